"""Figures of runs: the rectify-then-fortify dynamics, pass@k curves, and accuracy over refinement rounds.

The rectify-then-fortify figure shows fix-wrong and damage-correct rates against training step.

Validation curves come from ``val/transition/{fix_wrong, damage_correct}`` (one greedy answer and its
greedy refinement per problem, METHOD.md section 6); training curves from the refine phases,
``train/refine/fix_rate`` (refinements of wrong bases that are right) and ``1 - train/refine/keep_rate``
(refinements of right bases that are wrong). The same columns are in a run's ``metrics.csv`` and in the
``rectify_fortify.csv`` of `RectifyFortifyTracker`, so one function draws both and overlays runs
(ThinkTwice vs the GRPO baseline). matplotlib is imported only when drawing.

`plot_passk` draws pass@k against k per benchmark (and the macro average) before and after refinement, from an
evaluation's ``eval_records.csv`` (every k from 1 to n, by the unbiased estimator) or its logged keys;
`plot_rounds` draws accuracy against refinement round (``eval.refine_rounds``) beside the compute-matched
pass@((r + 1)k) of the first answers. Both write their numbers as a CSV beside the PNG.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from thinktwice_pl.errors import UserError
from thinktwice_pl.metrics import default_ks, pass_at_k, record_columns, stage_name, transition_name
from thinktwice_pl.optional import MATPLOTLIB, require

VAL_COLUMNS = {"fix_wrong": "val/transition/fix_wrong", "damage_correct": "val/transition/damage_correct"}
TRAIN_COLUMNS = {"fix_wrong": "train/refine/fix_rate", "keep_right": "train/refine/keep_rate"}
TRACKED = (
    "val/transition/fix_wrong",
    "val/transition/damage_correct",
    "val/transition/keep_right",
    "val/transition/stay_wrong",
    "train/refine/base_correct_frac",
    "train/refine/fix_rate",
    "train/refine/keep_rate",
    "train/refine/reward_share_from_wrong",
)
"""The columns of rectify_fortify.csv besides ``step``."""


def dynamics(metrics: pd.DataFrame) -> pd.DataFrame:
    """Long table ``step, curve (fix_wrong | damage_correct), source (val | train), rate`` from a metrics table.

    Raises:
        ValueError: the table has no step column or none of the transition / refine-signal columns.
    """
    if "step" not in metrics.columns:
        raise ValueError(f"the metrics table has no 'step' column (columns: {', '.join(metrics.columns)})")
    series: list[pd.DataFrame] = []

    def add(curve: str, source: str, values: pd.Series) -> None:
        frame = pd.DataFrame({"step": metrics["step"], "rate": values}).dropna()
        frame = frame.groupby("step", as_index=False)["rate"].mean()
        series.append(frame.assign(curve=curve, source=source))

    for curve, column in VAL_COLUMNS.items():
        if column in metrics.columns:
            add(curve, "val", metrics[column])
    if TRAIN_COLUMNS["fix_wrong"] in metrics.columns:
        add("fix_wrong", "train", metrics[TRAIN_COLUMNS["fix_wrong"]])
    if TRAIN_COLUMNS["keep_right"] in metrics.columns:
        add("damage_correct", "train", 1.0 - metrics[TRAIN_COLUMNS["keep_right"]])
    if not series:
        raise ValueError(
            f"the metrics table has none of {', '.join([*VAL_COLUMNS.values(), *TRAIN_COLUMNS.values()])}: "
            "validation transitions need data.val benchmarks and eval.transitions=true; training signals need "
            "the refine phase (data.refine=true)"
        )
    return pd.concat(series, ignore_index=True)[["step", "curve", "source", "rate"]]


def read_metrics(path: str | Path) -> pd.DataFrame:
    """A run's metrics.csv (CSVLogger) or a rectify_fortify.csv."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file {str(path)!r} does not exist (a run's metrics.csv, or rectify_fortify.csv)")
    return pd.read_csv(path)


