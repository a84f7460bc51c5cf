"""One test per shim of `thinktwice_pl.lightning_shims` against the installed Lightning: an upgrade that moves a private
name Lightning's own behaviour depends on fails here, not deep inside a fit."""

from __future__ import annotations

import csv
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, IterableDataset

from thinktwice_pl import lightning_shims as shims

QUIET = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}


class _Batches(IterableDataset[torch.Tensor]):
    """`n` batches and no ``__len__``, as the data module's phase batches."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Any:
        return (torch.randn(2, 32) for _ in range(self.n))


class _Model(BoringModel):
    def __init__(self, per_epoch: int = 4) -> None:
        super().__init__()
        self.per_epoch = per_epoch

    def train_dataloader(self) -> DataLoader[torch.Tensor]:
        return DataLoader(_Batches(self.per_epoch), batch_size=None)

    def val_dataloader(self) -> DataLoader[torch.Tensor]:
        return DataLoader(_Batches(1), batch_size=None)


class _Schedule(Callback):
    """Training batches completed at each validation; optionally runs `action(trainer)` at a hook."""

    def __init__(self, hook: str = "", action: Any = None) -> None:
        self.batches = 0
        self.validations: list[int] = []
        self.hook, self.action = hook, action

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook == "on_train_start":
            self.action(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches += 1
        if self.hook == "on_train_batch_end":
            self.action(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validations.append(self.batches)


# ---------------------------------------------------------------------------------------------- the command line


class _WidthModel(BoringModel):
    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()


class _Parsed(Exception):
    pass


def _parsed_width(cli_class: type[LightningCLI], ckpt: Path) -> int:
    class Probe(cli_class):  # type: ignore[misc, valid-type]
        def before_instantiate_classes(self) -> None:
            raise _Parsed(self.config[self.config.subcommand].model.width)

    with pytest.raises(_Parsed) as parsed:
        Probe(_WidthModel, args=["validate", "--ckpt_path", str(ckpt), "--model.width", "3"])
    return int(parsed.value.args[0])


def test_config_keeping_cli_keeps_the_model_config_that_lightning_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.argv", ["thinktwice"])  # pytest's own arguments are not the command's
    ckpt = tmp_path / "trained.ckpt"
    torch.save({"hyper_parameters": {"width": 5}}, ckpt)
    assert _parsed_width(LightningCLI, ckpt) == 5  # Lightning's private hook reads the checkpoint's config
    assert _parsed_width(shims.ConfigKeepingCLI, ckpt) == 3  # the shim keeps the command line's


# ---------------------------------------------------------------------------------------------- the fit loop


def test_run_validation_runs_the_fit_loops_validation_and_returns_to_training() -> None:
    training_after: list[bool] = []

    def validate_now(trainer: pl.Trainer) -> None:
        shims.run_validation(trainer)
        training_after.append(trainer.training)

    schedule = _Schedule("on_train_start", validate_now)
    pl.Trainer(max_epochs=1, **QUIET, callbacks=[schedule]).fit(_Model(per_epoch=2))
    assert schedule.validations == [0, 2]  # ours before the first batch, then Lightning's at the epoch's end
    assert training_after == [True]


@pytest.mark.parametrize(
    ("val_check_interval", "check_val_every_n_epoch"), [(2, None), (3, None), (2, 1), (1.0, 1), (1.0, 2)]
)
def test_validation_due_is_the_fit_loops_schedule(val_check_interval: float, check_val_every_n_epoch: int | None):
    per_epoch, epochs = 4, 3
    schedule = _Schedule()
    trainer = pl.Trainer(
        max_epochs=epochs,
        val_check_interval=val_check_interval,
        check_val_every_n_epoch=check_val_every_n_epoch,
        **QUIET,
        callbacks=[schedule],
    )
    trainer.fit(_Model(per_epoch))
    due = [b for b in range(1, per_epoch * epochs + 1) if shims.validation_due(trainer, b, per_epoch)]
    assert due == schedule.validations and due


def test_validation_due_is_never_with_a_time_interval() -> None:
    trainer = pl.Trainer(max_epochs=1, val_check_interval=timedelta(hours=1), check_val_every_n_epoch=None, **QUIET)
    assert trainer._val_check_time_interval == 3600  # the private name the shim reads
    assert not any(shims.validation_due(trainer, b, 4) for b in range(1, 9))


def test_stop_as_on_sigterm_stops_the_fit_after_the_current_batch() -> None:
    schedule = _Schedule("on_train_batch_end", shims.stop_as_on_sigterm)
    trainer = pl.Trainer(max_epochs=1, **QUIET, callbacks=[schedule])
    with pytest.raises(SIGTERMException):
        trainer.fit(_Model(per_epoch=4))
    assert trainer.received_sigterm and schedule.batches == 1


# ---------------------------------------------------------------------------------------------- loggers


def test_fixed_version_and_set_version(tmp_path: Path) -> None:
    assert shims.fixed_version(CSVLogger(tmp_path)) is None  # Lightning numbers it
    assert shims.fixed_version(CSVLogger(tmp_path, version="mine")) == "mine"
    assert shims.fixed_version(object()) is None
    logger = CSVLogger(tmp_path, name="run")
    assert shims.set_version(logger, 3)
    assert logger.version == 3 and Path(logger.log_dir) == tmp_path / "run" / "version_3"
    assert not shims.set_version(object(), 3)


def test_rewriting_csv_writer_keeps_replaces_and_rewrites(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="run", version=0)
    folder = Path(logger.log_dir)
    folder.mkdir(parents=True)
    lines = ["step,train/x,val/y", "0,1.0,", "1,2.0,", "1,,0.5", "2,3.0,", "3,4"]  # the last one cut short by a kill
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")

    def keep(row: dict[str, Any]) -> bool:
        return int(row["step"]) <= 1

    def slot(row: dict[str, Any]) -> tuple[int, bool]:
        return int(row["step"]), bool(row.get("train/x"))

    writer = shims.RewritingCSVWriter(logger.log_dir, keep, slot)
    shims.install_experiment(logger, writer)
    assert logger.experiment is writer
    logger.log_metrics({"train/x": 5.0}, step=1)  # replaces the old train row of step 1
    logger.save()
    with open(folder / "metrics.csv", newline="") as f:
        rows = [(r["step"], r["train/x"], r["val/y"]) for r in csv.DictReader(f)]
    assert rows == [("0", "1.0", ""), ("1", "", "0.5"), ("1", "5.0", "")]


# ---------------------------------------------------------------------------------------------- progress bar


def test_tqdm_train_bar() -> None:
    bar = TQDMProgressBar()
    assert shims.tqdm_train_bar(bar) is None  # the public property raises here
    with pytest.raises(TypeError):
        _ = bar.train_progress_bar
    bar.train_progress_bar = bar.init_train_tqdm()
    assert shims.tqdm_train_bar(bar) is bar.train_progress_bar
