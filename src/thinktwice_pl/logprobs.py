"""The log-prob forward of the policy over the completion tokens of a collated micro-batch, with a shared prompt
run once per group."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from thinktwice_pl.batching import Collated
from thinktwice_pl.grad_accumulation import embedding_gradient_in_place, gradient_leaves
from thinktwice_pl.lm_head import token_logprobs
from thinktwice_pl.models import base_model, checkpointed_modules, fsdp_wrapped, is_sharded


def completion_logprobs(
    model: Any, batch: Collated, *, temperature: float, chunk_size: int, with_grad: bool, share_prompts: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probs and entropies of the completions of a collated micro-batch: ``([n, C], [n, C])``.

    The model runs without logits (an empty `logits_to_keep`; under FSDP2 the root unit still gathers the embeddings
    and the head); a hook takes the decoder's last hidden state at the completion positions and `token_logprobs`
    applies the head in chunks, so the micro-batch's fp32 logits never exist at once. Entropies are zeros without
    `with_grad` (only the update reports them).

    With `share_prompts`, rows that share a prompt (a group's samples) run it once, and its KV cache is gathered to
    the rows for a forward over the completions alone: the same log-probs and gradients for fewer tokens
    (`prompt_sharing_blocker` says when this is off).

    With `with_grad` (not under FSDP, whose parameters are its own), gradients reach ``.grad`` as backward produces
    them instead of when a weight's last use is done (`thinktwice_pl.grad_accumulation`): the use backward reaches
    first (the completions' forward, a tied head) goes through gradient leaves, the last (the prompt's forward, the
    input embedding) through the parameter itself, where a DDP reducer looks for it; the head's and the input
    embedding's ``[V, H]`` gradients are added to an existing ``.grad`` in place.
    """
    base = base_model(model)
    device = next(model.parameters()).device
    on_device = _to_device(batch, device)
    shared = share_prompts and batch.num_prompts < len(batch.input_ids) and prompt_sharing_blocker(model) is None
    sharded = fsdp_wrapped(model)
    direct = with_grad and not sharded
    head = base.get_output_embeddings()
    embedding = base.get_input_embeddings()
    with (
        torch.enable_grad() if with_grad else torch.no_grad(),
        embedding_gradient_in_place(embedding) if direct else contextlib.nullcontext(),
    ):
        forward = functools.partial(_shared_prompt_hidden, direct=direct) if shared else _joint_hidden
        hidden = forward(model, on_device)  # [n, C, H]
        logprobs, entropy = token_logprobs(
            hidden,
            _head_input(base, direct=direct, sharded=sharded),
            on_device.input_ids[:, batch.prompt_width :],
            temperature=temperature,
            chunk_size=chunk_size,
            with_entropy=with_grad,
            grad_into=head.weight if direct else None,
        )  # [n, C] each
    return logprobs, entropy if entropy is not None else torch.zeros_like(logprobs)


def _to_device(batch: Collated, device: torch.device) -> Collated:
    tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch) if f.name != "prompt_width"}
    return dataclasses.replace(batch, **{name: t.to(device) for name, t in tensors.items()})


def _head_input(base: Any, *, direct: bool, sharded: bool) -> Any:
    """What `token_logprobs` applies: a plain bias-free linear head's weight (its hand-written log-softmax), else
    the head module; a tied head that trains goes through a gradient leaf, so its gradient does not wait for the
    input embedding's at the end of backward."""
    head = base.get_output_embeddings()
    head_input: Any = head.weight if _plain_linear(head) and not sharded else head
    tied = getattr(head, "weight", None) is base.get_input_embeddings().weight
    if direct and tied and head.weight.requires_grad:
        leaf = gradient_leaves({"weight": head.weight})
        if head_input is head.weight:
            return leaf["weight"]
        return functools.partial(torch.func.functional_call, head, leaf)
    return head_input


@contextlib.contextmanager
def _decoder_outputs(model: Any) -> Iterator[list[torch.Tensor]]:
    """The last hidden states ``[rows, positions, H]`` of each decoder call while the context is open."""
    captured: list[torch.Tensor] = []
    decoder = base_model(model).get_decoder()
    hook = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        yield captured
    finally:
        hook.remove()


def _joint_hidden(model: Any, batch: Collated) -> torch.Tensor:
    """Hidden states ``[n, C, H]`` that predict each completion token, from one forward over prompts and completions."""
    no_logits = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
    with _decoder_outputs(model) as captured:
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=no_logits,
        )
    start, width = batch.prompt_width, batch.completion_mask.shape[1]
    return captured[-1][:, start - 1 : start + width - 1]  # position t predicts token t + 1


def _shared_prompt_hidden(model: Any, batch: Collated, *, direct: bool) -> torch.Tensor:
    """Hidden states ``[n, C, H]`` that predict each completion token, from a forward over each distinct prompt and
    one over the completions, which read their prompt's KV cache. With `direct` the completions' forward goes
    through gradient leaves (backward reaches it first): its weight gradients go to ``.grad`` at once."""
    start, first = batch.prompt_width, batch.first_rows
    no_logits = torch.zeros(0, dtype=torch.long, device=batch.input_ids.device)
    recorder = _PromptRecorder.cache()
    with _cache_kept_under_checkpointing(model), _decoder_outputs(model) as captured:
        model(
            input_ids=batch.input_ids[first, :start],
            attention_mask=batch.attention_mask[first, :start],
            position_ids=batch.position_ids[first, :start],
            past_key_values=recorder,
            use_cache=False,
            logits_to_keep=no_logits,
        )
        reader = _PromptReader.cache(recorder, batch.prompt_index)
        completions = {
            "input_ids": batch.input_ids[:, start:],
            "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids[:, start:],
            "past_key_values": reader,
            "use_cache": False,
            "logits_to_keep": no_logits,
        }
        if direct:
            trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
            torch.func.functional_call(model, gradient_leaves(trainable), args=(), kwargs=completions)
        else:
            model(**completions)
    if not reader.layers or any(layer.reads == 0 for layer in reader.layers):
        name = type(base_model(model)).__name__
        raise RuntimeError(f"{name}: a layer did not read the shared prompt's KV cache; set model.share_prompts=false")
    # the prompt's last position predicts the first completion token, each completion position the next
    return torch.cat([captured[0][:, -1:][batch.prompt_index], captured[1][:, :-1]], dim=1)


def _plain_linear(module: Any) -> bool:
    """A `torch.nn.Linear` itself (not a LoRA or quantized subclass) without bias, holding a plain tensor."""
    plain = type(module) is torch.nn.Linear and module.bias is None
    return plain and type(module.weight) in (torch.Tensor, torch.nn.Parameter)


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
    if fsdp_wrapped(model):
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
