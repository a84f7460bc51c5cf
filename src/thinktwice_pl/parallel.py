"""Where and in which precision the policy trains: strategy and precision checks, FSDP2 sharding and its mixed
precision, the compute dtype rollout engines sample in, and the check that lr-sized updates survive the weights'
dtype (METHOD.md section 4: fp32 master weights and AdamW state, bf16 compute).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import Any, NoReturn

import torch

from thinktwice_pl.errors import UserError
from thinktwice_pl.models import decoder_layers


def shard_fsdp2(model: Any, mesh: Any, *, mp_policy: Any = None) -> Any:
    """FSDP2 (`fully_shard`) on each decoder layer and on the model itself (embeddings, final norm, head).

    The model is the root unit, so every forward has to enter through it (the trainer's log-prob pass calls
    ``model(...)`` and applies the head in chunks to the returned hidden states: the root unit does not
    reshard after forward, so its head weight is still gathered then). Tied embeddings stay tied, because
    the embedding and the head share one unit.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------- precision

# Number of explicit mantissa bits: an update smaller than half a weight's spacing (|w| * 2**-bits, roughly) is
# rounded away when it is added to the weight.
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
_PROBE_ELEMENTS = 1 << 16  # weights sampled per tensor for the resolution check


def compute_dtype(precision: str, model: Any) -> torch.dtype:
    """The dtype the policy computes in under ``trainer.precision``: bf16 for ``bf16-mixed`` (autocast over fp32
    master weights), fp16 for ``16-mixed``, else the dtype of its floating-point weights (bf16 when every weight
    is quantised). Rollout engines sample in this dtype, so that the sampler computes like the trainer."""
    if precision == "bf16-mixed":
        return torch.bfloat16
    if precision == "16-mixed":
        return torch.float16
    for param in model.parameters():
        if param.is_floating_point():
            dtype: torch.dtype = param.dtype
            return dtype
    return torch.bfloat16


def lost_update_fraction(model: Any, learning_rate: float) -> float:
    """Share of the trainable 16-bit weights that an update of size `learning_rate` would leave unchanged.

    AdamW's step is about `learning_rate` in size; added to a bf16 weight ``w`` it rounds away when it is below half
    the spacing of bf16 numbers near ``w`` (``2**(floor(log2|w|) - 7)``), i.e. for |w| above about 256 x lr. fp32
    weights count as losing nothing. Estimated on up to 65,536 elements of each tensor (this rank's shard).
    """
    lost = total = 0
    for param in model.parameters():
        bits = _MANTISSA_BITS.get(param.dtype)
        if not param.requires_grad or bits is None:
            if param.requires_grad:
                total += param.numel()
            continue
        data = param.detach()
        data = data.to_local() if hasattr(data, "to_local") else data  # FSDP2 shard
        flat = data.reshape(-1)
        if flat.numel() > _PROBE_ELEMENTS:
            flat = flat[torch.linspace(0, flat.numel() - 1, _PROBE_ELEMENTS, device=flat.device).long()]
        magnitude = flat.float().abs()
        spacing = torch.exp2(torch.floor(torch.log2(magnitude.clamp(min=torch.finfo(param.dtype).tiny))) - bits)
        share = float((learning_rate < spacing / 2).float().mean()) if flat.numel() else 0.0
        lost += round(share * param.numel())
        total += param.numel()
    return lost / total if total else 0.0


def check_update_resolution(model: Any, learning_rate: float, precision: str, dtype: str) -> float:
    """Warn (once, rank 0) when most trainable weights are 16-bit and too large for `learning_rate` to move them.

    METHOD.md section 4: the published runs keep fp32 master weights and AdamW state and compute in bf16; pure bf16
    weights at lr 1e-6 leave almost every update below bf16's resolution. Returns the lost fraction.
    """
    lost = lost_update_fraction(model, learning_rate)
    if lost > 0.5:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"trainer.precision={precision} with model.dtype={dtype}: the trained weights are 16-bit, and at "
            f"model.learning_rate={learning_rate:g} an optimizer step is smaller than half the spacing of "
            f"{lost:.0%} of them, so those updates round away and the model barely trains. Keep fp32 master "
            "weights and compute in bf16: trainer.precision=bf16-mixed with model.dtype=float32 (as "
            "configs/qwen3-4b/thinktwice.yaml), or a LoRA adapter (fp32 adapters on a bf16 base)."
        )
    return lost


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX); elsewhere torch emulates them."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def check_cpu_bf16(precision: str, model: Any, device_type: str) -> bool:
    """Warn (once, rank 0) when a CPU run computes in bf16 (`compute_dtype`) on a CPU without bf16 hardware, where
    torch emulates bf16 matmuls (correct but much slower); returns whether it warned. The run goes on.
    """
    if device_type != "cpu" or compute_dtype(precision, model) != torch.bfloat16 or native_cpu_bf16():
        return False
    from lightning.pytorch.utilities import rank_zero_warn

    weights = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    rank_zero_warn(
        f"trainer.precision={precision} with {str(weights).removeprefix('torch.')} weights computes in bf16, and "
        f"this CPU has no bf16 hardware (no AVX512-BF16 or AMX; torch reports "
        f"{torch.backends.cpu.get_cpu_capability()}): torch emulates bf16 matmuls (10x slower than fp32 on an AVX2 "
        "EPYC; the rollout engine samples in bf16 too). Unless you need bf16 numerics, use --trainer.precision "
        "32-true --model.dtype float32."
    )
    return True


