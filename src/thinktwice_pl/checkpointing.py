"""Checkpoints that survive a kill: atomic writes, the newest checkpoint of a run, a checkpoint's progress.

- `AtomicCheckpointIO`: Lightning's checkpoint files written to a hidden ``.<name>.partial-<pid>`` file in the
  target's own directory, flushed to disk, then renamed over the target (`os.replace`, atomic on POSIX). A kill
  during a write leaves the previous file whole, and at most a hidden partial file that nothing loads. (Lightning's
  own writer goes through a temporary file in the system temp directory and moves it: across file systems that
  move is a copy, which a kill can cut short.)
- `make_checkpoints_atomic`: installs it on a strategy, and makes FSDP2's sharded checkpoints (directories) atomic
  too: written under a hidden name, then renamed into place. ``save_last: link`` links are made after the rename,
  so they never point at a half-written checkpoint.
- `latest_checkpoint`: the newest complete checkpoint in some folders (what ``--ckpt_path last`` resolves to).
- `checkpoint_progress`: the phases completed and optimizer steps of a checkpoint, read without loading its tensors.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from thinktwice_pl.errors import UserError

SHARDED_METADATA = "meta.pt"  # written last into an FSDP2 checkpoint directory by Lightning's ModelParallelStrategy
PARTIAL_MARK = ".partial"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that a kill cannot leave half-written: a temporary file in the same directory,
    fsync, rename over `path`, fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_then_rename(path, lambda f: torch.save(obj, f))
    _fsync_directory(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the file `path` with `text` atomically (a temporary file in the same directory, fsync, rename)."""
    _write_then_rename(path, lambda f: f.write(text.encode("utf-8")))


def _write_then_rename(path: Path, write: Callable[[Any], Any]) -> None:
    """`write` into a hidden ``.<name>.partial-<pid>`` file beside `path` (binary), fsync it, rename it over `path`;
    on any failure the partial file is removed and `path` is untouched."""
    partial = path.with_name(f".{path.name}{PARTIAL_MARK}-{os.getpid()}")
    try:
        with open(partial, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with atomic local writes (`atomic_save`); remote paths (``s3://`` ...) go
    through Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        atomic_save(checkpoint, path)


class _AtomicShardedSave:
    """ModelParallelStrategy.save_checkpoint for sharded (directory) checkpoints: every rank writes its shard into a
    hidden ``.<name>.partial`` directory, then rank 0 renames it into place."""

    def __init__(self, strategy: Any, save: Callable[..., None]) -> None:
        self.strategy, self.save = strategy, save

    def __call__(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        strategy = self.strategy
        if not getattr(strategy, "_save_distributed_checkpoint", False):  # one file: through the checkpoint IO
            self.save(checkpoint, filepath, storage_options)
            return
        final = Path(strategy.broadcast(str(filepath)))
        partial = final.with_name(f".{final.name}{PARTIAL_MARK}")
        if strategy.is_global_zero:
            _remove(partial)  # left by a kill during an earlier write
        strategy.barrier("thinktwice_atomic_save_start")
        self.save(checkpoint, partial, storage_options)
        strategy.barrier("thinktwice_atomic_save_written")
        if strategy.is_global_zero:
            _rename_into_place(partial, final)
        strategy.barrier("thinktwice_atomic_save_done")


def make_checkpoints_atomic(strategy: Any) -> None:
    """Make every checkpoint `strategy` writes atomic: files through `AtomicCheckpointIO` (when the strategy uses
    Lightning's default `TorchCheckpointIO`; a custom checkpoint IO is left alone), FSDP2 directories through a
    hidden directory and a rename. Idempotent."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
    if isinstance(strategy, ModelParallelStrategy) and not isinstance(strategy.save_checkpoint, _AtomicShardedSave):
        strategy.save_checkpoint = _AtomicShardedSave(strategy, strategy.save_checkpoint)  # type: ignore[method-assign]


def is_partial(path: Path) -> bool:
    """True for the hidden temporary files and directories of an unfinished atomic write."""
    return path.name.startswith(".") and PARTIAL_MARK in path.name


def remove_partials(folder: Path) -> list[Path]:
    """Delete the leftovers of writes that a kill interrupted in `folder`; returns what was removed."""
    removed = [p for p in folder.iterdir() if is_partial(p)] if folder.is_dir() else []
    for path in removed:
        _remove(path)
    return removed


def latest_checkpoint(folders: Iterable[Path]) -> Path | None:
    """The most recently written complete checkpoint in `folders` (by modification time) that a fit can resume
    from, or None.

    Checkpoint files and FSDP2 directories named ``*.ckpt`` count; links (``last.ckpt``) count as what they point
    to, dangling links and the hidden partial files of interrupted writes do not, nor do directories without their
    metadata file, nor weights-only files (a ModelCheckpoint with ``save_weights_only``: no optimizer state)."""
    found: dict[Path, int] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") or entry.suffix != ".ckpt":
                continue
            target = entry.resolve()
            marker = target / SHARDED_METADATA if target.is_dir() else target
            if marker.is_file():
                found[target] = marker.stat().st_mtime_ns
    return next((p for p in sorted(found, key=lambda p: found[p], reverse=True) if _resumable(p)), None)


def _resumable(path: Path) -> bool:
    """Whether a checkpoint holds the training state (optimizer and loops), not the weights alone."""
    if path.is_dir():
        return True  # FSDP2 checkpoints of the fit always hold it
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:
        return True  # unreadable: --ckpt_path then names it in its error
    return "optimizer_states" in state or "loops" in state


@dataclass(frozen=True)
class Progress:
    """How far the run of a checkpoint had come."""

    global_step: int
    """Optimizer steps taken (Lightning's ``global_step``)."""
    phases: int | None
    """Phase batches completed (the data module's cursor); None when the checkpoint has no ThinkTwice data state."""
    model_hparams: dict[str, Any]
    """The module's hyper-parameters (the ``model:`` section it was trained with)."""


def checkpoint_progress(path: str | Path, *, weights_only: bool | None = None) -> Progress:
    """The progress recorded in a checkpoint file or FSDP2 directory; its tensors are memory-mapped, not read.

    Raises:
        UserError: the path is no readable checkpoint.
    """
    path = Path(path)
    meta = path / SHARDED_METADATA if path.is_dir() else path
    try:
        state = torch.load(
            meta,
            map_location="cpu",
            mmap=not path.is_dir(),
            weights_only=True if weights_only is None else weights_only,
        )
    except Exception as error:
        raise UserError(
            f"--ckpt_path {path} is not a readable checkpoint ({type(error).__name__}: {error}); give another one "
            f"(in {path.parent}: {', '.join(sorted(p.name for p in path.parent.glob('*.ckpt'))) or 'none'})"
        ) from error
    data = next((v for v in state.values() if isinstance(v, dict) and "cursor" in v and "fingerprint" in v), None)
    return Progress(
        global_step=int(state.get("global_step", 0)),
        phases=int(data["cursor"]) if data else None,
        model_hparams=dict(state.get("hyper_parameters", {})),
    )


def _rename_into_place(partial: Path, final: Path) -> None:
    """Move a finished `partial` write to `final`, replacing what was there (a file, link or directory)."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(partial, final)
    _fsync_directory(final.parent)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
