"""GRPO math as pure tensor functions: group advantages, chunked token log-probs, the clipped loss.

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

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.utils.checkpoint

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


def token_logprobs(
    hidden: torch.Tensor,
    lm_head: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    grad_into: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of `targets` under the head, without materialising all fp32 logits at once.

    The head is applied to at most `chunk_size` positions at a time; each chunk's logits are upcast
    to fp32, turned into log-probs of the target tokens and dropped. Backward recomputes each chunk's
    logits, so peak memory is one chunk of ``[chunk_size, V]`` fp32 logits instead of ``[N * T, V]``.

    `lm_head` is either the weight ``[V, H]`` of a bias-free linear head or any callable head. With the
    weight, each chunk runs through `_HeadLogProbs`: the log-softmax, the entropy and their gradient are
    written out by hand, with one exponential of the logits in forward and one in backward (autograd through
    ``logsumexp``, ``gather`` and a per-chunk checkpoint made about twice the passes over a chunk's logits, and
    the checkpoint recomputed the entropy, a metric without gradient, in backward), and the last chunk
    keeps its exponentials for backward instead of recomputing them (backward starts with it, so at most one
    chunk of them exists at a time, as in the forward). Chunks are cut from the end, so that last chunk is a
    whole one. A callable head (LoRA on the head, a sharded or quantized one) goes through activation
    checkpointing per chunk instead. Both give the same values and gradients up to float rounding.

    Args:
        hidden: ``[N, T, H]`` hidden states at the positions that predict each target (i.e. already
            shifted: ``hidden[:, t]`` predicts ``targets[:, t]``).
        lm_head: the head's weight ``[V, H]``, or a map from ``[..., H]`` to ``[..., V]`` logits.
        targets: ``[N, T]`` token ids.
        temperature: logits are divided by it (the sampling temperature, so ratios compare the
            distributions the sampler drew from).
        chunk_size: positions per chunk.
        with_entropy: also return the per-token entropy (no gradient).
        grad_into: the parameter whose ``.grad`` receives the weight's gradient (the weight itself, or the
            parameter behind a gradient leaf of it), for a backward that fills ``.grad`` (not
            ``torch.autograd.grad``). With a weight head, once that ``.grad`` exists (a later micro-batch, the second
            use of a tied weight) each chunk's ``[V, H]`` weight gradient is added to it in place
            (`grad_in_place`) instead of being allocated, held and summed by autograd.

    Returns:
        ``(logprobs [N, T], entropy [N, T] or None)``.
    """
    n, t, h = hidden.shape
    flat_hidden = hidden.reshape(n * t, h)  # [N*T, H]
    flat_targets = targets.reshape(n * t)  # [N*T]
    logprob_chunks: list[torch.Tensor] = []
    entropy_chunks: list[torch.Tensor] = []
    total = n * t
    bounds = [(max(0, end - chunk_size), end) for end in range(total, 0, -chunk_size)][::-1]  # the last is whole
    for index, (start, end) in enumerate(bounds):
        hid, tgt = flat_hidden[start:end], flat_targets[start:end]  # [chunk, H], [chunk]
        if isinstance(lm_head, torch.Tensor):
            keep = index == len(bounds) - 1
            lp, ent = _HeadLogProbs.apply(hid, lm_head, tgt, temperature, with_entropy, keep, grad_into)
        elif hid.requires_grad:  # recompute the chunk's logits in backward instead of keeping them
            lp, ent = torch.utils.checkpoint.checkpoint(
                _callable_head_logprobs, lm_head, hid, tgt, temperature, with_entropy, use_reentrant=False
            )
        else:
            lp, ent = _callable_head_logprobs(lm_head, hid, tgt, temperature, with_entropy)
        logprob_chunks.append(lp)
        entropy_chunks.append(ent.detach())
    logprobs = torch.cat(logprob_chunks).view(n, t)  # [N, T]
    entropy = torch.cat(entropy_chunks).view(n, t) if with_entropy else None  # [N, T]
    return logprobs, entropy


def _callable_head_logprobs(
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    hid: torch.Tensor,
    tgt: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hid).float()  # [chunk, V]
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)  # [chunk]
    lp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - log_norm  # [chunk]
    if not with_entropy:
        return lp, lp.new_zeros(())
    with torch.no_grad():  # H = logsumexp(z) - sum_v p_v z_v
        entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # [chunk]
    return lp, entropy


