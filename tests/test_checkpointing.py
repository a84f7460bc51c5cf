"""Atomic checkpoint writes, the newest checkpoint of a run, and a checkpoint's progress."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from thinktwice_pl.checkpointing import (
    AtomicCheckpointIO,
    atomic_save,
    checkpoint_progress,
    latest_checkpoint,
    make_checkpoints_atomic,
    remove_partials,
)
from thinktwice_pl.errors import UserError


class _FailsToPickle:
    """torch.save writes part of the archive, then this object fails: a write cut short."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise OSError("No space left on device (simulated)")


def test_a_failed_write_leaves_the_old_checkpoint_whole_and_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save({"global_step": 4, "weights": torch.arange(1000.0)}, target)
    before = target.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"global_step": 8, "weights": torch.arange(1000.0), "bad": _FailsToPickle()}, target)
    assert target.read_bytes() == before
    assert torch.load(target, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_writes_through_a_hidden_file_in_the_same_folder(tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        seen.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    AtomicCheckpointIO().save_checkpoint({"global_step": 2}, tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    [(src, dst)] = seen
    assert Path(src).parent == Path(dst).parent == tmp_path / "ckpt"  # same file system: the rename is atomic
    assert Path(src).name.startswith(".epoch=0-step=2.ckpt.partial-")
    assert torch.load(dst, weights_only=True) == {"global_step": 2}


def test_make_checkpoints_atomic_replaces_only_lightnings_default_io() -> None:
    strategy = SingleDeviceStrategy("cpu")
    assert type(strategy.checkpoint_io) is TorchCheckpointIO
    make_checkpoints_atomic(strategy)
    make_checkpoints_atomic(strategy)
    assert type(strategy.checkpoint_io) is AtomicCheckpointIO

    class Custom(TorchCheckpointIO):
        pass

    custom = SingleDeviceStrategy("cpu", checkpoint_io=Custom())
    make_checkpoints_atomic(custom)
    assert type(custom.checkpoint_io) is Custom, "a user's checkpoint IO is left alone"


def test_latest_checkpoint_skips_partial_writes_dangling_links_unfinished_directories_and_weights_only(
    tmp_path: Path,
) -> None:
    a, b = tmp_path / "version_0" / "checkpoints", tmp_path / "version_1" / "checkpoints"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    older, newer = a / "epoch=0-step=4.ckpt", b / "epoch=0-step=2.ckpt"
    torch.save({"global_step": 4, "loops": {}}, older)
    torch.save({"global_step": 2, "loops": {}}, newer)
    os.utime(older, ns=(1_000_000_000, 1_000_000_000))
    (a / "last.ckpt").symlink_to(older.name)
    assert latest_checkpoint([a, b]) == newer.resolve()
    assert latest_checkpoint([a]) == older.resolve(), "a link counts as the file it points to"
    (b / ".epoch=0-step=6.ckpt.partial-123").write_bytes(b"half")  # newest, but an unfinished write
    (b / "gone.ckpt").symlink_to("deleted.ckpt")  # dangling
    (b / "sharded.ckpt").mkdir()  # an FSDP2 directory without its metadata file: unfinished
    assert latest_checkpoint([a, b]) == newer.resolve()
    torch.save({"global_step": 5, "state_dict": {}}, b / "best.ckpt")  # save_weights_only: nothing to resume
    assert latest_checkpoint([a, b]) == newer.resolve()
    torch.save({"global_step": 6}, b / "sharded.ckpt" / "meta.pt")
    assert latest_checkpoint([a, b]) == (b / "sharded.ckpt").resolve()
    assert latest_checkpoint([tmp_path / "missing"]) is None
    assert remove_partials(b) == [b / ".epoch=0-step=6.ckpt.partial-123"]
    assert not (b / ".epoch=0-step=6.ckpt.partial-123").exists()


def test_checkpoint_progress_reads_the_phase_cursor_and_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    state = {
        "global_step": 6,
        "ThinkTwiceDataModule": {"cursor": 3, "fingerprint": {}},
        "state_dict": {},
        "hyper_parameters": {"learning_rate": 0.01},
    }
    torch.save(state, path)
    progress = checkpoint_progress(path)
    assert (progress.global_step, progress.phases, progress.model_hparams) == (6, 3, {"learning_rate": 0.01})
    path.write_bytes(path.read_bytes()[:200])  # what a kill during a non-atomic write leaves
    with pytest.raises(UserError, match=r"--ckpt_path .*x\.ckpt is not a readable checkpoint"):
        checkpoint_progress(path)
