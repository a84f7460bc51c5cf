"""HFExport: write the trained policy as a plain HF model directory at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class HFExport(Callback):
    """Save the policy with ``save_pretrained`` (adapters merged) and its tokenizer when fit ends.

    Args:
        dirpath: output directory; None = ``<trainer.log_dir>/hf_model``.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.dirpath or Path(trainer.log_dir or ".") / "hf_model")
        policy = pl_module.policy
        if hasattr(policy, "merge_and_unload"):  # peft: export a standalone model, adapters merged in
            policy = policy.merge_and_unload()
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            policy.save_pretrained(out)
            pl_module.tokenizer.save_pretrained(out)
            log.info("exported the trained policy to %s", out)
        trainer.strategy.barrier("hf_export")
