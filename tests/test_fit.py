"""Short real fits on the tiny model: phases alternate, metrics are logged, weights move, resume is exact."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from fit_helpers import quiet_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from metrics_helpers import train_phases

from thinktwice_pl.callbacks import RolloutCallback
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.prompts import encode_chat, refine_messages
from thinktwice_pl.types import PhaseBatch

PHASE_KEYS = [
    "reward_mean",
    "reward_std",
    "frac_zero_std_groups",
    "completion_len_mean",
    "truncated_frac",
    "loss",
    "grad_norm",
    "reward_errors",
]
REFINE_KEYS = ["base_correct_frac", "reward_share_from_wrong"]


def _fit(
    tiny_model_dir: Path,
    root: Path,
    *,
    max_steps: int,
    ckpt_path: str | None = None,
    refine: bool = True,
    callbacks: list[Any] | None = None,
    data_kw: dict[str, Any] | None = None,
    rollout_kw: dict[str, Any] | None = None,
    **module_kw: Any,
) -> tuple[ThinkTwiceModule, pd.DataFrame]:
    """A fit of 2 problems x 4 samples per phase, 2 optimizer steps per phase; returns the module and metrics."""
    pl.seed_everything(0)
    kwargs = {"learning_rate": 1e-2, "weight_decay": 0.0, "mini_batch_problems": 1, **module_kw}
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir),
        problems_per_batch=2,
        num_generations=4,
        max_completion_length=12,
        **kwargs,
    )
    data = ThinkTwiceDataModule(
        train=ProblemSource(path="procedural", num_problems=16),
        problems_per_batch=2,
        refine=refine,
        seed=0,
        **(data_kw or {}),
    )
    rollout = RolloutCallback(
        **{
            "num_generations": 4,
            "max_completion_length": 12,
            "reward_workers": 0,
            "reward": "signal_rewards.even_length",
            **(rollout_kw or {}),
        }
    )
    trainer = quiet_trainer(
        root, rollout, *(callbacks or []), max_steps=max_steps, enable_checkpointing=bool(callbacks)
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    return module, metrics


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ThinkTwiceModule, pd.DataFrame]:
    """One fit of 4 phases (solve, refine, solve, refine; 2 optimizer steps each), shared by the tests below."""
    return _fit(tiny_model_dir, tmp_path_factory.mktemp("reference"), max_steps=8)


def test_fit_alternates_phases_logs_metrics_and_updates_weights(
    tiny_model_dir: Path, reference: tuple[ThinkTwiceModule, pd.DataFrame]
) -> None:
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    module, metrics = reference
    assert train_phases(metrics) == ["solve", "refine", "solve", "refine"]
    assert metrics["step"].tolist() == [0, 1, 2, 3]  # one row per phase, step = phase index
    for phase in ("solve", "refine"):
        rows = metrics[metrics[f"train/{phase}/reward_mean"].notna()]
        for key in PHASE_KEYS:
            assert rows[f"train/{phase}/{key}"].notna().all(), f"train/{phase}/{key} missing"
        assert (rows[f"train/{phase}/reward_errors"] == 0).all()
        assert (rows[f"train/{phase}/trained_frac"] > 0).any(), "no sequence had a non-zero advantage"
    refine_rows = metrics[metrics["train/refine/reward_mean"].notna()]
    for key in REFINE_KEYS:
        assert refine_rows[f"train/refine/{key}"].between(0, 1).all()
    for key in ("perf/generate_s", "perf/train_s", "perf/sync_s", "perf/tokens_per_s"):
        assert metrics[key].notna().all()
    assert module.trainer.global_step == 8  # 4 phases x 2 optimizer steps
    assert module.trainer.optimizers[0].param_groups[0]["fused"], "CPU parameters: fused AdamW, not the slow loop"
    changed = [n for n, p in module.policy.state_dict().items() if not torch.equal(p, initial[n])]
    assert len(changed) == len(initial), "every parameter should move (weight decay 0, non-zero advantages)"
    samples = (Path(module.trainer.logger.log_dir) / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 8  # log_completions=2 per phase


def test_grpo_baseline_serves_solve_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, metrics = _fit(tiny_model_dir, tmp_path, max_steps=4, refine=False)
    assert train_phases(metrics) == ["solve", "solve"]


def test_same_seed_same_metrics(tiny_model_dir: Path, tmp_path: Path, reference) -> None:
    _, again = _fit(tiny_model_dir, tmp_path, max_steps=4)  # the reference's first two phases, run again
    columns = [c for c in again.columns if c.startswith("train/")]
    pd.testing.assert_frame_equal(again[columns], reference[1][columns].iloc[:2])


def test_resume_after_solve_step_continues_with_refine(tiny_model_dir: Path, tmp_path: Path, reference) -> None:
    continuous = reference[1]  # solve, refine, ... without interruption
    # stop after the solve phase (2 optimizer steps), checkpointing there
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _fit(tiny_model_dir, tmp_path / "first", max_steps=2, callbacks=[ckpt])
    saved = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert saved.exists(), list((tmp_path / "ckpt").iterdir())
    state = torch.load(saved, weights_only=False)["ThinkTwiceDataModule"]
    assert state["cursor"] == 1 and state["cache"] is not None  # the solve rollouts travel in the checkpoint
    module, resumed = _fit(tiny_model_dir, tmp_path / "resumed", max_steps=4, ckpt_path=str(saved))
    assert train_phases(resumed) == ["refine"]
    assert resumed["step"].tolist() == [1]
    columns = [c for c in resumed.columns if c.startswith("train/refine/")]
    expected = continuous[continuous["step"] == 1][columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(resumed[columns].reset_index(drop=True), expected)
    assert module.trainer.global_step == 4


def test_beta_kl_against_frozen_reference(tiny_model_dir: Path, tmp_path: Path) -> None:
    # one optimizer step per phase: the first solve step runs with policy == reference
    module, metrics = _fit(tiny_model_dir, tmp_path, max_steps=2, beta=0.1, mini_batch_problems=2)
    assert module.ref_policy is not None
    kl = metrics["train/solve/kl"].dropna().tolist() + metrics["train/refine/kl"].dropna().tolist()
    assert kl[0] == pytest.approx(0.0, abs=1e-7)
    assert kl[-1] > 0  # after updates the policy has moved away from the frozen copy
    assert all(math.isfinite(v) for v in kl)
    ref_keys = [k for k in module.state_dict() if k.startswith("ref_policy.")]
    assert ref_keys  # registered as a module ...
    ckpt = tmp_path / "manual.ckpt"
    module.trainer.save_checkpoint(ckpt)
    assert not [k for k in torch.load(ckpt, weights_only=False)["state_dict"] if k.startswith("ref_policy.")]


def test_mask_truncated_completions_leaves_them_out_of_the_loss(tiny_model_dir: Path, tmp_path: Path) -> None:
    _, plain = _fit(tiny_model_dir, tmp_path / "plain", max_steps=2, mini_batch_problems=2)
    _, masked = _fit(
        tiny_model_dir, tmp_path / "masked", max_steps=2, mini_batch_problems=2, mask_truncated_completions=True
    )
    # the random tiny model never stops within 12 tokens: every completion is truncated
    assert plain["train/solve/truncated_frac"].dropna().tolist() == [1.0]
    assert masked["train/solve/truncated_frac"].dropna().tolist() == [1.0]
    assert plain["train/solve/trained_frac"].dropna().item() > 0 and plain["train/solve/grad_norm"].dropna().item() > 0
    assert masked["train/solve/grad_norm"].dropna().item() == 0.0  # nothing entered the loss
    assert masked["train/solve/trained_frac"].dropna().item() == 0.0
    assert "train/solve/clip_frac_low" not in masked.columns or masked["train/solve/clip_frac_low"].isna().all()


def test_missing_rollout_callback_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=2, mini_batch_problems=1, num_generations=2
    )
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=8), problems_per_batch=2)
    trainer = quiet_trainer(tmp_path, log=None, max_steps=1)
    with pytest.raises(RuntimeError, match="RolloutCallback is missing"):
        trainer.fit(module, datamodule=data)


def test_geometry_errors_name_the_flags() -> None:
    with pytest.raises(ValueError, match=r"data.problems_per_batch=6 is not divisible by model.mini_batch_problems=4"):
        ThinkTwiceModule(problems_per_batch=6, mini_batch_problems=4)
    with pytest.raises(ValueError, match="num_generations"):
        ThinkTwiceModule(num_generations=1)


class InjectNaN(Callback):
    """Turns the gradient of one weight into NaN in the backward passes of the first optimizer step only."""

    def __init__(self) -> None:
        self.handle: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        weight = next(p for p in pl_module.policy.parameters() if p.requires_grad)
        self.handle = weight.register_hook(lambda grad: grad * float("nan"))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self.handle is not None:  # after the first step's backward passes
            self.handle.remove()
            self.handle = None


def test_non_finite_gradient_skips_the_step_and_the_run_goes_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    # beta > 0: every sequence is in the loss, so the first step runs a backward (and the NaN hook) whatever its
    # groups' rewards were
    with pytest.warns(UserWarning, match=r"phase batch 0 \(solve\): the gradient norm is NaN or infinite"):
        module, metrics = _fit(tiny_model_dir, tmp_path, max_steps=4, callbacks=[InjectNaN()], beta=0.04)
    assert module.trainer.global_step == 4  # the skipped step still counts: phases and steps stay aligned
    skipped = metrics.set_index("step")["train/solve/skipped_steps"].dropna()
    assert skipped.to_dict() == {0: 1.0}, "the first solve step (of 2) is skipped, nothing else"
    assert metrics["train/refine/skipped_steps"].dropna().tolist() == [0.0]
    optimizer = module.trainer.optimizers[0]
    steps = {int(state["step"]) for state in optimizer.state.values()}
    assert steps == {3}, "AdamW stepped 3 of the 4 optimizer steps (no moment or weight-decay update on the skip)"
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert metrics["train/solve/grad_norm"].dropna().map(math.isfinite).all()  # the mean over applied steps


class _PhaseRecorder(pl.Callback):
    """Keeps each phase batch as the module trained on it."""

    def __init__(self) -> None:
        self.batches: list[PhaseBatch] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches.append(batch)


def test_wrong_first_refine_phase_reviews_bases_of_the_whole_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    # problems with an even gold answer have only right answers, the others about half wrong: wrong_first then gives
    # both refine prompts of such a pair to the problem with wrong answers
    recorder = _PhaseRecorder()
    _, metrics = _fit(
        tiny_model_dir,
        tmp_path,
        max_steps=16,
        callbacks=[recorder],
        data_kw={"refine_selection": "wrong_first"},
        rollout_kw={"reward": "signal_rewards.even_answers_right"},
    )
    assert train_phases(metrics) == ["solve", "refine"] * 4
    refines = [b for b in recorder.batches if b.phase == "refine"]
    twice = [b for b in refines if len({p.id for p in b.prompt_problems}) < len(b.prompt_problems)]
    assert twice, "no pair had a problem without wrong answers next to one with several"
    for batch in refines:
        assert batch.bases is not None and batch.rollouts is not None
        assert [p.id for p in batch.prompt_problems] == [b.problem_id for b in batch.bases]
        groups = [batch.rollouts.rollouts[g * 4 : (g + 1) * 4] for g in range(2)]  # G = 4 refinements per base
        for base, group in zip(batch.bases, groups, strict=True):
            assert {(r.problem_id, r.base_text, r.base_correct) for r in group} == {
                (base.problem_id, base.completion_text, base.correct)
            }
        row = metrics[metrics["step"] == batch.index].iloc[0]
        assert row["train/refine/base_correct_frac"] == sum(b.correct for b in batch.bases) / 2
    for batch in twice:
        assert not any(b.correct for b in batch.bases) and len({b.completion_text for b in batch.bases}) == 2


def test_fit_with_long_refine_prompts_truncates_counts_and_warns_once(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # with the tiny tokenizer solve prompts take at most 121 tokens, refine prompts over 230
    recorder = _PhaseRecorder()
    with caplog.at_level(logging.WARNING, logger="thinktwice_pl.callbacks.rollout"):
        module, metrics = _fit(
            tiny_model_dir, tmp_path, max_steps=8, callbacks=[recorder], rollout_kw={"max_prompt_length": 200}
        )
    assert train_phases(metrics) == ["solve", "refine", "solve", "refine"]
    assert metrics["train/refine/truncated_prompts"].dropna().tolist() == [2.0, 2.0]  # both prompts of each phase
    warnings = [r.getMessage() for r in caplog.records if "rollout.max_prompt_length" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 2 refine prompts" in warnings[0], warnings
    tokenizer = module.tokenizer
    for batch in recorder.batches:
        assert batch.rollouts is not None
        if batch.phase == "solve":
            assert all(len(r.prompt_ids) < 200 for r in batch.rollouts.rollouts)
            continue
        assert batch.bases is not None
        for g, (problem, base) in enumerate(zip(batch.prompt_problems, batch.bases, strict=True)):
            full = encode_chat(refine_messages(problem.prompt_text, base.completion_text, tokenizer), tokenizer)
            assert len(full) > 200
            assert batch.rollouts.rollouts[g * 4].prompt_ids == full[-200:]  # the last 200 tokens were trained on
