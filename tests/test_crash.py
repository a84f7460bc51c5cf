"""Crash safety of the ``thinktwice`` command, tried as a user would: real processes that run out of memory, are
killed with SIGKILL between two phases and in the middle of a checkpoint write, and resume; two processes (DDP,
FSDP2) stopped by SIGTERM that save together and resume; a crash that must not leak into the next run; and the
one-line errors of user mistakes.

The faults come from tests/fault_fit.py (``python -m thinktwice_pl`` with an injected fault). Every fit uses
configs/tiny.yaml with a reward that varies within groups (signal_rewards.even_length), so every phase trains:
4 phases of 2 optimizer steps, checkpoints every 4 steps, validation before the first phase and after the fourth.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from fit_helpers import quiet_trainer, tiny_module
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from thinktwice_pl.callbacks import CrashCheckpoint, Evaluation, RolloutCallback
from thinktwice_pl.cli import main
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.errors import OutOfMemoryInPhase

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
TINY = str(ROOT / "configs" / "tiny.yaml")
SIGNAL = ["--rollout.reward", "signal_rewards.even_length", "--rollout.reward_workers", "0"]
FIT = ["fit", "--config", TINY, *SIGNAL]


def _env(**faults: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        **faults,
    }


def _start(args: list[str], cwd: Path, log: str, **faults: str) -> subprocess.Popen[bytes]:
    """``python tests/fault_fit.py <args>`` in `cwd`, output to `cwd/log`."""
    out = open(cwd / log, "wb")  # noqa: SIM115 - closed with the process, below
    process = subprocess.Popen(
        [sys.executable, str(TESTS / "fault_fit.py"), *args],
        cwd=cwd,
        env=_env(**faults),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    return process


def _finish(process: subprocess.Popen[bytes], cwd: Path, log: str, timeout: float = 120) -> tuple[int, str]:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"{log} ran for more than {timeout} s:\n{(cwd / log).read_text()[-3000:]}")
    return process.returncode, (cwd / log).read_text()


def _kill_when(process: subprocess.Popen[bytes], ready: Callable[[], bool], cwd: Path, log: str) -> None:
    """SIGKILL the process (no handler runs) as soon as `ready()`; fails if it ends or times out first."""
    deadline = time.monotonic() + 120
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"{log}: the moment to kill never came:\n{(cwd / log).read_text()[-3000:]}")
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL


def _phase_rows(metrics_csv: Path) -> list[int]:
    if not metrics_csv.is_file():
        return []
    with contextlib.suppress(pd.errors.EmptyDataError):
        metrics = pd.read_csv(metrics_csv)
        return sorted(metrics.loc[metrics.filter(like="train/").notna().any(axis=1), "step"].astype(int))
    return []


def _comparable(metrics: pd.DataFrame) -> pd.DataFrame:
    """Training and validation values by (step, kind): what two runs with the same seed must share (perf/ differs)."""
    kind = metrics.filter(like="val/").notna().any(axis=1).map({True: "val", False: "train"})
    columns = sorted(c for c in metrics.columns if c.startswith(("train/", "val/")))
    return metrics.assign(kind=kind).set_index(["step", "kind"])[columns].sort_index()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The uninterrupted fit, run in this process: its metrics.csv."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with contextlib.chdir(root):
        main(FIT)
    return pd.read_csv(root / "runs" / "tiny" / "version_0" / "metrics.csv")


@pytest.fixture(autouse=True)
def _shared_models_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The subprocesses build thinktwice:tiny in the same THINKTWICE_HOME as the in-process reference."""
    monkeypatch.setenv("THINKTWICE_HOME", str(tmp_path_factory.getbasetemp() / "thinktwice-home"))


