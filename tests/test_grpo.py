"""grpo.py: hand-computed expectations (the arithmetic is in the comment beside each assert)."""

from __future__ import annotations

import math

import pytest
import torch

from thinktwice_pl.grpo import group_advantages, kl_k3, policy_loss


def test_group_advantages_none_is_reward_minus_group_mean() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = group_advantages(rewards, 4, "none")
    # group 0 mean 0.5 -> +-0.5; group 1 all right -> 0
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]


def test_group_advantages_group_scaling_divides_by_group_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4, "group")
    std = math.sqrt(((0.75**2) + 3 * (0.25**2)) / 3)  # unbiased std of [1,0,0,0] = 0.5
    assert adv.tolist() == pytest.approx([0.75 / (std + 1e-4), -0.25 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 2)


def test_group_advantages_batch_scaling_uses_one_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # groups of 2: [1,0] and [1,1]
    adv = group_advantages(rewards, 2, "batch")
    std = torch.tensor([1.0, 0.0, 1.0, 1.0]).std().item()  # 0.5
    assert adv.tolist() == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0])


def test_group_advantages_rejects_ragged_groups() -> None:
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "bogus")  # type: ignore[arg-type]


def _loss(lp: list[float], old: list[float], adv: float, **kw: object) -> tuple[float, dict[str, torch.Tensor]]:
    logprobs = torch.tensor([lp])
    loss, stats = policy_loss(logprobs, torch.tensor([old]), torch.tensor([adv]), torch.ones_like(logprobs), **kw)  # type: ignore[arg-type]
    return float(loss), stats


def test_policy_loss_ratio_one_is_minus_advantage() -> None:
    loss, stats = _loss([-1.0, -2.0], [-1.0, -2.0], 0.5)
    assert loss == pytest.approx(-0.5)  # ratio 1 everywhere: -A
    assert float(stats["clip_low"]) == 0 and float(stats["clip_high"]) == 0


def test_policy_loss_clips_high_for_positive_advantage() -> None:
    loss, stats = _loss([0.0], [-1.0], 1.0)
    # ratio e = 2.718 > 1.28: min(-e, -1.28) -> max of the two losses = -1.28
    assert loss == pytest.approx(-1.28)
    assert float(stats["clip_high"]) == 1


def test_policy_loss_clips_low_for_negative_advantage() -> None:
    loss, stats = _loss([-1.0], [0.0], -1.0)
    # ratio e^-1 = 0.368 < 0.8: max(0.368, 0.8) = 0.8 (loss = -A * clip(r) = 0.8)
    assert loss == pytest.approx(0.8)
    assert float(stats["clip_low"]) == 1


def test_policy_loss_dual_clip_caps_negative_advantage_loss() -> None:
    loss, stats = _loss([2.0], [0.0], -1.0)
    # ratio e^2 = 7.39; PPO loss max(7.39, 1.28) = 7.39; dual clip caps at -A * 3 = 3
    assert loss == pytest.approx(3.0)
    assert float(stats["clip_dual"]) == 1
    loss_no_dual, _ = _loss([2.0], [0.0], -1.0, clip_ratio_c=None)
    assert loss_no_dual == pytest.approx(math.exp(2.0))


def test_policy_loss_log_ratio_is_clamped() -> None:
    loss, _ = _loss([100.0], [0.0], -1.0, clip_ratio_c=None)
    assert loss == pytest.approx(math.exp(20.0), rel=1e-5)  # log-ratio clamped at 20, not exp(100) = inf


def test_loss_types_aggregate_differently() -> None:
    logprobs = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # lengths 3 and 1
    adv = torch.tensor([1.0, -1.0])
    common = {"epsilon_low": 0.2, "epsilon_high": 0.28, "clip_ratio_c": 3.0}
    dapo, _ = policy_loss(logprobs, logprobs, adv, mask, loss_type="dapo", **common)
    grpo, _ = policy_loss(logprobs, logprobs, adv, mask, loss_type="grpo", **common)
    dr, _ = policy_loss(logprobs, logprobs, adv, mask, loss_type="dr_grpo", max_completion_length=10, **common)
    assert float(dapo) == pytest.approx((-3 + 1) / 4)  # token sum / 4 tokens
    assert float(grpo) == pytest.approx((-1 + 1) / 2)  # per-sequence means -1 and +1, then mean
    assert float(dr) == pytest.approx((-3 + 1) / (10 * 2))  # token sum / (L_max * sequences)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logprobs, logprobs, adv, mask, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_micro_batch_losses_add_up_to_the_full_batch(loss_type: str) -> None:
    torch.manual_seed(0)
    logprobs = torch.randn(6, 5, requires_grad=True)
    old = logprobs.detach() + 0.3 * torch.randn(6, 5)
    adv = torch.randn(6)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    kw = {"loss_type": loss_type, "max_completion_length": 5}
    full, _ = policy_loss(logprobs, old, adv, mask, **kw)  # type: ignore[arg-type]
    (full_grad,) = torch.autograd.grad(full, logprobs)
    totals = {"num_tokens": float(mask.sum()), "num_sequences": 6.0}
    parts = [policy_loss(logprobs[s], old[s], adv[s], mask[s], **kw, **totals)[0] for s in (slice(0, 2), slice(2, 6))]  # type: ignore[arg-type]
    (part_grad,) = torch.autograd.grad(sum(parts), logprobs)
    assert float(sum(parts).detach()) == pytest.approx(float(full.detach()), abs=1e-6)
    torch.testing.assert_close(part_grad, full_grad, atol=1e-7, rtol=1e-6)


