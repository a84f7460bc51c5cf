"""thinktwice_pl.comparison: metrics from per-problem records and their intervals over problems and seeds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from thinktwice_pl.comparison import POOLED, bootstrap, markdown_table, per_problem, summarize


def records(solve: list[int], refine: list[int], greedy: list[int], greedy_refine: list[int], n: int = 4):
    """An eval_records.csv's test rows: correct counts out of n samples, and the greedy pair per problem."""
    size = len(solve)
    return pd.DataFrame(
        {
            "split": "test",
            "problem_id": [f"p{i}" for i in range(size)],
            "n": n,
            "solve_correct": solve,
            "refine_correct": refine,
            "greedy_correct": greedy,
            "greedy_refine_correct": greedy_refine,
        }
    )


def random_records(rng: np.random.Generator, size: int, p: float) -> pd.DataFrame:
    greedy = (rng.random(size) < p).astype(int)
    return records(
        rng.binomial(4, p, size).tolist(),
        rng.binomial(4, p, size).tolist(),
        greedy.tolist(),
        np.where(rng.random(size) < 0.3, 1 - greedy, greedy).tolist(),
    )


def test_per_problem_metrics_are_the_definitions() -> None:
    frame = records(solve=[4, 2, 0], refine=[4, 0, 1], greedy=[1, 0, 0], greedy_refine=[0, 1, 0])
    metrics = per_problem(frame, 4)
    ratio = {name: num.sum() / den.sum() for name, (num, den) in metrics.items()}
    assert ratio["solve/pass@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert ratio["solve/pass@4"] == pytest.approx(2 / 3)
    assert ratio["refine/pass@4"] == pytest.approx(2 / 3)
    assert ratio["transition/fix_wrong"] == pytest.approx(1 / 2)  # of the two wrong greedy answers, one fixed
    assert ratio["transition/damage_correct"] == pytest.approx(1.0)  # the one right answer was broken


def test_pooled_value_is_the_ratio_over_every_seed_and_problem() -> None:
    a = records([4, 0], [4, 0], [1, 0], [1, 1])
    b = records([0, 0], [4, 4], [0, 0], [0, 1])
    scores = bootstrap([a, b], 4, np.random.default_rng(0))
    assert scores["solve/pass@1"]["value"] == pytest.approx(1 / 4)
    assert scores["refine/pass@1"]["value"] == pytest.approx(3 / 4)
    assert scores["transition/fix_wrong"]["value"] == pytest.approx(2 / 3)  # 3 wrong greedy answers, 2 fixed
    for metric, values in scores.items():
        if metric == "transition/damage_correct":  # seed b has no right greedy answer: one seed, no seed spread
            assert values["value"] == 0 and np.isnan(values["lo"]) and np.isnan(values["hi"])
        else:
            assert values["lo"] <= values["value"] + 1e-12 and values["value"] <= values["hi"] + 1e-12


def test_seed_to_seed_spread_widens_the_pooled_interval() -> None:
    """Three seeds that disagree give a wider interval than three copies of one seed with the same pooled mean: the
    two-level bootstrap counts the seeds' variation, not only the problems'."""
    rng = np.random.default_rng(1)
    low, high = random_records(rng, 200, 0.2), random_records(rng, 200, 0.8)
    mixed = bootstrap([low, high, low], 4, np.random.default_rng(0))["solve/pass@1"]
    middle = random_records(rng, 200, 0.4)
    same = bootstrap([middle, middle, middle], 4, np.random.default_rng(0))["solve/pass@1"]
    assert mixed["hi"] - mixed["lo"] > 2 * (same["hi"] - same["lo"])


def test_a_paired_difference_of_identical_runs_is_exactly_zero() -> None:
    rng = np.random.default_rng(2)
    runs = [random_records(rng, 50, 0.5) for _ in range(3)]
    scores = bootstrap(runs, 4, np.random.default_rng(0), minus=runs)
    assert all(v["value"] == 0 and v["lo"] == 0 and v["hi"] == 0 for v in scores.values())
    with pytest.raises(ValueError, match="as many seeds on both sides"):
        bootstrap(runs, 4, np.random.default_rng(0), minus=runs[:2])


def test_summary_and_tables_hold_every_seed_the_pool_and_the_difference() -> None:
    rng = np.random.default_rng(3)
    data = {("Base", "base", None): random_records(rng, 30, 0.1)}
    for seed in (0, 1):
        for checkpoint in ("best", "final"):
            data[("GRPO", checkpoint, seed)] = random_records(rng, 30, 0.5)
            data[("ThinkTwice", checkpoint, seed)] = random_records(rng, 30, 0.6)
    summary = summarize(data, 4)
    models = summary.groupby(["checkpoint", "seed"])["model"].unique().map(sorted).to_dict()
    assert models[("base", POOLED)] == ["Base"]
    for checkpoint in ("best", "final"):
        for seed in (0, 1, POOLED):
            assert models[(checkpoint, seed)] == ["GRPO", "ThinkTwice", "ThinkTwice - GRPO"]
    pooled = summary[(summary["checkpoint"] == "best") & (summary["seed"] == POOLED)].set_index(["model", "metric"])
    difference = pooled.loc[("ThinkTwice - GRPO", "solve/pass@1"), "value"]
    assert difference == pytest.approx(
        pooled.loc[("ThinkTwice", "solve/pass@1"), "value"] - pooled.loc[("GRPO", "solve/pass@1"), "value"]
    )
    table = markdown_table(summary, 4, "best").splitlines()
    assert table[0].startswith("| model | solve pass@1 | solve pass@4 | refine pass@1")
    assert [row.split("|")[1].strip() for row in table[2:]] == ["Base", "GRPO", "ThinkTwice", "ThinkTwice - GRPO"]
    value = pooled.loc[("ThinkTwice", "refine/pass@1")]
    assert f"{value['value']:.3f} [{value['lo']:.3f}, {value['hi']:.3f}]" in table[3 + 1]


def test_one_seed_intervals_and_paired_differences_on_a_worked_example() -> None:
    # 4 problems, n = 2: pass@1 per problem 1, 0.5, 0, 0 -> 0.375; greedy right on the first two, the refinement
    # fixes problem 3 and breaks problem 2 -> fix-wrong 1/2, damage-correct 1/2
    frame = records(solve=[2, 1, 0, 0], refine=[2, 0, 1, 0], greedy=[1, 1, 0, 0], greedy_refine=[1, 0, 1, 0], n=2)
    stats = bootstrap([frame], 2, np.random.default_rng(0), resamples=500)
    assert stats["solve/pass@1"]["value"] == pytest.approx(0.375)
    assert stats["solve/pass@2"]["value"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert stats["refine/pass@1"]["value"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert stats["transition/fix_wrong"]["value"] == pytest.approx(0.5)
    assert stats["transition/damage_correct"]["value"] == pytest.approx(0.5)
    assert 0 <= stats["solve/pass@1"]["lo"] < 0.375 < stats["solve/pass@1"]["hi"] <= 1
    better = frame.assign(solve_correct=[2, 2, 1, 0])  # +0.5 and +0.5 on two problems: +0.25 on average
    diff = bootstrap([better], 2, np.random.default_rng(0), minus=[frame], resamples=500)["solve/pass@1"]
    assert diff["value"] == pytest.approx(0.25) and 0 <= diff["lo"] <= 0.25 <= diff["hi"] <= 0.5


def test_several_seeds_interval_is_the_t_interval_of_seed_and_problem_variance() -> None:
    rng = np.random.default_rng(4)
    runs = [random_records(rng, 100, p) for p in (0.3, 0.5, 0.6)]
    scores = bootstrap(runs, 4, np.random.default_rng(0), resamples=4000)["solve/pass@1"]
    per_seed = np.array([r["solve_correct"].mean() / 4 for r in runs])  # pass@1 = c / n per problem
    assert scores["value"] == pytest.approx(per_seed.mean())
    problems = np.stack([r["solve_correct"].to_numpy() / 4 for r in runs]).mean(0)  # seed-mean per problem
    se_problems = problems.std(ddof=0) / np.sqrt(len(problems))  # the bootstrap's variance, in closed form
    half = 4.303 * np.sqrt(per_seed.var(ddof=1) / 3 + se_problems**2)
    assert scores["hi"] - scores["value"] == pytest.approx(half, rel=0.05)
    assert scores["value"] - scores["lo"] == pytest.approx(half, rel=0.05)


def test_several_seeds_intervals_stay_within_the_range_of_a_rate_and_of_a_difference() -> None:
    rng = np.random.default_rng(5)
    ours = [random_records(rng, 40, p) for p in (0.05, 0.9, 0.1)]  # seeds far apart: t * spread exceeds the range
    theirs = [random_records(rng, 40, p) for p in (0.9, 0.05, 0.95)]
    rate = bootstrap(ours, 4, np.random.default_rng(0))["solve/pass@1"]
    difference = bootstrap(ours, 4, np.random.default_rng(0), minus=theirs)["solve/pass@1"]
    assert rate["lo"] == 0.0 and rate["hi"] == 1.0
    assert difference["lo"] == -1.0 and difference["hi"] == 1.0