@pytest.mark.slow
def test_sigkill_between_phases_and_during_a_checkpoint_write_loses_nothing(tmp_path: Path, reference) -> None:
    run = tmp_path / "runs" / "tiny" / "version_0"
    checkpoints = run / "checkpoints"

    # 1. killed between phase 2 and phase 3 (mid-pair: after the solve phase of the second problem batch)
    first = _start(FIT, tmp_path, "first.log", FAULT_PAUSE_AFTER_PHASE="2")
    _kill_when(first, lambda: 2 in _phase_rows(run / "metrics.csv"), tmp_path, "first.log")
    assert _phase_rows(run / "metrics.csv") == [0, 1, 2], "every finished phase's row is on disk at once"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]

    # 2. resumed from the newest checkpoint (after phase 1), killed while it writes the next one (after phase 3)
    second = _start([*FIT, "--ckpt_path", "last"], tmp_path, "second.log", FAULT_SLOW_SAVES="1")
    partial = []

    def writing() -> bool:
        partial[:] = [p for p in checkpoints.iterdir() if p.name.startswith(".") and p.stat().st_size > 100_000]
        return bool(partial)

    _kill_when(second, writing, tmp_path, "second.log")
    assert partial[0].name.startswith(".epoch=0-step=8.ckpt.partial-"), partial
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    for path in checkpoints.glob("*.ckpt"):  # nothing truncated under a name that a resume would load
        assert torch.load(path, weights_only=True)["global_step"] == 4, path
    assert _phase_rows(run / "metrics.csv") == [0, 1, 2, 3]

    # 3. resumed again: it redoes phases 2 and 3 from the checkpoint, then finishes
    code, out = _finish(_start([*FIT, "--ckpt_path", "last"], tmp_path, "third.log"), tmp_path, "third.log")
    assert code == 0, out[-3000:]
    assert "--ckpt_path last: runs/tiny/version_0/checkpoints/" in out
    assert "Resuming from runs/tiny/version_0/checkpoints/" in out and "(2 phases, 4 optimizer steps)" in out
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "the partial write is cleaned up"
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["version_0"]
    resumed = pd.read_csv(run / "metrics.csv")
    pd.testing.assert_frame_equal(_comparable(resumed), _comparable(reference))  # every phase once, same values
    samples = [json.loads(line)["step"] for line in (run / "samples.jsonl").open()]
    assert samples == [2, 4, 6, 8], "one sample per phase, the redone phases' samples once"
    assert (
        (run / "config.yaml").exists()
        and (run / "config.resume1.yaml").exists()
        and (run / "config.resume2.yaml").exists()
    )


