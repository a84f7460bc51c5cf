"""Two gloo ranks run the update's forward (`completion_logprobs`, shared prompts, gradient checkpointing, tied
embeddings) under DistributedDataParallel, as the module does: two passes, the first under ``no_sync``. Rank 0
compares the reduced gradients with plain HF forwards of both ranks' rows, averaged over the ranks, and writes the
largest difference per parameter to a JSON file.

    python tests/ddp_grads_worker.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from grad_helpers import accumulate_plain_gradients

WORLD = 2
PASSES = 2


def _batch(rank: int, step: int) -> tuple[Any, torch.Tensor]:
    from thinktwice_pl.batching import collate

    generator = torch.Generator().manual_seed(100 * rank + step)
    prompts = [torch.randint(5, 500, (n,), generator=generator).tolist() for n in (6, 9)]
    rows = [(0, 3), (0, 5), (1, 4), (1, 2), (0, 1)]  # (prompt, completion length)
    completions = [torch.randint(5, 500, (c,), generator=generator).tolist() for _, c in rows]
    batch = collate([prompts[p] for p, _ in rows], completions, 0)
    weights = torch.randn(len(rows), batch.completion_mask.shape[1], generator=generator) * batch.completion_mask
    return batch, weights


class _Update(torch.nn.Module):
    """What DDP wraps in a fit (the LightningModule): the policy, and a forward that computes the loss."""

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, batch: Any, weights: torch.Tensor) -> torch.Tensor:
        from thinktwice_pl.logprobs import completion_logprobs

        logprobs, _ = completion_logprobs(self.policy, batch, temperature=0.8, chunk_size=4, with_grad=True)
        return (logprobs * weights).sum()


def _reference(model_dir: str) -> dict[str, torch.Tensor]:
    from thinktwice_pl.models import load_causal_lm

    model = load_causal_lm(model_dir)
    for rank in range(WORLD):
        for step in range(PASSES):
            batch, weights = _batch(rank, step)
            accumulate_plain_gradients(model, batch, weights, temperature=0.8, scale=1 / WORLD)  # DDP averages
    return {name: p.grad for name, p in model.named_parameters()}


def _run(rank: int, model_dir: str, store: str, out: str) -> None:
    from thinktwice_pl.models import load_causal_lm

    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        update = torch.nn.parallel.DistributedDataParallel(
            _Update(load_causal_lm(model_dir, gradient_checkpointing=True))
        )
        for step in range(PASSES):
            batch, weights = _batch(rank, step)
            with update.no_sync() if step < PASSES - 1 else torch.enable_grad():
                update(batch, weights).backward()
        grads = {name.removeprefix("module.policy."): p.grad for name, p in update.named_parameters()}
        if rank == 0:
            reference = _reference(model_dir)
            diff = {name: float((grads[name] - grad).abs().max()) for name, grad in reference.items()}
            scale = {name: float(grad.abs().max()) for name, grad in reference.items()}
            Path(out).write_text(json.dumps({"diff": diff, "scale": scale}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run, args=(model_dir, f"{tmp}/store", out), nprocs=WORLD)


if __name__ == "__main__":
    main()
