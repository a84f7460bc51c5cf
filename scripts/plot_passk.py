"""Draw pass@k against k (log2 axis) before and after refinement, per benchmark and macro-averaged, for runs overlaid.

    python scripts/plot_passk.py --run ThinkTwice=runs/thinktwice/version_1 --run GRPO=runs/grpo/version_1 \\
        --out passk.png
    python scripts/plot_passk.py --run base=runs/base/version_0/eval_records.csv --split val --step 0 --out base.png

Each run is a log directory, its eval_records.csv (eval.records: true; every k from 1 to n by the unbiased
estimator) or its metrics.csv (the logged k only). Writes the PNG and, beside it, a CSV (run, benchmark, stage, k,
pass@k).
"""

from __future__ import annotations

from thinktwice_pl.plotting import plot_command, plot_passk


def main(argv: list[str] | None = None) -> None:
    plot_command(__doc__.split("\n\n")[0], plot_passk, argv)


if __name__ == "__main__":
    main()
