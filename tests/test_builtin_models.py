"""Built-in models (``thinktwice:<name>``): built once on first use, by whichever process of a run needs it first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
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


def test_a_built_model_storing_its_tied_head_as_lm_head_is_rewritten_as_the_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from thinktwice_pl.builtin_models import build_tiny_model, resolve_model_path
    from thinktwice_pl.models import load_causal_lm

    built = build_tiny_model(tmp_path / "tiny", tie_word_embeddings=True)
    weights = built / "model.safetensors"
    state = load_file(weights)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state  # as save_pretrained stores it
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = load_causal_lm(str(built))(ids).logits
    state["lm_head.weight"] = state.pop("model.embed_tokens.weight")  # the same weights under the head's name
    save_file(state, str(weights), metadata={"format": "pt"})

    monkeypatch.setenv("THINKTWICE_HOME", str(tmp_path))
    assert resolve_model_path("thinktwice:tiny") == str(built)
    with safe_open(weights, "pt") as f:
        assert set(f.keys()) == set(state) - {"lm_head.weight"} | {"model.embed_tokens.weight"}
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(str(built))(ids).logits, expected)
