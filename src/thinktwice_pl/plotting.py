"""The rectify-then-fortify figure: fix-wrong and damage-correct rates against training step.

Validation curves come from ``val/transition/{fix_wrong, damage_correct}`` (one greedy answer and its
greedy refinement per problem, METHOD.md section 6); training curves from the refine phases,
``train/refine/fix_rate`` (refinements of wrong bases that are right) and ``1 - train/refine/keep_rate``
(refinements of right bases that are wrong). The same columns are in a run's ``metrics.csv`` and in the
``rectify_fortify.csv`` of `RectifyFortifyTracker`, so one function draws both and overlays runs
(ThinkTwice vs the GRPO baseline). matplotlib is imported only when drawing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

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


def _pyplot() -> Any:
    require(MATPLOTLIB, "plotting", "pip install matplotlib (or the bench extra)")
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, no display
    import matplotlib.pyplot as plt

    return plt