def plot_dynamics(runs: dict[str, pd.DataFrame], out: str | Path, title: str | None = None) -> Path:
    """Draws fix-wrong and damage-correct against step for each run (label -> metrics table) into the PNG `out`.

    Validation rates are solid lines with markers, training refine-phase rates thin dashed lines.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, (label, metrics) in enumerate(runs.items()):
        table = dynamics(metrics)
        color = colors[run_index % len(colors)]
        for ax, curve in zip(axes, ("fix_wrong", "damage_correct"), strict=True):
            for source, style in (
                ("val", {"marker": "o", "linewidth": 2.0}),
                ("train", {"linestyle": "--", "linewidth": 1.0, "alpha": 0.6}),
            ):
                rows = table[(table["curve"] == curve) & (table["source"] == source)]
                if len(rows):
                    name = f"{label} ({'validation, greedy' if source == 'val' else 'training, sampled'})"
                    ax.plot(rows["step"], 100 * rows["rate"], color=color, label=name, **style)
    axes[0].set_title("fix-wrong: wrong base -> right refinement")
    axes[1].set_title("damage-correct: right base -> wrong refinement")
    for ax in axes:
        ax.set_xlabel("step (phase)")
        ax.set_ylabel("rate (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------------ evaluations

PASSK_COLUMNS = ("run", "benchmark", "stage", "k", "pass@k")
"""The CSV of `plot_passk`: one row per run, benchmark (``avg`` = the macro average), stage and k."""
STAGE_STYLES = {"solve": "--", "refine": "-"}  # before refinement dashed, after solid; later rounds dotted


def read_evaluation(path: str | Path, split: str | None = None, step: int | None = None) -> tuple[str, pd.DataFrame]:
    """The evaluation rows of one run: ``("records", rows)`` from its eval_records.csv (all ranks' files of a run
    directory), else ``("metrics", row)`` from its metrics.csv (the logged keys only), at `split` (default: test
    when the file has test rows, else val) and `step` (default: the split's last). `path` is a run's log directory or
    one of those files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("eval_records*.csv")) or sorted(path.glob("metrics.csv"))
        if not files:
            raise UserError(
                f"--run {path}: the directory has no eval_records.csv or metrics.csv (a run's log directory)"
            )
    elif path.is_file():
        files = [path]
    else:
        raise UserError(
            f"--run {path}: no such file or directory (a run's log directory, eval_records.csv or metrics.csv)"
        )
    table = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    kind = "records" if {"split", "solve_correct"} <= set(table.columns) else "metrics"
    if kind == "metrics" and "step" not in table.columns:
        raise UserError(f"--run {path}: neither eval_records.csv (split, solve_correct columns) nor metrics.csv (step)")
    splits = {
        name: table[table["split"] == name] if kind == "records" else table[_split_rows(table, name)]
        for name in ("test", "val")
    }
    chosen = split or ("test" if len(splits["test"]) else "val")
    if chosen not in splits:
        raise UserError(f"--split {chosen}: use test or val")
    rows = splits[chosen]
    if not len(rows):
        raise UserError(f"--run {path}: no {chosen} evaluation rows (--split picks test or val)")
    steps = sorted(int(s) for s in rows["step"].unique())
    at = steps[-1] if step is None else step
    if at not in steps:
        raise UserError(f"--step {at}: {path} has {chosen} evaluations at steps {steps}")
    rows = rows[rows["step"] == at]
    if kind == "metrics":  # several logger rows of one step: each column's last value
        rows = rows.groupby("step", as_index=False).last()
    rows = rows.assign(split=chosen).reset_index(drop=True)
    rows.attrs["inputs"] = files  # never overwritten by the figures' outputs
    return kind, rows


def read_runs(
    specs: list[str], split: str | None = None, step: int | None = None
) -> dict[str, tuple[str, pd.DataFrame]]:
    """`read_evaluation` of each ``LABEL=PATH`` of `specs` (the scripts' ``--run`` options), by label."""
    runs = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--run {spec}: write LABEL=PATH, e.g. --run ThinkTwice=runs/thinktwice/version_0")
        if label in runs:
            raise UserError(f"--run {spec}: the label {label!r} is used twice")
        runs[label] = read_evaluation(path, split, step)
    return runs


