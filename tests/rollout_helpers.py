"""Rollouts built by hand for the module's tests."""

from __future__ import annotations

from thinktwice_pl.types import Rollout


def make_rollout(
    prompt: list[int], completion: list[int], reward: float = 0.0, base_correct: bool | None = None
) -> Rollout:
    """A finished rollout of problem "p": a refinement when `base_correct` is given, else a solve answer."""
    return Rollout(
        problem_id="p",
        phase="refine" if base_correct is not None else "solve",
        prompt_ids=prompt,
        completion_ids=completion,
        completion_text="",
        finish_reason="stop",
        reward=reward,
        base_correct=base_correct,
    )
