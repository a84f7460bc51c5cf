"""Precision of the paper recipe (METHOD.md section 4): fp32 master weights and AdamW state, bf16 compute.

At lr 1e-6 an AdamW step moves each weight by about 1e-6. bf16 holds 8 significant bits, so that step is lost on
any bf16 weight larger than about 2.6e-4 in magnitude: with pure bf16 weights (``bf16-true``) almost nothing
trains. These tests run real optimizer steps on a tiny model on the CPU (autocast supports bf16 there).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from thinktwice_pl import parallel
from thinktwice_pl.builtin_models import build_tiny_model
from thinktwice_pl.callbacks import RolloutCallback
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.models import LoraSettings, load_causal_lm
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.parallel import check_cpu_bf16, compute_dtype, lost_update_fraction
from thinktwice_pl.rollout.vllm import VLLMRolloutEngine


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # tied embeddings: the output head's gradient reaches every embedding row, so every weight gets a gradient
    return build_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True)


class DtypeProbe(Callback):
    """Records the output dtype of the first decoder layer's MLP projection (a matmul: bf16 under autocast, the
    weights' dtype otherwise; the residual stream stays fp32 either way) in the training forward (with grad) and
    while the HF engine generates (no grad, in on_train_batch_start: outside Lightning's training_step autocast)."""

    def __init__(self) -> None:
        self.seen: dict[str, set[torch.dtype]] = {"generate": set(), "train": set()}

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        policy = pl_module.policy
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        base.get_decoder().layers[0].mlp.down_proj.register_forward_hook(self._record)

    def _record(self, module: Any, args: Any, output: Any) -> None:
        self.seen["train" if torch.is_grad_enabled() else "generate"].add(output.dtype)


def _one_step(
    model_dir: Path, root: Path, *, precision: str, dtype: str, steps: int = 1, lora: LoraSettings | None = None
) -> tuple[ThinkTwiceModule, dict[str, torch.Tensor], DtypeProbe]:
    """`steps` optimizer steps (one per solve phase) of AdamW at lr 1e-6; returns the module, the initial weights of
    the trained parameters (as loaded, before any step) and the dtype probe."""
    pl.seed_everything(0)
    module = ThinkTwiceModule(
        model_name_or_path=str(model_dir),
        dtype=dtype,
        lora=lora,
        learning_rate=1e-6,
        problems_per_batch=2,
        mini_batch_problems=None,
        num_generations=4,
        max_completion_length=8,
    )
    initial: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
            initial.update({n: p.detach().clone() for n, p in pl_module.policy.named_parameters() if p.requires_grad})

    probe = DtypeProbe()
    rollout = RolloutCallback(
        num_generations=4, max_completion_length=8, reward="signal_rewards.even_length", reward_workers=0
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[Snapshot(), probe, rollout],
    )
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=8), problems_per_batch=2, refine=False, seed=0)
    trainer.fit(module, datamodule=data)
    return module, initial, probe


def _moved_fraction(module: ThinkTwiceModule, initial: dict[str, torch.Tensor]) -> float:
    params = dict(module.policy.named_parameters())
    moved = sum(int((params[name].detach() != before).sum()) for name, before in initial.items())
    return moved / sum(before.numel() for before in initial.values())


def test_bf16_mixed_keeps_fp32_weights_computes_in_bf16_and_moves_every_weight_at_lr_1e6(
    tied_model_dir: Path, tmp_path: Path
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the precision warning must not fire
        warnings.filterwarnings("ignore", message=".*(hit rollout.max_completion_length|same reward for all)")
        warnings.filterwarnings("ignore", message=".*this CPU has no bf16 hardware")  # on AVX2 machines: slow only
        module, initial, probe = _one_step(tied_model_dir, tmp_path, precision="bf16-mixed", dtype="float32")
    assert {p.dtype for p in module.policy.parameters()} == {torch.float32}  # master weights
    state = module.trainer.optimizers[0].state
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.float32}  # AdamW state
    assert probe.seen["train"] == {torch.bfloat16}, "the trainer's forward must run under bf16 autocast"
    assert probe.seen["generate"] == {torch.bfloat16}, "the HF engine must sample in the trainer's compute dtype"
    # AdamW's first step moves each weight with a gradient by lr * sign(grad); fp32 resolves it
    assert _moved_fraction(module, initial) > 0.9