def _shifted_logits(hid: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 ``hid @ weight.T / temperature``, in place where it can be."""
    logits = (hid @ weight.t()).float()  # [chunk, V]; under autocast the product runs in the autocast dtype
    return logits.div_(temperature) if temperature != 1.0 else logits


class _HeadLogProbs(torch.autograd.Function):
    """Log-probs of the targets (and entropies, without gradient) for one chunk of a linear head's inputs.

    With ``z = hid @ W.T / T - m`` (m the row maximum), ``e = exp(z)`` and ``s = sum(e)``: ``lp = z[y] - log s``
    and ``H = log s - sum(e * z) / s``. Backward: ``dlp / dlogits = (onehot(y) - e / s) / T``; ``e`` is
    recomputed from the saved ``m`` and ``s`` unless the chunk kept it.
    """

    @staticmethod
    def forward(
        ctx: Any, hid: torch.Tensor, weight: torch.Tensor, tgt: torch.Tensor, temperature: float,
        with_entropy: bool, keep: bool, grad_into: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        z = _shifted_logits(hid, weight, temperature)  # [chunk, V]
        top = z.amax(dim=-1, keepdim=True)  # [chunk, 1]
        z.sub_(top)
        e = torch.exp(z)
        s = e.sum(dim=-1)  # [chunk]
        log_s = s.log()
        lp = z.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - log_s
        entropy = lp.new_zeros(())
        if with_entropy:  # sum(e * z) per row as a batched dot product (no [chunk, V] temporary), in fp32
            with torch.autocast(hid.device.type, enabled=False):
                entropy = log_s - torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1) / s
        del z
        ctx.save_for_backward(hid, weight, tgt, top, s)
        ctx.kept = e if keep else None  # an intermediate, freed with the graph (or after its first use)
        ctx.temperature, ctx.grad_into = temperature, grad_into
        device = hid.device.type  # the backward's recomputation runs under the forward's autocast
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        ctx.mark_non_differentiable(entropy)
        return lp, entropy

    @staticmethod
    def backward(ctx: Any, grad_lp: torch.Tensor, _grad_entropy: torch.Tensor) -> tuple[Any, ...]:
        hid, weight, tgt, top, s = ctx.saved_tensors
        temperature = ctx.temperature
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            e, ctx.kept = ctx.kept, None  # a second backward through a retained graph recomputes
            if e is None:
                e = _shifted_logits(hid, weight, temperature).sub_(top).exp_()
            grad = grad_lp / temperature  # [chunk]
            grad_logits = e.mul_((-grad / s).unsqueeze(-1))  # -g p / T, in the exponentials' buffer
            grad_logits.scatter_add_(-1, tgt.unsqueeze(-1), grad.unsqueeze(-1))  # + g onehot(y) / T
            grad_logits = grad_logits.to(hid.dtype)
            grad_hid = grad_logits @ weight if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:
                into = grad_in_place(ctx.grad_into, grad_logits.dtype)
                if into is None:
                    grad_weight = grad_logits.t() @ hid
                else:
                    into.addmm_(grad_logits.t(), hid)
                    grad_weight = added_in_place(weight)
        return grad_hid, grad_weight, None, None, None, None, None


def grad_in_place(param: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``param.grad`` when a backward may add a gradient of `dtype` to it in place, else None: it exists, dense,
    of that dtype, outside autograd (the first micro-batch of an optimizer step has none yet; its gradient is then
    allocated and stolen by autograd as usual)."""
    grad = None if param is None else param.grad
    if grad is None or grad.layout != torch.strided or grad.dtype != dtype or grad.requires_grad:
        return None
    return grad


def added_in_place(weight: torch.Tensor) -> torch.Tensor:
    """The gradient a backward returns for `weight` after adding its gradient to ``.grad`` itself: an empty
    sparse tensor of the weight's shape. Autograd still accumulates it, so the hooks on that accumulation (a DDP
    reducer's, a gradient leaf's) run as they would for a dense gradient (Megatron-LM's fused weight-gradient
    accumulation returns a placeholder for the same reason)."""
    rows = torch.zeros(1, 0, dtype=torch.long, device=weight.device)
    values = weight.new_zeros(0, *weight.shape[1:])
    return torch.sparse_coo_tensor(rows, values, weight.shape, is_coalesced=True, check_invariants=False)


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
