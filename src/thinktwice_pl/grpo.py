"""GRPO math as pure tensor functions: group advantages, the clipped policy loss, the k3 KL.

No Lightning, no I/O. Shapes are in comments: ``N`` rollouts, ``T`` completion length, ``S`` full
sequence length, ``H`` hidden size, ``V`` vocabulary size.

What the ThinkTwice reference code runs (METHOD.md section 3), and what we default to:

- advantage ``A = r - mean(r over the group)`` without std scaling (Dr.GRPO, Liu et al. 2025,
  arXiv 2503.20783); the original GRPO std scaling (Shao et al. 2024, arXiv 2402.03300) is
  ``scale="group"``;
- PPO ratio clipping with asymmetric bounds ``[1 - epsilon_low, 1 + epsilon_high]``
  ("clip-higher", DAPO, Yu et al. 2025, arXiv 2503.14476), log-ratio clamped to [-20, 20];
- dual clip (Ye et al. 2020, arXiv 1912.09729): for negative advantages the per-token loss is
  capped at ``-A * clip_ratio_c``;
- token-mean aggregation over every completion token of the optimizer step (``loss_type="dapo"``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

ScaleRewards = Literal["none", "group", "batch"]
LossType = Literal["dapo", "grpo", "dr_grpo"]
LOG_RATIO_CLAMP = 20.0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: ScaleRewards = "none") -> torch.Tensor:
    """Group-relative advantages.

    Args:
        rewards: ``[num_groups * group_size]`` in group-major order (sample j of group g at
            ``g * group_size + j``).
        group_size: G, the number of samples per prompt.
        scale: ``"none"``: ``r - mean_g`` (reference code, Dr.GRPO); ``"group"``: divided by the
            group's std (original GRPO); ``"batch"``: divided by the std of all rewards of the batch.

    Returns:
        Advantages of the same shape as ``rewards``. A group whose rewards are all equal gets 0.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be 1-D with a multiple of group_size={group_size} items, got {tuple(rewards.shape)}"
        )
    grouped = rewards.float().view(-1, group_size)  # [num_groups, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # [num_groups, G]
    if scale == "none":
        return centred.view(-1)
    eps = 1e-4  # as in TRL/verl: a zero-variance group stays at advantage 0, not nan
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        return (centred / (std + eps)).view(-1)
    if scale == "batch":
        std = rewards.float().std() if rewards.numel() > 1 else rewards.new_zeros(())
        return (centred / (std + eps)).view(-1)
    raise ValueError(f"scale_rewards must be 'none', 'group' or 'batch', got {scale!r}")


