"""Test settings shared by the whole suite: offline hub, one thread (2-core machines), tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from thinktwice_pl.cli import filter_foreign_noise  # noqa: E402

filter_foreign_noise()  # fits run in-process see what the command's users see


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen2 + ChatML tokenizer on disk (built in about a second, once per session)."""
    from thinktwice_pl.builtin_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def _isolated_models_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in models (thinktwice:tiny) are built under a temporary THINKTWICE_HOME, not in the checkout."""
    home = tmp_path_factory.getbasetemp() / "thinktwice-home"
    monkeypatch.setenv("THINKTWICE_HOME", str(home))


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``thinktwice fit --config configs/tiny.yaml`` (4 phases, validated before and after), run once per session;
    returns its run directory (runs/tiny/version_0)."""
    import contextlib

    from thinktwice_pl.cli import main

    root = tmp_path_factory.mktemp("tiny-cli")
    home = tmp_path_factory.getbasetemp() / "thinktwice-home"
    with contextlib.chdir(root), pytest.MonkeyPatch.context() as patch:
        patch.setenv("THINKTWICE_HOME", str(home))
        main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml")])
    return root / "runs" / "tiny" / "version_0"
