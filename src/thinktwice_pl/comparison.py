"""Scores of a ThinkTwice-vs-GRPO comparison from per-problem evaluation records, with intervals over problems and
training seeds.

Every reported metric is a ratio of sums over (seed, problem) pairs: pass@k is the mean of the unbiased per-problem
estimate, fix-wrong the share of wrong greedy answers whose greedy refinement is right, damage-correct the share of
right greedy answers whose refinement is wrong. A difference of two methods is paired: the same problems, and
seed s of one method against seed s of the other.

Intervals (95 %). One seed: the percentile interval of a bootstrap over the test problems. Several seeds (S): the
pooled value +- t(0.975, S - 1) * sqrt(s^2 / S + se_p^2), where s^2 is the variance of the per-seed values (what
training and sampling randomness move) and se_p^2 the bootstrap variance over the test problems of the pooled value
(what the choice of problems moves, shared by all seeds), cut to [0, 1] for a rate and to [-1, 1] for a difference of
two rates. The t factor (4.30 for 3 seeds) makes it wide, on purpose: with three seeds the seed-to-seed spread is
itself poorly known.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from thinktwice_pl.metrics import pass_at_k

RESAMPLES = 2000
METHODS = ("GRPO", "ThinkTwice")
DIFFERENCE = "ThinkTwice - GRPO"
POOLED = "pooled"


def per_problem(records: pd.DataFrame, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (numerator, denominator), one entry per problem of an eval_records.csv's test rows."""
    ones = np.ones(len(records))
    solve, refine = records["solve_correct"].to_numpy(), records["refine_correct"].to_numpy()
    greedy, refined = records["greedy_correct"].to_numpy(), records["greedy_refine_correct"].to_numpy()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in sorted({1, n}):
        out[f"solve/pass@{k}"] = (np.array([pass_at_k(n, int(c), k) for c in solve], dtype=float), ones)
        out[f"refine/pass@{k}"] = (np.array([pass_at_k(n, int(c), k) for c in refine], dtype=float), ones)
    out["transition/fix_wrong"] = (((greedy == 0) & (refined == 1)).astype(float), (greedy == 0).astype(float))
    out["transition/damage_correct"] = (((greedy == 1) & (refined == 0)).astype(float), (greedy == 1).astype(float))
    return out


def bootstrap(
    runs: Sequence[pd.DataFrame],
    n: int,
    rng: np.random.Generator,
    minus: Sequence[pd.DataFrame] | None = None,
    resamples: int = RESAMPLES,
) -> dict[str, dict[str, float]]:
    """Each metric pooled over `runs` (one records table per seed, the same problems in the same order), minus the
    same metric pooled over `minus` (the other method's seeds, paired by position), with its 95 % interval (module
    docstring). Returns metric -> {value, lo, hi}."""
    ours = [per_problem(r, n) for r in runs]
    theirs = [per_problem(r, n) for r in minus] if minus is not None else None
    if theirs is not None and len(theirs) != len(ours):
        raise ValueError(f"a paired difference needs as many seeds on both sides, got {len(ours)} and {len(theirs)}")
    picks = rng.integers(0, len(runs[0]), size=(resamples, len(runs[0])))  # [B, P]: the problems of each resample
    out = {}
    for metric in ours[0]:
        value, per_seed, samples = _ratios(ours, metric, picks)
        if theirs is not None:
            other, other_seeds, other_samples = _ratios(theirs, metric, picks)
            value, per_seed, samples = value - other, per_seed - other_seeds, samples - other_samples
        finite = samples[np.isfinite(samples)]
        if len(runs) == 1:
            lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
        else:
            seeds = per_seed[np.isfinite(per_seed)]  # a seed without the metric's denominator has no value
            half = np.nan
            if len(seeds) > 1:
                half = t_975(len(seeds) - 1) * np.sqrt(np.var(seeds, ddof=1) / len(seeds) + np.var(finite))
            lo, hi = value - half, value + half
        floor = 0.0 if theirs is None else -1.0  # a rate lies in [0, 1], a difference of two rates in [-1, 1]
        lo, hi = max(lo, floor), min(hi, 1.0)
        out[metric] = {"value": float(value), "lo": float(lo), "hi": float(hi)}
    return out


