"""Token log-probs through the LM head in chunks: the fp32 logits of the whole batch never exist at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from thinktwice_pl.grad_accumulation import added_in_place, grad_in_place


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

    `lm_head` is either the weight ``[V, H]`` of a bias-free linear head or any callable head. A weight goes through
    `_HeadLogProbs`, whose log-softmax, entropy and gradient are written by hand: one exponential of the logits in
    forward and one in backward, the entropy (a metric) never recomputed, and the last chunk's exponentials kept for
    backward, which starts with it (chunks are cut from the end, so that chunk is whole). A callable head (LoRA on
    the head, a sharded or quantized one) runs under activation checkpointing per chunk. Both give the same values
    and gradients up to float rounding.

    Args:
        hidden: ``[N, T, H]`` hidden states at the positions that predict each target (i.e. already
            shifted: ``hidden[:, t]`` predicts ``targets[:, t]``).
        lm_head: the head's weight ``[V, H]``, or a map from ``[..., H]`` to ``[..., V]`` logits.
        targets: ``[N, T]`` token ids.
        temperature: logits are divided by it (the sampling temperature, so ratios compare the
            distributions the sampler drew from).
        chunk_size: positions per chunk.
        with_entropy: also return the per-token entropy (no gradient).
        grad_into: the parameter whose ``.grad`` receives a weight head's gradient (the weight, or the parameter
            behind a gradient leaf of it). Once that ``.grad`` exists, each chunk's ``[V, H]`` gradient is added to
            it in place (`grad_in_place`) instead of being allocated and summed by autograd; for a backward that
            fills ``.grad``, not ``torch.autograd.grad``.

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
        ctx: Any,
        hid: torch.Tensor,
        weight: torch.Tensor,
        tgt: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        keep: bool,
        grad_into: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
