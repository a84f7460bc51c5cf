"""RectifyFortifyTracker: the rectify-then-fortify dynamics of a run as a CSV and the paper's figure.

Early in ThinkTwice training most refined answers are wrong and the refine reward pays for fixing
them (rectify); later most are right and it pays for keeping them right (fortify). This callback
records, per refine phase, the training signals of METHOD.md section 8 and, per validation, the
greedy transition rates of section 6, in ``<log_dir>/rectify_fortify.csv``, and draws fix-wrong and
damage-correct against step in ``<log_dir>/rectify_fortify.png`` after every validation and at the
end of fit.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.callbacks.evaluation import phase_step
from thinktwice_pl.plotting import TRACKED, plot_dynamics
from thinktwice_pl.types import PhaseBatch

log = logging.getLogger(__name__)


class RectifyFortifyTracker(Callback):
    """Writes the refine-phase signals and validation transition rates over steps as CSV and PNG.

    Args:
        dirpath: where rectify_fortify.csv / .png go; None = the trainer's log directory.
        label: the run's name in the plot legend.
    """

    def __init__(self, dirpath: str | None = None, label: str = "ThinkTwice") -> None:
        super().__init__()
        self.dirpath = dirpath
        self.label = label
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, PhaseBatch) or batch.phase != "refine" or not isinstance(outputs, dict):
            return
        metrics = outputs  # the phase's metrics, returned by the module's training_step
        row = {key: float(metrics[key]) for key in TRACKED if key in metrics}
        if row:
            self._add(batch.index, row)
            self._write_csv(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # only this validation's rates: callback_metrics also still holds the last training phase's values
        row = {
            key: float(value)
            for key, value in trainer.callback_metrics.items()
            if key in TRACKED and key.startswith("val/")
        }
        if row:
            self._add(phase_step(trainer), row)
            self.save(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path | None:
        """Writes the CSV and draws the PNG (rank 0 only); returns the PNG path, None when there is nothing yet."""
        csv = self._write_csv(trainer)
        if csv is None:
            return None
        png = csv.with_suffix(".png")
        try:
            plot_dynamics({self.label: self.table()}, png, title=f"{self.label}: rectify then fortify")
        except ValueError as e:  # nothing to draw yet (e.g. only NaN rates)
            log.info("rectify/fortify plot skipped: %s", e)
            return None
        return png

    def table(self) -> pd.DataFrame:
        """The recorded rows: ``step`` and the tracked columns (NaN where a row lacks one)."""
        return pd.DataFrame(self.rows, columns=["step", *TRACKED])

    def _add(self, step: int, row: dict[str, float]) -> None:
        self.rows.append({"step": float(step), **{k: v for k, v in row.items() if not math.isnan(v)}})

    def _write_csv(self, trainer: pl.Trainer) -> Path | None:
        folder = self.dirpath or trainer.log_dir or trainer.default_root_dir  # on every rank: log_dir is a broadcast
        if not trainer.is_global_zero or not self.rows:
            return None
        out = Path(folder) / "rectify_fortify.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.table().to_csv(out, index=False)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = list(state_dict.get("rows", []))
