"""Reading a run's metrics.csv in tests."""

from __future__ import annotations

import pandas as pd


def train_phases(metrics: pd.DataFrame) -> list[str]:
    """The phase of each training row, in step order; rows without train/ keys (validation) are skipped.

    Each training row must belong to exactly one phase (one logger row per phase).
    """
    phases = []
    for _, row in metrics.sort_values("step").iterrows():
        present = {c.split("/")[1] for c in row.dropna().index if c.startswith("train/")}
        if not present:
            continue
        assert len(present) == 1, f"row at step {row['step']} mixes phases: {present}"
        phases.append(present.pop())
    return phases
