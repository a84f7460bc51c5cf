"""Draw the rectify-then-fortify figure (fix-wrong and damage-correct against step) from runs' metrics files.

    python scripts/plot_dynamics.py runs/qwen3-4b-thinktwice/version_0/metrics.csv --out dynamics.png
    python scripts/plot_dynamics.py runs/a/version_0/metrics.csv runs/b/version_0/metrics.csv \\
        --labels ThinkTwice GRPO --out thinktwice_vs_grpo.png

Reads a run's metrics.csv (CSVLogger) or the rectify_fortify.csv of RectifyFortifyTracker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from thinktwice_pl.plotting import plot_dynamics, read_metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.csv or rectify_fortify.csv of each run")
    parser.add_argument("--labels", nargs="+", help="legend name of each run (default: the run directory names)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    labels = args.labels or [f"{p.parent.parent.name}/{p.parent.name}" for p in args.metrics]
    if len(labels) != len(args.metrics):
        parser.error(f"{len(args.metrics)} metrics files but {len(labels)} labels")
    runs = {label: read_metrics(path) for label, path in zip(labels, args.metrics, strict=True)}
    print(plot_dynamics(runs, args.out, title=args.title))


if __name__ == "__main__":
    main()
