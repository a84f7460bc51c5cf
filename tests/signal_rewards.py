"""TRL-style reward functions for tests: they give the random tiny model a non-zero reward variance.

Imported by dotted path (``rollout.reward: signal_rewards.even_length``) in the main process and in
the grader worker processes; tests/ is on sys.path under pytest.
"""

from __future__ import annotations

from typing import Any


def even_length(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """1 when the completion has an even number of characters: meaningless, but varies within a group."""
    return [float(len(c) % 2 == 0) for c in completions]


def even_answers_right(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float]:
    """1 for every completion of a problem whose gold answer is even, else `even_length`: groups of all-right and
    of mixed answers side by side."""
    return [1.0 if int(gold) % 2 == 0 else float(len(c) % 2 == 0) for c, gold in zip(completions, answer, strict=True)]


def always_wrong(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """0 for every completion: no group ever has a reward variance."""
    return [0.0 for _ in completions]
