"""metrics.py: pass@k against brute-force subset enumeration, transitions on hand-made cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from thinktwice_pl.metrics import (
    PassAtK,
    Transitions,
    default_ks,
    pass_at_k,
    transition_counts,
    transition_rates,
)


def _brute_force(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_subset_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases() -> None:
    assert pass_at_k(64, 0, 1) == 0.0 and pass_at_k(64, 0, 64) == 0.0  # nothing right: never passes
    assert pass_at_k(64, 64, 1) == 1.0 and pass_at_k(64, 64, 32) == 1.0  # all right: always passes
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # C(3,2)/C(4,2) = 3/6 wrong-only pairs
    with pytest.raises(ValueError, match=r"pass@5 needs at least k=5 samples per problem but n=4"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 0)


def test_pass_at_k_is_exact_for_hundreds_of_samples() -> None:
    # n = 512, c = 1, k = 256: 1 - C(511,256)/C(512,256) = 1 - 256/512 = 0.5 exactly
    assert pass_at_k(512, 1, 256) == 0.5
    # tiny probabilities survive: n = 400, c = 1, k = 1 -> 1/400
    assert pass_at_k(400, 1, 1) == 1 / 400
    # near 1: n = 300, c = 299, k = 2 -> C(1,2) = 0 -> exactly 1
    assert pass_at_k(300, 299, 2) == 1.0
    # c = 2 of n = 300, k = 150: 1 - (150*149)/(300*299)
    assert pass_at_k(300, 2, 150) == pytest.approx(1 - (150 * 149) / (300 * 299), rel=1e-15)
    assert math.isfinite(pass_at_k(1000, 3, 500))


def test_default_ks_are_powers_of_two_up_to_n() -> None:
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(64) == [1, 2, 4, 8, 16, 32, 64]
    assert default_ks(6) == [1, 2, 4, 6]


def test_pass_at_k_metric_averages_over_problems() -> None:
    metric = PassAtK(n=4)
    metric.update(torch.tensor([0, 4]))
    metric.update([1])
    out = metric.compute()
    assert list(out) == [1, 2, 4]
    # pass@1: (0 + 1 + 0.25) / 3; pass@2: (0 + 1 + 0.5) / 3; pass@4: (0 + 1 + 1) / 3
    assert out[1] == pytest.approx(1.25 / 3) and out[2] == pytest.approx(1.5 / 3) and out[4] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k <= n"):
        PassAtK(n=4, ks=[8])


def test_pass_at_k_metric_states_sum_across_ranks() -> None:
    # two "ranks" merged the way torchmetrics reduces (dist_reduce_fx="sum") give the mean over all problems
    a, b = PassAtK(n=2), PassAtK(n=2)
    a.update([2])  # pass@1 = 1
    b.update([0, 1, 1])  # pass@1 = 0, 0.5, 0.5
    a.merge_state(b)
    assert a.compute()[1] == pytest.approx(2 / 4)
    assert a._reductions["total"].__name__ == "dim_zero_sum"


def test_transition_counts_and_rates_on_hand_made_cases() -> None:
    base = [False, False, False, True, True, True, True, False]
    refined = [True, False, False, True, True, False, True, True]
    counts = transition_counts(base, refined)
    # wrong->right: problems 0 and 7; right->wrong: 5; right->right: 3, 4, 6; wrong->wrong: 1, 2
    assert counts == {"wrong_to_right": 2, "right_to_wrong": 1, "right_to_right": 3, "wrong_to_wrong": 2}
    rates = transition_rates(counts)
    assert rates == {"fix_wrong": 2 / 4, "damage_correct": 1 / 4, "keep_right": 3 / 4, "stay_wrong": 2 / 4}
    all_right = transition_rates(transition_counts([True, True], [True, False]))
    assert math.isnan(all_right["fix_wrong"]) and math.isnan(all_right["stay_wrong"])  # no wrong base
    assert all_right["damage_correct"] == 0.5
    with pytest.raises(ValueError, match="2 base results but 1 refinement"):
        transition_counts([True, False], [True])


def test_transitions_metric_accumulates_counts() -> None:
    metric = Transitions()
    metric.update([False, True], [True, True])
    metric.update([False, True, True], [False, False, True])
    # wrong->right 1, wrong->wrong 1, right->right 2, right->wrong 1
    assert metric.compute() == pytest.approx(
        {"fix_wrong": 0.5, "stay_wrong": 0.5, "keep_right": 2 / 3, "damage_correct": 1 / 3}
    )


def test_eval_metrics_names_rounds_matched_budgets_and_transitions() -> None:
    from thinktwice_pl.metrics import eval_metrics, matched_ks, record_columns, stage_name, transition_name

    assert [stage_name(r) for r in range(4)] == ["solve", "refine", "refine2", "refine3"]
    assert [transition_name(r) for r in (1, 2)] == ["transition", "transition2"]
    assert record_columns(0) == ("solve_correct", "greedy_correct")
    assert record_columns(2) == ("refine2_correct", "greedy_refine2_correct")
    assert matched_ks([1, 2, 4, 8], 1, 8) == [1, 2, 4] and matched_ks([1, 2, 4, 8], 2, 8) == [1, 2]
    n, counts = 8, [[1, 8, 0], [3, 8, 2], [6, 7, 4]]  # rounds 0, 1, 2 of three problems
    rounds = [PassAtK(n, [1, 2]) for _ in counts]
    for metric, correct in zip(rounds, counts, strict=True):
        metric.update(correct)
    matched = [PassAtK(n, [(r + 1) * k for k in matched_ks([1, 2], r, n)]) for r in (1, 2)]
    for metric in matched:
        metric.update(counts[0])
    greedy = [Transitions(), Transitions()]
    greedy[0].update([False, True, False], [True, True, False])
    greedy[1].update([True, True, False], [True, False, False])
    out = eval_metrics({"b": rounds}, {"b": greedy}, "test", {"b": matched})

    def mean(round_: int, k: int) -> float:
        return sum(pass_at_k(n, c, k) for c in counts[round_]) / 3

    assert out["test/b/refine2/pass@2"] == pytest.approx(mean(2, 2))
    assert out["test/b/matched1/pass@2"] == pytest.approx(mean(0, 4))  # pass@2 after one round costs 4 answers
    assert out["test/b/matched2/pass@2"] == pytest.approx(mean(0, 6))
    assert out["test/avg/matched2/pass@1"] == pytest.approx(mean(0, 3))
    assert out["test/b/solve/greedy_acc"] == pytest.approx(1 / 3) and out["test/b/refine/greedy_acc"] == 2 / 3
    assert out["test/b/refine2/greedy_acc"] == pytest.approx(1 / 3)
    assert out["test/transition/fix_wrong"] == 0.5 and out["test/transition/damage_correct"] == 0.0
    assert out["test/transition2/fix_wrong"] == 0.0 and out["test/transition2/damage_correct"] == 0.5
    assert "test/b/refine2/pass@4" not in out and "test/transition3/fix_wrong" not in out
