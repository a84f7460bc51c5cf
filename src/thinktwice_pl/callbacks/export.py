"""HFExport: write the trained policy as a plain HF model directory at the end of training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.models import is_peft_model

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
        if is_peft_model(policy):  # export a standalone model, adapters merged in
            policy = policy.merge_and_unload()
        full_state = _gathered_state_dict(policy)  # FSDP2 shards: a collective, so on every rank
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            policy.save_pretrained(out, state_dict=full_state)
            pl_module.tokenizer.save_pretrained(out)
            log.info("exported the trained policy to %s", out)
        trainer.strategy.barrier("hf_export")


def _gathered_state_dict(model: Any) -> dict[str, Any] | None:
    """The full (unsharded, CPU) state dict of an FSDP2-sharded model; None for a plain one."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
