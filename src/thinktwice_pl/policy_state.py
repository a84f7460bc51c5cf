"""What a checkpoint holds of the policy, and the check that it fits the policy it is loaded into.

A checkpoint holds the trained weights: all of the policy's, or with LoRA only the adapters (the frozen base comes
from the model path again). The frozen KL reference is never saved (it is the initial policy, rebuilt from the model
path), except in FSDP2's sharded checkpoints, which hold every shard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from thinktwice_pl.errors import UserError, describe

REFERENCE = "ref_policy."  # the state-dict prefix of the frozen KL reference


def weights_to_save(state: dict[str, Any], policy: Any, *, lora: bool, sharded: bool) -> dict[str, Any]:
    """The part of the module's `state` a checkpoint keeps."""
    if lora:
        return _adapter_weights(policy)
    if sharded:
        return state
    return {key: value for key, value in state.items() if not key.startswith(REFERENCE)}


def trained_weights(
    policy: Any, module_state: Callable[[], dict[str, torch.Tensor]], *, lora: bool
) -> dict[str, torch.Tensor]:
    """The weights this module trains, under the names a checkpoint holds them by."""
    if lora:
        return _adapter_weights(policy)
    return {key: value for key, value in module_state().items() if not key.startswith(REFERENCE)}


def _adapter_weights(policy: Any) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {f"policy.{key}": value for key, value in get_peft_model_state_dict(policy).items()}


def load_adapters(policy: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint's LoRA adapters into `policy`; returns the policy's whole state, which Lightning then loads
    (the base weights as they are)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(policy, {key.removeprefix("policy."): value for key, value in saved.items()})
    return {f"policy.{key}": value for key, value in policy.state_dict().items()}


def reference_weights(reference: Any) -> dict[str, torch.Tensor]:
    """The frozen reference's weights, from the model path, under their state-dict names."""
    return {f"{REFERENCE}{key}": value for key, value in reference.state_dict().items()}


def check_weights_fit(ours: dict[str, torch.Tensor], checkpoint: dict[str, Any], hparams: dict[str, Any]) -> None:
    """Refuses, naming both models, a checkpoint whose ``state_dict`` does not fit the weights `ours` (another model
    or LoRA setting) instead of torch's list of every missing key. `hparams`: the module's hyper-parameters."""
    theirs = checkpoint["state_dict"]
    missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    shapes = [k for k in sorted(ours.keys() & theirs.keys()) if tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if not (missing or unexpected or shapes):
        return
    problems = [
        f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else "",
        f"{len(unexpected)} unknown (e.g. {unexpected[0]})" if unexpected else "",
        f"{len(shapes)} of another shape (e.g. {shapes[0]}: {tuple(theirs[shapes[0]].shape)} in the "
        f"checkpoint, {tuple(ours[shapes[0]].shape)} here)"
        if shapes
        else "",
    ]
    written_for = checkpoint.get("hyper_parameters", {})
    raise UserError(
        f"the checkpoint does not fit this model ({'; '.join(p for p in problems if p)}): it was written for "
        f"model.model_name_or_path={written_for.get('model_name_or_path')} with model.lora="
        f"{describe(written_for.get('lora'))}, this config loads {hparams.get('model_name_or_path')} with "
        f"model.lora={describe(hparams.get('lora'))}; resume with the config it was trained with (config.yaml in "
        "its run folder), or start a fresh run (without --ckpt_path)"
    )
