"""Generate with transformers on the training model itself (no second copy of the weights)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils.rnn import pad_sequence

from thinktwice_pl.models import is_quantized
from thinktwice_pl.types import Completion, FinishReason

if TYPE_CHECKING:
    from thinktwice_pl.rollout import SamplingConfig


# Explicit neutral values for every logits processor that reshapes the sampling distribution: generate() fills
# unset arguments from the model's generation_config (e.g. repetition_penalty=1.1, min_new_tokens), which would
# make the sampler draw from a different distribution than the one the loss assumes.
NEUTRAL_PROCESSORS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "min_new_tokens": 0,  # also resets min_length (generate sets it to prompt length + min_new_tokens)
    "min_p": None,  # off (an explicit None beats the model's generation_config; 0.0 would warn when greedy)
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "renormalize_logits": False,
}


class HFRolloutEngine:
    """Sample with ``model.generate`` on the policy being trained.

    Weights never go stale (there is only one copy), so `sync_weights` is a no-op. Slow next to vLLM
    on a GPU, but exact, dependency-free and the right choice for CPU runs and tests.

    Args:
        max_batch_sequences: at most this many sequences (prompts x samples) per ``generate`` call;
            None generates a whole phase at once. Lower it when generation runs out of memory.
    """

    def __init__(self, max_batch_sequences: int | None = None) -> None:
        if max_batch_sequences is not None and max_batch_sequences < 1:
            raise ValueError(f"max_batch_sequences must be >= 1 or None, got {max_batch_sequences}")
        self.max_batch_sequences = max_batch_sequences
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
        # eval: no dropout, and gradient checkpointing would otherwise switch the KV cache off. Not for 4-bit
        # bitsandbytes + LoRA: generating in eval mode breaks the next backward (an in-place view error); in
        # train mode under no_grad it does not (dropout is off unless model.lora.dropout > 0).
        if not is_quantized(self.model):
            self.model.eval()
        # FSDP2: every forward gathers parameter shards collectively, so ranks whose samples finish early keep
        # stepping until all ranks are done (transformers' synced_gpus)
        synced = _is_sharded(self.model)
        try:
            with (
                torch.random.fork_rng(devices=rng_devices) if sampling.seed is not None else contextlib.nullcontext(),
                self._autocast(device),
            ):
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                for start in range(0, len(prompts), per_call):
                    results.extend(self._generate_chunk(prompts[start : start + per_call], n, sampling, device, synced))
        finally:
            self.model.train(was_training)
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
        width = input_ids.shape[1]
        greedy = sampling.temperature == 0
        samples = 1 if greedy else n  # greedy samples are identical: decode once, repeat
        # prefill once per prompt: the KV of all prompt tokens but the last, computed for B rows and expanded to the
        # B * samples rows (sample j of prompt i at row i * samples + j, as num_return_sequences orders them);
        # generate() then runs only the last prompt token and the decoding steps
        cache = self._prefill(input_ids, attention_mask, samples) if width > 1 else None
        if samples > 1:
            input_ids = input_ids.repeat_interleave(samples, dim=0)  # [B * n, P]
            attention_mask = attention_mask.repeat_interleave(samples, dim=0)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else (sampling.top_k or 0),
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=1,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
            use_cache=True,
            synced_gpus=synced,
            **NEUTRAL_PROCESSORS,
        )  # [B * samples, P + L], sample j of prompt i at row i * samples + j
        if samples < n:
            out = out.repeat_interleave(n, dim=0)
        new_tokens = out[:, width:].tolist()
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

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, samples: int) -> Any:
        """The KV cache of every prompt token but the last (``[B, P - 1]`` left-padded prompts), computed once per
        prompt and repeated for its `samples` rows. Positions count real tokens, as generate() counts them; no
        logits are computed (an empty `logits_to_keep`)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P], 0 on left padding
        out = self.model(
            input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1], position_ids=position_ids[:, :-1],
            use_cache=True, logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
        )  # fmt: skip
        cache = out.past_key_values
        if cache is None:  # no KV cache (a model in train mode with gradient checkpointing): generate() prefills
            return None
        if samples > 1:
            cache.batch_repeat_interleave(samples)  # [B * samples, ...] per layer, rows of a prompt together
        return cache


def _is_sharded(model: Any) -> bool:
    """True when the model holds FSDP2 (DTensor) parameter shards."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


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
