"""HFExport: each run's export in its own folder; an occupied destination is refused at start or written beside."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
from fit_helpers import quiet_trainer, tiny_module

from thinktwice_pl.callbacks import HFExport, RolloutCallback
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.errors import UserError


def _fit(model_dir: Path, root: Path, *callbacks: pl.Callback) -> Path:
    """One GRPO phase of the tiny model with `callbacks`; returns the run's log folder."""
    module = tiny_module(model_dir, max_completion_length=4)
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=4), problems_per_batch=2, refine=False)
    rollout = RolloutCallback(
        num_generations=2, max_completion_length=4, reward="signal_rewards.even_length", reward_workers=0
    )
    trainer = quiet_trainer(root, rollout, *callbacks, max_steps=1)
    trainer.fit(module, datamodule=data)
    return Path(trainer.log_dir)


def test_each_run_exports_into_its_own_version_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = _fit(tiny_model_dir, tmp_path, HFExport())
    first_weights = (first / "hf_model" / "model.safetensors").read_bytes()
    second = _fit(tiny_model_dir, tmp_path, HFExport())
    assert (first.name, second.name) == ("version_0", "version_1")
    assert (second / "hf_model" / "config.json").exists()
    assert (first / "hf_model" / "model.safetensors").read_bytes() == first_weights  # the first run's model stays


def test_a_fixed_dirpath_that_holds_a_model_is_refused_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    export = HFExport(dirpath=str(tmp_path / "export"))
    _fit(tiny_model_dir, tmp_path, export)
    kept = (tmp_path / "export" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"HFExport dirpath=.*export already holds files .* drop dirpath"):
        _fit(tiny_model_dir, tmp_path, HFExport(dirpath=str(tmp_path / "export")))
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == kept


def test_a_destination_filled_during_the_run_is_written_beside(tiny_model_dir: Path, tmp_path: Path) -> None:
    class FillsTheFolder(pl.Callback):  # another process writes into the export folder while this run trains
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            (tmp_path / "export").mkdir()
            (tmp_path / "export" / "theirs.txt").write_text("not ours")

    export = HFExport(dirpath=str(tmp_path / "export"))
    _fit(tiny_model_dir, tmp_path, FillsTheFolder(), export)
    assert export.exported == tmp_path / "export-2" and (tmp_path / "export-2" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["theirs.txt"]
