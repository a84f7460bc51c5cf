"""HFExport: write the trained policy as a plain HF model directory at the end of training.

An export never replaces another: by default it goes into the run's own version folder; a fixed ``dirpath`` that
already holds files is refused when the fit starts (before any training), and a destination that fills up during
the run is written beside, under a free name, with a warning."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.errors import UserError
from thinktwice_pl.models import is_peft_model, is_sharded
from thinktwice_pl.resume import display_path
from thinktwice_pl.rollout.weights import MergeRounding, rollout_weights

log = logging.getLogger(__name__)


class HFExport(Callback):
    """Save the policy with ``save_pretrained`` (adapters merged) and its tokenizer when fit ends.

    Args:
        dirpath: output directory; None = ``<trainer.log_dir>/hf_model``, the run's own folder (recommended: a
            fixed directory is shared by every run of the config, so a second run is refused at start).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.exported: Path | None = None
        """Where the last export was written."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dirpath is not None and _holds_files(Path(self.dirpath)):
            raise UserError(
                f"HFExport dirpath={self.dirpath} already holds files (another run's export?) that this run's export "
                "would overwrite: drop dirpath from the config (the export then goes into the run's own folder, "
                "<log dir>/hf_model), give a new dirpath, or move those files away"
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # log_dir is read on every rank (with several it is a broadcast); rank 0, which writes, picks a free name
        planned = Path(self.dirpath) if self.dirpath is not None else Path(trainer.log_dir or ".") / "hf_model"
        out = Path(trainer.strategy.broadcast(str(_free_destination(planned)) if trainer.is_global_zero else None))
        self.exported = out
        policy = pl_module.policy
        if is_peft_model(policy):  # export a standalone model, adapters merged in, and the adapter itself
            self._save_adapter(trainer, policy, out / "adapter")
            policy = policy.merge_and_unload()
        full_state = _gathered_state_dict(policy)  # FSDP2 shards: a collective, so on every rank
        if trainer.is_global_zero:
            out.mkdir(parents=True, exist_ok=True)
            policy.save_pretrained(out, state_dict=full_state)
            pl_module.tokenizer.save_pretrained(out)
            log.info("exported the trained policy to %s", out)
        trainer.strategy.barrier("hf_export")

    def _save_adapter(self, trainer: pl.Trainer, policy: Any, folder: Path) -> None:
        """Save the trained adapter (peft's format) and warn when merging it into the base's dtype rounds much of
        its update away: the adapter then holds the trained model, the merged weights an approximation."""
        rounding = MergeRounding()
        for _ in rollout_weights(policy, rounding=rounding):  # merged per layer as the export will be; every rank
            pass
        if not trainer.is_global_zero:
            return
        if not is_sharded(policy):  # peft's own save cannot gather FSDP2 shards
            policy.save_pretrained(folder)
        if rounding.lost >= 0.1:
            log.warning(
                "the merged export rounds %.0f%% of the LoRA update away (W + BA in the base weights' dtype): load the "
                "base with the adapter saved in %s (peft) for the trained model itself",
                100 * rounding.lost,
                display_path(folder),
            )


def _free_destination(out: Path) -> Path:
    """`out`, or when it holds files by now (a resumed run that had exported, a folder filled during the run) the
    first free ``<out>-<n>`` beside it, said in a warning."""
    if not _holds_files(out):
        return out
    n = 2
    while _holds_files(out.with_name(f"{out.name}-{n}")):
        n += 1
    free = out.with_name(f"{out.name}-{n}")
    log.warning(
        "%s already holds an exported model; this run's export goes to %s", display_path(out), display_path(free)
    )
    return free


def _holds_files(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _gathered_state_dict(model: Any) -> dict[str, Any] | None:
    """The full (unsharded, CPU) state dict of an FSDP2-sharded model; None for a plain one."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
