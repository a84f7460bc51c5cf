"""ThinkTwiceModule pieces on the tiny model: micro-batched gradients, refine signals, precision and dropout checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from rollout_helpers import make_rollout

from thinktwice_pl.batching import plan_phase
from thinktwice_pl.metrics import refine_signals
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.parallel import check_precision


def test_refine_signals_by_hand() -> None:
    rollouts = [
        make_rollout([1], [2], reward=1.0, base_correct=False),  # fixed
        make_rollout([1], [2], reward=0.0, base_correct=False),  # still wrong
        make_rollout([1], [2], reward=0.0, base_correct=False),
        make_rollout([1], [2], reward=1.0, base_correct=True),  # kept
        make_rollout([1], [2], reward=1.0, base_correct=True),
        make_rollout([1], [2], reward=0.0, base_correct=True),  # damaged
    ]
    signals = refine_signals(rollouts)
    assert signals["base_correct_frac"] == pytest.approx(3 / 6)
    assert signals["fix_rate"] == pytest.approx(1 / 3)
    assert signals["keep_rate"] == pytest.approx(2 / 3)
    assert signals["reward_share_from_wrong"] == pytest.approx(1 / 3)  # 1 of the 3 reward points
    only_right = refine_signals(rollouts[3:])
    assert math.isnan(only_right["fix_rate"])  # undefined without wrong bases, and then not logged


def test_fp16_amp_is_refused_other_precisions_pass() -> None:
    # (Lightning turns 16-mixed into bf16-mixed on CPU, so the check is called directly.)
    with pytest.raises(ValueError, match=r"trainer\.precision=16-mixed"):
        check_precision("16-mixed")
    for ok in ("32-true", "bf16-mixed", "bf16-true"):
        check_precision(ok)


def test_dropout_is_disabled_by_default(tmp_path: Path) -> None:
    from thinktwice_pl.builtin_models import build_tiny_model
    from thinktwice_pl.models import load_causal_lm

    path = build_tiny_model(tmp_path / "tiny")
    config = json.loads((path / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (path / "config.json").write_text(json.dumps(config))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    noisy = load_causal_lm(str(path), disable_dropout=False)
    attn = [m for m in noisy.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert attn and all(m.attention_dropout == 0.5 for m in attn)
    assert not torch.equal(noisy(ids).logits, noisy(ids).logits)  # train mode + dropout: two passes differ
    clean = load_causal_lm(str(path))
    assert clean.training
    assert all(m.attention_dropout == 0.0 for m in clean.modules() if hasattr(m, "attention_dropout"))
    assert torch.equal(clean(ids).logits, clean(ids).logits)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_token_budget_micro_batches_give_the_gradient_of_one_big_batch(tiny_model_dir: Path, loss_type: str) -> None:
    from types import SimpleNamespace

    torch.manual_seed(0)
    lengths = [(7, 5), (3, 9), (11, 2), (4, 4), (6, 8), (2, 3)]  # (prompt, completion) tokens
    rollouts = [
        make_rollout(torch.randint(5, 500, (p,)).tolist(), torch.randint(5, 500, (c,)).tolist()) for p, c in lengths
    ]
    advantages = torch.tensor([0.5, -0.5, 0.25, -0.25, 0.75, -0.75])

    def gradients(budget: int | None) -> tuple[dict[str, torch.Tensor], int]:
        module = ThinkTwiceModule(
            model_name_or_path=str(tiny_model_dir),
            problems_per_batch=1,
            num_generations=6,
            mini_batch_problems=1,
            max_grad_norm=None,
            loss_type=loss_type,
            max_tokens_per_microbatch=budget,
        )
        module.configure_model()
        module._trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=None)  # what _optimizer_step reads
        module.manual_backward = lambda loss: loss.backward()
        opt = torch.optim.SGD(module.policy.parameters(), lr=0.0)  # lr 0: the gradients stay to be compared
        module.optimizers = lambda: opt
        plan = plan_phase(
            lengths, 6, [True] * 6, [True] * 6, mini_batch_groups=1, micro_batch_size=None, max_tokens=budget
        )
        [step] = plan.steps
        for work in step.passes:  # the budget holds: rows x (longest prompt + longest completion)
            width = max(lengths[i][0] for i in work.rows) + max(lengths[i][1] for i in work.rows)
            assert budget is None or len(work.rows) == 1 or len(work.rows) * width <= budget
        module._optimizer_step(rollouts, step, advantages, {})
        return {n: p.grad.clone() for n, p in module.policy.named_parameters()}, len(step.passes)

    whole, one = gradients(None)
    split, many = gradients(30)
    assert one == 1 and many >= 3
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-5, atol=1e-7, msg=name)
