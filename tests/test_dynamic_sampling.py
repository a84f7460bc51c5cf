"""DAPO's dynamic sampling and soft overlong penalty: the rules (pure), real fits of the tiny model that log them,
and a run killed between two generation rounds that resumes to the same metrics."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fit_helpers import quiet_trainer, tiny_module
from lightning.pytorch.callbacks import Callback

from thinktwice_pl.callbacks import RolloutCallback
from thinktwice_pl.cli import main
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.dynamic_sampling import choose_groups, overlong_penalty, sampling_stats
from thinktwice_pl.errors import UserError
from thinktwice_pl.types import PhaseBatch, Rollout

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DYNAMIC = [
    "--rollout.reward",
    "signal_rewards.even_answers_right",  # groups of even-gold problems are all right: uninformative
    "--rollout.reward_workers",
    "0",
    "--rollout.dynamic_sampling",
    "true",
    "--rollout.max_sampling_rounds",
    "3",
    "--rollout.overlong_buffer",
    "6",
]
FIT = ["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *DYNAMIC]


def _rollout(problem: str, reward: float, penalty: float = 0.0) -> Rollout:
    return Rollout(problem, "solve", [1], [2], "x", "stop", reward=reward, length_penalty=penalty)


def _group(problem: str, *rewards: float) -> list[Rollout]:
    return [_rollout(problem, r) for r in rewards]


# ---------------------------------------------------------------------------------------------- the rules


def test_overlong_penalty_is_dapo_equation_13() -> None:
    # L_max 100, L_b 20: no penalty up to 80 tokens, linear to -1 at 100, -1 beyond; times the factor
    assert [overlong_penalty(n, 100, 20) for n in (0, 80, 81, 90, 100, 101)] == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    assert overlong_penalty(90, 100, 20, factor=0.5) == -0.25
    with pytest.raises(ValueError, match="overlong buffer 0"):
        overlong_penalty(10, 100, 0)


def test_groups_with_equal_rewards_are_dropped_and_the_phase_is_filled_in_sampling_order() -> None:
    first = [_group("a", 1, 1), _group("b", 0, 1), _group("c", 0, 0)]
    second = [_group("d", 1, 0), _group("e", 1, 0), _group("f", 0, 0)]
    trained = choose_groups([first, second], 3)
    assert [g[0].problem_id for g in trained] == ["b", "d", "e"]  # informative, in order; f is not needed
    stats = sampling_stats([first, second], trained, dynamic=True, overlong=False)
    assert (stats.rounds, stats.groups_sampled, stats.groups_informative) == (2, 6, 3)
    assert (stats.groups_dropped, stats.groups_filled) == (3, 0)
    short = choose_groups([first], 3)  # one informative group, filled with the dropped ones, in sampling order
    assert [g[0].problem_id for g in short] == ["a", "b", "c"]
    assert [g[0].problem_id for g in choose_groups([first, second], 2)] == ["b", "d"]
    assert [g[0].problem_id for g in choose_groups([first[::-1]], 2)] == ["c", "b"]  # c dropped before a
    stats = sampling_stats([first], short, dynamic=True, overlong=False)
    assert (stats.groups_informative, stats.groups_filled, stats.groups_dropped) == (1, 2, 0)
    assert stats.metrics("solve")["train/solve/groups_filled"] == 2.0


def test_the_filter_reads_correctness_only_as_dapo_does() -> None:
    # all wrong, different length penalties: a gradient from the penalty, but dropped (DAPO eq. 11, verl's "score")
    wrong = [_rollout("a", 0.0, 0.0), _rollout("a", 0.0, -0.5)]
    mixed = [_rollout("b", 1.0, -1.0), _rollout("b", 0.0, 0.0)]  # equal training rewards, different correctness
    assert choose_groups([[wrong, mixed]], 1) == [mixed]
    stats = sampling_stats([[wrong, mixed]], [mixed], dynamic=True, overlong=True)
    assert (stats.groups_informative, stats.groups_dropped) == (1, 1)
    assert stats.metrics("refine")["train/refine/overlong_penalty_mean"] == -0.5
    assert stats.metrics("refine")["train/refine/overlong_frac"] == 0.5


@pytest.mark.parametrize(
    ("settings", "flag"),
    [
        ({"max_sampling_rounds": 0}, "rollout.max_sampling_rounds=0"),
        ({"overlong_buffer": 40, "max_completion_length": 32}, "rollout.overlong_buffer=40"),
        ({"overlong_buffer": 8, "overlong_penalty_factor": -1.0}, "rollout.overlong_penalty_factor=-1.0"),
    ],
)
def test_bad_settings_name_the_flag(settings: dict[str, Any], flag: str) -> None:
    with pytest.raises(UserError, match=flag.replace(".", r"\.")):
        RolloutCallback(**settings)


# ---------------------------------------------------------------------------------------------- real fits


class _Phases(Callback):
    """What each phase trained: its problems, bases and groups' rewards."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: PhaseBatch, batch_idx: int) -> None:
        assert batch.rollouts is not None
        self.seen.append(
            {
                "phase": batch.phase,
                "problems": [p.id for p in batch.problems],
                "bases": [b.problem_id for b in batch.bases or []],
                "groups": [r.problem_id for r in batch.rollouts.rollouts[:: batch.rollouts.group_size]],
                "texts": [b.completion_text for b in batch.bases or []],
            }
        )


