"""The policy's weights as a rollout engine must see them: full, HF-named, adapters merged, dequantised.

A colocated sampler keeps its own copy of the weights, in the layout of the original checkpoint
(``model.layers.0.self_attn.q_proj.weight``, ...). The trainer may hold the policy in another form:

- plain HF model: the parameters as they are;
- LoRA (peft): ``W + scale * B @ A`` computed per layer from the adapter, without touching the
  trained module (no merge/unmerge round trip that would drift bf16 weights a little each phase).
  Cast to a 16-bit dtype, the merged weight rounds every change below half a spacing of W back to W:
  `MergeRounding` measures how much of the adapter's update that loses;
- QLoRA: the 4-bit base dequantised, then the adapter delta added; the sampler stays in 16 bits;
- FSDP2 (``fully_shard``): each DTensor gathered with ``full_tensor()`` one parameter at a time, so
  at most one full parameter exists next to the shards;
- FSDP1: inside ``summon_full_params`` (one full copy, no writeback);
- tied embeddings: the shared tensor is yielded once, under the input-embedding name.

`rollout_weights` yields ``(name, tensor)`` pairs lazily, in module order; every rank of a sharded
policy must iterate it to the end (the gathers are collectives).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from thinktwice_pl.models import base_model

# submodule names that wrappers insert and that the checkpoint layout does not have
_WRAPPER_NAMES = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


@dataclass
class MergeRounding:
    """How much of the adapters' update survives in merged weights: over all merged layers, the relative error
    ``||round(W + D) - round(W) - D|| / ||D||`` of the update D as the merged weights carry it (0: kept exactly;
    1: as if there were no update; W's own rounding is not counted)."""

    error_sq: float = 0.0
    delta_sq: float = 0.0

    def add(self, carried: torch.Tensor, delta: torch.Tensor) -> None:
        self.error_sq += float((carried - delta).pow(2).sum())
        self.delta_sq += float(delta.pow(2).sum())

    @property
    def lost(self) -> float:
        """The relative error; 0 before any update (D = 0)."""
        return math.sqrt(self.error_sq / self.delta_sq) if self.delta_sq > 0 else 0.0


def rollout_weights(
    model: Any,
    *,
    merge_adapters: bool = True,
    dtype: torch.dtype | None = None,
    rounding: MergeRounding | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the policy's full weights under the base model's HF parameter names.

    Args:
        model: the policy: an HF causal LM, possibly peft-wrapped, 4-bit quantised or FSDP-sharded.
        merge_adapters: add each active LoRA adapter's delta to its base weight (True), or yield the
            base weights only (False; for engines that apply the adapter themselves).
        dtype: cast floating-point weights to it (the engine's dtype); None = as held.
        rounding: adds each merged layer's rounding of its adapter update (see `MergeRounding`).
    """
    base = base_model(model)
    with _full_params(base):
        for name, tensor in _walk(base, "", merge_adapters, set(), dtype, rounding):
            yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@contextlib.contextmanager
def _full_params(model: Any) -> Iterator[None]:
    """FSDP1 keeps flat shards: gather them for the duration of the iteration (read-only)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - torch without distributed
        yield
        return
    if any(isinstance(m, FSDP) for m in model.modules()):
        with FSDP.summon_full_params(model, writeback=False, recurse=True):
            yield
    else:
        yield


def _walk(
    module: Any, prefix: str, merge: bool, seen: set[int], dtype: torch.dtype | None, rounding: MergeRounding | None
) -> Iterator[tuple[str, torch.Tensor]]:
    lora_layer, modules_to_save = _peft_classes()
    if lora_layer is not None and isinstance(module, lora_layer):
        yield from _lora_layer_weights(module, prefix, merge, seen, dtype, rounding)
        return
    if modules_to_save is not None and isinstance(module, modules_to_save):
        active = module.active_adapters[0] if module.active_adapters else None
        inner = module.modules_to_save[active] if active is not None else module.original_module
        yield from _walk(inner, prefix, merge, seen, dtype, rounding)
        return
    for name, param in module.named_parameters(recurse=False):
        if id(param) in seen:  # tied weights: once, under the first name (the input embedding)
            continue
        seen.add(id(param))
        tensor = _dequantized(module) if name == "weight" and _is_quantized(param) else param
        yield prefix + name, _full(tensor).detach()
    for name, child in module.named_children():
        yield from _walk(child, prefix if name in _WRAPPER_NAMES else f"{prefix}{name}.", merge, seen, dtype, rounding)


def _lora_layer_weights(
    layer: Any, prefix: str, merge: bool, seen: set[int], dtype: torch.dtype | None, rounding: MergeRounding | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """A peft LoRA layer as the plain layer it stands for: base weight (+ active adapter deltas), bias."""
    base_layer = layer.get_base_layer()
    weight = base_layer.weight
    seen.add(id(weight))
    full = _full(_dequantized(base_layer) if _is_quantized(weight) else weight).detach()
    if merge and not getattr(layer, "merged", False):
        deltas = []
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
                continue
            if getattr(layer, "use_dora", {}).get(adapter, False):
                raise NotImplementedError(
                    f"{prefix}: DoRA adapters cannot be synced as merged weights; use the engine's "
                    "lora_sync: adapter mode or a plain LoRA adapter (use_dora: false)"
                )
            deltas.append(_full(layer.get_delta_weight(adapter)).detach())
        if deltas:
            merged = full.float()
            update = sum(delta.to(device=merged.device, dtype=torch.float32) for delta in deltas)
            merged = merged + update
            # rounded once, straight to the dtype the weights are yielded in (dense: quantised bases were
            # dequantised above)
            rounded = merged.to(dtype if dtype is not None else full.dtype)
            if rounding is not None:  # what the update became in the rounded weight
                rounding.add(rounded.float() - full.to(rounded.dtype).float(), update)
            full = rounded
    yield prefix + "weight", full
    bias = getattr(base_layer, "bias", None)
    if bias is not None:
        seen.add(id(bias))
        yield prefix + "bias", _full(bias).detach()


def _is_quantized(param: torch.Tensor) -> bool:
    return type(param).__name__ in ("Params4bit", "Int8Params")


def _dequantized(module: Any) -> torch.Tensor:
    """bitsandbytes 4-bit/8-bit weight -> a dense tensor in its compute dtype."""
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(module)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 shard) gathered to the full tensor; anything else as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _peft_classes() -> tuple[Any, Any]:
    """peft's LoRA layer and wrapper classes, or Nones when peft is not imported: a model holds peft layers only once
    peft is imported, and importing it imports bitsandbytes, whose CPU backend logs a failed hub download offline."""
    if "peft" not in sys.modules:
        return None, None
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    return LoraLayer, ModulesToSaveWrapper
