"""Loading the policy for training: an HF causal LM by path, with LoRA adapters (peft) or a 4-bit QLoRA base
(bitsandbytes, the ``quant`` extra), and the chunked log-prob forward over completion tokens.

Built-in model names (``thinktwice:tiny``, ...) are resolved in `thinktwice_pl.builtin_models`; strategies,
precision and FSDP2 sharding are in `thinktwice_pl.parallel`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from thinktwice_pl.attention import use_grouped_sdpa
from thinktwice_pl.batching import Collated
from thinktwice_pl.errors import UserError
from thinktwice_pl.grpo import grad_in_place, token_logprobs
from thinktwice_pl.optional import BITSANDBYTES, require

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
            raise UserError(f"model.lora.rank={self.rank} must be at least 1")
        if not 0 <= self.dropout < 1:
            raise UserError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
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


def trim_host_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere a no-op).

    Tensors of a few MiB (activations, KV caches) come from glibc's heap, and freed ones stay resident until a
    request of a fitting size reuses them. Phases alternate between shapes (short solve prompts, long refine prompts,
    generation caches that grow token by token, an update's activations), so without this the resident set keeps the
    high-water mark of every shape seen so far. Called after each phase's generation and update; it costs a few
    milliseconds."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


HOST_MMAP_THRESHOLD = 4 << 20  # bytes


def configure_host_allocator() -> None:
    """Serve host allocations of 4 MiB and more with their own mappings, returned to the system when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``; a no-op elsewhere, or when ``MALLOC_MMAP_THRESHOLD_`` is set in the environment).

    glibc starts with a 128 KiB threshold and raises it to the size of each mapped block that is freed, up to
    32 MiB: after the first few logits chunks and KV buffers, every tensor under 32 MiB comes from the heap, where
    freed blocks stay resident until a request of a fitting size reuses them. A fixed threshold stops that. Measured
    on the quickstart (4 phases, 2 cores): the update's resident peak 2.89 GiB instead of 3.00-3.13, same time."""
    if _LIBC is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD)


_M_MMAP_THRESHOLD = -3  # glibc malloc.h


def _glibc() -> Any:
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # glibc only (not musl)


_LIBC = _glibc()


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