def _fit(model_dir: Path, root: Path, reward: str, **rollout: Any) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    module = tiny_module(model_dir, num_generations=4, max_completion_length=12, learning_rate=1e-3)
    data = ThinkTwiceDataModule(train=ProblemSource(path="procedural", num_problems=16), problems_per_batch=2, seed=0)
    settings = {"num_generations": 4, "max_completion_length": 12, "reward_workers": 0, "dynamic_sampling": True}
    callback = RolloutCallback(reward=reward, **{**settings, **rollout})
    phases = _Phases()
    trainer = quiet_trainer(root, callback, phases, max_steps=4)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4, "dynamic sampling must not change the number of optimizer steps"
    return pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv"), phases.seen


def test_dynamic_sampling_trains_informative_groups_and_counts_the_rounds(tiny_model_dir: Path, tmp_path: Path) -> None:
    metrics, seen = _fit(tiny_model_dir, tmp_path, "signal_rewards.even_answers_right", max_sampling_rounds=5)
    assert [s["phase"] for s in seen] == ["solve", "refine", "solve", "refine"]
    for phase in ("solve", "refine"):
        rows = metrics[metrics[f"train/{phase}/reward_mean"].notna()]
        informative = rows[f"train/{phase}/groups_informative"]
        filled = rows[f"train/{phase}/groups_filled"]
        assert ((informative + filled) == 2).all()  # every phase trains B = 2 groups
        assert (rows[f"train/{phase}/sampling_rounds"].between(1, 5)).all()
        full = rows[filled == 0]
        assert (full[f"train/{phase}/frac_zero_std_groups"] == 0).all(), "an uninformative group was trained"
    solve_rows = metrics[metrics["train/solve/reward_mean"].notna()]
    assert (solve_rows["train/solve/groups_dropped"] > 0).any(), "even-gold problems should have been dropped"
    for solve, refine in zip(seen[::2], seen[1::2], strict=True):
        assert solve["groups"] == solve["problems"], "the solve batch names the problems of the groups it trained"
        assert refine["problems"] == solve["problems"], "the refine phase reviews what its solve phase trained"
        assert set(refine["bases"]) <= set(solve["problems"])
        assert refine["groups"] == refine["bases"]


