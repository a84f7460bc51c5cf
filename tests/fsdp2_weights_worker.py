"""Run by test_rollout_weights.py under torchrun (2 CPU processes, gloo): FSDP2-sharded policy -> full weights."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from thinktwice_pl.models import load_causal_lm
from thinktwice_pl.rollout.weights import rollout_weights


def main(model_dir: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = load_causal_lm(model_dir)
    with torch.no_grad():
        for p in model.parameters():  # as after training: every rank starts from the same weights
            p.add_(0.01 * torch.randn_like(p))
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = dict(model.named_parameters())["model.embed_tokens.weight"]
    assert (
        type(local).__name__ == "DTensor" and local.to_local().shape[0] < expected["model.embed_tokens.weight"].shape[0]
    )
    gathered = dict(rollout_weights(model))
    assert list(gathered) == list(expected), (list(gathered)[:5], list(expected)[:5])
    for name, tensor in gathered.items():
        assert not hasattr(tensor, "full_tensor"), f"{name} is still a DTensor"
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    print(f"rank {dist.get_rank()}: {len(gathered)} full tensors match", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
