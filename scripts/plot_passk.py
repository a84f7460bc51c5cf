"""Draw pass@k against k (log2 axis) before and after refinement, per benchmark and macro-averaged, for runs overlaid.

    python scripts/plot_passk.py --run ThinkTwice=runs/thinktwice/version_1 --run GRPO=runs/grpo/version_1 \\
        --out passk.png
    python scripts/plot_passk.py --run base=runs/base/version_0/eval_records.csv --split val --step 0 --out base.png

Each run is a log directory, its eval_records.csv (eval.records: true; every k from 1 to n by the unbiased
estimator) or its metrics.csv (the logged k only). Writes the PNG and, beside it, a CSV (run, benchmark, stage, k,
pass@k).
"""

from __future__ import annotations

import argparse

from thinktwice_pl.errors import UserError
from thinktwice_pl.plotting import plot_passk, read_runs


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
        png, csv = plot_passk(read_runs(args.run, args.split, args.step), args.out, title=args.title)
    except UserError as error:
        parser.error(str(error))
    print(png)
    print(csv)


if __name__ == "__main__":
    main()
