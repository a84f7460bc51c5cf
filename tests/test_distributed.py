"""Two CPU processes over gloo: DDP and FSDP2 (ModelParallelStrategy) fits that run solve and refine phases,
split the problems between ranks, reduce metrics, and resume exactly from their (sharded) checkpoints.

Each fit is a subprocess (tests/dist_fit.py) that Lightning relaunches for rank 1; a hang is killed with its
whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _launch(strategy: str, model: Path, root: Path, max_steps: int, ckpt: Path | None = None, *extra: str) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        str(HERE / "dist_fit.py"),
        "--strategy",
        strategy,
        "--model",
        str(model),
        "--root",
        str(root),
        "--max-steps",
        str(max_steps),
    ]
    if ckpt is not None:
        command += ["--ckpt", str(ckpt)]
    command += list(extra)
    process = subprocess.Popen(
        command, env=env, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # both ranks: the relaunched one is in the same session
        output, _ = process.communicate()
        pytest.fail(f"{strategy} fit hung for 180 s:\n{output[-4000:]}")
    assert process.returncode == 0, output[-4000:]
    result = json.loads((root / "result.json").read_text())
    result["metrics"] = pd.read_csv(Path(result["log_dir"]) / "metrics.csv")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_fit_and_sharded_resume(strategy: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    # solve, refine, solve: 3 phases of 2 optimizer steps, checkpointed after each phase
    full = _launch(strategy, tiny_model_dir, tmp_path / "full", max_steps=6)
    assert full["world_size"] == 2 and full["global_step"] == 6 and full["cursor"] == 3
    assert full["moved"] == full["tensors"], "every parameter should move on the ranks' averaged gradients"
    assert full["exported"] == full["tensors"], "the HF export must hold the gathered (unsharded) weights"
    assert (Path(full["log_dir"]) / "hf_model" / "config.json").exists()  # the run's own folder, by default
    assert (Path(full["log_dir"]) / "rectify_fortify.csv").exists()  # the tracker writes on rank 0 without a hang
    if strategy == "ddp":  # replicas: one all-reduce per optimizer step keeps them identical
        assert full["same_weights_on_all_ranks"]
    assert full["same_cache_on_all_ranks"], "the refine cache must hold every rank's solve rollouts on every rank"
    metrics = full["metrics"].sort_values("step")
    assert metrics["step"].tolist() == [0, 1, 2]
    solve = metrics[metrics["train/solve/reward_mean"].notna()]
    refine = metrics[metrics["train/refine/reward_mean"].notna()]
    assert len(solve) == 2 and len(refine) == 1
    # the metrics cover both ranks' shares: 4 problems x 4 samples, all trained tokens counted once
    assert (refine["train/refine/base_correct_frac"].between(0, 1)).all()
    assert (metrics.filter(like="trained_frac").stack().dropna() > 0).all()

    if strategy == "fsdp2":  # beta > 0: a sharded frozen reference; the policy has moved away from it by phase 2
        assert metrics["train/solve/kl"].dropna().iloc[-1] > 0

    saved = tmp_path / "full" / "ckpt" / "epoch=0-step=2.ckpt"  # after the first solve phase
    if strategy == "fsdp2":
        assert saved.is_dir() and len(list(saved.glob("*.distcp"))) == 2, "expected one shard file per rank"
        assert (saved / "meta.pt").is_file() and not list(saved.parent.glob(".*")), "written whole, then renamed"
    else:
        assert saved.is_file()
    resumed = _launch(strategy, tiny_model_dir, tmp_path / "resumed", max_steps=4, ckpt=saved)
    assert resumed["global_step"] == 4 and resumed["cursor"] == 2
    rows = resumed["metrics"]
    assert rows["step"].tolist() == [1], "the resumed run continues with the refine phase of the checkpointed pair"
    columns = [c for c in rows.columns if c.startswith("train/refine/")]
    expected = metrics[metrics["step"] == 1][columns].reset_index(drop=True)
    pd.testing.assert_frame_equal(rows[columns].reset_index(drop=True), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_keeps_fp32_shards_and_trains_at_lr_1e6(tmp_path: Path) -> None:
    """The paper's precision under FSDP2 (METHOD.md section 4): fp32 sharded weights and AdamW state, bf16 compute
    (MixedPrecisionPolicy: bf16 gathers, fp32 gradient reduction). At lr 1e-6 one phase of 2 optimizer steps moves
    almost every weight; in bf16 almost none would move (tests/test_precision.py)."""
    from thinktwice_pl.builtin_models import build_tiny_model

    model = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)  # every weight gets a gradient
    result = _launch("fsdp2", model, tmp_path / "run", 2, None, "--precision", "bf16-mixed", "--lr", "1e-6")
    assert result["global_step"] == 2
    assert result["weight_dtypes"] == ["torch.float32"]
    assert result["moved_elements_frac"] > 0.9


def test_close_process_group_destroys_the_group_and_is_a_no_op_without_one() -> None:
    import torch.distributed as dist

    from thinktwice_pl.parallel import close_process_group

    close_process_group()  # no group: nothing to do, no error
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.is_initialized()
    close_process_group()
    assert not dist.is_initialized()


@pytest.mark.slow
def test_ddp_reduces_both_shares_of_the_shared_prompt_update(tmp_path: Path) -> None:
    """Under DDP the reducer all-reduces a parameter's gradient when the parameter's own accumulation runs. The
    update's forward sends one use of each weight through gradient leaves that add into `.grad` early
    (`logprobs.completion_logprobs`); the reduced gradients must still hold both uses' shares: they equal plain HF
    forwards' gradients of both ranks' rows, averaged (two passes, the first under no_sync, as in a fit)."""
    from thinktwice_pl.builtin_models import build_tiny_model

    model = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    out = tmp_path / "grads.json"
    done = subprocess.run(
        [sys.executable, str(HERE / "ddp_grads_worker.py"), str(model), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert len(result["diff"]) > 10
    wrong = {n: (d, result["scale"][n]) for n, d in result["diff"].items() if d > 1e-5 + 1e-4 * result["scale"][n]}
    assert not wrong, wrong
