"""Draw accuracy against refinement round (eval.refine_rounds) for runs overlaid, beside the compute-matched line.

    python scripts/plot_rounds.py --run ThinkTwice=runs/thinktwice/version_1 --run GRPO=runs/grpo/version_1 \\
        --out rounds.png

Round 0 is the first answers, round r their r-th refinement. Left: pass@1 after r rounds (solid) and the first
answers' pass@(r + 1), which costs as many generations (dashed); right: the greedy chain's accuracy. Each run is a
log directory, its eval_records.csv or its metrics.csv. Writes the PNG and, beside it, a CSV (run, round, pass@k,
matched_pass@k, greedy_acc, fix_wrong, damage_correct).
"""

from __future__ import annotations

from thinktwice_pl.plotting import plot_command, plot_rounds


def main(argv: list[str] | None = None) -> None:
    plot_command(__doc__.split("\n\n")[0], plot_rounds, argv)


if __name__ == "__main__":
    main()
