"""Shared pieces of the vLLM engine tests: engine lifetime, HF reference log-probs, a real update step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from thinktwice_pl.grpo import policy_loss
from thinktwice_pl.rollout import SamplingConfig

# a CPU KV cache of 64 MiB: plenty for the tiny model, and no 18 GB reservation
ENGINE_KW: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 1024}
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=24, seed=0)


@contextlib.contextmanager
def vllm_engine(model: Any, tokenizer: Any, **kw: Any) -> Iterator[Any]:
    """A started VLLMRolloutEngine, shut down afterwards (one engine per process at a time)."""
    from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(**{**ENGINE_KW, **kw})
    engine.setup(model, tokenizer)
    try:
        yield engine
    finally:
        engine.close()


@torch.no_grad()
def hf_logprobs(
    model: Any, prompt: list[int], completion: list[int], temperature: float = 1.0, train_mode: bool = False
) -> torch.Tensor:
    """log pi(completion token | prefix) from one full HF forward pass, ``[len(completion)]`` float32.

    `train_mode`: forward in train mode, as the trainer does (bitsandbytes' CPU 4-bit kernels differ by ~2e-3
    between eval and train mode; dropout is 0 in these models, so nothing else changes).
    """
    was_training = model.training
    model.train(train_mode)
    try:
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([prompt + completion], device=device)).logits[0].float().cpu()
    finally:
        model.train(was_training)
    logits = logits[len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def max_gap(
    model: Any, prompt: list[int], completion: Any, temperature: float = 1.0, train_mode: bool = False
) -> float:
    """Largest |sampler log-prob - HF log-prob| over a completion's tokens."""
    reference = hf_logprobs(model, prompt, completion.token_ids, temperature, train_mode)
    return float((reference - torch.tensor(completion.logprobs)).abs().max())


def update_step(model: Any, prompt: list[int], completions: list[Any], lr: float = 0.05) -> None:
    """One real GRPO update (policy_loss + AdamW) on the given completions, large enough to move the outputs."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    width = max(len(c.token_ids) for c in completions)
    logprobs, mask = [], []
    for c in completions:
        logits = model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        logprobs.append(torch.nn.functional.pad(lp, (0, width - len(lp))))
        mask.append(torch.nn.functional.pad(torch.ones(len(lp)), (0, width - len(lp))))
    lp_t, mask_t = torch.stack(logprobs), torch.stack(mask)
    advantages = torch.linspace(-1.0, 1.0, len(completions))
    loss, _ = policy_loss(lp_t, lp_t.detach(), advantages, mask_t)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