def truncated_importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, float]:
    """Truncated importance weights ``min(pi_old / pi_sampler, cap)`` per token (Yao et al. 2025), from the log-ratio
    ``[N, T]``, and how many masked tokens the cap bound."""
    ratio = torch.exp(log_ratio.clamp(max=math.log(cap) + 1.0))  # [N, T]; anything past log(cap) is capped anyway
    capped = float(((ratio > cap).float() * mask).sum())
    return ratio.clamp(max=cap), capped


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is set (0 when the mask is empty)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(ref - lp) - (ref - lp) - 1`` (Schulman 2020).

    Unbiased, always >= 0, low variance. Shapes ``[N, T]`` -> ``[N, T]``.
    """
    delta = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(delta) - delta - 1.0


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.28,
    clip_ratio_c: float | None = 3.0,
    loss_type: LossType = "dapo",
    max_completion_length: int | None = None,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped GRPO policy loss with dual clip and optional k3 KL.

    For gradient accumulation over micro-batches, pass the optimizer step's totals as
    `num_tokens` (dapo) / `num_sequences` (grpo, dr_grpo): then the losses of the micro-batches add
    up to the loss of the whole step computed at once.

    Args:
        logprobs: ``[N, T]`` current log-probs of the completion tokens (with grad).
        old_logprobs: ``[N, T]`` log-probs under the policy that sampled (no grad).
        advantages: ``[N]`` one advantage per sequence.
        completion_mask: ``[N, T]`` 1 for completion tokens that enter the loss.
        epsilon_low: lower clip, ratio >= 1 - epsilon_low.
        epsilon_high: upper clip, ratio <= 1 + epsilon_high.
        clip_ratio_c: dual-clip constant (> 1) for negative advantages; None disables it.
        loss_type: ``dapo``: sum of token losses / tokens of the step; ``grpo``: mean over each
            sequence's tokens, then mean over sequences; ``dr_grpo``: sum of token losses /
            (max_completion_length * sequences).
        max_completion_length: the constant of dr_grpo.
        ref_logprobs: ``[N, T]`` reference log-probs, required when beta > 0.
        beta: weight of the k3 KL penalty.
        num_tokens: dapo normaliser; defaults to this batch's completion-token count.
        num_sequences: grpo / dr_grpo normaliser; defaults to this batch's size N.
        is_weights: ``[N, T]`` per-token importance weights (no grad) multiplying the clipped policy-gradient
            term, e.g. truncated ``min(pi_old / pi_sampler, cap)`` to correct for a sampler whose numerics
            differ from the trainer's (Yao et al., 2025); the KL term is not weighted.

    Returns:
        ``(loss, stats)``; stats are detached sums over this batch's masked tokens
        (``clip_low``, ``clip_high``, ``clip_dual``, ``kl``, ``tokens``) so they can be added across
        micro-batches and divided by ``tokens`` at the end.
    """
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (rollout.max_completion_length)")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs")
    mask = completion_mask.to(logprobs.dtype)  # [N, T]
    adv = advantages.to(logprobs.dtype).unsqueeze(1)  # [N, 1]

    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [N, T]
    ratio = torch.exp(log_ratio)  # [N, T]
    loss_unclipped = -adv * ratio  # [N, T]
    loss_clipped = -adv * ratio.clamp(1.0 - epsilon_low, 1.0 + epsilon_high)  # [N, T]
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # [N, T]
    dual_clipped = torch.zeros_like(mask, dtype=torch.bool)
    if clip_ratio_c is not None:
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")
        cap = -adv * clip_ratio_c  # [N, 1], positive where adv < 0
        dual_clipped = (adv < 0) & (per_token > cap)  # [N, T]
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach().to(per_token.dtype)

    kl = None
    if beta > 0:
        assert ref_logprobs is not None
        kl = kl_k3(logprobs, ref_logprobs)  # [N, T]
        per_token = per_token + beta * kl

    if loss_type == "dapo":
        denom = float(num_tokens) if num_tokens is not None else mask.sum().clamp(min=1.0)
        loss = (per_token * mask).sum() / denom
    elif loss_type == "grpo":
        n_seq = float(num_sequences) if num_sequences is not None else float(mask.shape[0])
        seq_mean = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [N]
        loss = seq_mean.sum() / n_seq
    elif loss_type == "dr_grpo":
        n_seq = float(num_sequences) if num_sequences is not None else float(mask.shape[0])
        assert max_completion_length is not None
        loss = (per_token * mask).sum() / (max_completion_length * n_seq)
    else:
        raise ValueError(f"loss_type must be 'dapo', 'grpo' or 'dr_grpo', got {loss_type!r}")

    with torch.no_grad():
        is_low = (ratio < 1.0 - epsilon_low) & (adv < 0)  # clipped from below (only binds for A < 0)
        is_high = (ratio > 1.0 + epsilon_high) & (adv > 0)  # clipped from above (only binds for A > 0)
        stats = {
            "clip_low": (is_low.to(mask.dtype) * mask).sum(),
            "clip_high": (is_high.to(mask.dtype) * mask).sum(),
            "clip_dual": (dual_clipped.to(mask.dtype) * mask).sum(),
            "kl": (kl.detach() * mask).sum() if kl is not None else mask.new_zeros(()),
            "tokens": mask.sum(),
        }
    return loss, stats
