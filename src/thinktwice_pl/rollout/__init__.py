"""Rollout engines: where completions are sampled.

An engine is chosen by ``class_path`` in YAML (``rollout.engine``); engines other than the HF one
are imported only when chosen. Every engine follows `RolloutEngine`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from thinktwice_pl.types import Completion


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one generate call."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None or 0: off
    max_new_tokens: int = 256
    seed: int | None = None  # seeds this call's sampling, so a resumed run draws the same samples

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the rollout callback needs from a sampler (the callback owns it for fit, validate and test)."""

    def setup(self, model: Any, tokenizer: Any, compute_dtype: Any = None) -> None:
        """Bind the engine to the training policy and tokenizer (called once, at fit start).

        `compute_dtype` is the dtype the trainer computes in (bf16 under ``trainer.precision=bf16-mixed``, whose
        master weights stay fp32); the engine samples in it. None: the dtype of the policy's weights.
        """

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        """Sample `n` completions for each tokenized prompt; result[i][j] is sample j of prompt i."""

    def sync_weights(self, model: Any) -> None:
        """Make the sampler use the policy's current weights (after every optimizer phase)."""

    def sleep(self) -> None:
        """Free sampler memory while the trainer updates (no-op where not supported)."""

    def wake_up(self) -> None:
        """Undo `sleep` before the next generate."""

    def close(self) -> None:
        """Release the engine's memory when fit, validate or test ends (`setup` may be called again afterwards)."""


from thinktwice_pl.rollout.hf import HFRolloutEngine  # noqa: E402  (needs SamplingConfig above)

__all__ = ["HFRolloutEngine", "RolloutEngine", "SamplingConfig"]
