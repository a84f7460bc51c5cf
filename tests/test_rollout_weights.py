"""rollout_weights: what a rollout engine receives from each way of holding the policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
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
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "fsdp2_weights_worker.py"),
            str(tiny_model_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("full tensors match") == 2


def _small_lora_update(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """A peft LoRA on every linear layer whose update BA has `ratio` times the RMS of each base weight."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape))
                scale = module.get_base_layer().weight.float().pow(2).mean().sqrt()
                b.mul_(ratio * scale / module.get_delta_weight("default").float().pow(2).mean().sqrt())
    return peft_model


def test_merge_rounding_measures_the_update_lost_in_16_bit_weights(tiny_model_dir: Path) -> None:
    from thinktwice_pl.rollout.weights import MergeRounding

    model = _small_lora_update(load_causal_lm(str(tiny_model_dir), dtype="bfloat16"), ratio=1e-4)
    rounding = MergeRounding()
    merged = dict(rollout_weights(model, rounding=rounding))
    error_sq = delta_sq = 0.0  # the same figure, layer by layer from peft's own delta
    for name, module in model.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            base = module.get_base_layer().weight.float()
            delta = module.get_delta_weight("default").detach().float()
            carried = merged[name.removeprefix("base_model.model.") + ".weight"].float() - base
            error_sq += float((carried - delta).pow(2).sum())
            delta_sq += float(delta.pow(2).sum())
    assert rounding.lost == pytest.approx((error_sq / delta_sq) ** 0.5, rel=1e-6)
    assert rounding.lost > 0.9  # an update of 1e-4 of W's size is mostly below half a bf16 spacing of W
    exact = MergeRounding()
    fp32 = _small_lora_update(load_causal_lm(str(tiny_model_dir)), ratio=1e-4)
    list(rollout_weights(fp32, rounding=exact))
    assert exact.lost < 1e-3  # fp32 weights carry it
    cast = MergeRounding()  # the same fp32 policy pushed into a bf16 engine
    weights = dict(rollout_weights(fp32, dtype=torch.bfloat16, rounding=cast))
    assert cast.lost > 0.9 and {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert MergeRounding().lost == 0.0
