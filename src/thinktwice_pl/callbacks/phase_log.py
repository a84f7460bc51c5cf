"""PhaseLogger: one logger row per phase, a few sample completions, and the warnings of a run learning nothing.

The module's `training_step` returns the phase's metrics; they reach this callback as `outputs`, and the row adds
``perf/sync_s``, the weight-sync time the `RolloutCallback` puts on the batch (``PhaseBatch.sync_s``) in its own
``on_train_batch_end``, which runs first, and the counts of dynamic sampling and the overlong penalty
(``PhaseBatch.sampling``) when they are on. Lightning would write one row per optimizer step and repeat the other
phase's last values in each; here every phase is one row at ``step`` = phase index, as the reference code counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from thinktwice_pl.checkpointing import atomic_write_text
from thinktwice_pl.types import PhaseBatch

WARN_EVERY_PHASES = 20


class PhaseLogger(Callback):
    """Writes each phase's metrics as one logger row, sample completions to ``<log_dir>/samples.jsonl`` (and
    TensorBoard), and warns, at most every 20 phases, when most completions are truncated, most groups have zero
    reward variance, or an optimizer step was skipped on a non-finite gradient.

    The module adds it through ``configure_callbacks``, after the trainer's callbacks (so after the RolloutCallback's
    weight sync). Once the row and samples are written it sets ``PhaseBatch.logged``, which `CrashCheckpoint` reads.

    Args:
        log_completions: sample completions written per phase (the first sample of the first groups; 0 = none).
    """

    def __init__(self, log_completions: int = 2) -> None:
        super().__init__()
        self.log_completions = log_completions
        self._warned_at: dict[str, int] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run in its old folder: drop the samples of the phases after the checkpoint (they are redone)."""
        if not trainer.ckpt_path:
            return
        log_dir = trainer.log_dir  # on every rank: with several, it is a broadcast from rank 0
        if trainer.is_global_zero and log_dir:
            trim_samples(Path(log_dir) / "samples.jsonl", trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, PhaseBatch) or not outputs:
            return
        metrics = {key: float(value) for key, value in outputs.items()}
        if batch.sync_s is not None:
            metrics["perf/sync_s"] = batch.sync_s
        if batch.sampling is not None:
            metrics.update(batch.sampling.metrics(batch.phase))
        size = len(batch.rollouts.rollouts) if batch.rollouts is not None else 1
        # callback_metrics (monitors, early stopping) and the progress bar; the loggers get the row below
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, batch_size=size, logger=False)
        reward = metrics.get(f"train/{batch.phase}/reward_mean")
        if reward is not None:
            pl_module.log(
                f"{batch.phase}_reward",
                reward,
                prog_bar=True,
                on_step=True,
                on_epoch=False,
                batch_size=size,
                logger=False,
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**metrics, "epoch": float(batch.epoch)}, step=batch.index)
                logger.save()  # on disk after every phase: a killed run loses no row (CSVLogger keeps 100 in memory)
        self._warn(batch, metrics)
        self._write_samples(trainer, batch)
        batch.logged = True

    def _warn(self, batch: PhaseBatch, metrics: dict[str, float]) -> None:
        """The usual causes of a run that silently learns nothing, and skipped updates."""
        phase = batch.phase
        truncated = metrics.get(f"train/{phase}/truncated_frac", 0.0)
        zero_std = metrics.get(f"train/{phase}/frac_zero_std_groups", 0.0)
        skipped = metrics.get(f"train/{phase}/skipped_steps", 0.0)
        truncated_message = (
            f"{truncated:.0%} of {phase} completions hit rollout.max_completion_length: raise it, or the model is "
            "not finishing its answers"
        )
        zero_std_message = (
            f"{zero_std:.0%} of {phase} groups have the same reward for all samples (zero advantage, no gradient): "
            "problems too easy/hard, or the grader never matches (check the sample completions and rollout.reward)"
        )
        nonfinite_message = (
            "the gradient norm is NaN or infinite, so an optimizer step was skipped (no update, gradients dropped) and "
            "counted in train/<phase>/skipped_steps; the run goes on. Repeated skips point at the data (a degenerate "
            "completion), the learning rate or precision"
        )
        checks = {
            "truncated": (truncated > 0.5, truncated_message),
            "zero_std": (zero_std > 0.9, zero_std_message),
            "nonfinite": (skipped > 0, nonfinite_message),
        }
        for key, (bad, message) in checks.items():
            last = self._warned_at.get(key)
            if bad and (last is None or batch.index - last >= WARN_EVERY_PHASES):
                self._warned_at[key] = batch.index
                rank_zero_warn(f"phase batch {batch.index} ({phase}): {message}")

    def _write_samples(self, trainer: pl.Trainer, batch: PhaseBatch) -> None:
        """A few sample completions: always to <log_dir>/samples.jsonl, and to TensorBoard as text."""
        if self.log_completions <= 0 or batch.rollouts is None:
            return
        log_dir = trainer.log_dir  # on every rank: with several, it is a broadcast from rank 0
        if not trainer.is_global_zero:
            return
        group_size = batch.rollouts.group_size
        picks = batch.rollouts.rollouts[: self.log_completions * group_size : group_size]  # first of each group
        problems = {p.id: p for p in batch.problems}
        records = [
            {
                "step": trainer.global_step,
                "phase": batch.phase,
                "problem": problems[r.problem_id].prompt_text,
                "answer": problems[r.problem_id].answer,
                "base": r.base_text,
                "completion": r.completion_text,
                "reward": r.reward,
                "finish_reason": r.finish_reason,
            }
            for r in picks
        ]
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(log_dir) / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                text = "\n\n---\n\n".join(f"**reward {r['reward']}**\n\n```\n{r['completion']}\n```" for r in records)
                experiment.add_text(f"samples/{batch.phase}", text, trainer.global_step)


def trim_samples(path: Path, global_step: int) -> None:
    """Keep the records of a ``samples.jsonl`` written at optimizer steps up to `global_step`; a line cut short by
    a kill is dropped. The file is replaced atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and int(record.get("step", 0)) <= global_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