def test_a_phase_without_informative_groups_is_filled_and_warned_once(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # every answer scores 0: no group is informative, however many rounds run
    with caplog.at_level(logging.WARNING, logger="thinktwice_pl"):
        metrics, _ = _fit(tiny_model_dir, tmp_path, "signal_rewards.always_wrong", max_sampling_rounds=2)
    rows = metrics[metrics["train/solve/reward_mean"].notna()]
    assert (rows["train/solve/sampling_rounds"] == 2).all()
    assert (rows["train/solve/groups_filled"] == 2).all() and (rows["train/solve/groups_dropped"] == 2).all()
    assert (rows["train/solve/trained_frac"] == 0).all()
    warned = [r.getMessage() for r in caplog.records if "dynamic sampling found 0 informative groups" in r.getMessage()]
    assert len(warned) == 1 and "rollout.max_sampling_rounds=2" in warned[0]


def test_the_overlong_penalty_alone_gives_a_gradient_and_is_logged_apart(tiny_model_dir: Path, tmp_path: Path) -> None:
    # correctness is 0 for every sample; the length penalty differs between a sample that stops early and one cut at
    # the limit, so such groups have non-zero advantages and are trained
    metrics, _ = _fit(
        tiny_model_dir, tmp_path, "signal_rewards.always_wrong", dynamic_sampling=False, overlong_buffer=10
    )
    for phase in ("solve", "refine"):
        rows = metrics[metrics[f"train/{phase}/reward_mean"].notna()]
        assert (rows[f"train/{phase}/reward_mean"] == 0).all(), "the correctness reward is logged without the penalty"
        assert (rows[f"train/{phase}/overlong_penalty_mean"] < 0).all()
        assert rows[f"train/{phase}/overlong_frac"].between(0, 1).all()
        assert f"train/{phase}/groups_dropped" not in rows, "dynamic sampling is off: no sampling counts"
    trained = metrics[["train/solve/trained_frac", "train/refine/trained_frac"]].stack()
    assert (trained > 0).any(), "no group had different lengths"


# ---------------------------------------------------------------------------------------------- kill and resume


@pytest.fixture(autouse=True)
def _shared_models_home(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("THINKTWICE_HOME", str(tmp_path_factory.getbasetemp() / "thinktwice-home"))


def _comparable(metrics: pd.DataFrame) -> pd.DataFrame:
    kind = metrics.filter(like="val/").notna().any(axis=1).map({True: "val", False: "train"})
    columns = sorted(c for c in metrics.columns if c.startswith(("train/", "val/")))
    return metrics.assign(kind=kind).set_index(["step", "kind"])[columns].sort_index()


@pytest.mark.slow
def test_a_kill_between_generation_rounds_resumes_to_the_same_metrics(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.mkdir()
    with contextlib.chdir(reference):
        main(FIT)
    expected = pd.read_csv(reference / "runs" / "tiny" / "version_0" / "metrics.csv")
    rounds = expected["train/solve/sampling_rounds"].fillna(expected["train/refine/sampling_rounds"])
    later = expected.loc[(rounds > 1) & (expected["step"] >= 2), "step"]  # after the first checkpoint (phase 1)
    assert len(later), "the reference run should need a second generation round in phase 2 or 3"
    phase = int(later.iloc[0])

    run = tmp_path / "killed"
    run.mkdir()
    path = os.pathsep.join([str(ROOT / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "FAULT_KILL_IN_ROUND": f"{phase}:1"}
    killed = subprocess.run([sys.executable, str(TESTS / "fault_fit.py"), *FIT], cwd=run, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, "the fault should have killed the run in its second round"
    env.pop("FAULT_KILL_IN_ROUND")
    resumed = subprocess.run(
        [sys.executable, str(TESTS / "fault_fit.py"), *FIT, "--ckpt_path", "last"],
        cwd=run,
        env=env,
        timeout=300,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    got = pd.read_csv(run / "runs" / "tiny" / "version_0" / "metrics.csv")
    pd.testing.assert_frame_equal(_comparable(got), _comparable(expected))
