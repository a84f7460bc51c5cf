"""``python -m thinktwice_pl`` with a fault injected, for tests/test_crash.py. The faults live here, in the tests;
the package has no test hooks.

    python tests/fault_fit.py fit --config configs/tiny.yaml ...

The command runs as ``python -m thinktwice_pl`` would (same ``sys.argv[0]``, so a crash prints the same resume
command); environment variables choose the fault:

- ``FAULT_OOM_PHASE=k``: the first forward pass of phase batch k raises ``torch.OutOfMemoryError`` from inside the
  model's forward (the decoder's), as CUDA does when an allocation fails.
- ``FAULT_PAUSE_AFTER_PHASE=k``: once phase batch k is logged (its metrics row is on disk) the process sleeps, so
  that a test can kill it between two phases.
- ``FAULT_KILL_IN_ROUND=k:r``: the process SIGKILLs itself as generation round r (0 = the first) of phase batch k
  starts (dynamic sampling), between two rounds of one phase.
- ``FAULT_SLOW_SAVES=1``: every checkpoint is written in 64 KiB chunks, 50 ms apart, so that a test can kill the
  process in the middle of a write.

With several processes Lightning starts the other ranks as ``python -m thinktwice_pl.__main__``, without these
faults; `SigtermInPhase` is a callback given on the command line instead, so every rank has it.
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class SigtermInPhase(Callback):
    """Sends this process SIGTERM during phase batch `phase`, as a scheduler signals every rank of a job, each at
    its own moment: rank 0 as the phase ends, the other ranks as it starts.

        --trainer.callbacks+=fault_fit.SigtermInPhase --trainer.callbacks.phase=2
    """

    def __init__(self, phase: int) -> None:
        self.phase = phase

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch.index == self.phase and trainer.global_rank != 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch.index == self.phase and trainer.global_rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def _oom_in_phase(phase: int) -> None:
    from thinktwice_pl.module import ThinkTwiceModule

    original = ThinkTwiceModule.training_step

    def training_step(self: Any, batch: Any, batch_idx: int) -> Any:
        if batch.index != phase:
            return original(self, batch, batch_idx)

        def fail(module: Any, args: Any) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by fault_fit.py)")

        handle = self.policy.get_decoder().register_forward_pre_hook(fail)
        try:
            return original(self, batch, batch_idx)
        finally:
            handle.remove()

    ThinkTwiceModule.training_step = training_step  # type: ignore[method-assign]


def _pause_after_phase(phase: int) -> None:
    from thinktwice_pl.callbacks.phase_log import PhaseLogger

    original = PhaseLogger.on_train_batch_end

    def on_train_batch_end(self: Any, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        original(self, trainer, pl_module, outputs, batch, batch_idx)
        if batch.index == phase:
            time.sleep(600)

    PhaseLogger.on_train_batch_end = on_train_batch_end  # type: ignore[method-assign]


def _kill_in_round(phase: int, round_: int) -> None:
    from thinktwice_pl.callbacks.rollout import RolloutCallback

    original = RolloutCallback.sample

    def sample(self: Any, trainer: Any, pl_module: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        if batch.index == phase and (args[2] if len(args) > 2 else kwargs.get("round_", 0)) == round_:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, trainer, pl_module, batch, *args, **kwargs)

    RolloutCallback.sample = sample  # type: ignore[method-assign]


def _slow_saves() -> None:
    real_save = torch.save

    def slow_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, str | os.PathLike):
            real_save(obj, f, *args, **kwargs)
            return
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        for start in range(0, len(data), 1 << 16):
            f.write(data[start : start + (1 << 16)])
            f.flush()
            time.sleep(0.05)

    torch.save = slow_save


if __name__ == "__main__":
    if "FAULT_OOM_PHASE" in os.environ:
        _oom_in_phase(int(os.environ["FAULT_OOM_PHASE"]))
    if "FAULT_PAUSE_AFTER_PHASE" in os.environ:
        _pause_after_phase(int(os.environ["FAULT_PAUSE_AFTER_PHASE"]))
    if "FAULT_KILL_IN_ROUND" in os.environ:
        _kill_in_round(*map(int, os.environ["FAULT_KILL_IN_ROUND"].split(":")))
    if os.environ.get("FAULT_SLOW_SAVES"):
        _slow_saves()
    runpy.run_module("thinktwice_pl", run_name="__main__", alter_sys=True)