# ---------------------------------------------------------------------------------------------- checks


def check_precision(precision: str) -> None:
    """Refuse fp16 AMP: its loss scaler would have to be unscaled before our gradient clipping and norm logging."""
    if precision in ("16-mixed", "16"):
        raise UserError(
            f"trainer.precision={precision}: fp16 loss scaling is not supported with GRPO's manual optimization; "
            "use bf16-mixed, bf16-true or 32-true"
        )


def check_strategy(strategy: Any, *, lora: bool, quantized: bool) -> None:
    """Refuse the strategy/adapter combinations that are not tested, naming the flags (at set-up, before any work)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    name = type(strategy).__name__
    processes = getattr(strategy, "num_processes", 1) * getattr(strategy, "num_nodes", 1)
    if isinstance(strategy, FSDPStrategy) and processes > 1:
        raise UserError(
            f"trainer.strategy=fsdp (FSDP1) on {processes} devices is not supported: the rollout engine generates "
            "outside the FSDP root's forward, where FSDP1 holds only flat shards. Use FSDP2: trainer.strategy="
            "lightning.pytorch.strategies.ModelParallelStrategy with init_args {data_parallel_size: <devices>, "
            "tensor_parallel_size: 1} (see configs/qwen3-4b/thinktwice.yaml)"
        )
    if quantized and (processes > 1 or isinstance(strategy, FSDPStrategy | ModelParallelStrategy)):
        raise UserError(
            f"model.quantization (QLoRA) with trainer.strategy={name} on {processes} device(s): 4-bit weights are "
            "supported on one device without sharding (trainer.devices=1, trainer.strategy=auto); drop "
            "model.quantization to use LoRA or full fine-tuning on several devices"
        )
    if lora and isinstance(strategy, ModelParallelStrategy | FSDPStrategy):
        raise UserError(
            f"model.lora with trainer.strategy={name} (FSDP) is not supported; LoRA runs on one device or with "
            "trainer.strategy=ddp (adapters are small: sharding them saves little)"
        )
    if not isinstance(strategy, SingleDeviceStrategy | DDPStrategy | ModelParallelStrategy | FSDPStrategy):
        raise UserError(
            f"trainer.strategy={name} is not supported; use auto (one device), ddp, or ModelParallelStrategy (FSDP2)"
        )


def fsdp2_mixed_precision(precision: str) -> Any:
    """FSDP2's mixed precision for trainer.precision=bf16-mixed: bf16 compute and gathers, fp32 weights and grads."""
    if precision != "bf16-mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def check_divisible(problems_per_batch: int, mini_batch_problems: int, world_size: int) -> None:
    """Every rank takes an equal share of the problems of every optimizer step."""
    for flag, value in (
        ("data.problems_per_batch", problems_per_batch),
        ("model.mini_batch_problems", mini_batch_problems),
    ):
        if value % world_size:
            raise UserError(
                f"{flag}={value} is not divisible by the {world_size} ranks (trainer.devices x trainer.num_nodes): "
                "each rank takes an equal share of the problems of every optimizer step"
            )


def shard(model: Any, strategy: Any, mesh: Any, precision: str, *, lora: bool, quantized: bool) -> None:
    """FSDP2 (ModelParallelStrategy): check the combination, then shard `model` over the data-parallel mesh with the
    mixed precision of `precision` (bf16-mixed: bf16 gathers and compute, fp32 weights and gradient reduction)."""
    check_strategy(strategy, lora=lora, quantized=quantized)
    if mesh["tensor_parallel"].size() > 1:
        raise UserError(
            f"ModelParallelStrategy tensor_parallel_size={mesh['tensor_parallel'].size()}: only data-parallel "
            "FSDP2 is supported; set trainer.strategy.init_args.tensor_parallel_size=1 and data_parallel_size "
            "to the number of devices"
        )
    shard_fsdp2(model, mesh["data_parallel"], mp_policy=fsdp2_mixed_precision(precision))


def close_process_group() -> bool:
    """Destroy the default process group, if there is one, while the interpreter is still whole; True when there was.

    Lightning destroys it at exit only for NCCL; a gloo group left to interpreter finalization can abort the process
    with SIGABRT (pytorch/pytorch#179291).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        return True
    return False


def exit_skipping_native_teardown(code: int) -> NoReturn:
    """End a process that ran torch.distributed, once its work is done and written: run the ``atexit`` handlers
    (loggers, Lightning's launcher, multiprocessing) and flush, then leave without interpreter finalization.

    Objects that still hold a gloo group (the DDP reducer, FSDP2's device mesh) can keep its native threads alive
    into the C++ teardown, which then aborts with SIGABRT even after `close_process_group`. Skipping that teardown
    loses nothing the run wrote.
    """
    atexit._run_exitfuncs()  # what a normal exit would run first; CPython's own entry point for it
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def fused_adamw(params: list[torch.nn.Parameter]) -> bool | None:
    """True (fused AdamW) when every trained parameter is a plain CPU tensor, else None (torch's choice: foreach on
    GPUs). On CPU torch's default is a loop over parameters, several times slower; fused gives the same update up
    to float rounding (`scripts/bench_step.py` times a step)."""
    from torch.distributed.tensor import DTensor

    plain_cpu = all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in params)
    return True if params and plain_cpu else None