def test_pure_bf16_at_lr_1e6_warns_and_barely_moves(tied_model_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"trainer.precision=bf16-true with model.dtype=bfloat16: .* round away"):
        module, initial, _ = _one_step(tied_model_dir, tmp_path, precision="bf16-true", dtype="bfloat16")
    assert {p.dtype for p in module.policy.parameters()} == {torch.bfloat16}
    assert _moved_fraction(module, initial) < 0.1  # the failure the warning names: the step is rounded away


def test_lora_adapters_stay_fp32_on_a_bf16_base_and_train_at_lr_1e6(tied_model_dir: Path, tmp_path: Path) -> None:
    lora = LoraSettings(rank=4, alpha=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(hit rollout.max_completion_length|same reward for all)")
        warnings.filterwarnings("ignore", message=".*this CPU has no bf16 hardware")  # on AVX2 machines: slow only
        module, initial, probe = _one_step(
            tied_model_dir, tmp_path, precision="bf16-mixed", dtype="bfloat16", lora=lora, steps=2
        )
    trained = {p.dtype for p in module.policy.parameters() if p.requires_grad}
    frozen = {p.dtype for p in module.policy.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
    assert probe.seen["train"] == {torch.bfloat16}
    # LoRA's B starts at 0, so A gets no gradient in the first step; after two steps both have moved
    assert _moved_fraction(module, initial) > 0.9


def test_lost_update_fraction_measures_bf16_resolution(tiny_model_dir: Path) -> None:
    model = load_causal_lm(str(tiny_model_dir))  # fp32: nothing is lost at any learning rate used here
    assert lost_update_fraction(model, 1e-6) == 0.0
    model = model.to(torch.bfloat16)
    assert lost_update_fraction(model, 1e-6) > 0.9  # weights of N(0, 0.02) and norms of 1.0 dwarf 256 x 1e-6
    assert lost_update_fraction(model, 1.0) == 0.0  # a step of 1.0 is above half the spacing of any weight < 256


def test_compute_dtype_follows_the_precision_flag_and_the_vllm_engine_uses_it(tiny_model_dir: Path) -> None:
    model = load_causal_lm(str(tiny_model_dir))
    assert compute_dtype("bf16-mixed", model) == torch.bfloat16
    assert compute_dtype("32-true", model) == torch.float32
    assert compute_dtype("bf16-true", model.to(torch.bfloat16)) == torch.bfloat16
    engine = VLLMRolloutEngine()  # the dtype choice only; no engine is started
    assert engine._engine_dtype(model.float(), torch.bfloat16) == "bfloat16"  # not the fp32 master weights
    assert engine._engine_dtype(model, None) == "float32"
    assert VLLMRolloutEngine(dtype="float16")._engine_dtype(model, torch.bfloat16) == "float16"  # explicit wins


def test_bf16_on_a_cpu_without_bf16_hardware_warns_with_the_fix(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    native = parallel.native_cpu_bf16()  # this machine's answer, from torch's CPU feature checks
    assert native == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    fp32, bf16 = load_causal_lm(str(tiny_model_dir)), load_causal_lm(str(tiny_model_dir), dtype="bfloat16")
    monkeypatch.setattr(parallel, "native_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match=r"precision=bf16-mixed .* no bf16 hardware .* 32-true"):
        assert check_cpu_bf16("bf16-mixed", fp32, "cpu")
    with pytest.warns(UserWarning, match=r"bfloat16 weights"):  # bf16 weights compute in bf16 under 32-true
        assert check_cpu_bf16("32-true", bf16, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not check_cpu_bf16("32-true", fp32, "cpu")
        assert not check_cpu_bf16("bf16-mixed", fp32, "cuda")
        monkeypatch.setattr(parallel, "native_cpu_bf16", lambda: True)
        assert not check_cpu_bf16("bf16-mixed", fp32, "cpu")
