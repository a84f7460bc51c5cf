"""The pure batching of a phase (thinktwice_pl.batching): steps, rank shares, micro-batches, padding passes,
normalisers, collation. No Lightning trainer, no processes."""

from __future__ import annotations

import pytest
import torch

from thinktwice_pl.batching import collate, micro_batches, padded_passes, plan_phase, rank_share, rank_slice

# 4 problems x G = 2 (rollouts 0..7, group-major); (prompt tokens, completion tokens)
LENGTHS = [(5, 3), (5, 9), (7, 2), (7, 2), (4, 6), (4, 1), (6, 4), (6, 8)]


def test_rank_slices_and_shares_keep_groups_whole() -> None:
    assert [rank_slice(4, r, 2) for r in range(2)] == [slice(0, 2), slice(2, 4)]
    assert rank_share([0, 1, 2, 3, 4, 5, 6, 7], 2, rank=1, world_size=2) == [4, 5, 6, 7]  # problems 2 and 3
    with pytest.raises(ValueError, match="3 problems cannot be split evenly over 2 ranks"):
        rank_slice(3, 0, 2)


def test_micro_batches_sort_by_length_and_respect_size_and_budget() -> None:
    # sorted by prompt + completion length: 5 (5 tokens), 0 (8), 2 and 3 (9), 4 and 6 (10), 1 and 7 (14)
    assert micro_batches(list(range(8)), LENGTHS, None, None) == [[5, 0, 2, 3, 4, 6, 1, 7]]
    assert micro_batches(list(range(8)), LENGTHS, 3, None) == [[5, 0, 2], [3, 4, 6], [1, 7]]
    packed = micro_batches(list(range(8)), LENGTHS, None, 30)
    for rows in packed:  # rows x (longest prompt + longest completion) <= 30, or a lone sequence
        width = max(LENGTHS[i][0] for i in rows) + max(LENGTHS[i][1] for i in rows)
        assert len(rows) == 1 or len(rows) * width <= 30
    assert sorted(i for rows in packed for i in rows) == list(range(8))
    assert micro_batches([1], LENGTHS, None, 5) == [[1]]  # over the budget alone: it still runs


def test_micro_batches_keep_groups_together_and_count_a_shared_prompt_once() -> None:
    # 3 groups of 4: prompts 100, 50, 100 tokens; completions vary within each group
    lengths = [(100, c) for c in (9, 1, 5, 3)] + [(50, c) for c in (2, 8, 4, 6)] + [(100, c) for c in (7, 2, 2, 1)]
    rows = list(range(12))
    # by total length the groups interleave; with shared prompts each group's rows are adjacent (shortest prompt
    # first, then by group, then by completion)
    assert micro_batches(rows, lengths, 4, None, group_size=4) == [[4, 6, 7, 5], [1, 3, 2, 0], [11, 9, 10, 8]]
    assert micro_batches(rows, lengths, 4, None) != micro_batches(rows, lengths, 4, None, group_size=4)
    # a budget of 150 tokens: one 100-token prompt with its 4 rows of up to 9 tokens (100 + 4 x 9 = 136) fits;
    # without sharing (4 x 109 = 436) each row goes alone
    packed = micro_batches(list(range(4)), lengths, None, 150, group_size=4)
    assert packed == [[1, 3, 2, 0]]
    assert len(micro_batches(list(range(4)), lengths, None, 150)) == 4
    # two groups' prompts count twice: adding group 3's first row would make 2 x 100 + 5 x 9 = 245 > 240
    assert micro_batches([0, 1, 2, 3, 8, 9, 10, 11], lengths, None, 240, group_size=4) == [[1, 3, 2, 0], [11, 9, 10, 8]]


def test_padding_passes_give_every_rank_the_same_number_of_passes() -> None:
    plans = [[[0, 1], [2]], [[4]]]  # rank 1 trains fewer micro-batches than rank 0
    rank0, rank1 = padded_passes(plans, 0, filler=[0]), padded_passes(plans, 1, filler=[4])
    assert len(rank0) == len(rank1) == 2
    assert [(p.rows, p.weight) for p in rank1] == [([4], 1), ([4], 0)]  # the padding pass trains nothing


def test_phase_plan_steps_normalisers_and_skipped_rollouts() -> None:
    in_loss = [True] * 8
    in_loss[7] = False  # e.g. truncated, with mask_truncated_completions
    trainable = [i not in (2, 3, 7) for i in range(8)]  # problem 1's group has equal rewards: advantage 0
    plan = plan_phase(LENGTHS, 2, in_loss, trainable, mini_batch_groups=2, micro_batch_size=None, max_tokens=None)
    assert len(plan.steps) == 2 and plan.needs_old  # 2 optimizer steps of 2 problems: the old log-probs are needed
    first, second = plan.steps
    assert [p.rows for p in first.passes] == [[0, 1]]  # rollouts 2 and 3 skip the forward pass ...
    assert first.num_tokens == 3 + 9 + 2 + 2  # ... but their tokens stay in the step's normaliser (dapo)
    assert first.num_sequences == 4
    assert second.num_tokens == 6 + 1 + 4 and second.num_sequences == 3  # rollout 7 is out of the loss
    assert plan.trained == [0, 1, 4, 5, 6]
    assert sorted(i for p in plan.old_passes for i in p.rows) == [0, 1, 4, 5, 6]
    one_step = plan_phase(
        LENGTHS, 2, in_loss, trainable, mini_batch_groups=None, micro_batch_size=None, max_tokens=None
    )
    assert len(one_step.steps) == 1 and not one_step.needs_old  # the detached current log-probs serve


def test_phase_plan_over_two_ranks_with_uneven_shares() -> None:
    # rank 0 holds problems 0-1, rank 1 problems 2-3 of each step; rank 1 has nothing to train in step 1
    trainable = [True, True, True, True, False, False, False, False]
    plans = [
        plan_phase(
            LENGTHS,
            2,
            [True] * 8,
            trainable,
            mini_batch_groups=None,
            micro_batch_size=1,
            max_tokens=None,
            rank=r,
            world_size=2,
        )
        for r in range(2)
    ]
    step0, step1 = plans[0].steps[0], plans[1].steps[0]
    assert len(step0.passes) == len(step1.passes) == 4  # same collectives on both ranks
    assert all(p.weight == 0 for p in step1.passes)  # rank 1 only pads
    assert step0.num_tokens == step1.num_tokens == sum(c for _, c in LENGTHS)  # the whole step, every rank


def test_collate_left_pads_prompts_and_right_pads_completions() -> None:
    batch = collate([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert batch.prompt_width == 3
    assert batch.input_ids.tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 0, 0, 1, 2]]  # left padding does not shift positions
    assert torch.equal(batch.completion_mask, torch.tensor([[1, 0], [1, 1]]))
