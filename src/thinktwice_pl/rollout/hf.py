"""Generate with the transformers model being trained (no second copy of the weights), in a decoding loop of our own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers.cache_utils import DynamicCache, DynamicLayer

from thinktwice_pl.hostmem import trim_host_memory
from thinktwice_pl.models import checkpointed_modules, is_quantized, is_sharded
from thinktwice_pl.types import Completion, FinishReason

if TYPE_CHECKING:
    from thinktwice_pl.rollout import SamplingConfig


class HFRolloutEngine:
    """Sample from the policy being trained with its own forward: a decoding loop over the transformers model.

    Weights never go stale (there is only one copy), so `sync_weights` is a no-op. Slow next to vLLM
    on a GPU, but exact, dependency-free and the right choice for CPU runs and tests. The loop replaces
    ``model.generate``: each prompt is prefilled once for its samples, the KV cache grows in place in buffers
    reserved for the call, and tokens are drawn from softmax(logits / T) after top-k and top-p only (no
    repetition penalty or other processor from the model's generation_config: the loss assumes this
    distribution).

    Args:
        max_batch_sequences: at most this many sequences (prompts x samples) per ``generate`` call;
            None generates a whole phase at once. Lower it when generation runs out of memory.
        max_prefill_tokens: the prompts' prefill runs in passes of at most this many (padded) prompt tokens
            (at least one prompt per pass), each writing its KV states into the buffers reserved for the whole
            generation: the activations of one pass, not of all prompts at once, come on top of the KV cache.
            None prefills all prompts of a call in one pass.
    """

    def __init__(self, max_batch_sequences: int | None = None, max_prefill_tokens: int | None = 2048) -> None:
        if max_batch_sequences is not None and max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1 or None, got {max_batch_sequences}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1 or None, got {max_prefill_tokens}")
        self.max_batch_sequences = max_batch_sequences
        self.max_prefill_tokens = max_prefill_tokens
        self.model: Any = None
        self.tokenizer: Any = None
        self.compute_dtype: torch.dtype | None = None

    def setup(self, model: Any, tokenizer: Any, compute_dtype: torch.dtype | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.compute_dtype = compute_dtype

    def sync_weights(self, model: Any) -> None:
        self.model = model  # same object; nothing to copy

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def close(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        if self.model is None:
            raise RuntimeError("HFRolloutEngine.generate called before setup(model, tokenizer)")
        per_call = max(1, (self.max_batch_sequences or n * len(prompts)) // n)
        results: list[list[Completion]] = []
        device = next(self.model.parameters()).device
        rng_devices = [device] if device.type == "cuda" else []
        was_training = self.model.training
        # eval: no dropout. Not for 4-bit bitsandbytes + LoRA: generating in eval mode breaks the next backward (an
        # in-place view error); in train mode under no_grad it does not (dropout is off unless model.lora.dropout >
        # 0). In train mode, gradient checkpointing would switch the KV cache off (quadratic decoding): paused.
        if not is_quantized(self.model):
            self.model.eval()
        # FSDP2: every forward gathers parameter shards collectively, so ranks whose samples finish early keep
        # stepping until all ranks are done (transformers' synced_gpus)
        synced = is_sharded(self.model)
        try:
            with (
                torch.random.fork_rng(devices=rng_devices) if sampling.seed is not None else contextlib.nullcontext(),
                self._autocast(device),
                _checkpointing_paused(self.model),
            ):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(prompts), per_call):
                    results.extend(self._generate_chunk(prompts[start : start + per_call], n, sampling, device, synced))
        finally:
            self.model.train(was_training)
            trim_host_memory()  # the KV buffers of the call leave the resident set (an evaluation makes several calls)
        return results

    def _autocast(self, device: torch.device) -> Any:
        """Sample in the trainer's compute dtype: under bf16-mixed the fp32 master weights run under bf16 autocast,
        as the trainer's forward does."""
        weights = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if self.compute_dtype is None or self.compute_dtype == weights:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def _generate_chunk(
        self, prompts: list[list[int]], n: int, sampling: SamplingConfig, device: torch.device, synced: bool = False
    ) -> list[list[Completion]]:
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos_ids = eos_token_ids(self.model, tok)
        rows = [torch.tensor(ids, dtype=torch.long) for ids in prompts]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")  # [B, P]
        attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        samples = 1 if sampling.temperature == 0 else n  # greedy samples are identical: decode once, repeat
        tokens = self._decode(input_ids, attention_mask, samples, sampling, eos_ids, pad_id, synced)  # [B * samples, L]
        if samples < n:
            tokens = tokens.repeat_interleave(n, dim=0)
        new_tokens = tokens.tolist()
        results: list[list[Completion]] = []
        for i in range(len(prompts)):
            group = []
            for j in range(n):
                ids = new_tokens[i * n + j]
                stop = next((k for k, t in enumerate(ids) if t in eos_ids), None)
                reason: FinishReason
                if stop is None:  # ran to max_new_tokens (padding after EOS cannot happen without an EOS)
                    completion, reason = ids, "length"
                else:  # keep the EOS token: the policy must learn to stop
                    completion, reason = ids[: stop + 1], "stop"
                text = tok.decode(completion, skip_special_tokens=True)
                group.append(Completion(token_ids=completion, text=text, finish_reason=reason))
            results.append(group)
        return results

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        samples: int,
        sampling: SamplingConfig,
        eos_ids: list[int],
        pad_id: int,
        synced: bool,
    ) -> torch.Tensor:
        """Sample up to ``max_new_tokens`` tokens for each of the ``samples`` rows of each left-padded prompt.

        The prompt is prefilled once (all its tokens but the last, for its B rows; `_prefill`), its KV cache copied
        to the B * samples rows of its samples (sample j of prompt i at row i * samples + j) into buffers reserved
        for the whole generation, then every step runs one token per row. Rows that ended keep stepping (pad tokens,
        never read) until all rows have ended; under FSDP2, until every rank's rows have (each step gathers shards
        collectively). Returns the new tokens, ``[B * samples, steps]``, pad after a row's EOS.
        """
        model, device = self.model, input_ids.device
        width = input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P], real tokens count from 0
        capacity = width + sampling.max_new_tokens
        if width > 1:
            prompt = (input_ids[:, :-1], attention_mask[:, :-1], positions[:, :-1])
            cache = self._prefill(*prompt, samples, capacity, synced)
        else:
            cache = DynamicCache(config=model.config)
        if samples > 1:
            input_ids = input_ids.repeat_interleave(samples, dim=0)  # [B * samples, P]
            attention_mask = attention_mask.repeat_interleave(samples, dim=0)
            positions = positions.repeat_interleave(samples, dim=0)
        rows = input_ids.shape[0]
        step_ids, step_pos = input_ids[:, -1:], positions[:, -1:]
        eos = torch.tensor(eos_ids, device=device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        mask = torch.ones(rows, capacity, dtype=attention_mask.dtype, device=device)
        mask[:, :width] = attention_mask  # [rows, capacity]: the prompt's padding, then every new position
        new: list[torch.Tensor] = []
        for step in range(sampling.max_new_tokens):
            logits = model(
                input_ids=step_ids,
                attention_mask=mask[:, : width + step],
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1, :]
            if step == 0 and width == 1:
                reserve_cache(cache, 1, capacity)
            token = sample_next_tokens(logits, sampling).masked_fill_(done, pad_id)
            new.append(token)
            done |= torch.isin(token, eos)
            if _all_done(done, synced):
                break
            step_ids, step_pos = token[:, None], step_pos + 1
        return torch.stack(new, dim=1)

    def _prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        samples: int,
        capacity: int,
        synced: bool,
    ) -> Any:
        """The KV cache of the ``[B, P]`` prompts, each prompt's states held `samples` times in buffers reserved for
        `capacity` positions. Runs in passes of ``max_prefill_tokens // P`` prompts (at least one), whose attention
        layers write their states straight into those buffers (`_ReservedLayer`), so only one pass's activations
        come on top of them. In one pass under FSDP2 (`synced`: ranks must run as many forwards as each other); a
        model whose cache has layers other than plain `DynamicLayer` (sliding windows, ...) is prefilled in one pass
        into its own cache, then copied into the buffers (`reserve_cache`)."""
        model, rows = self.model, len(input_ids)
        cache = DynamicCache(config=model.config)
        if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
            states = self._prefill_pass(input_ids, attention_mask, positions, None)
            reserve_cache(states, samples, capacity)
            return states
        cache.layers = [_ReservedLayer(rows * samples, samples, capacity) for _ in cache.layers]
        limit = self.max_prefill_tokens
        per_pass = rows if limit is None or synced else max(1, limit // input_ids.shape[1])
        for start in range(0, rows, per_pass):
            for layer in cache.layers:
                layer.first = start
            part = slice(start, start + per_pass)
            self._prefill_pass(input_ids[part], attention_mask[part], positions[part], cache)
        for layer in cache.layers:
            layer.prefilled()
        return cache

    def _prefill_pass(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> Any:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=_NO_LOGITS.to(input_ids.device),
        )
        states = _require_cache(out.past_key_values, self.model)
        if cache is not None and (states is not cache or any(not layer.is_initialized for layer in cache.layers)):
            raise RuntimeError(f"{type(self.model).__name__} did not fill the KV cache it was given in the prefill")
        return states


_NO_LOGITS = torch.zeros(0, dtype=torch.long)  # logits_to_keep for the prefill: no logits at all


def _require_cache(cache: Any, model: Any) -> Any:
    if cache is None:
        raise RuntimeError(
            f"{type(model).__name__} returned no KV cache with use_cache=True; the HF rollout engine needs one "
            "(gradient checkpointing is paused during generation, so this model does not support caching)"
        )
    return cache


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    """Whether every row has ended; under FSDP2 (`synced`), every row of every rank."""
    if not synced:
        return bool(done.all())
    import torch.distributed as dist

    pending = (~done).sum().to(torch.float32)
    dist.all_reduce(pending)
    return bool(pending == 0)


class _ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers reserved for the whole generation: ``rows`` rows (each
    prompt's states `repeats` times, rows of one prompt together) and room for `capacity` positions.

    While prefilling (`first` set), each call writes the states of prompts ``first, first + 1, ...`` to their rows
    (allocating the buffers at the first call, shaped after its states) and returns them as they are, and nothing
    counts as cached yet, so the next pass of prompts starts at position 0 too; `prefilled` ends that. Decoding then
    writes each step in place and returns views of the filled part: transformers' `DynamicLayer` appends a step
    with ``torch.cat``, which copies the layer's whole cache at every step (quadratic in the length; 8% of a
    64-token SmolLM2 generation on CPU). Past the reserved capacity it falls back to concatenation, so it is never
    wrong, only slower.
    """

    def __init__(self, rows: int, repeats: int, capacity: int) -> None:
        super().__init__()
        self.rows, self.repeats, self.capacity = rows, repeats, capacity
        self.first: int | None = 0  # prefilling: the first prompt the next call writes; None once decoding
        self.length = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first is not None:
            self._write(key_states, value_states)
            return key_states, value_states
        start, end = self.keys.shape[-2], self.keys.shape[-2] + key_states.shape[-2]
        if end > self._key_buffer.shape[-2] or self.keys.data_ptr() != self._key_buffer.data_ptr():
            return super().update(key_states, value_states, *args, **kwargs)
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        assert self.first is not None
        length = key_states.shape[-2]
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self._key_buffer, self._value_buffer = (
                states.new_empty(self.rows, states.shape[1], max(self.capacity, length), states.shape[-1])
                for states in (key_states, value_states)
            )
            self.keys, self.values = self._key_buffer[:, :, :0], self._value_buffer[:, :, :0]  # nothing cached yet
            self.is_initialized = True
        for buffer, states in ((self._key_buffer, key_states), (self._value_buffer, value_states)):
            grouped = buffer.view(-1, self.repeats, *buffer.shape[1:])  # [prompts, repeats, heads, capacity, dim]
            grouped[self.first : self.first + len(states), :, :, :length].copy_(states[:, None])
        self.length = length

    def prefilled(self) -> None:
        """End of the prefill: the written positions count as cached, and calls append to them."""
        self.keys, self.values = self._key_buffer[:, :, : self.length], self._value_buffer[:, :, : self.length]
        self.first = None


def reserve_cache(cache: Any, repeats: int, capacity: int) -> None:
    """Turn every filled plain `DynamicLayer` of a `DynamicCache` into a `_ReservedLayer` holding each row
    `repeats` times (rows of one prompt together) with room for `capacity` positions. Other layer kinds (sliding
    windows, quantized caches) are repeated as they are."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.numel() > 0:
            reserved = _ReservedLayer(len(layer.keys) * repeats, repeats, capacity)
            reserved.update(layer.keys, layer.values)
            reserved.prefilled()
            cache.layers[index] = reserved
        elif repeats > 1:
            layer.batch_repeat_interleave(repeats)


def sample_next_tokens(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """One token per row from ``[rows, V]`` logits: argmax when ``temperature == 0``, else a draw from
    `sampling_distribution`.

    The draw inverts the cumulative distribution with one uniform number per row (in float64): an exact sample of
    the same categorical distribution as ``torch.multinomial``, which draws one exponential number per vocabulary
    entry and so costs a noticeable share of decoding. The tokens drawn for a given seed therefore differ from
    transformers' `generate`; their distribution does not.
    """
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs, candidates = sampling_distribution(logits, sampling)
    cdf = probs.double().cumsum(dim=-1)  # [rows, V'], unnormalised
    draw = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    # the first column whose cumulative mass exceeds the draw: never a zero-probability column
    choice = torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[-1] - 1)  # [rows, 1]
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


def sampling_distribution(logits: torch.Tensor, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distribution a sampled token is drawn from: softmax(logits / T) restricted to the top-k tokens, then to
    the top-p nucleus, in that order (the order of transformers' and vLLM's samplers).

    Returns ``(probs, candidates)``: ``probs`` ``[rows, V']``, not renormalised after the top-p cut;
    ``candidates`` the vocabulary id of each column, or None when the columns are the whole vocabulary in order.
    """
    logits = logits.float() / sampling.temperature
    candidates = None
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        logits, candidates = logits.topk(sampling.top_k, dim=-1)  # sorted, largest first
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        if candidates is None:
            probs, candidates = probs.sort(dim=-1, descending=True)
        # keep a token while the mass strictly above it is below top_p (the most likely token always stays)
        above = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(above >= sampling.top_p, 0.0)
    return probs, candidates


@contextlib.contextmanager
def _checkpointing_paused(model: Any) -> Iterator[None]:
    """Switch gradient checkpointing off on every module that has it on, and back on afterwards: under
    ``no_grad`` it saves nothing, and in train mode transformers drops the KV cache for it."""
    paused = checkpointed_modules(model)
    for module in paused:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in paused:
            module.gradient_checkpointing = True


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """All token ids that end a turn: the generation config's EOS ids plus the tokenizer's."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token")
    return sorted(ids)
