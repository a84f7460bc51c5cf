"""Resuming a run where it stopped: which checkpoint, which folder, and metrics files that continue.

A fit starts fresh unless ``--ckpt_path`` is given. ``--ckpt_path last`` is the newest complete checkpoint of this
run's folder: ``<logger save_dir>/<logger name>/*/checkpoints/`` (and the folders of ModelCheckpoints with their own
``dirpath``); never a file of another experiment.

A checkpoint that lies in ``<save_dir>/<name>/<version>/checkpoints/`` resumes into that same version folder:

- ``metrics.csv`` keeps the old run's rows of the phases the checkpoint had completed (training rows at steps
  below its phase count, validation rows up to it), and the resumed run adds the rest; a row replaces an earlier
  one of the same step and kind, so every phase and every validation appears once. The file is rewritten whole
  through a temporary file and a rename at every save, one save per phase: a kill never truncates it.
- ``samples.jsonl`` keeps the samples of the phases the checkpoint had completed (`PhaseLogger`).
- the resumed run's config goes to ``config.resume<N>.yaml`` beside the original ``config.yaml``.

A checkpoint from elsewhere starts a new version folder whose rows begin at the checkpoint's phase count; its
``metrics.csv`` joins the old one by ``step`` (the old rows below that step, then the new file).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from thinktwice_pl import lightning_shims
from thinktwice_pl.checkpointing import Progress, latest_checkpoint

KeepRow = Callable[[int | None, str], bool]


# ---------------------------------------------------------------------------------------------- which checkpoint


def run_root(trainer: Any) -> Path:
    """This run's folder: ``<save_dir>/<name>`` of the first logger, or the trainer's ``default_root_dir``."""
    logger = trainer.loggers[0] if trainer.loggers else None
    root = getattr(logger, "root_dir", None)
    return Path(root if root is not None else trainer.default_root_dir)


def checkpoint_folders(trainer: Any) -> list[Path]:
    """Where the checkpoints of this run live: ``<run root>/*/checkpoints`` (every version), ``<run root>/checkpoints``
    without a logger, and the ``dirpath`` of every ModelCheckpoint that sets one."""
    root = run_root(trainer)
    folders = [*sorted(p for p in root.glob("*/checkpoints") if p.is_dir()), root / "checkpoints"]
    folders += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return list(dict.fromkeys(folders))


def resolve_last(trainer: Any) -> Path | None:
    """``--ckpt_path last``: the newest complete checkpoint of this run's folders, or None when there is none."""
    return latest_checkpoint(checkpoint_folders(trainer))


def version_folder_of(checkpoint: Path, trainer: Any) -> str | None:
    """The version folder name when `checkpoint` lies in ``<run root>/<version>/checkpoints/``, else None."""
    ckpt = checkpoint.resolve()
    if ckpt.parent.name != "checkpoints" or ckpt.parent.parent.parent != run_root(trainer).resolve():
        return None
    return ckpt.parent.parent.name


# ---------------------------------------------------------------------------------------------- the resume command


def resume_command(command: list[str] | None, checkpoint: str | Path) -> str:
    """`command` (the program and its arguments, as invoked) with ``--ckpt_path <checkpoint>`` instead of any
    ``--ckpt_path`` it had; from ``sys.argv`` when None."""
    if command is None:
        command = invocation(sys.argv[1:])
    args: list[str] = []
    skip = False
    for arg in command:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            args.append(arg)
    return shlex.join([*args, "--ckpt_path", display_path(Path(checkpoint))])


def invocation(args: list[str]) -> list[str]:
    """The program as the user started it (``thinktwice`` or ``python -m thinktwice_pl``) followed by `args`."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "__main__.py" and script.parent.name == "thinktwice_pl":
        return [sys.executable, "-m", "thinktwice_pl", *args]
    if script is not None and script.name == "thinktwice":
        return [sys.argv[0], *args]
    return ["thinktwice", *args]


def display_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    absolute = path.absolute()
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


# ---------------------------------------------------------------------------------------------- the folder


@dataclass
class Continuation:
    """A fit resumed into the version folder of its checkpoint."""

    version: str
    log_dir: Path
    progress: Progress

    def keep(self, step: int | None, kind: str) -> bool:
        """Whether an old metrics row stays: training rows of completed phases, validations up to the checkpoint."""
        phases = self.progress.phases
        if step is None or phases is None or kind == "other":
            return True
        return step < phases if kind == "train" else step <= phases


def free_name(folder: Path, stem: str, suffix: str) -> str:
    """``<stem>1<suffix>``, ``<stem>2<suffix>``, ...: the first that does not exist in `folder`."""
    n = 1
    while (folder / f"{stem}{n}{suffix}").exists():
        n += 1
    return f"{stem}{n}{suffix}"


# ---------------------------------------------------------------------------------------------- metrics.csv


def row_kind(row: dict[str, Any]) -> str:
    """``val`` for an evaluation row, ``train`` for a phase row, ``other`` for anything else."""
    keys = [k for k, v in row.items() if v not in ("", None)]
    if any(k.startswith(("val/", "test/")) for k in keys):
        return "val"
    if any(k.startswith("train/") for k in keys):
        return "train"
    return "other"


def row_step(row: dict[str, Any]) -> int | None:
    value = row.get("step")
    try:
        return int(float(value)) if value not in ("", None) else None
    except (TypeError, ValueError):
        return None


def row_slot(row: dict[str, Any]) -> Hashable | None:
    """Rows of the same step and kind replace each other (a phase or validation redone after a resume)."""
    kind = row_kind(row)
    return None if kind == "other" else (row_step(row), kind)


def metrics_writer(log_dir: str, keep: KeepRow | None = None) -> lightning_shims.RewritingCSVWriter:
    """A CSV experiment writer for `log_dir` that rewrites ``metrics.csv`` whole and atomically at every save,
    starting from the old rows that `keep` accepts (None: none), a row replacing those of the same step and kind."""
    keep_row = None if keep is None else (lambda row: keep(row_step(row), row_kind(row)))
    return lightning_shims.RewritingCSVWriter(log_dir, keep_row, row_slot)


def install_metrics_writer(logger: Any, keep: KeepRow | None) -> None:
    """Give a CSVLogger the `metrics_writer` (on global rank 0, where Lightning's CSVLogger writes)."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_only

    if not isinstance(logger, CSVLogger) or getattr(rank_zero_only, "rank", 0) != 0:
        return
    os.makedirs(logger.root_dir, exist_ok=True)
    lightning_shims.install_experiment(logger, metrics_writer(logger.log_dir, keep))


def set_version(loggers: Iterable[Any], version: str) -> None:
    """Point loggers with version folders (CSV, TensorBoard) at the folder `version` before they create their
    writers (``version_<N>`` as the number N, which is how Lightning names and shows it)."""
    number = version.removeprefix("version_")
    value: int | str = int(number) if version.startswith("version_") and number.isdigit() else version
    for logger in loggers:
        lightning_shims.set_version(logger, value)