def _split_rows(metrics: pd.DataFrame, split: str) -> pd.Series:
    columns = [c for c in metrics.columns if c.startswith(f"{split}/avg/")]
    return metrics[columns].notna().any(axis=1) if columns else pd.Series(False, index=metrics.index)


def _rounds(records: pd.DataFrame) -> int:
    """R, the last refinement round with columns in `records`."""
    r = 1
    while record_columns(r + 1)[0] in records.columns:
        r += 1
    return r


def passk_table(kind: str, rows: pd.DataFrame) -> pd.DataFrame:
    """Long table ``benchmark, stage, k, pass@k`` of one evaluation (`read_evaluation`): from records every k from 1
    to n, the mean over problems of the unbiased estimator; from metrics the logged k. ``avg`` is the macro mean."""
    parts: list[dict[str, Any]] = []
    if kind == "records":
        rows = rows[rows["n"] > 0]
        if not len(rows):
            raise UserError("the records hold no sampled answers (n = 0, a greedy-only validation): no pass@k")
        for bench, group in rows.groupby("benchmark", sort=False):
            ns = group["n"].astype(int).tolist()
            for r in range(_rounds(group) + 1):
                counts = group[record_columns(r)[0]].astype(int).tolist()
                for k in range(1, min(ns) + 1):
                    value = sum(pass_at_k(n, c, k) for n, c in zip(ns, counts, strict=True)) / len(counts)
                    parts.append({"benchmark": bench, "stage": stage_name(r), "k": k, "pass@k": value})
    else:
        split = rows["split"].iloc[0]
        pattern = re.compile(rf"^{split}/(.+)/(solve|refine\d*)/pass@(\d+)$")
        for column in rows.columns:
            if (match := pattern.match(column)) and match.group(1) != "avg" and pd.notna(rows[column].iloc[0]):
                parts.append(
                    {
                        "benchmark": match.group(1),
                        "stage": match.group(2),
                        "k": int(match.group(3)),
                        "pass@k": rows[column].iloc[0],
                    }
                )
        if not parts:
            raise UserError(f"the metrics hold no {split}/<benchmark>/<stage>/pass@<k> values (eval.num_samples >= 1)")
    table = pd.DataFrame(parts)
    avg = table.groupby(["stage", "k"], as_index=False, sort=False)["pass@k"].mean().assign(benchmark="avg")
    return pd.concat([table, avg], ignore_index=True)[["benchmark", "stage", "k", "pass@k"]]


