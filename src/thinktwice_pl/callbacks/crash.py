"""CrashCheckpoint: when a fit fails, save the run as it stood after its last completed phase, and say how to resume.

Lightning's ``OnExceptionCheckpoint`` writes into a fixed folder shared by every run of a config, even when training
never started, and its presence makes every later ``fit`` in that folder resume from the file without being asked.
This callback instead:

- writes only once training has started (at least one optimizer step) and only when the state in memory is that of
  a completed phase: the failure came before the failing phase applied any optimizer step (in generation, grading,
  the first forward/backward, validation, or between phases). After some of a phase's optimizer steps the state is
  half a phase: no file is written (a resume from it could not be exact) and the note names the newest checkpoint;
- writes into the run's own ``<log_dir>/checkpoints/crash-step=<N>.ckpt`` (atomically, like every checkpoint of
  the ``thinktwice`` command), where ``--ckpt_path last`` finds it;
- adds a note to the exception that ends with the exact command that resumes: the command line of the failed run
  with ``--ckpt_path <that file>``;
- after a SIGTERM (a scheduler's polite kill), which Lightning raises as an exception once the current phase is
  done, saves that completed phase.

With several processes (DDP, FSDP2) no crash checkpoint is written: saving is collective, and a rank that failed
alone would leave the others waiting. The note then points at ``--ckpt_path last``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.errors import add_note
from thinktwice_pl.resume import display_path, resolve_last, resume_command
from thinktwice_pl.types import PhaseBatch


class CrashCheckpoint(Callback):
    """Saves ``<log_dir>/checkpoints/crash-step=<N>.ckpt`` when a fit fails after its first optimizer step, at the
    state of the last completed phase, and adds the resume command to the error. No arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.command: list[str] | None = None
        """The command line of this run (set by the ``thinktwice`` command; None: ``sys.argv``)."""
        self.saved: Path | None = None
        self._phase: PhaseBatch | None = None  # the phase batch in progress, None between phases
        self._steps_at_phase_start = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._phase = batch if isinstance(batch, PhaseBatch) else None
        self._steps_at_phase_start = trainer.global_step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._phase = None  # validation runs between phases

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        applied = trainer.global_step - self._steps_at_phase_start
        if trainer.world_size > 1:
            add_note(exception, f"No crash checkpoint with {trainer.world_size} processes; {self._newest(trainer)}")
            return
        if self._phase is not None and applied and not _completed(trainer, self._phase):
            add_note(exception, f"No crash checkpoint: phase {self._phase.index} ({self._phase.phase}) had applied "
                                f"{applied} optimizer step(s), so the state of a completed phase is gone; "
                                f"{self._newest(trainer)}")  # fmt: skip
            return
        name = f"crash-step={trainer.global_step}.ckpt"
        path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / name
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # never hide the original failure behind this one
            add_note(exception, f"The crash checkpoint could not be written ({type(error).__name__}: {error}); "
                                f"{self._newest(trainer)}")  # fmt: skip
            return
        self.saved = path
        phases = getattr(trainer.datamodule, "cursor", None)  # type: ignore[attr-defined]
        done = f"{phases} phases, " if isinstance(phases, int) else ""
        add_note(exception, f"Saved the run after {done}{trainer.global_step} optimizer steps to {display_path(path)}. "
                            f"Resume with:\n  {resume_command(self.command, path)}")  # fmt: skip

    def _newest(self, trainer: pl.Trainer) -> str:
        latest = resolve_last(trainer)
        if latest is None:
            return "this run has no checkpoint yet."
        return (f"the newest checkpoint of this run is {display_path(latest)}. Resume with:\n"
                f"  {resume_command(self.command, latest)}")  # fmt: skip


def _completed(trainer: pl.Trainer, phase: PhaseBatch) -> bool:
    """Whether `phase` had finished when the failure came: the data module counts it done and its metrics row is
    written (e.g. after a SIGTERM, which Lightning raises as an exception once the batch's hooks have run)."""
    done = getattr(trainer.datamodule, "cursor", None) == phase.index + 1  # type: ignore[attr-defined]
    logged = any(getattr(c, "last_logged", None) == phase.index for c in trainer.callbacks)  # type: ignore[attr-defined]
    return done and logged