def _ratios(
    runs: list[dict[str, tuple[np.ndarray, np.ndarray]]], metric: str, picks: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """The ratio over every (seed, problem) pair, per seed ([S]), and over all seeds on each resample's problems
    ([B])."""
    num = np.stack([run[metric][0] for run in runs])  # [S, P]
    den = np.stack([run[metric][1] for run in runs])
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = num.sum() / den.sum() if den.sum() else np.nan
        return pooled, num.sum(-1) / den.sum(-1), num[:, picks].sum((0, -1)) / den[:, picks].sum((0, -1))


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (from df 10 on, 1.96 + 2.4 / df: within 0.03)."""
    return T_975.get(df, 1.96 + 2.4 / df)


def summarize(records: dict[tuple[str, str, int | None], pd.DataFrame], n: int, seed: int = 0) -> pd.DataFrame:
    """The summary table of a comparison: for each (model, checkpoint), per seed and pooled over seeds, every metric
    with its interval, and the paired ThinkTwice - GRPO difference. `records` maps (model, checkpoint, seed) to that
    evaluation's test records (the base model: ("Base", "base", None))."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, object]] = []

    def add(model: str, checkpoint: str, seed_label: object, scores: dict[str, dict[str, float]]) -> None:
        rows.extend(
            {"model": model, "checkpoint": checkpoint, "seed": seed_label, "metric": m, **v} for m, v in scores.items()
        )

    for (model, checkpoint, run_seed), frame in records.items():
        if run_seed is None:
            add(model, checkpoint, POOLED, bootstrap([frame], n, rng))
    checkpoints = sorted({c for (m, c, s) in records if s is not None})
    for checkpoint in checkpoints:
        seeds = sorted({s for (m, c, s) in records if c == checkpoint and s is not None})
        by_method = {m: [records[(m, checkpoint, s)] for s in seeds] for m in METHODS}
        for run_seed in seeds:
            for m in METHODS:
                add(m, checkpoint, run_seed, bootstrap([records[(m, checkpoint, run_seed)]], n, rng))
            pair = [records[(m, checkpoint, run_seed)] for m in reversed(METHODS)]
            add(DIFFERENCE, checkpoint, run_seed, bootstrap([pair[0]], n, rng, minus=[pair[1]]))
        for m in METHODS:
            add(m, checkpoint, POOLED, bootstrap(by_method[m], n, rng))
        add(DIFFERENCE, checkpoint, POOLED, bootstrap(by_method["ThinkTwice"], n, rng, minus=by_method["GRPO"]))
    return pd.DataFrame(rows)


def table_metrics(n: int) -> list[tuple[str, str]]:
    """(metric, column header) of the results tables."""
    ks = sorted({1, n})
    return [
        *((f"solve/pass@{k}", f"solve pass@{k}") for k in ks),
        *((f"refine/pass@{k}", f"refine pass@{k}") for k in ks),
        ("transition/fix_wrong", "fix-wrong"),
        ("transition/damage_correct", "damage-correct"),
    ]


def markdown_table(summary: pd.DataFrame, n: int, checkpoint: str, seed: object = POOLED) -> str:
    """Rows Base, GRPO, ThinkTwice and ThinkTwice - GRPO of one checkpoint kind and one seed (or pooled): value
    [95 % interval]."""
    columns = table_metrics(n)
    lines = ["| model | " + " | ".join(h for _, h in columns) + " |", "|---|" + "---|" * len(columns)]
    for model in ("Base", *METHODS, DIFFERENCE):
        wanted = ("base", POOLED) if model == "Base" else (checkpoint, seed)
        rows = summary[(summary["model"] == model) & (summary["checkpoint"] == wanted[0])]
        rows = rows[rows["seed"].astype(str) == str(wanted[1])]
        if rows.empty:
            continue
        cells = {r.metric: _cell(r.value, r.lo, r.hi) for r in rows.itertuples()}
        lines.append(f"| {model} | " + " | ".join(cells.get(m, "n/a") for m, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: float, lo: float, hi: float) -> str:
    if not np.isfinite(value):
        return "n/a"
    if not np.isfinite(lo):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def pooled_table(results_dir: str | Path) -> str:
    """The pooled best-checkpoint table of a stored comparison (``<results_dir>/summary.csv``), as in the README."""
    summary = pd.read_csv(Path(results_dir) / "summary.csv")
    n = max(int(m.split("@")[1]) for m in summary["metric"] if m.startswith("solve/pass@"))
    meta = json.loads((Path(results_dir) / "meta.json").read_text())
    seeds = meta["seeds"]
    caption = (
        f"Best checkpoint of each run; {len(seeds)} training seed{'s' if len(seeds) > 1 else ''} pooled; "
        f"{meta['precision']}; {meta['machine']}.\n\n"
    )
    return caption + markdown_table(summary, n, "best")


def update_readme(readme: str | Path, results_dir: str | Path) -> None:
    """Replaces the table between ``<!-- table: <results_dir> -->`` and ``<!-- /table -->`` in `readme` with
    `pooled_table(results_dir)`; `results_dir` is written relative to the README's folder.

    Raises:
        ValueError: the README has no such markers.
    """
    readme = Path(readme)
    name = Path(results_dir).resolve().relative_to(readme.resolve().parent).as_posix()
    text = readme.read_text()
    start, end = f"<!-- table: {name} -->\n", "<!-- /table -->"
    if start not in text or end not in text.split(start, 1)[1]:
        raise ValueError(f"{readme} has no '{start.strip()}' ... '{end}' block: add one where the table goes")
    before, rest = text.split(start, 1)
    readme.write_text(before + start + pooled_table(results_dir) + rest[rest.index(end) :])
