"""DAPO's two rollout-side changes (Yu et al. 2025, arXiv 2503.14476; METHOD.md section 9), as pure functions.

- Dynamic sampling: a group whose G answers are all right or all wrong teaches nothing about correctness (DAPO
  eq. 11 keeps ``0 < #correct < G``). With ``rollout.dynamic_sampling`` such groups are dropped and more prompts
  are sampled, round after round, until the phase holds B informative groups or ``rollout.max_sampling_rounds``
  rounds have run (`choose_groups`). The filter reads correctness only, as DAPO and the reference's
  ``filter_groups.metric=score`` do: a group of equal correctness whose length penalties differ is dropped too. A
  phase still short of B after the last round is filled with dropped groups (first dropped, first used), so every
  phase trains B groups and takes the same number of optimizer steps; the filled groups are counted.
- Soft overlong penalty (DAPO eq. 13, `overlong_penalty`): a completion longer than ``L_max - L_b`` tokens loses
  reward linearly, down to ``-factor`` at ``L_max``. It is kept apart from the correctness reward
  (``Rollout.length_penalty``): advantages use their sum, correctness metrics and refine bases use correctness only.

`SamplingStats` counts both per phase for the logged row (``train/<phase>/sampling_rounds`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from thinktwice_pl.types import Rollout


def overlong_penalty(length: int, max_length: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO eq. 13 times `factor`: 0 up to ``max_length - buffer`` tokens, then linear down to ``-factor`` at
    `max_length`, and ``-factor`` beyond (a completion cut at the limit has exactly `max_length` tokens)."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer {buffer} must be in 1..{max_length} (the completion limit)")
    expected = max_length - buffer
    if length <= expected:
        return 0.0
    if length <= max_length:
        return factor * (expected - length) / buffer
    return -factor


def training_reward(rollout: Rollout) -> float:
    """The reward the advantages are computed from: correctness plus the overlong penalty (0 when off)."""
    return rollout.reward + rollout.length_penalty


def is_informative(group: list[Rollout]) -> bool:
    """Whether a group holds both right and wrong answers (its correctness rewards differ)."""
    return len({r.reward for r in group}) > 1


def sampled_groups(rounds: list[list[list[Rollout]]]) -> list[list[Rollout]]:
    """The groups of all generation rounds, in the order they were sampled."""
    return [group for groups in rounds for group in groups]


def groups_of(rollouts: list[Rollout], group_size: int) -> list[list[Rollout]]:
    """Group-major rollouts as a list of groups."""
    return [rollouts[start : start + group_size] for start in range(0, len(rollouts), group_size)]


@dataclass
class SamplingStats:
    """What one phase's sampling did, for its logged row (`metrics`)."""

    rounds: int = 1  # generation rounds run (1 without dynamic sampling)
    groups_sampled: int = 0  # groups generated over all rounds
    groups_informative: int = 0  # informative groups trained
    groups_dropped: int = 0  # uninformative groups left out of the phase
    groups_filled: int = 0  # uninformative groups trained because the rounds ran out (advantage 0)
    penalised: int = 0  # trained completions with a non-zero overlong penalty
    penalty_sum: float = 0.0  # sum of the trained completions' overlong penalties
    completions: int = 0  # trained completions
    dynamic: bool = False  # dynamic sampling was on
    overlong: bool = False  # the overlong penalty was on

    def metrics(self, phase: str) -> dict[str, float]:
        """``train/<phase>/...`` keys of the switched-on features (none when both are off)."""
        out: dict[str, float] = {}
        if self.dynamic:
            counts = {
                "sampling_rounds": self.rounds,
                "groups_sampled": self.groups_sampled,
                "groups_informative": self.groups_informative,
                "groups_dropped": self.groups_dropped,
                "groups_filled": self.groups_filled,
            }
            out.update({f"train/{phase}/{name}": float(value) for name, value in counts.items()})
        if self.overlong and self.completions:
            out[f"train/{phase}/overlong_penalty_mean"] = self.penalty_sum / self.completions
            out[f"train/{phase}/overlong_frac"] = self.penalised / self.completions
        return out

    def short_message(self, index: int, phase: str, max_rounds: int | None) -> str:
        """The warning for a phase that ran out of generation rounds before it found B informative groups."""
        return (
            f"phase batch {index} ({phase}): dynamic sampling found {self.groups_informative} informative groups of "
            f"{self.groups_informative + self.groups_filled} in {self.rounds} generation rounds "
            f"(rollout.max_sampling_rounds={max_rounds}); the phase trains {self.groups_filled} uninformative groups "
            f"too (advantage 0), counted in train/{phase}/groups_filled. The problems are too easy or too hard for the "
            "model: raise rollout.max_sampling_rounds or change the data. (Warned once per run.)"
        )


def sampling_stats(
    rounds: list[list[list[Rollout]]], trained: list[list[Rollout]], *, dynamic: bool, overlong: bool
) -> SamplingStats:
    """The counts of a phase that sampled the groups of `rounds` (one list per generation round) and trains
    `trained`, with dynamic sampling and the overlong penalty on or off."""
    sampled = sampled_groups(rounds)
    trained_ids = {id(group) for group in trained}
    informative = sum(is_informative(group) for group in trained)
    return SamplingStats(
        rounds=len(rounds),
        groups_sampled=len(sampled),
        groups_informative=informative,
        groups_dropped=sum(not is_informative(g) and id(g) not in trained_ids for g in sampled),
        groups_filled=len(trained) - informative,
        penalised=sum(r.length_penalty != 0 for group in trained for r in group),
        penalty_sum=sum(r.length_penalty for group in trained for r in group),
        completions=sum(len(group) for group in trained),
        dynamic=dynamic,
        overlong=overlong,
    )


def choose_groups(rounds: list[list[list[Rollout]]], want: int) -> list[list[Rollout]]:
    """The `want` groups a phase trains under dynamic sampling, from the groups of each generation round: the first
    `want` informative ones (a surplus of the last round is left out) and, when fewer were found, the first dropped
    ones, all in the order they were sampled (so filled groups spread over the phase's optimizer steps)."""
    sampled = sampled_groups(rounds)
    informative = [i for i, group in enumerate(sampled) if is_informative(group)][:want]
    dropped = [i for i, group in enumerate(sampled) if not is_informative(group)]
    return [sampled[i] for i in sorted(informative + dropped[: want - len(informative)])]


def informative_count(groups: list[list[Rollout]]) -> int:
    """How many of `groups` are informative."""
    return sum(is_informative(group) for group in groups)
