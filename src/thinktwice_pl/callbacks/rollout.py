"""RolloutCallback: sample and score each phase's completions before its training step.

Solve phase: one chat per problem. Refine phase: for each problem, the data module picks one of
the cached solve answers (after the solve step's update), and the chat holds that answer plus the
review instruction. After each step the callback hands the solve rollouts to the data module's
cache and syncs the engine's weights with the updated policy.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar

from thinktwice_pl.data import rank_slice
from thinktwice_pl.models import compute_dtype
from thinktwice_pl.prompts import (
    DEFAULT_REFINE_INSTRUCTION,
    DEFAULT_SOLVE_SUFFIX,
    refine_messages,
    render_chat,
    solve_messages,
    tokenize_rendered,
)
from thinktwice_pl.rewards import RewardScorer
from thinktwice_pl.rollout import HFRolloutEngine, RolloutEngine, SamplingConfig
from thinktwice_pl.types import PhaseBatch, Rollout, RolloutBatch

log = logging.getLogger(__name__)


class RolloutCallback(Callback):
    """Generates and scores the rollouts of every phase batch (the ``rollout:`` section of the config).

    Args:
        engine: the sampler (``class_path`` in YAML): HFRolloutEngine (default) or a vLLM engine.
        num_generations: G, samples per prompt in both phases.
        temperature: sampling temperature in training.
        top_p: nucleus sampling threshold (1.0 = off).
        top_k: top-k sampling (None = off).
        max_completion_length: most new tokens per completion.
        max_prompt_length: longest allowed prompt in tokens (refine prompts hold the earlier answer);
            a longer prompt is an error naming the problem. None = no limit.
        reward: math_verify (default), boxed (last \\boxed{} string match, the reference grader), last_number
            (the last number written; restating "26 + 29" is not an answer, unlike math-verify) or
            a dotted path to a TRL-style function ``fn(prompts, completions, **columns)``.
        reward_timeout_s: per-completion grading deadline; a timeout scores 0 and is counted.
        reward_workers: grader processes (0 = grade in the training process).
        solve_prompt_suffix: instruction appended to each problem (METHOD.md section 2 default).
        refine_instruction: the review instruction of the refine turn (METHOD.md section 2 default).
        seed: base seed of the per-phase sampling seeds (a resumed run draws the same samples).
    """

    def __init__(
        self,
        engine: RolloutEngine | None = None,
        num_generations: int = 8,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        max_completion_length: int = 3000,
        max_prompt_length: int | None = None,
        reward: str = "math_verify",
        reward_timeout_s: float = 5.0,
        reward_workers: int = 2,
        solve_prompt_suffix: str = DEFAULT_SOLVE_SUFFIX,
        refine_instruction: str = DEFAULT_REFINE_INSTRUCTION,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.engine: RolloutEngine = engine if engine is not None else HFRolloutEngine()
        self.num_generations = num_generations
        self.sampling = SamplingConfig(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_completion_length
        )
        self.max_prompt_length = max_prompt_length
        self.reward = reward
        self.reward_timeout_s = reward_timeout_s
        self.reward_workers = reward_workers
        self.solve_prompt_suffix = solve_prompt_suffix
        self.refine_instruction = refine_instruction
        self.seed = seed
        self.scorer: RewardScorer | None = None

    # ------------------------------------------------------------------------------ lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not hasattr(trainer.datamodule, "bases_for"):
            raise TypeError("RolloutCallback needs the ThinkTwiceDataModule (data:) to serve phase batches")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.setup(
            pl_module.policy, pl_module.tokenizer, compute_dtype(str(trainer.precision), pl_module.policy)
        )
        self.scorer = RewardScorer(self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        close = getattr(self.engine, "close", None)  # optional part of the engine protocol
        if callable(close):
            close()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, PhaseBatch):
            raise TypeError(f"expected a PhaseBatch from ThinkTwiceDataModule, got {type(batch).__name__}")
        _show_phase(trainer, batch)
        if batch.phase == "refine":
            batch.bases = trainer.datamodule.bases_for(batch)
        batch.rollouts = self.rollout(pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        trainer.datamodule.phase_done(batch)
        start = time.perf_counter()
        self.engine.sync_weights(pl_module.policy)
        batch.extras["sync_s"] = time.perf_counter() - start  # logged with the phase's metrics by the module

    # ------------------------------------------------------------------------------ rollouts

    def rollout(self, pl_module: pl.LightningModule, batch: PhaseBatch) -> RolloutBatch:
        """Build the phase's prompts, sample G completions each, grade them: a scored `RolloutBatch`.

        With several ranks each rank samples and grades its share of the problems (`rank_slice`), then the
        shares are gathered, so every rank holds the whole phase (the refine cache and the logged metrics
        are the same everywhere; the module trains each rank on its share).
        """
        tokenizer = pl_module.tokenizer
        trainer = pl_module._trainer
        world = trainer.world_size if trainer is not None else 1
        share = rank_slice(len(batch.problems), pl_module.global_rank, world)
        problems = batch.problems[share]
        bases = batch.bases[share] if batch.bases is not None else None
        if batch.phase == "solve":
            chats = [solve_messages(p.prompt_text, self.solve_prompt_suffix) for p in problems]
        else:
            assert bases is not None
            chats = [
                refine_messages(p.prompt_text, base.completion_text, tokenizer, self.solve_prompt_suffix,
                                self.refine_instruction)
                for p, base in zip(problems, bases, strict=True)
            ]  # fmt: skip
        prompt_texts = [render_chat(chat, tokenizer) for chat in chats]
        prompt_ids = [tokenize_rendered(text, tokenizer) for text in prompt_texts]
        if self.max_prompt_length is not None:
            for problem, ids in zip(problems, prompt_ids, strict=True):
                if len(ids) > self.max_prompt_length:
                    raise ValueError(
                        f"{batch.phase} prompt of problem {problem.id!r} has {len(ids)} tokens > "
                        f"rollout.max_prompt_length={self.max_prompt_length}: raise it (refine prompts hold the "
                        "problem, an earlier answer of up to max_completion_length tokens and the instruction)"
                    )
        sampling = SamplingConfig(
            temperature=self.sampling.temperature, top_p=self.sampling.top_p, top_k=self.sampling.top_k,
            max_new_tokens=self.sampling.max_new_tokens,
            seed=phase_seed(self.seed, batch.index, pl_module.global_rank),
        )  # fmt: skip
        start = time.perf_counter()
        self.engine.wake_up()
        groups = self.engine.generate(prompt_ids, self.num_generations, sampling)
        self.engine.sleep()
        generate_s = time.perf_counter() - start

        start = time.perf_counter()
        completions = [c for group in groups for c in group]  # group-major
        answers = [p.answer for p in problems for _ in range(self.num_generations)]
        prompts = [text for text in prompt_texts for _ in range(self.num_generations)]
        assert self.scorer is not None, "on_fit_start did not run"
        scores = self.scorer.score(prompts, [c.text for c in completions], answers)
        score_s = time.perf_counter() - start

        rollouts: list[Rollout] = []
        for i, (problem, group) in enumerate(zip(problems, groups, strict=True)):
            base = bases[i] if bases is not None else None
            for j, completion in enumerate(group):
                k = i * self.num_generations + j
                rollouts.append(Rollout(
                    problem_id=problem.id, phase=batch.phase, prompt_ids=prompt_ids[i],
                    completion_ids=completion.token_ids, completion_text=completion.text,
                    finish_reason=completion.finish_reason, sampler_logprobs=completion.logprobs,
                    reward=scores.rewards[k], reward_error=scores.errors[k] is not None,
                    base_text=base.completion_text if base is not None else None,
                    base_correct=base.correct if base is not None else None,
                ))  # fmt: skip
        if scores.num_errors:
            first = next(e for e in scores.errors if e is not None)
            log.warning("%d of %d %s completions could not be graded (scored 0), e.g. %s",
                        scores.num_errors, len(completions), batch.phase, first)  # fmt: skip
        local = RolloutBatch(rollouts, self.num_generations, generate_s=generate_s, score_s=score_s,
                             reward_errors=scores.num_errors)  # fmt: skip
        return _gather(local) if world > 1 else local


def phase_seed(seed: int, index: int, rank: int = 0) -> int:
    """A sampling seed for phase batch `index` on `rank` that depends only on (seed, index, rank)."""
    digest = hashlib.sha256(f"{seed}/{index}/{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _gather(local: RolloutBatch) -> RolloutBatch:
    """All ranks' shares in rank order (group-major over the whole problem batch); times are the slowest rank's."""
    import torch.distributed as dist

    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    return RolloutBatch(
        [r for share in shares for r in share.rollouts], local.group_size,
        generate_s=max(share.generate_s for share in shares), score_s=max(share.score_s for share in shares),
        reward_errors=sum(share.reward_errors for share in shares),
    )  # fmt: skip


def _show_phase(trainer: pl.Trainer, batch: PhaseBatch) -> None:
    """Put the current phase in the progress bar's description (TQDM or Rich)."""
    bar = trainer.progress_bar_callback
    description = f"Epoch {trainer.current_epoch} [{batch.phase}]"
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled and getattr(bar, "_train_progress_bar", None) is not None:
        bar.train_progress_bar.set_description(description)
    elif (
        isinstance(bar, RichProgressBar)
        and bar.is_enabled
        and bar.progress is not None
        and bar.train_progress_bar_id is not None
    ):
        bar.progress.update(bar.train_progress_bar_id, description=description)
