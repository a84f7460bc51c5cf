"""Which rollouts each forward/backward pass of a phase holds, and their collation into tensors.

Pure functions: no Lightning, no processes, no model. A phase holds N rollouts in groups of G (group-major:
rollout ``g * G + j`` is sample j of problem g). METHOD.md sections 1 and 3 fix how they are trained:

1. the phase is split into optimizer steps of ``mini_batch_groups`` problems (the paper: 8 of 32, so 4 steps);
2. with several data-parallel ranks, each rank trains its contiguous share of every step's groups (a group
   never straddles ranks);
3. on a rank, the step's rollouts that need a forward pass are sorted by length and packed into micro-batches
   of at most ``micro_batch_size`` sequences and ``max_tokens`` padded tokens (with shared prompts, a group's
   rows stay together and its prompt counts once);
4. ranks run the same number of passes: a rank with fewer micro-batches adds zero-weight padding passes,
   because sharded and replicated strategies run collectives in every forward and backward.

The loss normaliser of a step (its completion tokens or sequences inside the loss, over every rank) is fixed
here, before any micro-batch runs, so gradient accumulation gives the gradient of one big batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence


@dataclass(frozen=True)
class Pass:
    """One forward/backward pass of a rank: rollout indices, and weight 0 for a padding pass (same collectives as
    the other ranks' passes, its loss multiplied by 0, no statistics)."""

    rows: list[int]
    weight: int = 1


@dataclass(frozen=True)
class StepPlan:
    """One optimizer step on this rank: its passes and the normalisers of the whole step (all ranks)."""

    passes: list[Pass]
    num_tokens: float  # completion tokens inside the loss (the dapo normaliser)
    num_sequences: float  # sequences inside the loss (the grpo normaliser)


@dataclass(frozen=True)
class PhasePlan:
    """A phase's optimizer steps on this rank; `old_passes` compute the pre-update log-probs of this rank's whole
    share when the phase takes several steps (empty otherwise: the detached current log-probs serve)."""

    steps: list[StepPlan]
    old_passes: list[Pass]
    trained: list[int]  # every rank's rollouts that enter a backward pass

    @property
    def needs_old(self) -> bool:
        return bool(self.old_passes)


def rank_slice(num_items: int, rank: int, world_size: int) -> slice:
    """The contiguous share of `num_items` (problems or groups) that `rank` of `world_size` ranks works on.

    Every rank gets the same batch of problems; each generates for and trains on its own share, so the
    G samples of a problem (its group) always stay on one rank.
    """
    if num_items % world_size:
        raise ValueError(f"{num_items} problems cannot be split evenly over {world_size} ranks")
    size = num_items // world_size
    return slice(rank * size, (rank + 1) * size)


def rank_share(indices: list[int], group_size: int, rank: int, world_size: int) -> list[int]:
    """The whole groups of `indices` (group-major rollout indices) that `rank` trains on."""
    part = rank_slice(len(indices) // group_size, rank, world_size)
    return indices[part.start * group_size : part.stop * group_size]


def micro_batches(
    indices: list[int],
    lengths: Sequence[tuple[int, int]],
    size: int | None,
    max_tokens: int | None,
    group_size: int | None = None,
) -> list[list[int]]:
    """`indices` sorted by length and packed into micro-batches, so little padding is computed.

    A micro-batch holds at most `size` sequences (None: no limit) and at most `max_tokens` padded tokens
    (rows x longest prompt + rows x longest completion; None: no budget); a sequence over the budget goes alone.

    With `group_size` (the forward runs a prompt shared by a group's rows once: `model.share_prompts`), a group's
    rows stay together, groups in order of prompt length and rows by completion length, and a prompt counts once
    per group in the budget (groups x longest prompt + rows x longest completion).

    Args:
        indices: rollouts to pack.
        lengths: ``(prompt tokens, completion tokens)`` of every rollout of the phase.
        size: most sequences per micro-batch.
        max_tokens: most padded tokens per micro-batch.
        group_size: G, when the rows of a group share their prompt's forward; None: every row runs its prompt.
    """
    limit = size or max(1, len(indices))
    if group_size:
        order = sorted(indices, key=lambda i: (lengths[i][0], i // group_size, lengths[i][1]))
    else:
        order = sorted(indices, key=lambda i: sum(lengths[i]))
    batches: list[list[int]] = []
    micro: list[int] = []
    prompt_width = completion_width = 0
    for i in order:
        p, c = max(prompt_width, lengths[i][0]), max(completion_width, lengths[i][1])
        prompts = len({j // group_size for j in [*micro, i]}) if group_size else len(micro) + 1
        if micro and (
            len(micro) >= limit or (max_tokens is not None and prompts * p + (len(micro) + 1) * c > max_tokens)
        ):
            batches.append(micro)
            micro, (p, c) = [], lengths[i]
        micro.append(i)
        prompt_width, completion_width = p, c
    return [*batches, micro] if micro else batches


def padded_passes(plans: list[list[list[int]]], rank: int, filler: list[int]) -> list[Pass]:
    """`rank`'s micro-batches with weight 1, then zero-weight `filler` passes up to the longest plan of any rank."""
    longest = max(len(plan) for plan in plans)
    return [Pass(rows) for rows in plans[rank]] + [Pass(filler, 0)] * (longest - len(plans[rank]))


def plan_phase(
    lengths: Sequence[tuple[int, int]],
    group_size: int,
    in_loss: Sequence[bool],
    trainable: Sequence[bool],
    *,
    mini_batch_groups: int | None,
    micro_batch_size: int | None,
    max_tokens: int | None,
    num_iterations: int = 1,
    rank: int = 0,
    world_size: int = 1,
    share_prompts: bool = False,
) -> PhasePlan:
    """The passes of every optimizer step of a phase on `rank` (steps 1-4 of the module docstring).

    Args:
        lengths: ``(prompt tokens, completion tokens)`` of each of the N rollouts, group-major.
        group_size: G.
        in_loss: rollouts whose tokens count in the loss and its normaliser.
        trainable: rollouts that need a forward/backward pass (inside the loss, and a non-zero advantage or a KL
            term); the others add nothing to the gradient.
        mini_batch_groups: problems per optimizer step; None = the whole phase in one step.
        micro_batch_size: most sequences per pass; None = no limit.
        max_tokens: most padded tokens per pass; None = no budget.
        num_iterations: passes over the phase's rollouts; with several steps or iterations the pre-update
            ("old") log-probs need passes of their own.
        rank: this rank.
        world_size: data-parallel ranks.
        share_prompts: the forward runs a group's prompt once (`micro_batches` with `group_size`).
    """
    num = len(lengths)
    shared_group = group_size if share_prompts else None
    groups = num // group_size
    per_step = min(groups, mini_batch_groups or groups)
    steps_rows = [  # rollout indices of each optimizer step
        list(range(g * group_size, min(groups, g + per_step) * group_size)) for g in range(0, groups, per_step)
    ]
    trained = [i for i in range(num) if trainable[i]]
    chosen = set(trained)
    steps: list[StepPlan] = []
    for rows in steps_rows:
        plans = [  # every rank's micro-batches, so each rank knows how many passes the others run
            micro_batches(
                [i for i in rank_share(rows, group_size, r, world_size) if i in chosen],
                lengths,
                micro_batch_size,
                max_tokens,
                shared_group,
            )
            for r in range(world_size)
        ]
        steps.append(
            StepPlan(
                passes=padded_passes(plans, rank, filler=rows[:1]),
                num_tokens=float(sum(lengths[i][1] for i in rows if in_loss[i])),
                num_sequences=float(sum(1 for i in rows if in_loss[i])),
            )
        )
    old_passes: list[Pass] = []
    if len(steps) > 1 or num_iterations > 1:
        shares = [
            [i for rows in steps_rows for i in rank_share(rows, group_size, r, world_size) if i in chosen]
            for r in range(world_size)
        ]
        plans = [micro_batches(share, lengths, micro_batch_size, max_tokens, shared_group) for share in shares]
        old_passes = padded_passes(plans, rank, filler=[0])
    return PhasePlan(steps, old_passes, trained)


@dataclass
class Collated:
    """A micro-batch as model inputs: prompts left-padded and completions right-padded, so completion token t of
    every row sits at position P + t."""

    input_ids: torch.Tensor  # [n, P + C]
    attention_mask: torch.Tensor  # [n, P + C]
    position_ids: torch.Tensor  # [n, P + C], counting real tokens only (left padding does not shift positions)
    completion_mask: torch.Tensor  # [n, C], 1 on completion tokens
    prompt_width: int  # P
    prompt_index: torch.Tensor  # [n]: which distinct prompt each row has (0, 1, ... in order of first appearance)
    first_rows: torch.Tensor  # [U]: the first row of each distinct prompt

    @property
    def num_prompts(self) -> int:
        """How many distinct prompts the rows have (the G samples of a group share one)."""
        return len(self.first_rows)


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Collated:
    """Pad and join the prompts and completions of one micro-batch."""

    def padded(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
        tensors = [torch.tensor(row, dtype=torch.long) for row in rows]
        return pad_sequence(tensors, batch_first=True, padding_value=value, padding_side=side)

    prompt_ids, prompt_mask = padded(prompts, pad_id, "left"), padded([[1] * len(p) for p in prompts], 0, "left")
    completion_ids = padded(completions, pad_id, "right")  # [n, C]
    completion_mask = padded([[1] * len(c) for c in completions], 0, "right")  # [n, C]
    attention = torch.cat([prompt_mask, completion_mask], dim=1)  # [n, P + C]
    distinct: dict[tuple[int, ...], int] = {}
    index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    return Collated(
        input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=attention,
        position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
        completion_mask=completion_mask,
        prompt_width=prompt_ids.shape[1],
        prompt_index=torch.tensor(index, dtype=torch.long),
        first_rows=torch.tensor([index.index(i) for i in range(len(distinct))], dtype=torch.long),
    )
