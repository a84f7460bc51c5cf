"""Gradients added to .grad in place (`thinktwice_pl.grad_accumulation`)."""

from __future__ import annotations

import contextlib

import torch


def test_row_sparse_embedding_adds_the_dense_backwards_gradient_bit_for_bit() -> None:
    """Repeated ids, a padding id: `.grad` after the row-sparse add equals `.grad` after nn.Embedding's dense
    backward exactly (the rows are summed in the same order before the add)."""
    from thinktwice_pl.grad_accumulation import embedding_gradient_in_place

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(40, 8, padding_idx=3)
    ids = torch.tensor([[5, 3, 5, 9, 5], [9, 1, 3, 5, 0]])
    upstream, start = torch.randn(2, 5, 8), torch.randn(40, 8)
    results = []
    for in_place in (False, True):
        embedding.weight.grad = start.clone()
        with embedding_gradient_in_place(embedding) if in_place else contextlib.nullcontext():
            embedding(ids).backward(upstream)
        results.append(embedding.weight.grad)
    assert not torch.equal(results[0], start) and torch.equal(results[0][3], start[3])
    assert torch.equal(results[1], results[0])
