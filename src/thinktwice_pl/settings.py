"""The module's settings as typed, frozen records, built from the flat names users write (``model.epsilon``,
``data.problems_per_batch``, ...). Each record checks its values in ``__post_init__`` and names the flag to fix."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from thinktwice_pl.errors import UserError
from thinktwice_pl.grpo import LossType, ScaleRewards
from thinktwice_pl.models import DTYPES, LoraSettings, QuantizationSettings

LrScheduler = Literal["constant", "linear", "cosine"]
Record = TypeVar("Record")


def pick(record: type[Record], flat: Mapping[str, Any]) -> Record:
    """The `record` whose fields take the values of the same names in `flat` (the module's flat arguments)."""
    return record(**{field.name: flat[field.name] for field in dataclasses.fields(record)})  # type: ignore[arg-type]


@dataclass(frozen=True)
class PolicySettings:
    """What policy to load and how (`thinktwice_pl.models.load_causal_lm`)."""

    model_name_or_path: str
    dtype: str
    attn_implementation: str | None
    gradient_checkpointing: bool
    disable_dropout: bool
    lora: LoraSettings | None
    quantization: QuantizationSettings | None

    def loader_options(self) -> dict[str, Any]:
        """The keyword arguments of `load_causal_lm` (every field but the path)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model_name_or_path"}

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {['auto', *DTYPES]}, got {self.dtype!r}")
        if self.quantization is not None and self.lora is None:
            raise UserError("model.quantization (QLoRA) needs model.lora: 4-bit base weights are not trained directly")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its learning-rate schedule; steps are optimizer steps."""

    learning_rate: float
    betas: tuple[float, float]
    weight_decay: float
    max_grad_norm: float | None
    lr_scheduler: LrScheduler
    warmup_steps: int

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise UserError(f"model.learning_rate must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise UserError(f"model.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.lr_scheduler not in ("constant", "linear", "cosine"):
            raise UserError(f"model.lr_scheduler must be constant, linear or cosine, got {self.lr_scheduler!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UserError(f"model.max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    def lr_factor(self, step: int, total: int | None) -> float:
        """The learning-rate multiplier of optimizer step `step` (0-based): linear warm-up from 1 / warmup to 1,
        then constant, or linear or cosine decay to 0 at `total`. The first warm-up step already runs at
        lr / warmup, not 0 (transformers' schedulers start at 0): an RL phase is too costly to spend at lr 0."""
        warmup = self.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        if self.lr_scheduler == "constant" or total is None:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if self.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class BatchingSettings:
    """How a phase's rollouts are cut into optimizer steps and forward/backward passes (`thinktwice_pl.batching`),
    and how each pass computes log-probs (`thinktwice_pl.logprobs`)."""

    problems_per_batch: int
    mini_batch_problems: int | None
    micro_batch_size: int | None
    max_tokens_per_microbatch: int | None
    num_generations: int
    num_iterations: int
    logprob_chunk_size: int
    share_prompts: bool

    def __post_init__(self) -> None:
        if self.problems_per_batch % self.step_problems:
            raise UserError(
                f"data.problems_per_batch={self.problems_per_batch} is not divisible by "
                f"model.mini_batch_problems={self.mini_batch_problems}: each optimizer step takes whole problems"
            )
        if self.num_generations < 2:
            raise UserError(f"rollout.num_generations={self.num_generations}: GRPO needs at least 2 samples per group")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise UserError(f"model.micro_batch_size must be >= 1 or None, got {self.micro_batch_size}")
        tokens = self.max_tokens_per_microbatch
        if tokens is not None and tokens < 1:
            raise UserError(f"model.max_tokens_per_microbatch must be >= 1 or None, got {tokens}")
        if self.num_iterations < 1:
            raise UserError(f"model.num_iterations must be >= 1, got {self.num_iterations}")
        if self.logprob_chunk_size < 1:
            raise UserError(f"model.logprob_chunk_size must be >= 1, got {self.logprob_chunk_size}")

    @property
    def step_problems(self) -> int:
        """Problems per optimizer step."""
        return self.mini_batch_problems or self.problems_per_batch


@dataclass(frozen=True)
class LossSettings:
    """The GRPO objective (`thinktwice_pl.grpo`): advantages, clipping, aggregation, KL and the sampler correction."""

    epsilon: float
    epsilon_high: float | None
    clip_ratio_c: float | None
    loss_type: LossType
    scale_rewards: ScaleRewards
    beta: float
    mask_truncated_completions: bool
    temperature: float
    max_completion_length: int
    importance_sampling_cap: float | None

    def __post_init__(self) -> None:
        if self.importance_sampling_cap is not None and self.importance_sampling_cap <= 0:
            raise UserError(f"model.importance_sampling_cap must be > 0 or None, got {self.importance_sampling_cap}")
        if self.temperature <= 0:
            raise UserError(f"rollout.temperature={self.temperature}: training needs sampling (temperature > 0)")
        if self.clip_ratio_c is not None and self.clip_ratio_c <= 1.0:
            raise UserError(f"model.clip_ratio_c must be > 1 (dual clip) or None, got {self.clip_ratio_c}")
        if self.beta < 0:
            raise UserError(f"model.beta must be >= 0, got {self.beta}")
        if self.loss_type not in ("dapo", "grpo", "dr_grpo"):
            raise UserError(f"model.loss_type must be dapo, grpo or dr_grpo, got {self.loss_type!r}")
        if self.scale_rewards not in ("none", "group", "batch"):
            raise UserError(f"model.scale_rewards must be none, group or batch, got {self.scale_rewards!r}")

    def policy_loss_kwargs(self) -> dict[str, Any]:
        """The settings `grpo.policy_loss` takes by keyword."""
        return {
            "epsilon_low": self.epsilon,
            "epsilon_high": self.epsilon_high if self.epsilon_high is not None else self.epsilon,
            "clip_ratio_c": self.clip_ratio_c,
            "loss_type": self.loss_type,
            "max_completion_length": self.max_completion_length,
            "beta": self.beta,
        }