def completion_logprobs(
    model: Any, batch: Collated, *, temperature: float, chunk_size: int, with_grad: bool, share_prompts: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and entropies of the completions of a collated micro-batch: ``([n, C], [n, C])``.

    Only the completion positions go through the LM head. The forward enters through the model itself with an
    empty `logits_to_keep` (under FSDP2 the root unit's forward gathers the embeddings and the head, which stay
    gathered until backward); a hook takes the decoder's last hidden state and the head is applied to it in chunks
    (`token_logprobs`), so the fp32 logits of the whole micro-batch never exist at once. Entropies are zeros
    without `with_grad` (only the update reports them).

    With `share_prompts`, when rows share a prompt (the samples of a group), each distinct prompt runs once and its
    KV cache is gathered to its rows for a second forward over the completions only (`prompt_sharing_blocker`
    says when this is off). Same log-probs up to float rounding and the same gradients (the rows' gradients reach
    the shared prompt's activations through the gather), for fewer tokens: 16 rows of a 212-token refine prompt
    in 4 groups run 4 x 212 prompt tokens instead of 16 x 212.

    A weight used twice in one graph (every weight, with a shared prompt; a tied embedding and head) has its
    gradient summed by autograd before any of it reaches `.grad`: the first use's gradient of every weight would be
    held until the other use's backward ends (a second copy of all gradients, for the shared-prompt forward). With
    `with_grad`, the use that backward reaches first (the completions' forward, the head) goes through
    `gradient_leaves`, whose gradients are added to `.grad` as backward produces them; the last use (the prompt's
    forward, the input embedding) accumulates through the parameter itself, so a DDP reducer, which all-reduces a
    gradient from that accumulation, finds both shares in it. Not under FSDP, whose parameters are its own.
    Likewise, once `.grad` holds a micro-batch's gradients, the two vocabulary-sized ones (the head's weight and the
    input embedding's, ``[V, H]`` each) are added to it in place (`token_logprobs`'s `grad_into`,
    `_RowSparseEmbedding`) instead of arriving as dense temporaries at the peak of backward.
    """
    base = base_model(model)
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    device = next(model.parameters()).device
    input_ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
    positions = batch.position_ids.to(device)
    start, width = batch.prompt_width, batch.completion_mask.shape[1]
    no_logits = torch.zeros(0, dtype=torch.long, device=device)
    shared = share_prompts and batch.num_prompts < len(input_ids) and prompt_sharing_blocker(model) is None
    sharded = _fsdp_wrapped(model)
    direct = with_grad and not sharded
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad} if direct and shared else {}
    # a plain bias-free linear head goes to `token_logprobs` as its weight (the hand-written log-softmax)
    head_input: Any = head.weight if _plain_linear(head) and not sharded else head
    if direct and getattr(head, "weight", None) is base.get_input_embeddings().weight and head.weight.requires_grad:
        # tied embeddings: the head's gradient would wait for the embedding's, at the end of backward
        head_leaf = gradient_leaves({"weight": head.weight})
        head_input = (
            head_leaf["weight"]
            if head_input is head.weight
            else functools.partial(torch.func.functional_call, head, head_leaf)
        )
    captured: list[torch.Tensor] = []
    hook = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    embedding = base.get_input_embeddings()
    with (
        torch.enable_grad() if with_grad else torch.no_grad(),
        _embedding_gradient_in_place(embedding) if direct else contextlib.nullcontext(),
    ):
        try:
            if shared:
                index = batch.prompt_index.to(device)
                with _cache_kept_under_checkpointing(model):
                    first, recorder = batch.first_rows.to(device), _PromptRecorder.cache()
                    model(input_ids=input_ids[first, :start], attention_mask=attention[first, :start],
                          position_ids=positions[first, :start], past_key_values=recorder, use_cache=False,
                          logits_to_keep=no_logits)  # fmt: skip
                    reader = _PromptReader.cache(recorder, index)
                    completions = dict(input_ids=input_ids[:, start:], attention_mask=attention,
                                       position_ids=positions[:, start:], past_key_values=reader, use_cache=False,
                                       logits_to_keep=no_logits)  # fmt: skip
                    if direct:  # backward reaches this forward first: its weight gradients go to .grad at once
                        torch.func.functional_call(model, gradient_leaves(trainable), args=(), kwargs=completions)
                    else:
                        model(**completions)
                if not reader.layers or any(layer.reads == 0 for layer in reader.layers):
                    raise RuntimeError(f"{type(base).__name__}: a layer did not read the shared prompt's KV cache; "
                                       "set model.share_prompts=false")  # fmt: skip
            else:
                model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=False,
                      logits_to_keep=no_logits)  # fmt: skip
        finally:
            hook.remove()
        if shared:  # the prompt's last position predicts the first completion token, each completion position the next
            hidden = torch.cat([captured[0][:, -1:][index], captured[1][:, :-1]], dim=1)  # [n, C, H]
        else:
            hidden = captured[-1][:, start - 1 : start + width - 1]  # [n, C, H]: position t predicts token t + 1
        logprobs, entropy = token_logprobs(
            hidden,
            head_input,
            input_ids[:, start:],
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_grad,
            grad_into=head.weight if direct else None,
        )  # [n, C] each
    return logprobs, entropy if entropy is not None else torch.zeros_like(logprobs)


def _plain_linear(module: Any) -> bool:
    """A `torch.nn.Linear` itself (not a LoRA or quantized subclass) without bias, holding a plain tensor."""
    plain = type(module) is torch.nn.Linear and module.bias is None
    return plain and type(module.weight) in (torch.Tensor, torch.nn.Parameter)


def gradient_leaves(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """A leaf per parameter that shares its storage and adds its gradient to the parameter's `.grad` as soon as
    autograd has it (for `torch.func.functional_call`): a forward through these leaves is a use of the parameters
    whose gradient autograd does not hold back until the parameters' other uses are done."""
    leaves = {}
    for name, param in params.items():
        leaf = param.detach().requires_grad_()
        leaf.register_post_accumulate_grad_hook(functools.partial(_add_to_grad, param))
        leaves[name] = leaf
    return leaves


def _add_to_grad(param: torch.nn.Parameter, leaf: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = leaf.grad
    else:
        param.grad.add_(leaf.grad)
    leaf.grad = None


@contextlib.contextmanager
def _embedding_gradient_in_place(embedding: Any) -> Iterator[None]:
    """While it is open, a plain `torch.nn.Embedding` (no max_norm, scale_grad_by_freq or sparse option) looks up
    through `_RowSparseEmbedding`, whose gradient is added to the weight's existing `.grad` row by row instead of
    through a dense ``[V, H]`` tensor. Other embeddings are left alone."""
    weight = getattr(embedding, "weight", None)
    plain = type(embedding) is torch.nn.Embedding and type(weight) in (torch.Tensor, torch.nn.Parameter)
    options = plain and (embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse)
    if not plain or options or not weight.requires_grad:  # nothing to change
        yield
        return

    def lookup(ids: torch.Tensor) -> torch.Tensor:  # reads .weight at call time: a gradient leaf under functional_call
        return _RowSparseEmbedding.apply(ids, embedding.weight, weight, embedding.padding_idx)

    embedding.forward = lookup
    try:
        yield
    finally:
        del embedding.forward


class _RowSparseEmbedding(torch.autograd.Function):
    """``F.embedding(ids, weight)`` whose backward, when ``grad_into.grad`` exists (a later micro-batch, or the
    second use of a tied weight, after the head), returns the gradient as a sparse tensor over the looked-up rows:
    autograd adds it to that ``.grad`` in place, where the plain lookup's backward allocates a zero ``[V, H]`` tensor
    first (the vocabulary's rows, ~108 MiB for SmolLM2 in fp32, at the end of backward when every other gradient
    exists). Duplicate ids are summed in order before the add, as the dense backward does, so ``.grad`` comes out
    bit for bit the same. Without a ``.grad`` yet, the dense gradient is returned (it becomes ``.grad``)."""

    @staticmethod
    def forward(
        ctx: Any, ids: torch.Tensor, weight: torch.Tensor, grad_into: torch.Tensor, padding_idx: int | None
    ) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.grad_into, ctx.padding_idx, ctx.rows = grad_into, padding_idx, weight.shape[0]
        return torch.nn.functional.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (ids,) = ctx.saved_tensors
        padding = -1 if ctx.padding_idx is None else ctx.padding_idx
        if grad_in_place(ctx.grad_into, grad.dtype) is None:
            dense = torch.ops.aten.embedding_dense_backward(grad, ids, ctx.rows, padding, False)
            return None, dense, None, None
        ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])  # [tokens], [tokens, H]
        if ctx.padding_idx is not None:  # the padding row gets no gradient
            keep = ids != padding
            ids, grad = ids[keep], grad[keep]
        rows, slot = torch.unique(ids, return_inverse=True)  # sorted rows, each token's row slot
        values = grad.new_zeros(len(rows), grad.shape[-1]).index_add_(0, slot, grad)
        shape = (ctx.rows, grad.shape[-1])
        sparse = torch.sparse_coo_tensor(rows[None], values, shape, is_coalesced=True, check_invariants=False)
        return None, sparse, None, None


def _fsdp_wrapped(model: Any) -> bool:
    """True for FSDP2's sharded (DTensor) or FSDP1's flat parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return is_sharded(model) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def prompt_sharing_blocker(model: Any) -> str | None:
    """Why the shared-prompt forward of `completion_logprobs` cannot run on `model`, or None when it can.

    - FSDP (2 or 1): two forwards of the root unit before one backward are not a pattern FSDP's hooks are built
      for, so sharded runs keep the single forward;
    - gradient checkpointing with a transformers whose checkpointed layers cannot be told to keep a cache (no
      `_can_checkpoint_with_cache`; a layer that still drops it fails the forward's read check instead);
    - attention other than full causal attention in some layer (sliding windows, linear attention): the prompt's
      cache is kept whole, which only full attention reads as the joint forward does.
    """
    if is_sharded(model):
        return "FSDP2"
    if _fsdp_wrapped(model):
        return "FSDP"
    from transformers.modeling_layers import GradientCheckpointingLayer

    if (
        model.training
        and checkpointed_modules(model)
        and not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")
    ):
        return "gradient checkpointing (this transformers version drops a KV cache under it)"
    config = base_model(model).config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        return f"attention layers {sorted(kinds)}"
    # Qwen2/3 carry a sliding_window they do not use (use_sliding_window: false); Mistral-style configs use it
    if getattr(config, "use_sliding_window", getattr(config, "sliding_window", None) is not None):
        return "sliding-window attention"
    return None


class _PromptRecorder(DynamicLayer):
    """One layer's KV cache in the prompt pass of a shared-prompt forward: keeps the first states it is given and
    returns the states of each call unchanged (the prompt has no past). A checkpointed layer runs its forward again
    in backward; that second call changes nothing."""

    @classmethod
    def cache(cls) -> DynamicCache:
        cache = DynamicCache()
        cache.layer_class_to_replicate = cls  # one recorder per layer, created as the forward reaches it
        return cache

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states


class _PromptReader(DynamicLayer):
    """One layer's KV cache in the completion pass: the prompt's recorded states, gathered to the completion rows
    and prepended to each call's states, never extended (so a checkpointed layer's second call reads the same).

    The gather happens in each call, so the rows' copy of the prompt's states (``[n, heads, P, dim]``, n / prompts
    times the recorded ones) exists only while the layer runs, not for every layer from the forward to the end of
    backward. It is differentiable: the rows' gradients sum into their prompt's."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.is_initialized = keys, values, True  # [prompts, heads, P, dim]
        self.index = index  # [n]: each row's prompt
        self.reads = 0  # a layer that never read the prompt would have attended to its completion alone

    @classmethod
    def cache(cls, recorder: DynamicCache, index: torch.Tensor) -> DynamicCache:
        """The completion pass's cache: each recorded layer's states, read by the rows of `index`'s prompts."""
        cache = DynamicCache()
        cache.layers = [cls(layer.keys, layer.values, index) for layer in recorder.layers]
        cache.layer_class_to_replicate = None  # a layer the prompt pass did not reach is an error, not a new cache
        return cache

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        keys, values = self.keys.index_select(0, self.index), self.values.index_select(0, self.index)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)


@contextlib.contextmanager
def _cache_kept_under_checkpointing(model: Any) -> Iterator[None]:
    """Let checkpointed decoder layers keep the shared prompt's cache object: transformers drops the cache of a layer
    under gradient checkpointing unless it is marked as only read (`_can_checkpoint_with_cache`), because a cache
    that grows would grow again when backward recomputes the layer. `_PromptRecorder` and `_PromptReader` give the
    same result on a second call, which is that condition."""
    layers = [m for m in checkpointed_modules(model) if getattr(m, "_can_checkpoint_with_cache", None) is False]
    for layer in layers:
        layer._can_checkpoint_with_cache = True  # an instance attribute over the class's False
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # the class's False again


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
