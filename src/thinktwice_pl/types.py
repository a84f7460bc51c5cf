"""Records that flow between the data module, the rollout callback, the engines and the module.

Plain dataclasses, no behaviour beyond small derived views. Tensor shapes are in comments:
``N`` = number of rollouts in a phase (problems * group size), ``P`` = padded prompt length,
``C`` = padded completion length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from thinktwice_pl.dynamic_sampling import SamplingStats

Phase = Literal["solve", "refine"]
FinishReason = Literal["stop", "length"]


@dataclass
class Problem:
    """One math problem with its gold final answer.

    Not frozen: with ``trainer.precision`` bf16-true / 16-true Lightning rebuilds every dataclass of a batch
    (``convert_input``), which a frozen dataclass refuses. Treat it as read-only.
    """

    id: str
    prompt_text: str
    answer: str
    source: str = ""


@dataclass
class Completion:
    """What a rollout engine returns for one sample."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[float] | None = None  # sampler log-prob of each token in `token_ids`, when known


@dataclass
class Rollout:
    """One sampled answer (solve) or refinement (refine), scored.

    For the refine phase, `base_text` / `base_correct` describe the earlier solve answer that was
    placed in the prompt.
    """

    problem_id: str
    phase: Phase
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_text: str
    finish_reason: FinishReason
    sampler_logprobs: list[float] | None = None
    reward: float = 0.0  # correctness (the grader's score)
    reward_error: bool = False  # the grader timed out or raised; reward was set to 0 and counted
    length_penalty: float = 0.0  # DAPO's soft overlong penalty (<= 0), added to `reward` for the advantages only
    base_text: str | None = None
    base_correct: bool | None = None

    @property
    def correct(self) -> bool:
        return self.reward > 0.5

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class RolloutBatch:
    """The scored rollouts of one phase, group-major: rollouts[g * group_size + j] is sample j of group g."""

    rollouts: list[Rollout]
    group_size: int
    generate_s: float = 0.0
    score_s: float = 0.0
    reward_errors: int = 0
    truncated_prompts: int = 0  # prompts longer than rollout.max_prompt_length that kept only their last tokens

    def __post_init__(self) -> None:
        if self.group_size < 1 or len(self.rollouts) % self.group_size:
            raise ValueError(
                f"RolloutBatch has {len(self.rollouts)} rollouts, not a multiple of group_size={self.group_size}"
            )

    @property
    def num_groups(self) -> int:
        return len(self.rollouts) // self.group_size


@dataclass
class PhaseBatch:
    """One Lightning training batch: a batch of problems tagged with the phase to run on them.

    `index` counts phase batches from the start of training (solve and refine each count one);
    `pair` counts problem batches. `problems` is the problem batch, the same in both phases; with dynamic
    sampling the RolloutCallback sets it to the problems of the groups trained (in the solve phase some may be
    extra draws), before the refine phase reviews them. The fields after `epoch` are filled as the phase runs,
    each by one callback and read by those named.
    """

    phase: Phase
    problems: list[Problem]
    index: int
    pair: int
    epoch: int
    sampling: SamplingStats | None = None  # rounds, dropped groups, length penalty (RolloutCallback; PhaseLogger)
    bases: list[Rollout] | None = None  # refine: the solve answer each prompt reviews (RolloutCallback, batch start)
    rollouts: RolloutBatch | None = None  # scored rollouts (RolloutCallback, batch start; the module trains on them)
    sync_s: float | None = None  # the engine's weight sync after the update (RolloutCallback; PhaseLogger logs it)
    logged: bool = False  # the phase's row and samples are written (PhaseLogger; CrashCheckpoint reads it)

    @property
    def prompt_problems(self) -> list[Problem]:
        """The problem of each prompt: `problems` in a solve batch, the problem of each base in a refine batch (with
        ``wrong_first`` / ``balanced`` selection a problem may appear several times and another not at all)."""
        if self.phase == "solve":
            return self.problems
        if self.bases is None:
            raise ValueError(f"refine batch {self.index} has no bases yet (RolloutCallback sets them at batch start)")
        by_id = {p.id: p for p in self.problems}
        return [by_id[base.problem_id] for base in self.bases]


@dataclass
class EvalBatch:
    """One validation/test batch: problems of one named benchmark.

    `counted[i]` is False for the padding problems that give every rank the same number of batches (they are
    generated, so sharded models stay in step, but left out of the metrics). The evaluation callback sets
    `evaluated` once it has generated and scored the batch.
    """

    benchmark: str
    problems: list[Problem]
    index: int
    counted: list[bool]
    evaluated: bool = False