@pytest.mark.slow
def test_crash_checkpoint_resumes_exactly_and_never_leaks_into_the_next_run(tmp_path: Path, reference) -> None:
    # a run runs out of memory in the forward pass of phase 3 (refine), after 3 phases = 6 optimizer steps
    code, out = _finish(_start(FIT, tmp_path, "oom.log", FAULT_OOM_PHASE="3"), tmp_path, "oom.log")
    assert code == 2 and "Traceback" not in out, out[-3000:]
    error, saved, command = out.rstrip("\n").split("\n")[-3:]
    assert error.startswith(
        "error: out of memory in phase 3 (refine), in a forward/backward pass of 16 of the phase's 16 sequences"
    ), error
    for knob in (
        "model.max_tokens_per_microbatch",
        "model.micro_batch_size",
        "model.gradient_checkpointing=true",
        "rollout.max_completion_length (now 16)",
    ):
        assert knob in error, knob
    longest = re.search(r"the longest (\d+) tokens: (\d+) prompt \+ (\d+) completion", error)
    assert longest, error
    total, prompt, completion = map(int, longest.groups())
    assert total == prompt + completion and prompt > 200 and 1 <= completion <= 16, error  # a refine prompt
    crash = "runs/tiny/version_0/checkpoints/crash-step=6.ckpt"
    assert saved == f"Saved the run after 3 phases, 6 optimizer steps to {crash}. Resume with:"
    assert command == f"  {shlex.join([sys.executable, '-m', 'thinktwice_pl', *FIT, '--ckpt_path', crash])}"
    assert torch.load(tmp_path / crash, weights_only=True)["ThinkTwiceDataModule"]["cursor"] == 3

    # another experiment in the same folder starts fresh: no restore, no notice about checkpoints, a new version
    other = ["fit", "--config", TINY, *SIGNAL, "--trainer.max_steps", "2", "--model.learning_rate", "0.05"]
    code, out = _finish(_start(other, tmp_path, "other.log"), tmp_path, "other.log")
    assert code == 0, out[-3000:]
    assert "Restoring" not in out and "ckpt_path" not in out and "checkpoint" not in out.lower(), out
    fresh = pd.read_csv(tmp_path / "runs" / "tiny" / "version_1" / "metrics.csv")
    assert _phase_rows(tmp_path / "runs" / "tiny" / "version_1" / "metrics.csv") == [0] and len(fresh) == 2

    # the printed command resumes the crashed run, in its own folder, exactly
    resume = subprocess.run(shlex.split(command), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert resume.returncode == 0, resume.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {crash}" in resume.stdout + resume.stderr
    resumed = pd.read_csv(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv")
    pd.testing.assert_frame_equal(_comparable(resumed), _comparable(reference))


# --------------------------------------------------------------------------------------------- two processes

TWO = {  # two gloo processes on CPU
    "ddp": ["--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "fsdp2": [
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size",
        "2",
        "--trainer.strategy.tensor_parallel_size",
        "1",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_sigterm_to_two_processes_saves_together_at_the_phase_boundary_and_resumes_there(
    strategy: str, tmp_path: Path
) -> None:
    """A scheduler signals every rank, each at its own moment (tests/fault_fit.SigtermInPhase: rank 1 as phase 2
    starts, rank 0 as it ends): both ranks stop after phase 2 and save one crash checkpoint together; ``--ckpt_path
    last`` goes on with phase 3, and (DDP) the metrics equal those of an uninterrupted two-process run."""
    fit = ["fit", "--config", TINY, *SIGNAL, *TWO[strategy]]
    run = tmp_path / "runs" / "tiny" / "version_0"

    sigterm = ["--trainer.callbacks+=fault_fit.SigtermInPhase", "--trainer.callbacks.phase=2"]
    code, out = _finish(_start([*fit, *sigterm], tmp_path, "stopped.log"), tmp_path, "stopped.log")
    assert code == 143, out[-3000:]
    crash = "runs/tiny/version_0/checkpoints/crash-step=6.ckpt"
    command = shlex.join([sys.executable, "-m", "thinktwice_pl", *fit, *sigterm, "--ckpt_path", crash])
    lines = out.split("\n")
    assert "stopped: SIGTERM received (the current phase was finished first)" in lines, out[-3000:]
    saved = lines.index(f"Saved the run after 3 phases, 6 optimizer steps to {crash}. Resume with:")
    assert lines[saved + 1] == f"  {command}" and out.count("Resume with") == 1, out[-3000:]
    assert _phase_rows(run / "metrics.csv") == [0, 1, 2]
    assert (run / "rectify_fortify.csv").exists()  # the tracker's rank-0 writes do not stall the ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "crash-step=6.ckpt",
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    if strategy == "ddp":
        state = torch.load(tmp_path / crash, weights_only=True)
        assert (state["global_step"], state["ThinkTwiceDataModule"]["cursor"]) == (6, 3)
    else:
        assert len(list((tmp_path / crash).glob("*.distcp"))) == 2, "one shard per rank"

    code, out = _finish(_start([*fit, "--ckpt_path", "last"], tmp_path, "resumed.log"), tmp_path, "resumed.log")
    assert code == 0, out[-3000:]
    assert f"Resuming from {crash} (3 phases, 6 optimizer steps)" in out, out[-3000:]
    resumed = pd.read_csv(run / "metrics.csv")
    assert _phase_rows(run / "metrics.csv") == [0, 1, 2, 3] and len(resumed) == 6, "4 phases, 2 validations, once"
    if strategy == "ddp":
        (tmp_path / "reference").mkdir()
        code, out = _finish(_start(fit, tmp_path / "reference", "fit.log"), tmp_path / "reference", "fit.log")
        assert code == 0, out[-3000:]
        reference = pd.read_csv(tmp_path / "reference" / "runs" / "tiny" / "version_0" / "metrics.csv")
        pd.testing.assert_frame_equal(_comparable(resumed), _comparable(reference))


# --------------------------------------------------------------------------------------------- user errors

BAD_ROWS = '{"problem": "1 + 1?", "answer": "2"}\n{"problem": "2 + 2?", "solution": "4"}\n'
OLD_CONFIG = (
    Path(TINY)
    .read_text()
    .replace(
        "    - class_path: thinktwice_pl.callbacks.CrashCheckpoint",
        "    - class_path: lightning.pytorch.callbacks.OnExceptionCheckpoint\n"
        "      init_args:\n        dirpath: runs/tiny/on_exception\n    # was CrashCheckpoint",
    )
)
USER_ERRORS = {  # case: (arguments after `fit --config tiny.yaml`, files to write, the last line's start)
    "model-path": (
        ["--model.model_name_or_path", "./models/my-modle"],
        {},
        "error: model.model_name_or_path=./models/my-modle is neither a local directory nor a hub name",
    ),
    "empty-file": (
        ["--data.train.path", "empty.jsonl"],
        {"empty.jsonl": ""},
        "error: empty.jsonl has no rows: give it one problem per row",
    ),
    "bad-row": (
        ["--data.train.path", "bad.jsonl"],
        {"bad.jsonl": BAD_ROWS},
        "error: row 2 of bad.jsonl has no 'answer' field (set data.train.answer_field to the column that "
        "holds it, or data.train.on_bad_row=skip to skip such rows)",
    ),
    "flags": (
        ["--data.problems_per_batch", "5"],
        {},
        "error: data.problems_per_batch=5 is not divisible by model.mini_batch_problems=2",
    ),
    "checkpoint-path": (
        ["--ckpt_path", "runs/tiny/version_3/checkpoints/last.ckpt"],
        {},
        "error: --ckpt_path runs/tiny/version_3/checkpoints/last.ckpt does not exist",
    ),
    "on-exception-checkpoint": (
        ["--config", "old.yaml"],
        {"old.yaml": OLD_CONFIG},
        "error: trainer.callbacks holds lightning's OnExceptionCheckpoint",
    ),
    "debug": (
        ["--model.model_name_or_path", "./models/my-modle", "--debug"],
        {},
        "thinktwice_pl.errors.UserError: model.model_name_or_path=./models/my-modle is neither",
    ),
}


@pytest.fixture(scope="module")
def user_error_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Every case of USER_ERRORS as its own ``python -m thinktwice_pl fit`` process, two at a time (each is mostly
    imports): ``{case: (exit code, output, working directory)}``."""
    pending = list(USER_ERRORS.items())
    running: dict[str, tuple[subprocess.Popen[str], Path]] = {}
    results: dict[str, tuple[int, str, Path]] = {}
    try:
        while pending or running:
            while pending and len(running) < 2:
                case, (args, files, _) = pending.pop(0)
                cwd = tmp_path_factory.mktemp(case)
                for name, text in files.items():
                    (cwd / name).write_text(text)
                command = [sys.executable, "-m", "thinktwice_pl", "fit", "--config", TINY, *args]
                running[case] = (
                    subprocess.Popen(
                        command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                    ),
                    cwd,
                )
            case = next(iter(running))
            process, cwd = running.pop(case)
            out, _ = process.communicate(timeout=120)
            results[case] = (process.returncode, out, cwd)
    finally:
        for process, _ in running.values():
            process.kill()
    return results


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_a_user_error_is_one_line(case: str, user_error_runs) -> None:
    code, out, cwd = user_error_runs[case]
    last = out.rstrip("\n").split("\n")[-1]
    assert code == 2, out[-3000:]
    assert last.startswith(USER_ERRORS[case][2]), out[-3000:]
    if case == "debug":
        assert "Traceback (most recent call last)" in out
    else:
        assert "Traceback" not in out and "\n  File " not in out, out[-3000:]
    if case in ("model-path", "flags", "on-exception-checkpoint"):  # refused before any work
        assert not (cwd / "runs").exists()


# --------------------------------------------------------------------------------------------- in this process


def _fit_with_crash_checkpoint(tiny_model_dir: Path, root: Path, *callbacks: pl.Callback) -> pl.Trainer:
    """2 problems x 4 samples per phase, 2 optimizer steps per phase, a checkpoint after each phase (2 steps)."""
    pl.seed_everything(0)
    module = tiny_module(
        tiny_model_dir, num_generations=4, max_completion_length=12, learning_rate=1e-2, mini_batch_problems=1
    )
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=16), problems_per_batch=2)
    rollout = RolloutCallback(
        num_generations=4, max_completion_length=12, reward_workers=0, reward="signal_rewards.even_length"
    )
    crash = CrashCheckpoint()
    crash.command = ["thinktwice", "fit", "--config", "my.yaml"]
    every_phase = ModelCheckpoint(every_n_train_steps=2)
    trainer = quiet_trainer(root, crash, rollout, every_phase, *callbacks, max_steps=8, enable_checkpointing=True)
    trainer.fit(module, datamodule=data)
    return trainer


class _OutOfMemoryAt(pl.Callback):
    """From phase `phase` on, every forward pass of the policy after `after_steps` optimizer steps of that phase runs
    out of memory (raised inside the model's forward, as CUDA would)."""

    def __init__(self, phase: int, after_steps: int) -> None:
        self.phase, self.after_steps, self.start = phase, after_steps, 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch.index == self.phase:
            self.start = trainer.global_step

            def fail(module: Any, args: Any) -> None:
                if trainer.global_step - self.start >= self.after_steps:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            pl_module.policy.get_decoder().register_forward_pre_hook(fail)


def test_a_failure_in_the_middle_of_a_phase_writes_no_checkpoint_and_names_the_newest(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(OutOfMemoryInPhase, match=r"out of memory in phase 1 \(refine\)") as info:
        _fit_with_crash_checkpoint(tiny_model_dir, tmp_path, _OutOfMemoryAt(phase=1, after_steps=1))
    checkpoints = tmp_path / "run" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt"], "no crash-step=3.ckpt"
    [note] = info.value.__notes__
    assert note.startswith(
        "No crash checkpoint: phase 1 (refine) had applied 1 optimizer step(s), so the state of a "
        "completed phase is gone; the newest checkpoint of this run is "
    )
    assert note.endswith(f"--ckpt_path {checkpoints / 'epoch=0-step=2.ckpt'}")


def test_a_failure_before_the_first_optimizer_step_writes_nothing(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(OutOfMemoryInPhase, match=r"out of memory in phase 0 \(solve\)") as info:
        _fit_with_crash_checkpoint(tiny_model_dir, tmp_path, _OutOfMemoryAt(phase=0, after_steps=0))
    assert not getattr(info.value, "__notes__", [])
    assert not (tmp_path / "run" / "version_0" / "checkpoints").exists()


class _SigtermAfter(pl.Callback):
    """Sends this process SIGTERM (as a scheduler does) at the end of phase `phase`."""

    def __init__(self, phase: int) -> None:
        self.phase = phase

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch.index == self.phase:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "Lightning's handler is missing"
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_stops_at_the_next_phase_boundary_with_a_crash_checkpoint(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(SIGTERMException) as info:
        _fit_with_crash_checkpoint(tiny_model_dir, tmp_path, _SigtermAfter(phase=2))
    crash = tmp_path / "run" / "version_0" / "checkpoints" / "crash-step=6.ckpt"
    state = torch.load(crash, weights_only=True)
    assert (state["global_step"], state["ThinkTwiceDataModule"]["cursor"]) == (6, 3)
    assert info.value.__notes__ == [
        f"Saved the run after 3 phases, 6 optimizer steps to {crash}. Resume with:\n"
        f"  thinktwice fit --config my.yaml --ckpt_path {crash}"
    ]
    assert _phase_rows(tmp_path / "run" / "version_0" / "metrics.csv") == [0, 1, 2]


def test_a_run_that_failed_in_its_last_validation_gets_it_from_the_resumed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], reference
) -> None:
    original = Evaluation.evaluate

    def fails_after_the_last_phase(self: Any, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.state.fn == "fit" and trainer.datamodule.cursor == 4:
            raise KeyError("a bug in the grader")
        original(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(Evaluation, "evaluate", fails_after_the_last_phase)
    with pytest.raises(SystemExit) as stop:
        main(FIT)
    assert stop.value.code == 1  # a bug: its traceback, then the resume command
    err = capsys.readouterr().err.rstrip("\n").split("\n")
    crash = "runs/tiny/version_0/checkpoints/crash-step=8.ckpt"
    assert "Traceback (most recent call last):" in err and "KeyError: 'a bug in the grader'" in err
    assert err[-2:] == [
        f"Saved the run after 4 phases, 8 optimizer steps to {crash}. Resume with:",
        f"  {shlex.join(['thinktwice', *FIT, '--ckpt_path', crash])}",
    ]
    monkeypatch.setattr(Evaluation, "evaluate", original)
    main([*FIT, "--ckpt_path", "last"])  # no phase left to train: the owed validation runs at the end of fit
    resumed = pd.read_csv(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv")
    pd.testing.assert_frame_equal(_comparable(resumed), _comparable(reference))
