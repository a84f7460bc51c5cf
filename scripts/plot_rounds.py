"""Draw accuracy against refinement round (eval.refine_rounds) for runs overlaid, beside the compute-matched line.

    python scripts/plot_rounds.py --run ThinkTwice=runs/thinktwice/version_1 --run GRPO=runs/grpo/version_1 \\
        --out rounds.png

Round 0 is the first answers, round r their r-th refinement. Left: pass@1 after r rounds (solid) and the first
answers' pass@(r + 1), which costs as many generations (dashed); right: the greedy chain's accuracy. Each run is a
log directory, its eval_records.csv or its metrics.csv. Writes the PNG and, beside it, a CSV (run, round, pass@k,
matched_pass@k, greedy_acc, fix_wrong, damage_correct).
"""

from __future__ import annotations

import argparse

from thinktwice_pl.errors import UserError
from thinktwice_pl.plotting import plot_rounds, read_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        png, csv = plot_rounds(read_runs(args.run, args.split, args.step), args.out, title=args.title)
    except UserError as error:
        parser.error(str(error))
    print(png)
    print(csv)


if __name__ == "__main__":
    main()
