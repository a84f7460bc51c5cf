"""Loading the policy for training: an HF causal LM by path, with LoRA adapters (peft) or a 4-bit QLoRA base
(bitsandbytes, the ``quant`` extra), and what the other modules ask of a loaded model (its base, its layers, whether
it is sharded, quantized or checkpointed).

Built-in model names (``thinktwice:tiny``, ...) are resolved in `thinktwice_pl.builtin_models`; strategies,
precision and FSDP2 sharding are in `thinktwice_pl.parallel`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from thinktwice_pl.attention import use_grouped_sdpa
from thinktwice_pl.errors import UserError
from thinktwice_pl.optional import BITSANDBYTES, require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (peft): only the adapter weights are trained, optimised and checkpointed."""

    rank: int = 16
    """Adapter rank r."""
    alpha: int = 32
    """Scaling numerator: the adapter output is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter input (kept even with model.disable_dropout; 0 keeps the PPO ratio exact)."""
    target_modules: list[str] | str = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (e.g. [q_proj, v_proj]) or "all-linear" (every linear layer but the LM head)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UserError(f"model.lora.rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, list) and self.target_modules == ["all-linear"]:
            object.__setattr__(self, "target_modules", "all-linear")  # peft's spelling of the shortcut


@dataclass(frozen=True)
class QuantizationSettings:
    """QLoRA: the frozen base weights in 4 bits (bitsandbytes, the ``quant`` extra); needs model.lora."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type; nf4 is the QLoRA paper's."""
    double_quant: bool = True
    """Quantise the quantisation constants too (about 0.4 bit per weight saved)."""
    compute_dtype: str = "bfloat16"
    """dtype the 4-bit weights are dequantised to for each matmul: float32, bfloat16 or float16."""

    def __post_init__(self) -> None:
        if self.compute_dtype not in DTYPES:
            raise UserError(
                f"model.quantization.compute_dtype must be one of {list(DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.quant_type not in ("nf4", "fp4"):
            raise UserError(f"model.quantization.quant_type must be nf4 or fp4, got {self.quant_type!r}")


def load_causal_lm(
    path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    quantization: QuantizationSettings | None = None,
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    disable_dropout: bool = True,
) -> Any:
    """Load an HF causal LM for training: the given dtype, train mode, cache off, optional checkpointing.

    With `disable_dropout` every dropout is set to 0: the PPO ratio compares two forward passes of the same
    weights, and dropout noise would make it differ from 1 (and the sampler differ from the trainer).
    With `lora` the result is a peft model whose only trainable parameters are the adapters; with
    `quantization` (QLoRA) its frozen base linear layers hold 4-bit bitsandbytes weights.
    """
    from transformers import AutoModelForCausalLM

    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    if quantization is not None and lora is None:
        raise UserError("model.quantization (QLoRA) needs model.lora: 4-bit base weights cannot be trained directly")
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    use_grouped_sdpa(model)  # on CPU: grouped-query K/V heads are not copied to every query head
    if quantization is not None:  # layer norms etc. in fp32, input grads for checkpointing (the QLoRA recipe)
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention modules
                module.attention_dropout = 0.0
    if lora is not None:  # after the dropout pass: the adapter dropout stays as configured
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    model.train()  # from_pretrained returns eval mode
    return model


def _bnb_config(quantization: QuantizationSettings) -> Any:
    from transformers import BitsAndBytesConfig

    require(BITSANDBYTES, "model.quantization (QLoRA)", "pip install 'thinktwice_pl[quant]'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quantization.compute_dtype],
    )


def is_quantized(model: Any) -> bool:
    """True when the model holds 4-bit bitsandbytes weights (QLoRA)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False)
        or getattr(getattr(model, "base_model", None), "is_loaded_in_4bit", False)
    )


def is_peft_model(model: Any) -> bool:
    """True for a peft-wrapped policy (LoRA, QLoRA).

    A model can only be a peft model once peft is imported; a run without LoRA does not import it (peft imports
    bitsandbytes, whose CPU backend then logs a failed kernel download from the hub in every offline run).
    """
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: Any) -> Any:
    """The HF causal LM itself: inside a peft wrapper, or the model."""
    return model.get_base_model() if is_peft_model(model) else model


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (peft-wrapped or not): the FSDP wrapping units."""
    base = base_model(model)
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise NotImplementedError(
            f"{type(base).__name__}: no decoder.layers ModuleList found, so FSDP cannot wrap its blocks"
        )
    return list(layers)


def fsdp_wrapped(model: Any) -> bool:
    """True for FSDP2's sharded (DTensor) or FSDP1's flat parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return is_sharded(model) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def checkpointed_modules(model: Any) -> list[torch.nn.Module]:
    """The modules of `model` with gradient checkpointing switched on (transformers sets the flag on the model and
    on each decoder layer)."""
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def is_sharded(model: Any) -> bool:
    """True when the model holds FSDP2 (DTensor) parameter shards."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def check_supported(model: Any, path: str) -> None:
    """Refuse heads the chunked log-prob forward does not reproduce (it applies the output embedding alone)."""
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, name, None) not in (None, 1.0):
            raise UserError(
                f"model.model_name_or_path={path}: models with config.{name} are not supported (the chunked log-prob "
                "head applies the output embedding alone); choose another model"
            )
