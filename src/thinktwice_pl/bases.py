"""Which solve answers the refine phase reviews (METHOD.md section 1): `select_bases`, the reference code's rules.

Pure: rollouts and a seeded `random.Random` in, the chosen rollouts out.
"""

from __future__ import annotations

import random
from typing import Any, Literal

from thinktwice_pl.types import Rollout

BaseSelection = Literal["uniform", "wrong_first", "balanced"]


def select_bases(groups: list[list[Rollout]], mode: BaseSelection, rng: random.Random) -> list[Rollout]:
    """Picks the B = ``len(groups)`` solve answers whose reviews make up the refine phase (METHOD.md section 1).

    The rules of the ThinkTwice reference code (``select_reflection_indices``), which picks B bases for the batch as
    a whole, not one per problem. Draws are over samples, not texts: a text sampled 3 times out of G is 3 times as
    likely as one sampled once. A text chosen once (for any problem) is not chosen again. Problems are visited in a
    random order, so which of two problems sharing a text gets it is random.

    - ``uniform`` (the paper): every problem gets one of its samples whose text is not taken yet. A problem whose
      texts are all taken gets none: its place goes to a sample drawn from the whole batch (untaken texts only), so
      another problem gets a second base. Rare, except on tasks with very short answers.
    - ``wrong_first``: every problem with a wrong sample gets one wrong base; the remaining places take more wrong
      samples from the whole batch (several per problem), and right samples only once no wrong text is left. A
      problem whose samples are all right gets a base only then.
    - ``balanced``: of the problems with both right and wrong samples (in random order) the first B // 2 get a right
      base and the next B - B // 2 a wrong one (so with at most B / 2 such problems all of them get a right base);
      the remaining places are drawn from the whole batch as in ``uniform``.

    Ours, not the reference's: when the batch holds fewer than B distinct texts (the reference then refines fewer
    prompts), the last places go to samples not chosen yet, drawn uniformly, repeating texts, so that every refine
    phase has B prompts (rank shares and mini-batches are counted in prompts).

    Args:
        groups: the G solve rollouts of each of the B problems, in batch order.
        mode: ``uniform``, ``wrong_first`` or ``balanced``.
        rng: source of randomness; the same state gives the same choice.

    Returns:
        B rollouts in batch order (by problem, then by sample); ``bases[i].problem_id`` names the problem whose
        refine prompt holds ``bases[i]``. A problem may appear several times and another not at all (see above).
    """
    if mode not in ("uniform", "wrong_first", "balanced"):
        raise ValueError(f"unknown base selection {mode!r}; use uniform, wrong_first or balanced")
    for g, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {g} has no solve rollouts to choose a base from")
    want = len(groups)
    chosen: list[tuple[int, int]] = []  # (group, sample) slots
    taken: set[str] = set()  # texts already chosen

    def shuffled(items: list[Any]) -> list[Any]:
        return rng.sample(items, len(items))

    def take(g: int, j: int) -> None:
        chosen.append((g, j))
        taken.add(groups[g][j].completion_text)

    def one_each(problems: list[int], right: bool | None) -> None:
        """One sample of each problem (right or wrong ones only, unless None) whose text is not taken yet."""
        for g in problems:
            if len(chosen) == want:
                return
            candidates = [j for j, r in enumerate(groups[g]) if right is None or r.correct == right]
            j = next((j for j in shuffled(candidates) if groups[g][j].completion_text not in taken), None)
            if j is not None:
                take(g, j)

    def fill(right: bool | None, distinct: bool = True) -> None:
        """Samples of the whole batch (right or wrong ones only, unless None) until B are chosen."""
        slots = [
            (g, j)
            for g, group in enumerate(groups)
            for j, r in enumerate(group)
            if (right is None or r.correct == right) and (g, j) not in chosen
        ]
        for g, j in shuffled(slots):
            if len(chosen) == want:
                return
            if not distinct or groups[g][j].completion_text not in taken:
                take(g, j)

    problems = shuffled(list(range(want)))
    if mode == "uniform":
        one_each(problems, None)
        fill(None)
    elif mode == "wrong_first":
        one_each([g for g in problems if any(not r.correct for r in groups[g])], False)
        fill(False)
        fill(True)
    else:
        mixed = [g for g in problems if len({r.correct for r in groups[g]}) == 2]
        half = want // 2
        one_each(mixed[:half], True)
        one_each(mixed[half:want], False)
        fill(None)
    fill(None, distinct=False)  # ours: fewer than B distinct texts in the whole batch
    return [groups[g][j] for g, j in sorted(chosen)]
