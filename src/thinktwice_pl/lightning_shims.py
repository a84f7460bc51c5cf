"""Every use of Lightning's private API, in one place: written for Lightning 2.6 (pyproject: ``lightning>=2.6,<2.7``).

Each shim states which private name it touches and why no public one does the job; tests/test_lightning_shims.py
checks each against the installed Lightning, so an upgrade that moves one fails there first.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from thinktwice_pl.checkpointing import atomic_write_text

# ---------------------------------------------------------------------------------------------- the command line


class ConfigKeepingCLI(LightningCLI):
    """LightningCLI that keeps the ``model:`` config the user gave when ``--ckpt_path`` is set.

    Lightning (``LightningCLI._parse_ckpt_path``) replaces it by the hyper-parameters stored in a checkpoint file,
    reading the whole file at start-up, but not for ``last`` or a sharded directory. Here every checkpoint resumes
    the same way: the ``thinktwice`` command warns where the config differs from the checkpoint, and a checkpoint
    whose weights do not fit the model is refused when it loads.
    """

    def _parse_ckpt_path(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- the fit loop


def run_validation(trainer: pl.Trainer) -> None:
    """Runs the fit loop's validation now, as its scheduled check does (``fit_loop.epoch_loop.val_loop``: Lightning
    has no public call for a validation inside ``fit``), and puts the trainer's stage back."""
    stage = trainer.state.stage
    trainer.validating = True
    try:
        trainer.fit_loop.epoch_loop.val_loop.run()
    finally:
        trainer.state.stage = stage


def validation_due(trainer: pl.Trainer, batches: int, per_epoch: int) -> bool:
    """Whether the fit loop validates right after `batches` training batches of `per_epoch` each (an iterable
    loader without ``__len__``): the rule of the training epoch loop's private ``_should_check_val_fx``.

    An integer ``val_check_interval`` validates every n batches, counted within the epoch unless
    ``check_val_every_n_epoch`` is None; a float (``val_check_batch`` infinite) at the end of each epoch. A time
    interval (private ``Trainer._val_check_time_interval``) never says when: False.
    """
    every, n_epochs = trainer.val_check_batch, trainer.check_val_every_n_epoch
    if batches < 1 or per_epoch < 1 or not trainer.enable_validation:
        return False
    if getattr(trainer, "_val_check_time_interval", None) is not None or every is None:
        return False  # a time interval (val_check_batch is None then)
    epoch, done = divmod(batches - 1, per_epoch)
    if n_epochs is not None and (epoch + 1) % n_epochs:
        return False
    if every == float("inf"):
        return done + 1 == per_epoch
    return (batches if n_epochs is None else done + 1) % int(every) == 0


def stop_as_on_sigterm(trainer: pl.Trainer) -> None:
    """Sets the flag that Lightning's SIGTERM handler sets (private ``Trainer._signal_connector.received_sigterm``,
    read by the public ``Trainer.received_sigterm``, which has no setter), so that the loops raise
    ``SIGTERMException`` after the current batch's hooks and in a validation that follows."""
    trainer._signal_connector.received_sigterm = True


# ---------------------------------------------------------------------------------------------- loggers


def fixed_version(logger: Any) -> int | str | None:
    """The version folder a logger was given (``version=``), None when Lightning numbers it itself or the logger
    has no version folders. Private ``_version``: the public ``version`` picks a number on first read."""
    return getattr(logger, "_version", None)


def set_version(logger: Any, version: int | str) -> bool:
    """Points a logger with version folders (CSV, TensorBoard) at `version` before it creates its writer (private
    ``_version``: no public setter); False for a logger without version folders."""
    if not (hasattr(logger, "_version") and hasattr(logger, "root_dir")):
        return False
    logger._version = version
    return True


def install_experiment(logger: Any, writer: Any) -> None:
    """Makes `writer` the logger's ``experiment`` (private ``_experiment``: Lightning creates its own writer on
    first use and takes no writer class)."""
    logger._experiment = writer


class RewritingCSVWriter(ExperimentWriter):
    """Lightning's CSV experiment writer (``CSVLogger.experiment``), with every save a whole, atomic rewrite of
    ``metrics.csv``.

    Lightning's writer deletes an existing ``metrics.csv`` when it starts and appends rows in place (a kill can cut
    the last line, or the whole file while its header is rewritten). This one starts from the old rows that `keep`
    accepts (none when `keep` is None), replaces earlier rows of the same `slot` (None: never replaced), and writes
    the file through a temporary file and a rename. Overrides the private ``_check_log_dir_exists`` and uses the
    private ``_record_new_keys``.
    """

    def __init__(
        self,
        log_dir: str,
        keep: Callable[[dict[str, Any]], bool] | None,
        slot: Callable[[dict[str, Any]], Hashable | None],
    ) -> None:
        self._keep = keep
        self._slot = slot
        self._rows: list[dict[str, Any]] = []
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self._keep is None or not path.is_file():
            return
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            # a line cut short by a kill (Lightning's writer appends in place) has fewer fields: None values
            rows = [row for row in reader if None not in row and None not in row.values()]
            self.metrics_keys = sorted(reader.fieldnames or [])
        self._rows = [row for row in rows if self._keep(row)]

    def save(self) -> None:
        if not self.metrics:
            return
        self._record_new_keys()
        for row in self.metrics:
            slot = self._slot(row)
            if slot is not None:
                self._rows = [old for old in self._rows if self._slot(old) != slot]
            self._rows.append(row)
        self.metrics = []
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=self.metrics_keys, restval="")
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(Path(self.metrics_file_path), text.getvalue())


# ---------------------------------------------------------------------------------------------- progress bar


def tqdm_train_bar(bar: Any) -> Any | None:
    """A ``TQDMProgressBar``'s training bar, None before it exists (private ``_train_progress_bar``: the public
    ``train_progress_bar`` raises then)."""
    return getattr(bar, "_train_progress_bar", None)
