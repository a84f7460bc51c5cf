"""RolloutCallback: the one owner of the rollout engine and the grader, for fit, validate and test.

Before every training step it samples and scores the phase's completions. Solve phase: one chat per
problem. Refine phase: the data module picks B of the cached solve answers (`select_bases`: with the
paper's ``uniform`` selection one per problem), and each chat holds its problem, that answer and the
review instruction; the refinements are sampled after the solve step's update. After each step it
hands the solve rollouts to the data module's cache (`ThinkTwiceDataModule.phase_done`) and syncs the
engine's weights with the policy, putting the sync time on the batch (``PhaseBatch.sync_s``) for the
`PhaseLogger`. DAPO's dynamic sampling and soft overlong penalty (`thinktwice_pl.dynamic_sampling`) are options
of both phases: with dynamic sampling a phase runs more generation rounds (extra problems in a solve phase,
other cached solve answers of the pair in a refine phase) until it holds B informative groups. The Evaluation
callback asks it for prompts, completions and grades (`prompts`, `awake`, `score`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from thinktwice_pl.batching import rank_slice
from thinktwice_pl.data import thinktwice_data
from thinktwice_pl.dynamic_sampling import (
    choose_groups,
    groups_of,
    informative_count,
    overlong_penalty,
    sampled_groups,
    sampling_stats,
)
from thinktwice_pl.errors import OutOfMemoryInPhase, UserError, is_out_of_memory
from thinktwice_pl.hostmem import trim_host_memory
from thinktwice_pl.lightning_shims import tqdm_train_bar
from thinktwice_pl.parallel import check_cpu_bf16, compute_dtype
from thinktwice_pl.prompts import (
    DEFAULT_REFINE_INSTRUCTION,
    DEFAULT_SOLVE_SUFFIX,
    Prompts,
    PromptSettings,
    build_prompts,
    default_system_turn,
)
from thinktwice_pl.rewards import RewardScorer, ScoreResult
from thinktwice_pl.rollout import HFRolloutEngine, RolloutEngine, SamplingConfig
from thinktwice_pl.types import PhaseBatch, Problem, Rollout, RolloutBatch

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
        max_prompt_length: longest prompt in tokens (refine prompts hold the earlier answer). A longer refine
            prompt keeps its last max_prompt_length tokens (left truncation, as the reference code), counted in
            train/refine/truncated_prompts (evaluation does the same and logs its count); a longer solve prompt
            is an error naming the problem. None = no limit.
        reward: math_verify (default; math-verify on the last \\boxed{}, or on the whole text when nothing is
            boxed), boxed (the paper's grader: last \\boxed{} vs gold, Hendrycks-MATH normalisation then SymPy;
            no box scores 0), last_number (the last number written; restating "26 + 29" is not an answer, unlike
            with math-verify) or a dotted path to a TRL-style function ``fn(prompts, completions, **columns)``.
        reward_timeout_s: per-completion grading deadline; a timeout scores 0 and is counted.
        reward_workers: grader processes (0 = grade in the training process).
        solve_prompt_suffix: instruction appended to each problem (METHOD.md section 2 default).
        refine_instruction: the review instruction of the refine turn (METHOD.md section 2 default).
        remove_system_prompt: leave out the system turn that the chat template inserts into a chat without one
            (Olmo-3, Qwen2.5, SmolLM2 templates do; the reference code removes it for Olmo-3), in training and
            evaluation prompts alike. A no-op for templates without a default system prompt; an error at start-up
            when the template's system turn cannot be cut out.
        seed: base seed of the per-phase sampling seeds (a resumed run draws the same samples).
        dynamic_sampling: DAPO's dynamic sampling, in both phases: groups whose G answers are all right or all wrong
            (correctness only, not the length penalty) are dropped and more prompts are sampled until the phase holds
            B informative groups (solve: extra problems drawn from the training set; refine: other cached solve
            answers of the same problems), or until `max_sampling_rounds` generation rounds have run; a phase still
            short is filled with dropped groups so that it takes the usual number of optimizer steps. Counted per phase
            (``train/<phase>/sampling_rounds``, ``groups_dropped``, ``groups_filled`` ...).
        max_sampling_rounds: most generation rounds per phase with dynamic sampling (the first included; the
            reference allowed 10); None = until B informative groups are found or no prompt is left to draw.
        overlong_buffer: L_b of DAPO's soft overlong penalty (eq. 13): a completion longer than
            ``max_completion_length - L_b`` tokens loses reward linearly, down to ``-overlong_penalty_factor`` at the
            limit; logged apart from correctness (``train/<phase>/overlong_penalty_mean``). None = off.
        overlong_penalty_factor: the penalty's weight.
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
        remove_system_prompt: bool = False,
        seed: int = 0,
        dynamic_sampling: bool = False,
        max_sampling_rounds: int | None = 10,
        overlong_buffer: int | None = None,
        overlong_penalty_factor: float = 1.0,
    ) -> None:
        super().__init__()
        if max_sampling_rounds is not None and max_sampling_rounds < 1:
            raise UserError(
                f"rollout.max_sampling_rounds={max_sampling_rounds} must be >= 1 (the first round counts) or null "
                "(no limit)"
            )
        if overlong_buffer is not None and not 0 < overlong_buffer <= max_completion_length:
            raise UserError(
                f"rollout.overlong_buffer={overlong_buffer} must be in 1..rollout.max_completion_length="
                f"{max_completion_length}, or null (no length penalty)"
            )
        if overlong_penalty_factor < 0:
            raise UserError(f"rollout.overlong_penalty_factor={overlong_penalty_factor} must be >= 0")
        self.dynamic_sampling = dynamic_sampling
        self.max_sampling_rounds = max_sampling_rounds
        self.overlong_buffer = overlong_buffer
        self.overlong_penalty_factor = overlong_penalty_factor
        self.engine: RolloutEngine = engine if engine is not None else HFRolloutEngine()
        self.num_generations = num_generations
        self.sampling = SamplingConfig(
            temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_completion_length
        )
        self.prompt_settings = PromptSettings(
            solve_prompt_suffix, refine_instruction, remove_system_prompt, max_prompt_length
        )
        self.reward = reward
        self.reward_timeout_s = reward_timeout_s
        self.reward_workers = reward_workers
        self.seed = seed
        self.scorer: RewardScorer | None = None
        self._ready = False
        self._warned_truncation = False
        self._warned_short = False

    @property
    def max_prompt_length(self) -> int | None:
        return self.prompt_settings.max_prompt_length

    # ------------------------------------------------------------------------------ lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            thinktwice_data(trainer, "RolloutCallback")  # fails now rather than at the first refine batch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ready(trainer, pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ready(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ready(trainer, pl_module)

    def ready(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Set the engine and the grader up, once per fit / validate / test (later calls do nothing).

        The engine samples in the trainer's compute dtype (bf16 under bf16-mixed). Outside fit the policy's weights
        are pushed right away: those of ``--ckpt_path`` are loaded after the model is configured.
        """
        if self._ready:
            return
        self.check_chat_template(pl_module.tokenizer)
        policy: Any = pl_module.policy
        precision = str(trainer.precision)
        check_cpu_bf16(precision, policy, trainer.strategy.root_device.type)  # the engine samples in that dtype too
        self.engine.setup(policy, pl_module.tokenizer, compute_dtype(precision, policy))
        if trainer.state.fn != "fit":
            self.engine.sync_weights(policy)
        self.scorer = RewardScorer(self.reward, timeout_s=self.reward_timeout_s, num_workers=self.reward_workers)
        self._ready = True

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.scorer is not None:
            self.scorer.close()
            self.scorer = None
        self.engine.close()
        self._ready = False

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, PhaseBatch):
            raise TypeError(f"expected a PhaseBatch from ThinkTwiceDataModule, got {type(batch).__name__}")
        _show_phase(trainer, batch)
        if batch.phase == "refine":
            data = thinktwice_data(trainer, "RolloutCallback")
            batch.problems = data.solved_problems(batch)
            batch.bases = data.bases_for(batch)
        batch.rollouts = self.rollout(trainer, pl_module, batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        thinktwice_data(trainer, "RolloutCallback").phase_done(batch)
        start = time.perf_counter()
        self.engine.sync_weights(pl_module.policy)
        batch.sync_s = time.perf_counter() - start

    def check_chat_template(self, tokenizer: Any) -> None:
        """With ``remove_system_prompt``: fails now if the template's default system turn cannot be cut out, and
        says what is left out."""
        if not self.prompt_settings.remove_system_prompt:
            return
        found = default_system_turn(tokenizer)
        if found is None:
            rank_zero_info("rollout.remove_system_prompt: the chat template inserts no system prompt, nothing to cut")
        else:
            rank_zero_info(f"rollout.remove_system_prompt: prompts leave out the template's system turn {found[1]!r}")

    # ------------------------------------------------------------------------------ services (training, evaluation)

    def prompts(
        self,
        problems: list[Problem],
        tokenizer: Any,
        reviewed: list[str] | None = None,
        remove_system_prompt: bool | None = None,
    ) -> Prompts:
        """Solve prompts, or refine prompts reviewing `reviewed[i]` for `problems[i]` (`build_prompts`); warns once
        per run when refine prompts are left-truncated to ``max_prompt_length``. `remove_system_prompt` overrides
        the rollout's setting (evaluation has its own); None keeps it."""
        settings = self.prompt_settings
        if remove_system_prompt is not None:
            settings = dataclasses.replace(settings, remove_system_prompt=remove_system_prompt)
        prompts = build_prompts(problems, tokenizer, settings, reviewed)
        if prompts.truncated and not self._warned_truncation:
            self._warned_truncation = True
            limit = self.prompt_settings.max_prompt_length
            log.warning(
                "%d of %d refine prompts are longer than rollout.max_prompt_length=%d and keep only their last %d "
                "tokens (the start of the problem is cut, as in the reference code); counted in "
                "train/refine/truncated_prompts and in the evaluation's summary line. Raise rollout.max_prompt_length "
                "to keep them whole. (Warned once per run.)",
                len(prompts.truncated),
                len(prompts.ids),
                limit,
                limit,
            )
        return prompts

    @contextmanager
    def awake(self) -> Iterator[RolloutEngine]:
        """The engine, woken up for generation and put back to sleep afterwards (frees memory for the update)."""
        self.engine.wake_up()
        try:
            yield self.engine
        finally:
            self.engine.sleep()

    def score(self, segments: dict[str, tuple[list[str], list[str], list[str]]], what: str) -> dict[str, ScoreResult]:
        """Grade named ``(prompts, completions, answers)`` lists in one pass; warns when some could not be graded."""
        if self.scorer is None:
            raise RuntimeError("RolloutCallback.score before the engine and grader were set up (ready)")
        results = self.scorer.score_named(segments)
        errors = [e for result in results.values() for e in result.errors if e is not None]
        if errors:
            total = sum(len(result.rewards) for result in results.values())
            log.warning(
                "%d of %d %s completions could not be graded (scored 0), e.g. %s", len(errors), total, what, errors[0]
            )
        return results

    # ------------------------------------------------------------------------------ one phase

    def rollout(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: PhaseBatch) -> RolloutBatch:
        """The phase's scored rollouts: its prompts sampled G times each and graded (`sample`); with dynamic
        sampling, more rounds until B informative groups are found (`choose_groups`), after which `batch.problems`
        (solve) or `batch.bases` (refine) name the groups trained. Sets ``batch.sampling``."""
        problems, bases = batch.prompt_problems, batch.bases
        first = self.sample(trainer, pl_module, batch, problems, bases)
        rounds = [groups_of(first.rollouts, first.group_size)]
        if not self.dynamic_sampling:
            batch.sampling = sampling_stats(rounds, rounds[0], dynamic=False, overlong=self.overlong_buffer is not None)
            return first
        want, data, world = len(problems), thinktwice_data(trainer, "RolloutCallback"), trainer.world_size
        used_problems, used_bases = list(problems), list(bases or [])
        timing = [first]
        while sum(map(informative_count, rounds)) < want and (
            self.max_sampling_rounds is None or len(rounds) < self.max_sampling_rounds
        ):
            if batch.phase == "solve":
                extra_bases = None
                extra = data.extra_problems(batch, len(rounds), want, used_problems)
                extra = extra[: len(extra) - len(extra) % world]  # every rank samples an equal share
                used_problems += extra
            else:
                extra_bases = data.extra_bases(batch, len(rounds), want, used_bases)
                extra_bases = extra_bases[: len(extra_bases) - len(extra_bases) % world]
                by_id = {p.id: p for p in batch.problems}
                extra = [by_id[b.problem_id] for b in extra_bases]
                used_bases += extra_bases
            if not extra:
                break  # every problem (solve) or cached answer (refine) has been sampled
            more = self.sample(trainer, pl_module, batch, extra, extra_bases, len(rounds))
            rounds.append(groups_of(more.rollouts, more.group_size))
            timing.append(more)
        trained = choose_groups(rounds, want)
        batch.sampling = sampling_stats(rounds, trained, dynamic=True, overlong=self.overlong_buffer is not None)
        if batch.sampling.groups_filled:
            self._warn_short(batch)
        if batch.phase == "solve":
            by_id = {p.id: p for p in used_problems}
            batch.problems = [by_id[group[0].problem_id] for group in trained]
        else:  # the groups of all rounds, in order, are the G refinements of used_bases[0], used_bases[1], ...
            base_of = {id(group): base for group, base in zip(sampled_groups(rounds), used_bases, strict=True)}
            batch.bases = [base_of[id(group)] for group in trained]
        return RolloutBatch(
            [r for group in trained for r in group],
            first.group_size,
            generate_s=sum(part.generate_s for part in timing),
            score_s=sum(part.score_s for part in timing),
            reward_errors=sum(part.reward_errors for part in timing),
            truncated_prompts=sum(part.truncated_prompts for part in timing),
        )

    def _warn_short(self, batch: PhaseBatch) -> None:
        if not self._warned_short and batch.sampling is not None:
            self._warned_short = True
            log.warning(batch.sampling.short_message(batch.index, batch.phase, self.max_sampling_rounds))

    def sample(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: PhaseBatch,
        prompt_problems: list[Problem],
        bases: list[Rollout] | None,
        round_: int = 0,
    ) -> RolloutBatch:
        """One generation round of `batch`: the prompts of `prompt_problems` (reviewing `bases` in a refine phase)
        sampled G times each and graded: a scored `RolloutBatch`. Round 0 is the phase's own prompts; later rounds
        (dynamic sampling) draw their own seeds.

        With several ranks each rank samples and grades its share of the prompts (`rank_slice`), then the
        shares are gathered, so every rank holds the whole phase (the refine cache and the logged metrics
        are the same everywhere; the module trains each rank on its share).
        """
        world = trainer.world_size
        share = rank_slice(len(prompt_problems), pl_module.global_rank, world)
        problems, bases = (
            prompt_problems[share],
            bases[share] if bases is not None else None,
        )  # prompt i reviews bases[i]
        prompts = self.prompts(problems, pl_module.tokenizer, [b.completion_text for b in bases] if bases else None)
        sampling = dataclasses.replace(
            self.sampling, seed=phase_seed(self.seed, batch.index, pl_module.global_rank, round_)
        )
        start = time.perf_counter()
        try:
            with self.awake() as engine:
                groups = engine.generate(prompts.ids, self.num_generations, sampling)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryInPhase(
                f"out of memory in phase {batch.index} ({batch.phase}) while sampling {self.num_generations} "
                f"completions for each of {len(prompts.ids)} prompts (the longest {max(map(len, prompts.ids))} tokens, "
                f"up to {self.sampling.max_new_tokens} new tokens each): lower rollout.engine.init_args."
                "max_batch_sequences (HF engine) or gpu_memory_utilization / max_num_seqs (vLLM), or shorten "
                "rollout.max_completion_length"
            ) from error
        trim_host_memory()  # the generation caches leave the resident set before the update
        generate_s, start = time.perf_counter() - start, time.perf_counter()
        g = self.num_generations
        texts = [t for t in prompts.texts for _ in range(g)]  # [P*G], group-major like the completions
        completions = [c.text for group in groups for c in group]
        answers = [p.answer for p in problems for _ in range(g)]
        graded = self.score({batch.phase: (texts, completions, answers)}, batch.phase)[batch.phase]
        rollouts = [
            Rollout(
                problem_id=problem.id,
                phase=batch.phase,
                prompt_ids=prompts.ids[i],
                completion_ids=c.token_ids,
                completion_text=c.text,
                finish_reason=c.finish_reason,
                sampler_logprobs=c.logprobs,
                reward=graded.rewards[i * g + j],
                reward_error=graded.errors[i * g + j] is not None,
                length_penalty=self._length_penalty(len(c.token_ids)),
                base_text=bases[i].completion_text if bases else None,
                base_correct=bases[i].correct if bases else None,
            )
            for i, (problem, group) in enumerate(zip(problems, groups, strict=True))
            for j, c in enumerate(group)
        ]
        local = RolloutBatch(
            rollouts,
            g,
            generate_s=generate_s,
            score_s=time.perf_counter() - start,
            reward_errors=graded.num_errors,
            truncated_prompts=len(prompts.truncated),
        )
        return _gather(local) if world > 1 else local

    def _length_penalty(self, length: int) -> float:
        if self.overlong_buffer is None:
            return 0.0
        limit = self.sampling.max_new_tokens
        return overlong_penalty(length, limit, self.overlong_buffer, self.overlong_penalty_factor)


def phase_seed(seed: int, index: int, rank: int = 0, round_: int = 0) -> int:
    """A sampling seed for phase batch `index` on `rank` (generation round `round_` with dynamic sampling) that
    depends only on (seed, index, rank, round)."""
    key = f"{seed}/{index}/{rank}" if round_ == 0 else f"{seed}/{index}/{rank}/{round_}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _gather(local: RolloutBatch) -> RolloutBatch:
    """All ranks' shares in rank order (group-major over the whole problem batch); times are the slowest rank's."""
    import torch.distributed as dist

    shares: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(shares, local)
    return RolloutBatch(
        [r for share in shares for r in share.rollouts],
        local.group_size,
        generate_s=max(share.generate_s for share in shares),
        score_s=max(share.score_s for share in shares),
        reward_errors=sum(share.reward_errors for share in shares),
        truncated_prompts=sum(share.truncated_prompts for share in shares),
    )


def _show_phase(trainer: pl.Trainer, batch: PhaseBatch) -> None:
    """Put the current phase in the progress bar's description (TQDM or Rich)."""
    bar = trainer.progress_bar_callback
    description = f"Epoch {trainer.current_epoch} [{batch.phase}]"
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled and tqdm_train_bar(bar) is not None:
        bar.train_progress_bar.set_description(description)
    elif (
        isinstance(bar, RichProgressBar)
        and bar.is_enabled
        and bar.progress is not None
        and bar.train_progress_bar_id is not None
    ):
        bar.progress.update(bar.train_progress_bar_id, description=description)
