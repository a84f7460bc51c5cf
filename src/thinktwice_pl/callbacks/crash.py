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

With several processes (DDP, FSDP2) saving is collective, so every rank must stop at the same point:

- a SIGTERM only marks this rank (it replaces Lightning's handler, which broadcasts from inside the handler, at
  whatever collective the ranks are in, and lets each rank stop on its own flag);
- at the end of every phase all ranks all-reduce their marks; if any rank was signalled, every rank sets Lightning's
  SIGTERM flag there, so that all of them raise at the same phase boundary and save the crash checkpoint together.
  A signal that arrives after that all-reduce counts at the next phase's end;
- any other failure (a rank that fails alone) writes nothing; the note points at ``--ckpt_path last``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from thinktwice_pl.data import ThinkTwiceDataModule, thinktwice_data
from thinktwice_pl.errors import add_note
from thinktwice_pl.lightning_shims import stop_as_on_sigterm
from thinktwice_pl.resume import display_path, resolve_last, resume_command
from thinktwice_pl.types import PhaseBatch


class CrashCheckpoint(Callback):
    """Saves ``<log_dir>/checkpoints/crash-step=<N>.ckpt`` when a fit fails after its first optimizer step, at the
    state of the last completed phase, and adds the resume command to the error. No arguments.

    A phase counts as completed when the `ThinkTwiceDataModule` counts it done (its ``cursor``, advanced by the
    RolloutCallback) and `PhaseLogger` has written its row (``PhaseBatch.logged``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.command: list[str] | None = None
        """The command line of this run (set by the ``thinktwice`` command; None: ``sys.argv``)."""
        self.saved: Path | None = None
        self._data: ThinkTwiceDataModule | None = None  # set in setup: read in on_exception, which must not fail
        self._phase: PhaseBatch | None = None  # the phase batch in progress, None between phases
        self._steps_at_phase_start = 0
        self._signalled = False  # several processes: this rank received SIGTERM
        self._stopping = False  # several processes: all ranks agreed to stop at this phase boundary

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._data = thinktwice_data(trainer, "CrashCheckpoint")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """With several processes, SIGTERM only marks this rank (Lightning restores the previous handler when the
        fit ends). Lightning installs its own handler just before this hook."""
        self._signalled = self._stopping = False
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._mark_sigterm)

    def _mark_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """The phase boundary: with several processes, stop every rank here when any rank was signalled."""
        if trainer.world_size == 1 or not torch.distributed.is_initialized():
            return
        marks = torch.tensor([int(self._signalled)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(marks, op=torch.distributed.ReduceOp.MAX)  # every rank, once per phase
        if marks.item():
            self._stopping = True
            stop_as_on_sigterm(trainer)  # every rank raises SIGTERMException after this phase's hooks

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
        several = trainer.world_size > 1
        if several and not (self._stopping and isinstance(exception, SIGTERMException)):
            add_note(exception, f"No crash checkpoint with {trainer.world_size} processes; {self._newest(trainer)}")
            return
        completed = self._phase is None or not applied or self._completed(self._phase)
        if several:  # every rank is here, at the same phase boundary: decide together, then save together
            completed = _on_every_rank(trainer, completed)
        if not completed:
            assert self._phase is not None
            phase = f"phase {self._phase.index} ({self._phase.phase})"
            gone = f"had applied {applied} optimizer step(s), so the state of a completed phase is gone"
            _note(trainer, exception, f"No crash checkpoint: {phase} {gone}; {self._newest(trainer)}")
            return
        name = f"crash-step={trainer.global_step}.ckpt"
        path = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / name  # log_dir: rank 0's
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as error:  # never hide the original failure behind this one
            failed = f"The crash checkpoint could not be written ({type(error).__name__}: {error})"
            _note(trainer, exception, f"{failed}; {self._newest(trainer)}")
            return
        self.saved = path
        done = f"{self._data.cursor} phases, " if self._data is not None else ""
        saved = f"Saved the run after {done}{trainer.global_step} optimizer steps to {display_path(path)}."
        _note(trainer, exception, f"{saved} Resume with:\n  {resume_command(self.command, path)}")

    def _completed(self, phase: PhaseBatch) -> bool:
        """Whether `phase` had finished when the failure came: the data module counts it done and its metrics row is
        written (e.g. after a SIGTERM, which Lightning raises as an exception once the batch's hooks have run)."""
        done = self._data is not None and self._data.cursor == phase.index + 1
        return done and phase.logged

    def _newest(self, trainer: pl.Trainer) -> str:
        latest = resolve_last(trainer)
        if latest is None:
            return "this run has no checkpoint yet."
        return (
            f"the newest checkpoint of this run is {display_path(latest)}. Resume with:\n"
            f"  {resume_command(self.command, latest)}"
        )


def _note(trainer: pl.Trainer, exception: BaseException, note: str) -> None:
    """A note on rank 0's exception only: with several processes every rank ends with it, rank 0 prints the run's."""
    if trainer.is_global_zero:
        add_note(exception, note)


def _on_every_rank(trainer: pl.Trainer, flag: bool) -> bool:
    """Whether `flag` holds on every rank (a collective: every rank must call it)."""
    value = torch.tensor([int(flag)], device=trainer.strategy.root_device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())
