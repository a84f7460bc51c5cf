"""Gradients added to ``.grad`` as backward produces them, instead of held by autograd until a weight's last use.

`gradient_leaves` gives a use of the weights whose gradients reach ``.grad`` at once; `embedding_gradient_in_place`
adds the input embedding's gradient row by row; `grad_in_place` and `added_in_place` let a custom backward (the LM
head's, `thinktwice_pl.lm_head`) add its weight gradient into an existing ``.grad``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch


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
def embedding_gradient_in_place(embedding: Any) -> Iterator[None]:
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
    autograd adds it to that ``.grad`` in place, where the plain lookup's backward allocates a dense ``[V, H]`` tensor
    at the end of backward, when every other gradient exists. Duplicate ids are summed in order before the add, as
    the dense backward does, so ``.grad`` comes out bit for bit the same.
    Without a ``.grad`` yet, the dense gradient is returned (it becomes ``.grad``)."""

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
        return None, row_sparse(rows, values, shape), None, None


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
    rows = torch.zeros(0, dtype=torch.long, device=weight.device)
    return row_sparse(rows, weight.new_zeros(0, *weight.shape[1:]), weight.shape)


def row_sparse(rows: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A sparse COO tensor of `shape` holding ``values[i]`` in row ``rows[i]`` (`rows` sorted and distinct), built
    without invariant checks. The opt-out is explicit (torch 2.11 and 2.12 warn on every process's first sparse
    tensor built without it)."""
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        return torch.sparse_coo_tensor(rows[None], values, shape, is_coalesced=True, check_invariants=False)
