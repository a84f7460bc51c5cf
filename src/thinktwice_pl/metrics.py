"""Evaluation metrics of ThinkTwice (METHOD.md section 6): unbiased pass@k and refinement transitions.

- `pass_at_k(n, c, k)`: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code"), ``1 - C(n - c, k) / C(n, k)``: the probability that at least one of k
  samples drawn without replacement from n samples, c of them correct, is correct. Computed with
  exact integer binomials and one rounding at the end, so it is exact for any n.
- `transition_counts` / `transition_rates`: one greedy base answer and one greedy refinement per
  problem; ``fix_wrong = #(wrong -> right) / #(base wrong)``, ``damage_correct = #(right -> wrong) /
  #(base right)`` and their complements ``stay_wrong`` and ``keep_right`` (the rectify/fortify curves).
- `PassAtK` and `Transitions`: the same as torchmetrics ``Metric``s whose states are sums, so
  ``compute()`` reduces across data-parallel ranks before dividing.
- `greedy_accuracies`: accuracy of the greedy answers and of their greedy refinements (the paper selects
  checkpoints by the former).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torchmetrics import Metric

TRANSITIONS = ("fix_wrong", "damage_correct", "keep_right", "stay_wrong")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct answers among `n` samples.

    Args:
        n: samples drawn for the problem.
        c: how many of them are correct, ``0 <= c <= n``.
        k: the budget, ``1 <= k <= n``.

    Returns:
        ``1 - C(n - c, k) / C(n, k)``, exact up to the final float rounding.

    Raises:
        ValueError: k > n (the estimator needs at least k samples), or counts out of range.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k={k} samples per problem but n={n}; use k <= n (raise n)")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def default_ks(n: int) -> list[int]:
    """The reported budgets for n samples: 1, 2, 4, ... up to n, and n itself (METHOD.md section 6)."""
    if n < 1:
        raise ValueError(f"the number of samples per problem must be >= 1, got {n}")
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def transition_counts(base_correct: Sequence[bool], refined_correct: Sequence[bool]) -> dict[str, int]:
    """Counts of the four (base, refinement) outcomes, one pair per problem.

    Returns:
        ``{"wrong_to_right", "right_to_wrong", "right_to_right", "wrong_to_wrong"}`` counts.
    """
    if len(base_correct) != len(refined_correct):
        raise ValueError(f"{len(base_correct)} base results but {len(refined_correct)} refinement results")
    pairs = list(zip(base_correct, refined_correct, strict=True))
    return {
        "wrong_to_right": sum(1 for b, r in pairs if not b and r),
        "right_to_wrong": sum(1 for b, r in pairs if b and not r),
        "right_to_right": sum(1 for b, r in pairs if b and r),
        "wrong_to_wrong": sum(1 for b, r in pairs if not b and not r),
    }


def transition_rates(counts: dict[str, int]) -> dict[str, float]:
    """fix_wrong, stay_wrong (over base-wrong problems), damage_correct, keep_right (over base-right ones).

    A rate whose denominator is 0 (no wrong, or no right, base answers) is NaN.
    """
    wrong = counts["wrong_to_right"] + counts["wrong_to_wrong"]
    right = counts["right_to_wrong"] + counts["right_to_right"]
    nan = float("nan")
    return {
        "fix_wrong": counts["wrong_to_right"] / wrong if wrong else nan,
        "damage_correct": counts["right_to_wrong"] / right if right else nan,
        "keep_right": counts["right_to_right"] / right if right else nan,
        "stay_wrong": counts["wrong_to_wrong"] / wrong if wrong else nan,
    }


def greedy_accuracies(counts: dict[str, int]) -> tuple[float, float]:
    """``(accuracy of the greedy answers, accuracy of their greedy refinements)`` from `transition_counts`; NaN
    without problems. The first is the paper's model-selection score (METHOD.md section 4)."""
    total = sum(counts.values())
    if not total:
        return float("nan"), float("nan")
    answers = counts["right_to_wrong"] + counts["right_to_right"]
    refinements = counts["wrong_to_right"] + counts["right_to_right"]
    return answers / total, refinements / total


class PassAtK(Metric):
    """Mean unbiased pass@k over problems, for every k in `ks`, with n samples per problem.

    ``update(num_correct)`` takes the count of correct samples of each problem (``[problems]``);
    ``compute()`` returns ``{k: mean pass@k}``. States are sums, reduced across ranks.

    Args:
        n: samples per problem.
        ks: budgets to report; None = `default_ks(n)`.
    """

    full_state_update = False
    total: torch.Tensor
    num_problems: torch.Tensor

    def __init__(self, n: int, ks: Sequence[int] | None = None) -> None:
        super().__init__()
        self.n = n
        self.ks = list(ks) if ks is not None else default_ks(n)
        for k in self.ks:
            if not 1 <= k <= n:
                raise ValueError(f"pass@{k} needs at least k={k} samples per problem but n={n}; use k <= n")
        self.add_state("total", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_problems", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, num_correct: torch.Tensor | Sequence[int]) -> None:
        counts = [int(c) for c in (num_correct.tolist() if isinstance(num_correct, torch.Tensor) else num_correct)]
        values = [[pass_at_k(self.n, c, k) for k in self.ks] for c in counts]  # [problems, len(ks)]
        if values:
            self.total += torch.tensor(values, dtype=torch.float64, device=self.total.device).sum(0)
        self.num_problems += len(counts)

    def compute(self) -> dict[int, float]:
        if float(self.num_problems) == 0:
            return {k: float("nan") for k in self.ks}
        means = (self.total / self.num_problems).tolist()
        return dict(zip(self.ks, means, strict=True))


class Transitions(Metric):
    """Rates of the (greedy base -> greedy refinement) transitions, summed over problems and ranks.

    ``update(base_correct, refined_correct)`` takes one boolean per problem each; ``compute()``
    returns `transition_rates` of the accumulated counts.
    """

    full_state_update = False
    counts: torch.Tensor

    _ORDER = ("wrong_to_right", "right_to_wrong", "right_to_right", "wrong_to_wrong")

    def __init__(self) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(4, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, base_correct: Sequence[bool], refined_correct: Sequence[bool]) -> None:
        counts = transition_counts(base_correct, refined_correct)
        values = [counts[key] for key in self._ORDER]
        self.counts += torch.tensor(values, dtype=torch.float64, device=self.counts.device)

    def compute(self) -> dict[str, float]:
        return transition_rates(self.totals())

    def totals(self) -> dict[str, int]:
        """This rank's counts (inside ``sync_context()`` or `compute`: all ranks' counts)."""
        return {key: int(value) for key, value in zip(self._ORDER, self.counts.tolist(), strict=True)}