def rounds_table(kind: str, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per round (0 = the first answers, 1..R the refinements) of one evaluation: the macro averages
    ``pass@<k>``, ``matched_pass@<k>`` (the first answers' pass@((round + 1)k), as many generations; NaN where
    (round + 1)k > n), ``greedy_acc``, and the pooled greedy ``fix_wrong`` / ``damage_correct`` into the round."""
    if kind == "records":
        return _rounds_from_records(rows)
    split, row = rows["split"].iloc[0], rows.iloc[0]
    ks = sorted({int(m.group(1)) for c in rows.columns if (m := re.match(rf"^{split}/avg/solve/pass@(\d+)$", c))})
    refined = [re.match(rf"^{split}/avg/refine(\d*)/", c) for c in rows.columns]
    last = max([0, *(int(m.group(1) or 1) for m in refined if m)])  # "refine" is round 1, "refine<r>" round r
    out = []
    for r in range(last + 1):
        entry: dict[str, Any] = {"round": r}
        for k in ks:
            entry[f"pass@{k}"] = row.get(f"{split}/avg/{stage_name(r)}/pass@{k}", float("nan"))
        for k in ks:  # round 1 of a one-round evaluation: solve's pass@2k is its matched value
            fallback = row.get(f"{split}/avg/solve/pass@{(r + 1) * k}", float("nan"))
            entry[f"matched_pass@{k}"] = (
                row.get(f"{split}/avg/matched{r}/pass@{k}", fallback) if r else entry[f"pass@{k}"]
            )
        entry["greedy_acc"] = row.get(f"{split}/avg/{stage_name(r)}/greedy_acc", float("nan"))
        for rate in ("fix_wrong", "damage_correct"):
            entry[rate] = row.get(f"{split}/{transition_name(r)}/{rate}", float("nan")) if r else float("nan")
        out.append(entry)
    return pd.DataFrame(out)


def _rounds_from_records(rows: pd.DataFrame) -> pd.DataFrame:
    sampled = rows[rows["n"] > 0]
    n = int(sampled["n"].min()) if len(sampled) else 0
    ks = default_ks(n) if n else []
    nan = float("nan")

    def macro(value: Any) -> float:  # the mean over benchmarks of a per-benchmark value
        values = [value(group) for _, group in rows.groupby("benchmark", sort=False)]
        return sum(values) / len(values)

    def mean_pass(column: str, k: int) -> Any:
        return lambda g: sum(pass_at_k(int(m), int(c), k) for m, c in zip(g["n"], g[column], strict=True)) / len(g)

    out = []
    for r in range(_rounds(rows) + 1):
        column, greedy = record_columns(r)
        entry: dict[str, Any] = {"round": r}
        for k in ks:
            entry[f"pass@{k}"] = macro(mean_pass(column, k)) if len(sampled) == len(rows) else nan
        for k in ks:
            matched = (r + 1) * k <= n and len(sampled) == len(rows)
            entry[f"matched_pass@{k}"] = macro(mean_pass("solve_correct", (r + 1) * k)) if matched else nan
        has_greedy = rows[greedy].notna().all()
        entry["greedy_acc"] = macro(lambda g, c=greedy: g[c].mean()) if has_greedy else nan
        before = rows[record_columns(r - 1)[1]] if r else None
        for rate, was in (("fix_wrong", 0), ("damage_correct", 1)):
            base = (before == was) if r and has_greedy else None
            entry[rate] = (
                float(((rows[greedy] != was) & base).sum() / base.sum()) if base is not None and base.sum() else nan
            )
        out.append(entry)
    return pd.DataFrame(out)


def plot_passk(
    runs: dict[str, tuple[str, pd.DataFrame]], out: str | Path, title: str | None = None
) -> tuple[Path, Path]:
    """pass@k against k (log2 axis), one panel per benchmark and the macro average, for each run (label ->
    `read_evaluation`'s result): dashed before refinement, solid after, dotted for later rounds. Writes the PNG `out`
    and, beside it, the CSV of `PASSK_COLUMNS`."""
    table = pd.concat([passk_table(kind, rows).assign(run=label) for label, (kind, rows) in runs.items()])
    table = table[list(PASSK_COLUMNS)].reset_index(drop=True)
    png, csv = _outputs(out, runs)
    plt = _pyplot()
    benchmarks = [b for b in dict.fromkeys(table["benchmark"]) if b != "avg"] + ["avg"]
    fig, axes = plt.subplots(
        1, len(benchmarks), figsize=(4.2 * len(benchmarks), 3.8), squeeze=False, constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, bench in zip(axes[0], benchmarks, strict=True):
        for run_index, label in enumerate(runs):
            for stage, curve in table[(table["run"] == label) & (table["benchmark"] == bench)].groupby(
                "stage", sort=False
            ):
                style = STAGE_STYLES.get(stage, ":")
                ax.plot(
                    curve["k"],
                    100 * curve["pass@k"],
                    style,
                    color=colors[run_index % len(colors)],
                    label=f"{label} {stage}",
                )
        ax.set_xscale("log", base=2)
        ticks = [2**i for i in range(int(table["k"].max()).bit_length())]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_title("macro average" if bench == "avg" else bench)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save(fig, plt, png, title)
    _write_csv(table, csv)
    return png, csv


def plot_rounds(
    runs: dict[str, tuple[str, pd.DataFrame]], out: str | Path, title: str | None = None
) -> tuple[Path, Path]:
    """Macro-average accuracy against refinement round for each run (label -> `read_evaluation`'s result): pass@1
    (solid) beside the compute-matched pass@(round + 1) of the first answers (dashed), and the greedy chain's
    accuracy. Writes the PNG `out` and, beside it, the `rounds_table` of every run as CSV (with a ``run`` column)."""
    table = pd.concat([rounds_table(kind, rows).assign(run=label) for label, (kind, rows) in runs.items()])
    table = table[["run", *[c for c in table.columns if c != "run"]]].reset_index(drop=True)
    png, csv = _outputs(out, runs)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, (label, rows) in enumerate(table.groupby("run", sort=False)):
        color = colors[run_index % len(colors)]
        if "pass@1" in rows and rows["pass@1"].notna().any():
            axes[0].plot(rows["round"], 100 * rows["pass@1"], "-o", color=color, label=f"{label} pass@1 after r rounds")
            axes[0].plot(
                rows["round"],
                100 * rows["matched_pass@1"],
                "--s",
                color=color,
                label=f"{label} first answers' pass@(r+1)",
            )
        axes[1].plot(rows["round"], 100 * rows["greedy_acc"], "-o", color=color, label=label)
    for ax, name in zip(axes, ("sampled answers", "greedy chain"), strict=True):
        ax.set_title(name)
        ax.set_xlabel("round (0 = first answers)")
        ax.set_ylabel("accuracy (%)")
        ax.set_xticks(sorted(table["round"].unique()))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, plt, png, title)
    _write_csv(table, csv)
    return png, csv


def _outputs(out: str | Path, runs: dict[str, Any]) -> tuple[Path, Path]:
    """The PNG `out` and the CSV beside it; refuses names that would overwrite an input of a run."""
    png = Path(out)
    if png.suffix.lower() != ".png":
        raise UserError(f"--out {out}: name a .png file (the CSV is written beside it)")
    csv = png.with_suffix(".csv")
    inputs = {p.resolve() for _, (_, rows) in runs.items() for p in rows.attrs.get("inputs", [])}
    for path in (png, csv):
        if path.resolve() in inputs:
            raise UserError(f"--out {out} would overwrite the input {path}: choose another name")
    return png, csv


def _save(fig: Any, plt: Any, png: Path, title: str | None) -> None:
    if title:
        fig.suptitle(title)
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=png.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp.name, png)


def _write_csv(table: pd.DataFrame, csv: Path) -> None:
    with tempfile.NamedTemporaryFile("w", dir=csv.parent, suffix=".csv", delete=False, newline="") as tmp:
        table.to_csv(tmp, index=False)
    os.replace(tmp.name, csv)


def _pyplot() -> Any:
    require(MATPLOTLIB, "plotting", "pip install matplotlib (or the bench extra)")
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_command(description: str, plot: Any, argv: list[str] | None = None) -> None:
    """The command line of scripts/plot_passk.py and scripts/plot_rounds.py: ``--run LABEL=PATH`` (repeated),
    ``--out``, ``--split``, ``--step``, ``--title``; `plot(runs, out, title=...)` writes the PNG and its CSV."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="LABEL=PATH",
        help="a run's legend label and its log directory, eval_records.csv or metrics.csv (repeat to overlay runs)",
    )
    parser.add_argument("--out", required=True, help="the PNG to write; the CSV goes beside it")
    parser.add_argument("--split", choices=("test", "val"), help="the evaluation to draw (default: test if present)")
    parser.add_argument("--step", type=int, help="the step of the evaluation (default: the split's last)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        png, csv = plot(read_runs(args.run, args.split, args.step), args.out, title=args.title)
    except UserError as error:
        parser.error(str(error))
    print(png)
    print(csv)
