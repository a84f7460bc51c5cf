"""The small fits the tests run: the tiny module with the suite's usual geometry, and a quiet trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from thinktwice_pl.module import ThinkTwiceModule


def tiny_module(model_dir: Path | str, **settings: Any) -> ThinkTwiceModule:
    """A module of `model_dir` with 2 problems x 2 samples per phase, one optimizer step per phase and completions
    of at most 8 tokens, unless `settings` says otherwise."""
    defaults = {"problems_per_batch": 2, "num_generations": 2, "mini_batch_problems": 2, "max_completion_length": 8}
    return ThinkTwiceModule(model_name_or_path=str(model_dir), **{**defaults, **settings})


def quiet_trainer(root: Path, *callbacks: pl.Callback, log: str | None = "run", **options: Any) -> pl.Trainer:
    """A trainer on `accelerator` (default cpu) without progress bar, model summary or checkpoints (unless `options`
    says otherwise) that writes under `root`: a CSVLogger named `log`, or no logger when `log` is None."""
    logger = CSVLogger(root, name=log) if log is not None else False
    defaults = {
        "accelerator": "cpu",
        "logger": logger,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": root,
    }
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **options})