def test_kl_k3_is_zero_at_equality_and_matches_formula() -> None:
    lp = torch.tensor([[-1.0, -2.0]])
    assert kl_k3(lp, lp).tolist() == [[0.0, 0.0]]
    ref = torch.tensor([[-1.5, -1.0]])
    # d = ref - lp = [-0.5, 1.0]; k3 = exp(d) - d - 1
    assert kl_k3(lp, ref)[0].tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1])


def test_kl_term_is_added_with_beta() -> None:
    lp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-2.0]])
    loss, stats = policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1), ref_logprobs=ref, beta=0.1)
    kl = math.exp(-1.0) + 1.0 - 1.0  # d = -1: e^-1 - (-1) - 1
    assert float(loss) == pytest.approx(0.1 * kl)
    assert float(stats["kl"]) == pytest.approx(kl)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, lp, torch.tensor([0.0]), torch.ones(1, 1), beta=0.1)


def test_importance_weights_scale_the_policy_term_per_token_but_not_the_kl() -> None:
    lp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0]])
    adv = torch.tensor([1.0])
    mask = torch.ones(1, 2)
    weights = torch.tensor([[2.0, 0.5]])
    plain, _ = policy_loss(lp, lp, adv, mask, ref_logprobs=ref, beta=0.1)
    weighted, _ = policy_loss(lp, lp, adv, mask, ref_logprobs=ref, beta=0.1, is_weights=weights)
    kl = math.exp(-1.0)  # k3 at d = -1, per token
    assert float(plain) == pytest.approx(-1.0 + 0.1 * kl)  # dapo: token mean of (-A * ratio + beta * kl)
    assert float(weighted) == pytest.approx((-1.0 * 2.0 - 1.0 * 0.5) / 2 + 0.1 * kl)
    # the weights carry no gradient: d loss / d lp = -A * w * ratio / tokens (+ the KL's own gradient)
    lp_grad = lp.clone().requires_grad_(True)
    loss, _ = policy_loss(lp_grad, lp, adv, mask, is_weights=weights.requires_grad_(True))
    loss.backward()
    assert lp_grad.grad[0].tolist() == pytest.approx([-1.0, -0.25])
    assert weights.grad is None


def test_zero_advantage_rows_carry_no_gradient_so_skipping_them_is_exact() -> None:
    torch.manual_seed(1)
    logprobs = torch.randn(4, 3, requires_grad=True)
    old = logprobs.detach() + 0.1 * torch.randn(4, 3)
    adv = torch.tensor([0.5, 0.0, -0.5, 0.0])  # rows 1 and 3: all-equal groups
    mask = torch.ones(4, 3)
    full, _ = policy_loss(logprobs, old, adv, mask)
    (grad,) = torch.autograd.grad(full, logprobs)
    assert torch.all(grad[[1, 3]] == 0)
    kept = [0, 2]  # what the module forwards; the normaliser still counts all 12 tokens
    part, _ = policy_loss(logprobs[kept], old[kept], adv[kept], mask[kept], num_tokens=12.0)
    assert float(part.detach()) == pytest.approx(float(full.detach()), abs=1e-7)


def _dr_grpo_by_definition(
    logprobs: torch.Tensor, old: torch.Tensor, adv: list[float], lengths: list[int], max_len: int, clip_c: float
) -> torch.Tensor:
    """Dr.GRPO's objective written out from its definition (Liu et al. 2025; verl seq-mean-token-sum-norm), one
    sequence and one token at a time: the PPO token loss with the symmetric clip 0.2 and the dual clip, summed over
    each sequence's own tokens, divided by the constant `max_len`, averaged over all sequences of the step."""
    total = logprobs.new_zeros(())
    for i, (a, n) in enumerate(zip(adv, lengths, strict=True)):
        for t in range(n):
            ratio = torch.exp(logprobs[i, t] - old[i, t])
            token = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
            if a < 0:
                token = torch.minimum(token, torch.tensor(-a * clip_c))
            total = total + token / max_len
    return total / len(adv)


