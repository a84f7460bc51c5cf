"""Built-in models (``thinktwice:<name>``): built once on first use, by whichever process of a run needs it first."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _resolve_as_rank(rank: int, home: str, port: int) -> None:
    os.environ["THINKTWICE_HOME"] = home
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from thinktwice_pl.builtin_models import resolve_model_path
        from thinktwice_pl.models import load_causal_lm

        if rank == 1:  # rank 1 builds alone first: transformers' save_pretrained writes nothing off rank 0
            load_causal_lm(resolve_model_path("thinktwice:tiny"))
        torch.distributed.barrier()
        load_causal_lm(resolve_model_path("thinktwice:tiny"))
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_other_than_0_builds_a_complete_model(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_resolve_as_rank, args=(str(tmp_path), port), nprocs=2, join=True)
    built = sorted(p.name for p in (tmp_path / "tiny").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(built), built
