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
- `eval_metrics`: an evaluation's logged keys from those metrics, for one or more rounds of refinement (round r
  reviews round r - 1's answer), with the compute-matched pass@((r + 1)k) of the first answers.
- Training: `StepStats` (the update's statistics, summed over passes, steps and ranks), `refine_signals`
  (METHOD.md section 8) and `phase_metrics`, the ``train/<phase>/*`` and ``perf/*`` values of one phase.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torchmetrics import Metric

from thinktwice_pl.types import Rollout, RolloutBatch

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


def stage_name(round_: int) -> str:
    """The key part of refinement round `round_`: ``solve`` (0, the first answers), ``refine`` (1), ``refine<r>``."""
    return "solve" if round_ == 0 else "refine" if round_ == 1 else f"refine{round_}"


def transition_name(round_: int) -> str:
    """The key part of the transitions into round `round_` >= 1 from round - 1: ``transition``, ``transition<r>``."""
    return "transition" if round_ == 1 else f"transition{round_}"


def record_columns(round_: int) -> tuple[str, str]:
    """The eval_records.csv columns of round `round_`: (correct samples, greedy answer correct)."""
    if round_ == 0:
        return "solve_correct", "greedy_correct"
    suffix = "" if round_ == 1 else str(round_)
    return f"refine{suffix}_correct", f"greedy_refine{suffix}_correct"


def matched_ks(ks: Sequence[int], round_: int, n: int) -> list[int]:
    """The budgets k whose compute-matched pass@((round + 1)k) exists with n samples: pass@k after `round_`
    refinements costs (round + 1)k generations, as many as (round + 1)k first answers."""
    return [k for k in ks if (round_ + 1) * k <= n]


def eval_metrics(
    pass_metrics: dict[str, Sequence[PassAtK]],
    greedy: dict[str, Sequence[Transitions]],
    split: str,
    matched: dict[str, Sequence[PassAtK]] | None = None,
) -> dict[str, float]:
    """The documented keys of one evaluation; computes (so reduces across ranks) every metric.

    Args:
        pass_metrics: benchmark -> pass@k of round 0 (the first answers), 1, 2, ... (the refinements).
        greedy: benchmark -> transitions into round 1, 2, ...: the greedy answer -> its greedy refinement, then
            each greedy refinement -> the next.
        split: ``val`` or ``test``.
        matched: benchmark -> one `PassAtK` of the first answers per round 1, 2, ... whose budgets are
            (r + 1)k (`matched_ks`); logged under k.

    Returns:
        ``<split>/<bench>/<stage>/{pass@<k>,greedy_acc}`` (`stage_name`), ``<split>/<bench>/matched<r>/pass@<k>``,
        their macro averages ``<split>/avg/...`` and the ``<split>/<transition_name>/*`` rates pooled over benchmarks.
    """
    out: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}  # "<stage>/<metric>" -> one value per benchmark
    for bench, rounds in pass_metrics.items():
        for round_, metric in enumerate(rounds):
            for k, value in metric.compute().items():
                out[f"{split}/{bench}/{stage_name(round_)}/pass@{k}"] = value
                per_key.setdefault(f"{stage_name(round_)}/pass@{k}", []).append(value)
    for bench, rounds in (matched or {}).items():
        for round_, metric in enumerate(rounds, start=1):
            for budget, value in metric.compute().items():
                key = f"matched{round_}/pass@{budget // (round_ + 1)}"
                out[f"{split}/{bench}/{key}"] = value
                per_key.setdefault(key, []).append(value)
    pooled: list[Counter[str]] = []  # per round: the counts of all benchmarks
    for bench, rounds in greedy.items():
        for round_, outcomes in enumerate(rounds, start=1):
            with outcomes.sync_context():  # every rank's problems
                counts = outcomes.totals()
            if len(pooled) < round_:
                pooled.append(Counter())
            pooled[round_ - 1].update(counts)
            before, after = greedy_accuracies(counts)
            stages = [(stage_name(round_), after)] if round_ > 1 else [("solve", before), ("refine", after)]
            for stage, value in stages:
                out[f"{split}/{bench}/{stage}/greedy_acc"] = value
                per_key.setdefault(f"{stage}/greedy_acc", []).append(value)
    for key, values in per_key.items():
        out[f"{split}/avg/{key}"] = sum(values) / len(values)
    for round_, counts in enumerate(pooled, start=1):  # the transition rates pool the problems of all benchmarks
        name = transition_name(round_)
        out.update({f"{split}/{name}/{rate}": v for rate, v in transition_rates(dict(counts)).items()})
    return out


# ------------------------------------------------------------------------------------------------- training


@dataclass
class StepStats:
    """Statistics of a phase's optimizer steps: sums over passes, steps and (after `reduced`) ranks, except the
    fields marked as maxima; ``steps``, ``skipped_steps`` and ``grad_norm`` are the same on every rank (the norm
    of the reduced or sharded gradient) and are not reduced."""

    loss: float = 0.0  # the steps' losses (each already normalised over the whole step)
    tokens: float = 0.0  # completion tokens that entered a backward pass
    clip_low: float = 0.0  # ... of them clipped below (ratio < 1 - epsilon, negative advantage)
    clip_high: float = 0.0  # ... clipped above (ratio > 1 + epsilon_high, positive advantage)
    clip_dual: float = 0.0  # ... under the dual clip
    kl: float = 0.0  # summed per-token k3 KL
    entropy: float = 0.0  # summed per-token entropy
    sampler_diff: float = 0.0  # summed |log pi_old - log pi_sampler| over tokens with sampler log-probs
    sampler_tokens: float = 0.0  # tokens with sampler log-probs
    is_capped: float = 0.0  # tokens whose importance weight hit the cap
    sampler_diff_max: float = field(default=0.0, metadata={"reduce": "max"})  # the largest such gap
    grad_norm: float = field(default=0.0, metadata={"reduce": None})  # summed over applied steps
    steps: float = field(default=0.0, metadata={"reduce": None})  # applied optimizer steps
    skipped_steps: float = field(default=0.0, metadata={"reduce": None})  # skipped on a NaN or infinite gradient norm

    def __iadd__(self, other: StepStats) -> StepStats:
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, max(mine, theirs) if f.metadata.get("reduce") == "max" else mine + theirs)
        return self

    def reduced(self, reduce: Callable[[torch.Tensor, str], torch.Tensor], world_size: int) -> StepStats:
        """The statistics of all ranks: sums summed, maxima maxed (one collective each), per-rank fields kept.

        Args:
            reduce: ``reduce(tensor, "sum" | "max")`` across ranks (e.g. the Lightning strategy's ``reduce``).
            world_size: number of ranks; with 1 nothing is reduced.
        """
        if world_size == 1:
            return self
        fields = dataclasses.fields(self)
        out = dataclasses.replace(self)
        for op in ("sum", "max"):
            names = [f.name for f in fields if f.metadata.get("reduce", "sum") == op]
            values = reduce(torch.tensor([getattr(self, n) for n in names], dtype=torch.float64), op)
            for name, value in zip(names, values.tolist(), strict=True):
                setattr(out, name, float(value))
        return out


def refine_signals(rollouts: list[Rollout]) -> dict[str, float]:
    """Refine-phase signals of METHOD.md section 8 (rectify vs fortify), from one phase's rollouts.

    base_correct_frac: share of refinements whose base answer was right; fix_rate: share of
    refinements of wrong bases that are right; keep_rate: same for right bases;
    reward_share_from_wrong: share of the phase's total reward earned on wrong bases.
    """
    on_right = [r for r in rollouts if r.base_correct]
    on_wrong = [r for r in rollouts if r.base_correct is False]
    total_reward = sum(r.reward for r in rollouts)
    return {
        "base_correct_frac": len(on_right) / max(1, len(on_right) + len(on_wrong)),
        "fix_rate": sum(r.correct for r in on_wrong) / len(on_wrong) if on_wrong else float("nan"),
        "keep_rate": sum(r.correct for r in on_right) / len(on_right) if on_right else float("nan"),
        "reward_share_from_wrong": sum(r.reward for r in on_wrong) / total_reward if total_reward else 0.0,
    }


def phase_metrics(
    phase: str, batch: RolloutBatch, stats: StepStats, *, trained: int, train_s: float, importance_sampling: bool
) -> dict[str, float]:
    """The ``train/<phase>/*`` and ``perf/*`` values of one phase (docs/evaluation.md); undefined values are left out.

    Args:
        phase: solve or refine.
        batch: the phase's scored rollouts.
        stats: its update's statistics, reduced over ranks.
        trained: rollouts that entered a backward pass (all ranks).
        train_s: wall time of the update.
        importance_sampling: the truncated importance-sampling correction is on (report the capped share).
    """
    rollouts = batch.rollouts
    rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)  # [N]
    grouped = rewards.view(-1, batch.group_size)  # [groups, G]
    tokens, steps, nan = max(stats.tokens, 1.0), max(stats.steps, 1.0), float("nan")
    values = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "frac_zero_std_groups": (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item(),
        "completion_len_mean": sum(len(r.completion_ids) for r in rollouts) / len(rollouts),
        "truncated_frac": sum(r.truncated for r in rollouts) / len(rollouts),
        "loss": stats.loss / steps if stats.steps else nan,  # every step skipped: no loss, no gradient
        "grad_norm": stats.grad_norm / steps if stats.steps else nan,
        "reward_errors": float(batch.reward_errors),
        "trained_frac": trained / len(rollouts),  # entered the backward pass
        "skipped_steps": stats.skipped_steps,
    }
    if stats.tokens:  # else nothing was forwarded (all advantages 0): token statistics are undefined
        for key, total in (
            ("clip_frac_low", stats.clip_low),
            ("clip_frac_high", stats.clip_high),
            ("clip_frac_dual", stats.clip_dual),
            ("kl", stats.kl),
            ("entropy", stats.entropy),
        ):
            values[key] = total / tokens
    if stats.sampler_tokens:
        values["sampler_logprob_diff_mean"] = stats.sampler_diff / stats.sampler_tokens
        values["sampler_logprob_diff_max"] = stats.sampler_diff_max
        if importance_sampling:
            values["is_capped_frac"] = stats.is_capped / stats.sampler_tokens
    if phase == "refine":
        values.update(refine_signals(rollouts))
        values["truncated_prompts"] = float(batch.truncated_prompts)  # left-truncated to rollout.max_prompt_length
    out = {f"train/{phase}/{key}": value for key, value in values.items() if not math.isnan(value)}
    wall = batch.generate_s + batch.score_s + train_s
    all_tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    out.update(
        {
            "perf/generate_s": batch.generate_s,
            "perf/score_s": batch.score_s,
            "perf/train_s": train_s,
            "perf/tokens_per_s": all_tokens / wall if wall > 0 else 0.0,
        }
    )
    return out
