"""The module's settings records (`thinktwice_pl.settings`): built from the flat names, checked where they are made."""

from __future__ import annotations

import dataclasses
import math

import pytest

from thinktwice_pl.errors import UserError
from thinktwice_pl.models import QuantizationSettings
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.settings import BatchingSettings, LossSettings, OptimizerSettings, PolicySettings, pick


def _module_defaults() -> dict[str, object]:
    """The flat arguments of a default ThinkTwiceModule, as the records read them."""
    module = ThinkTwiceModule()
    return {**module.hparams, "lora": None, "quantization": None}


def test_each_record_takes_its_fields_from_the_flat_arguments_and_is_frozen() -> None:
    module = ThinkTwiceModule(epsilon=0.1, epsilon_high=None, learning_rate=3e-6, micro_batch_size=4)
    assert module.loss.policy_loss_kwargs()["epsilon_low"] == 0.1
    assert module.loss.policy_loss_kwargs()["epsilon_high"] == 0.1  # None: the lower clip range
    assert module.optim.learning_rate == 3e-6 and module.batching.micro_batch_size == 4
    assert module.batching.step_problems == 8 and module.policy_settings.dtype == "float32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.loss.beta = 0.1  # type: ignore[misc]
    assert pick(LossSettings, _module_defaults()) == ThinkTwiceModule().loss


@pytest.mark.parametrize(
    ("record", "change", "message"),
    [
        (BatchingSettings, {"problems_per_batch": 6, "mini_batch_problems": 4}, r"data\.problems_per_batch=6 is not"),
        (BatchingSettings, {"num_generations": 1}, r"rollout\.num_generations=1: GRPO needs at least 2"),
        (BatchingSettings, {"micro_batch_size": 0}, r"model\.micro_batch_size must be >= 1"),
        (BatchingSettings, {"max_tokens_per_microbatch": 0}, r"model\.max_tokens_per_microbatch must be >= 1"),
        (BatchingSettings, {"num_iterations": 0}, r"model\.num_iterations must be >= 1"),
        (BatchingSettings, {"logprob_chunk_size": 0}, r"model\.logprob_chunk_size must be >= 1"),
        (LossSettings, {"temperature": 0.0}, r"rollout\.temperature=0\.0: training needs sampling"),
        (LossSettings, {"importance_sampling_cap": 0.0}, r"model\.importance_sampling_cap must be > 0"),
        (LossSettings, {"clip_ratio_c": 1.0}, r"model\.clip_ratio_c must be > 1"),
        (LossSettings, {"beta": -0.1}, r"model\.beta must be >= 0"),
        (LossSettings, {"loss_type": "ppo"}, r"model\.loss_type must be dapo, grpo or dr_grpo, got 'ppo'"),
        (LossSettings, {"scale_rewards": "std"}, r"model\.scale_rewards must be none, group or batch"),
        (OptimizerSettings, {"learning_rate": 0.0}, r"model\.learning_rate must be > 0"),
        (OptimizerSettings, {"warmup_steps": -1}, r"model\.warmup_steps must be >= 0"),
        (OptimizerSettings, {"lr_scheduler": "step"}, r"model\.lr_scheduler must be constant, linear or cosine"),
        (OptimizerSettings, {"max_grad_norm": 0.0}, r"model\.max_grad_norm must be > 0 or None"),
        (PolicySettings, {"dtype": "float64"}, r"model\.dtype must be one of \['auto', 'float32'"),
        (PolicySettings, {"quantization": QuantizationSettings()}, r"model\.quantization \(QLoRA\) needs model\.lora"),
    ],
)
def test_a_bad_value_is_refused_naming_the_flag(record: type, change: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        pick(record, {**_module_defaults(), **change})


def test_the_module_refuses_a_bad_value_when_it_is_built() -> None:
    with pytest.raises(UserError, match=r"model\.learning_rate must be > 0"):
        ThinkTwiceModule(learning_rate=-1e-6)


def test_learning_rate_factor_warms_up_from_one_step_then_decays() -> None:
    def factors(shape: str) -> list[float]:
        optim = pick(OptimizerSettings, {**_module_defaults(), "lr_scheduler": shape, "warmup_steps": 2})
        return [optim.lr_factor(step, 6) for step in range(7)]

    assert factors("constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # the first step already at lr / warmup
    assert factors("linear") == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]  # 4 decay steps after warm-up
    cosine = factors("cosine")
    assert cosine[2] == 1.0 and cosine[4] == pytest.approx(0.5) and cosine[6] == pytest.approx(0.0)
    assert cosine[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