@pytest.mark.parametrize("world_size", [1, 2])
def test_dr_grpo_through_the_step_plan_is_the_definition(world_size: int) -> None:
    """The dr_grpo loss as the module runs it: the phase planned into optimizer steps, rank shares and micro-batches
    (batching.plan_phase), each pass normalised by its step's num_sequences, a rank's passes summed and the ranks'
    gradients averaged (the module scales each pass by the world size). Per optimizer step that must be the
    definition over the step's sequences, rows with advantage 0 (never forwarded) included in the count."""
    from thinktwice_pl.batching import plan_phase

    torch.manual_seed(3)
    group_size, max_len = 4, 12
    lengths = [3, 12, 7, 1, 5, 5, 9, 2, 4, 11, 6, 8, 10, 2, 3, 7]  # 4 groups; 12 = the limit, a truncated answer
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    adv = group_advantages(rewards, group_size, "none")  # group 1 all right: advantage 0, no forward pass
    logprobs = (-torch.rand(16, max_len) * 3).requires_grad_(True)
    old = logprobs.detach() + 0.5 * torch.randn(16, max_len)  # ratios on both sides of the clip range
    old[1, 0] = logprobs[1, 0].item() - 3.0  # A < 0 and ratio e^3 = 20: the dual clip 10 binds
    old[2, 1] = logprobs[2, 1].item() - 1.5  # A < 0 and ratio e^1.5 = 4.5: it does not (3.0 would)
    mask = (torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]).float()
    kw = {"epsilon_low": 0.2, "epsilon_high": 0.2, "clip_ratio_c": 10.0, "loss_type": "dr_grpo"}
    plans = [
        plan_phase(
            [(5, n) for n in lengths],
            group_size,
            [True] * 16,
            [a != 0 for a in adv.tolist()],
            mini_batch_groups=2,  # two optimizer steps of 2 groups
            micro_batch_size=3,
            max_tokens=None,
            rank=rank,
            world_size=world_size,
        )
        for rank in range(world_size)
    ]
    assert [s.num_sequences for s in plans[0].steps] == [8.0, 8.0]
    for step, rows in enumerate((list(range(8)), list(range(8, 16)))):
        passes = [(p.steps[step], work) for p in plans for work in p.steps[step].passes if work.weight]
        assert sorted(i for _, work in passes for i in work.rows) == [i for i in rows if adv[i] != 0]
        assert max(len(work.rows) for _, work in passes) <= 3 and len(passes) >= 2, "split into micro-batches"
        run = (
            sum(
                policy_loss(
                    logprobs[w.rows],
                    old[w.rows],
                    adv[w.rows],
                    mask[w.rows],
                    max_completion_length=max_len,
                    num_sequences=step_plan.num_sequences,
                    **kw,  # type: ignore[arg-type]
                )[0]
                * world_size  # the module's scaling; the strategy then averages over the ranks
                for step_plan, w in passes
            )
            / world_size
        )
        expected = _dr_grpo_by_definition(
            logprobs[rows], old[rows], adv[rows].tolist(), [lengths[i] for i in rows], max_len, clip_c=10.0
        )
        assert float(run.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
        (run_grad,) = torch.autograd.grad(run, logprobs)
        (expected_grad,) = torch.autograd.grad(expected, logprobs)
        torch.testing.assert_close(run_grad, expected_grad, rtol=1e-5, atol=1e-7)
        assert run_grad[mask == 0].abs().max() == 0  # no gradient past a sequence's own tokens


def test_dr_grpo_weighs_a_token_the_same_whatever_the_lengths_around_it() -> None:
    """Dr.GRPO's point: the normaliser is the constant L_max x sequences, so a token's gradient does not depend on its
    sequence's length or on the other sequences' lengths (the token mean's does)."""
    lp = torch.zeros(2, 10, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    grads = {}
    for loss_type in ("dr_grpo", "dapo"):
        for other in (2, 10):
            mask = torch.zeros(2, 10)
            mask[0, :4], mask[1, :other] = 1, 1
            loss, _ = policy_loss(lp, lp.detach(), adv, mask, loss_type=loss_type, max_completion_length=10)  # type: ignore[arg-type]
            grads[loss_type, other] = float(torch.autograd.grad(loss, lp)[0][0, 0])
    assert grads["dr_grpo", 2] == grads["dr_grpo", 10] == pytest.approx(-1.0 / (10 * 2))  # -A / (L_max * N)
    assert grads["dapo", 2] == pytest.approx(-1.0 / 6) and grads["dapo", 10] == pytest.approx(-1.0 / 14)
