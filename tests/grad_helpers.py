"""The gradients that `logprobs.completion_logprobs` must reproduce, computed the plain way: one HF forward per row."""

from __future__ import annotations

from typing import Any

import torch


def accumulate_plain_gradients(
    model: Any, batch: Any, weights: torch.Tensor, temperature: float, scale: float = 1.0
) -> None:
    """Add to the parameters' `.grad` the gradient of ``scale * sum(weights * completion log-probs)`` of a collated
    batch, through a plain HF forward over each row's unpadded prompt + completion (standard autograd)."""
    for row in range(len(batch.input_ids)):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()][None]  # [1, P + C] without padding
        length = int(batch.completion_mask[row].sum())
        logits = model(input_ids=ids).logits[0, -length - 1 : -1].float() / temperature  # [C, V]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, -length:, None])[:, 0]
        ((lp * weights[row, :length]).sum() * scale).backward()
