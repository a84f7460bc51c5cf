"""Chunked token log-probs through the LM head (`thinktwice_pl.lm_head`)."""

from __future__ import annotations

import pytest
import torch

from thinktwice_pl.lm_head import token_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("head_kind", ["callable", "weight"])
def test_chunked_token_logprobs_match_full_log_softmax(temperature: float, head_kind: str) -> None:
    """Both heads (a callable under per-chunk checkpointing, a weight through the hand-written log-softmax) give
    the log-probs, entropies and gradients (to the hidden states and to the weight) of one full log-softmax; 21
    positions in chunks of 4 leave a partial chunk, which goes first, and a second backward through the same graph
    (the last chunk's kept exponentials are used once) gives the same gradients."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    targets = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)
    full = torch.log_softmax(head(hidden).float() / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lm_head = head if head_kind == "callable" else head.weight
    chunked, entropy = token_logprobs(
        hidden, lm_head, targets, temperature=temperature, chunk_size=4, with_entropy=True
    )
    torch.testing.assert_close(chunked, full)
    probs = torch.softmax(head(hidden).float() / temperature, -1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1))
    assert not entropy.requires_grad
    expected = torch.autograd.grad((full * weights).sum(), (hidden, head.weight))
    for _ in range(2):
        got = torch.autograd.grad((chunked * weights).sum(), (hidden, head.weight), retain_graph=True)
        torch.testing.assert_close(got, expected)
    with torch.no_grad():  # no graph: the same values
        torch.testing.assert_close(
            token_logprobs(hidden, lm_head, targets, temperature=temperature, chunk_size=4)[0], full
        )


def test_entropy_under_bf16_autocast_is_computed_in_fp32() -> None:
    """Under bf16 autocast only the head's product runs in bf16: the entropy of those logits is an fp32 sum (a bf16
    dot product over 4096 vocabulary entries is off by about 1e-3 nats)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 8, 64), torch.randn(4096, 64) * 0.3
    targets = torch.randint(0, 4096, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, entropy = token_logprobs(hidden, weight, targets, chunk_size=4, with_entropy=True)
    logits = (hidden.bfloat16() @ weight.bfloat16().t()).double()  # the bf16 product, then exact arithmetic
    expected = torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)
    assert entropy is not None and entropy.dtype == torch.float32
    torch.testing.assert_close(entropy.double(), expected, rtol=0, atol=2e-5)


def test_weight_head_under_autocast_matches_the_callable_head() -> None:
    """Under bf16 autocast the weight head multiplies in bf16 in forward and in backward's recomputation, as the
    callable head (an autocast `nn.Linear`) does."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 64, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    targets = torch.randint(0, 64, (2, 9))
    results = []
    for lm_head in (head, head.weight):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, _ = token_logprobs(hidden, lm_head, targets, chunk_size=4)
            grads = torch.autograd.grad(lp.sum(), (hidden, head.weight))
        results.append((lp, *grads))
    torch.testing.assert_close(results[1], results[0], atol=1e-2, rtol=1e-2)
    plain = torch.log_softmax(head(hidden), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert (results[1][0] - plain).abs().max() > 1e-5  # the bf16 product, not the fp32 one
