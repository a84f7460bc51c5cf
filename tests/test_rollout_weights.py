"""rollout_weights: what a rollout engine receives from each way of holding the policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from thinktwice_pl.builtin_models import build_tiny_model
from thinktwice_pl.models import load_causal_lm
from thinktwice_pl.rollout.weights import rollout_weights

HERE = Path(__file__).resolve().parent


def test_plain_model_yields_every_parameter_once(tiny_model_dir: Path) -> None:
    model = load_causal_lm(str(tiny_model_dir))
    weights = dict(rollout_weights(model))
    assert list(weights) == [name for name, _ in model.named_parameters()]
    for name, param in model.named_parameters():
        assert weights[name] is not param and torch.equal(weights[name], param)
        assert not weights[name].requires_grad


def test_tied_embeddings_are_yielded_once_under_the_input_name(tmp_path: Path) -> None:
    model = load_causal_lm(str(build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)))
    names = [name for name, _ in rollout_weights(model)]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_fsdp2_sharded_policy_is_gathered_on_every_rank(tiny_model_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(HERE / "fsdp2_weights_worker.py"), str(tiny_model_dir)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("full tensors match") == 2
