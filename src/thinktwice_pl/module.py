"""The ThinkTwice LightningModule: one GRPO update per phase batch, solve and refine alike (METHOD.md section 1).

Lightning owns the loop; the data module serves each problem batch twice (solve, then refine), and
`RolloutCallback` samples and scores the phase's completions before the step. `training_step`: group advantages,
the plan of the phase's optimizer steps (`batching`), the "old" log-probs when the phase takes several steps, the
optimizer steps, and the phase's metrics, returned to the callbacks. The flat arguments users write are read once
into typed records (`settings`). Two shortcuts, each exact: a sequence with advantage 0 and no KL term has no
gradient, so it is not forwarded (its tokens still count in the normaliser); with one optimizer step per phase and
one iteration the ratio is 1, so the detached current log-probs serve as the "old" ones.

Several ranks (DDP, FSDP2): every rank holds all of the phase's rollouts and trains its share of each optimizer
step's groups; the normaliser counts the whole step, and the loss is scaled by the world size because the
strategies average gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.utils.rnn import pad_sequence

from thinktwice_pl import parallel, policy_state
from thinktwice_pl.batching import Pass, StepPlan, collate, plan_phase
from thinktwice_pl.builtin_models import check_model_name_or_path, resolve_model_path
from thinktwice_pl.callbacks.phase_log import PhaseLogger
from thinktwice_pl.dynamic_sampling import training_reward
from thinktwice_pl.errors import OutOfMemoryInPhase, UserError, is_out_of_memory, out_of_memory_message
from thinktwice_pl.grpo import LossType, ScaleRewards, group_advantages, policy_loss, truncated_importance_weights
from thinktwice_pl.hostmem import trim_host_memory
from thinktwice_pl.logprobs import completion_logprobs, prompt_sharing_blocker
from thinktwice_pl.metrics import StepStats, phase_metrics
from thinktwice_pl.models import (
    LoraSettings,
    QuantizationSettings,
    check_supported,
    is_peft_model,
    load_causal_lm,
    load_tokenizer,
)
from thinktwice_pl.settings import BatchingSettings, LossSettings, OptimizerSettings, PolicySettings, pick
from thinktwice_pl.types import EvalBatch, PhaseBatch, Rollout, RolloutBatch


class ThinkTwiceModule(pl.LightningModule):
    """GRPO on alternating solve and refine phases (ThinkTwice), with manual optimization.

    Args:
        model_name_or_path: HF model directory or hub name, or a built-in ``thinktwice:tiny`` /
            ``thinktwice:smollm2-135m-instruct`` (built on first use under ``checkpoints/``).
        dtype: weights dtype: float32, bfloat16, float16 or auto (the checkpoint's).
        attn_implementation: transformers attention backend (eager, sdpa, flash_attention_2); None = default.
        gradient_checkpointing: recompute decoder activations in backward to save memory.
        disable_dropout: set every dropout of the policy to 0 (so the old/new ratio is exactly 1 before an update).
        lora: train LoRA adapters (peft) instead of all weights; with beta > 0 the reference is the model with
            its adapters disabled (no second copy).
        quantization: QLoRA: hold the frozen base weights in 4 bits (bitsandbytes); needs `lora`, one device.
        learning_rate: AdamW learning rate (the published runs: 1e-6).
        betas: AdamW betas.
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the gradient norm of each optimizer step to this; None = no clipping.
        lr_scheduler: constant, linear or cosine decay after `warmup_steps` (optimizer steps).
        warmup_steps: linear warm-up length in optimizer steps.
        problems_per_batch: B, problems per phase (linked from data.problems_per_batch).
        mini_batch_problems: problems per optimizer step; B / mini_batch_problems optimizer steps per
            phase. None = one optimizer step per phase.
        micro_batch_size: sequences per forward/backward inside an optimizer step (gradient
            accumulation); None = the whole mini-batch at once.
        max_tokens_per_microbatch: at most this many (padded) prompt + completion tokens per forward/backward on
            each rank, sequences packed by length (a longer one goes alone); None = no token budget.
        num_generations: G, samples per prompt in both phases (linked from rollout.num_generations).
        num_iterations: passes over each phase's rollouts (PPO epochs; the paper uses 1).
        epsilon: lower clip range, ratio >= 1 - epsilon.
        epsilon_high: upper clip range, ratio <= 1 + epsilon_high ("clip-higher"); None = epsilon.
        clip_ratio_c: dual-clip constant for negative advantages; None disables the dual clip.
        loss_type: dapo (token mean over the optimizer step), grpo (sequence mean, then mean) or
            dr_grpo (token sum / max_completion_length).
        scale_rewards: advantage scaling: none (reference code), group (std of the group) or batch.
        beta: weight of the k3 KL to the initial policy; 0 = no reference model (the paper).
        mask_truncated_completions: leave completions that hit the length limit out of the loss.
        temperature: sampling temperature; log-probs are computed on logits / temperature (linked
            from rollout.temperature).
        max_completion_length: completion token limit (linked from rollout.max_completion_length);
            the dr_grpo normaliser.
        logprob_chunk_size: positions per chunk of the LM head's log-softmax (memory knob): the fp32 logits of at
            most this many positions exist at once (256 x vocabulary x 4 bytes: 156 MB for Qwen3).
        share_prompts: run a prompt shared by a group's samples once per forward/backward and reuse its KV cache for
            their completions: the same log-probs and gradients for fewer tokens; the prompt counts once in
            `max_tokens_per_microbatch`. Not used under FSDP or with sliding-window attention.
        log_completions: sample completions written to the loggers per phase (0 = none).
        importance_sampling_cap: truncated importance-sampling correction for the sampler/trainer
            mismatch (Yao et al., 2025): each token's policy-gradient loss is weighted by
            min(pi_old / pi_sampler, cap). None = off. Needs an engine that reports log-probs (vLLM).
    """

    def __init__(
        self,
        model_name_or_path: str = "thinktwice:tiny",
        dtype: str = "float32",
        attn_implementation: str | None = None,
        gradient_checkpointing: bool = False,
        disable_dropout: bool = True,
        lora: LoraSettings | None = None,
        quantization: QuantizationSettings | None = None,
        learning_rate: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
        lr_scheduler: Literal["constant", "linear", "cosine"] = "constant",
        warmup_steps: int = 0,
        problems_per_batch: int = 32,
        mini_batch_problems: int | None = 8,
        micro_batch_size: int | None = None,
        max_tokens_per_microbatch: int | None = None,
        num_generations: int = 8,
        num_iterations: int = 1,
        epsilon: float = 0.2,
        epsilon_high: float | None = 0.28,
        clip_ratio_c: float | None = 3.0,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "none",
        beta: float = 0.0,
        mask_truncated_completions: bool = False,
        temperature: float = 1.0,
        max_completion_length: int = 3000,
        logprob_chunk_size: int = 256,
        share_prompts: bool = True,
        log_completions: int = 2,
        importance_sampling_cap: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(lora, dict):  # hyper-parameters read back from a checkpoint
            lora = LoraSettings(**lora)
        if isinstance(quantization, dict):
            quantization = QuantizationSettings(**quantization)
        check_model_name_or_path(model_name_or_path)  # before any run folder is made, and before transformers
        self.save_hyperparameters()
        flat = {**self.hparams, "lora": lora, "quantization": quantization}
        self.policy_settings = pick(PolicySettings, flat)
        self.optim = pick(OptimizerSettings, flat)
        self.batching = pick(BatchingSettings, flat)
        self.loss = pick(LossSettings, flat)
        self.log_completions = log_completions
        # plain python in checkpoints: torch.load(weights_only=True), Lightning's default on resume, refuses classes
        self.hparams["lora"] = dataclasses.asdict(lora) if lora is not None else None
        self.hparams["quantization"] = dataclasses.asdict(quantization) if quantization is not None else None
        self.automatic_optimization = False
        self.policy: Any = None
        self.ref_policy: Any = None
        self.tokenizer: Any = None
        self._rows_in_pass: list[int] = []

    @property
    def lora(self) -> LoraSettings | None:
        return self.policy_settings.lora

    # ----------------------------------------------------------------------------------- set-up

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        settings = self.policy_settings
        path = resolve_model_path(settings.model_name_or_path)
        try:
            self.tokenizer = load_tokenizer(path)
            self.policy = load_causal_lm(path, **settings.loader_options())
        except OSError as error:  # transformers: a hub name it cannot fetch, a directory without weights
            name = settings.model_name_or_path
            raise UserError(f"model.model_name_or_path={name} could not be loaded: {error}") from error
        check_supported(self.policy, path)
        if self.loss.beta > 0 and self.lora is None:  # frozen initial policy, rebuilt from the path (not checkpointed)
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        if self.device_mesh is not None:  # set by ModelParallelStrategy: FSDP2
            precision = str(self.trainer.precision)
            for model in (m for m in (self.policy, self.ref_policy) if m is not None):
                parallel.shard(model, self.trainer.strategy, self.device_mesh, precision, **self._adapters())

    def _adapters(self) -> dict[str, bool]:
        return {"lora": self.lora is not None, "quantized": self.policy_settings.quantization is not None}

    def configure_callbacks(self) -> list[Callback]:
        """The per-phase logger rows, sample completions and warnings (after the trainer's own callbacks, so after
        the rollout callback's weight sync)."""
        return [PhaseLogger(log_completions=self.log_completions)]

    def setup(self, stage: str) -> None:
        parallel.check_precision(str(self.trainer.precision))
        parallel.check_strategy(self.trainer.strategy, **self._adapters())
        batching = self.batching
        parallel.check_divisible(batching.problems_per_batch, batching.step_problems, self.trainer.world_size)

    def configure_optimizers(self) -> Any:
        optim = self.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        precision = str(self.trainer.precision)
        parallel.check_update_resolution(self.policy, optim.learning_rate, precision, self.policy_settings.dtype)
        optimizer = torch.optim.AdamW(
            params,
            lr=optim.learning_rate,
            betas=optim.betas,
            weight_decay=optim.weight_decay,
            fused=parallel.fused_adamw(params),
        )
        if optim.lr_scheduler == "constant" and optim.warmup_steps == 0:
            return optimizer
        total = self.trainer.max_steps
        if optim.lr_scheduler != "constant" and (total is None or total < 1):
            raise UserError(f"model.lr_scheduler={optim.lr_scheduler} needs trainer.max_steps (optimizer steps)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: optim.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint or self.lora is not None:
            saved = checkpoint.get("state_dict", {})
            sharded = self.device_mesh is not None
            checkpoint["state_dict"] = policy_state.weights_to_save(
                saved, self.policy, lora=self.lora is not None, sharded=sharded
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:
            return
        ours = policy_state.trained_weights(self.policy, self.state_dict, lora=self.lora is not None)
        policy_state.check_weights_fit(ours, checkpoint, dict(self.hparams))  # names both models when they differ
        if self.lora is not None:
            checkpoint["state_dict"] = policy_state.load_adapters(self.policy, checkpoint["state_dict"])
        if self.ref_policy is not None:
            checkpoint["state_dict"].update(policy_state.reference_weights(self.ref_policy))

    # ----------------------------------------------------------------------------------- training

    def training_step(self, batch: PhaseBatch, batch_idx: int) -> dict[str, float]:
        """One phase, solve or refine (METHOD.md section 1): group advantages, the phase's optimizer steps, and its
        metrics, which reach the callbacks as ``outputs``."""
        loss, batching = self.loss, self.batching
        start = time.perf_counter()
        rollouts = _rollouts_of(batch)
        rewards = torch.tensor([training_reward(r) for r in rollouts.rollouts], dtype=torch.float32)  # [N]
        advantages = group_advantages(rewards, rollouts.group_size, loss.scale_rewards)  # [N]
        in_loss = [not (loss.mask_truncated_completions and r.truncated) for r in rollouts.rollouts]
        # a sequence with advantage 0 has no gradient without a KL term: it counts in the normaliser, unforwarded
        forwarded = [keep and (loss.beta > 0 or a != 0) for keep, a in zip(in_loss, advantages.tolist(), strict=True)]
        plan = plan_phase(
            [(len(r.prompt_ids), len(r.completion_ids)) for r in rollouts.rollouts],
            rollouts.group_size,
            in_loss,
            forwarded,
            mini_batch_groups=batching.mini_batch_problems,
            micro_batch_size=batching.micro_batch_size,
            max_tokens=batching.max_tokens_per_microbatch,
            num_iterations=batching.num_iterations,
            rank=self.global_rank,
            world_size=self.trainer.world_size,
            share_prompts=batching.share_prompts and prompt_sharing_blocker(self.policy) is None,
        )
        stats, scheduler = StepStats(), self.lr_schedulers()
        try:
            old = self._old_logprobs(rollouts.rollouts, plan.old_passes) if plan.needs_old else {}
            for _ in range(batching.num_iterations):
                for step in plan.steps:
                    stats += self._optimizer_step(rollouts.rollouts, step, advantages, old)
                    if scheduler is not None:
                        scheduler.step()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            self.optimizers().zero_grad(set_to_none=True)  # free what can be freed for the crash checkpoint
            raise OutOfMemoryInPhase(self._out_of_memory_message(batch, rollouts.rollouts)) from error
        self.optimizers().zero_grad(set_to_none=True)  # gradients are not needed until the next phase
        trim_host_memory()  # nor their pages: a validation or the next generation starts from the weights and AdamW
        stats = stats.reduced(lambda t, op: self.trainer.strategy.reduce(t, reduce_op=op), self.trainer.world_size)
        return phase_metrics(
            batch.phase,
            rollouts,
            stats,
            trained=len(plan.trained),
            train_s=time.perf_counter() - start,
            importance_sampling=loss.importance_sampling_cap is not None,
        )

    def _optimizer_step(
        self, rollouts: list[Rollout], step: StepPlan, advantages: torch.Tensor, old: dict[int, torch.Tensor]
    ) -> StepStats:
        """One optimizer step: this rank's passes, gradient clipping, AdamW. A NaN or infinite gradient norm skips
        the update (no parameter or AdamW state changes) and counts it; the step still counts for Lightning."""
        opt, world = self.optimizers(), self.trainer.world_size
        opt.zero_grad(set_to_none=False)  # zero tensors, not None: AdamW steps every parameter, as the reference
        stats = StepStats()
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)  # DDP: no_sync()
        for n, work in enumerate(step.passes):
            logprobs, entropy, mask = self._logprobs(rollouts, work.rows, grad=True)  # [n, C] each
            old_lp = _stack([old[i] for i in work.rows], mask) if old and work.weight else logprobs.detach()
            ref = self._ref_logprobs(rollouts, work.rows) if self.loss.beta > 0 else None
            is_weights, sampler = self._sampler_mismatch(rollouts, work.rows, old_lp, mask)
            loss, loss_stats = policy_loss(
                logprobs,
                old_lp,
                advantages[work.rows].to(logprobs.device),
                mask,
                ref_logprobs=ref,
                num_tokens=step.num_tokens,
                num_sequences=step.num_sequences,
                is_weights=is_weights,
                **self.loss.policy_loss_kwargs(),
            )
            # the strategies average gradients over ranks; the normaliser already counts all ranks' tokens. DDP
            # all-reduces once, in the step's last backward (the earlier ones accumulate locally)
            with block_sync() if n < len(step.passes) - 1 else nullcontext():
                self.manual_backward(loss * (world * work.weight))
            trim_host_memory()  # the pass's freed activations: the next pass's peak starts from the gradients
            if work.weight:  # a padding pass runs the collectives only
                entropy_sum = float((entropy * mask).sum())
                sums = {k: float(v) for k, v in loss_stats.items()}
                stats += dataclasses.replace(sampler, loss=float(loss.detach()), entropy=entropy_sum, **sums)
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):  # the norm of the reduced (DDP) or sharded (FSDP2) gradient: same on all ranks
            opt.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient: no moment, no weight decay
            opt.step()  # still an optimizer step for Lightning (trainer.global_step): phases and steps stay aligned
            return StepStats(skipped_steps=1.0)
        for p in self.policy.parameters():  # a step whose sequences all had advantage 0 still moves AdamW's state
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        return dataclasses.replace(stats, grad_norm=grad_norm, steps=1.0)

    def _sampler_mismatch(
        self, rollouts: list[Rollout], rows: list[int], old: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, StepStats]:
        """The engine's log-probs against the trainer's "old" ones (same weights, other numerics): the gap's
        statistics, and the truncated importance weights ``[n, C]`` when the correction is on."""
        cap = self.loss.importance_sampling_cap
        if any(rollouts[i].sampler_logprobs is None for i in rows):
            if cap is not None:
                raise UserError(
                    "model.importance_sampling_cap is set but the rollout engine reported no sampler log-probs "
                    "(HFRolloutEngine samples from the policy itself): use the vLLM engine or unset the cap"
                )
            return None, StepStats()
        sampler = _stack([torch.tensor(rollouts[i].sampler_logprobs, dtype=torch.float32) for i in rows], mask)
        gap = (old.float() - sampler.to(old.device)) * mask  # [n, C]: log(pi_old / pi_sampler) per token
        stats = StepStats(
            sampler_diff=float(gap.abs().sum()),
            sampler_diff_max=float(gap.abs().max()),
            sampler_tokens=float(mask.sum()),
        )
        if cap is None:
            return None, stats
        weights, stats.is_capped = truncated_importance_weights(gap, mask, cap)
        return weights, stats

    def _clip_gradients(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.optim.max_grad_norm if self.optim.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
        return float(norm)

    def _out_of_memory_message(self, batch: PhaseBatch, rollouts: list[Rollout]) -> str:
        """What ran out of memory (the phase, the pass's sequences, the longest one) and the settings that help."""
        rows = self._rows_in_pass or list(range(len(rollouts)))
        sizes = [(len(rollouts[i].prompt_ids), len(rollouts[i].completion_ids)) for i in rows]
        where = f"phase {batch.index} ({batch.phase})"
        return out_of_memory_message(where, sizes, len(rollouts), self.trainer.world_size, dict(self.hparams))

    def _logprobs(
        self, rollouts: list[Rollout], rows: list[int], *, grad: bool, model: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log-probs, entropies, completion mask)`` of the completions of `rows`, each ``[n, C]``."""
        self._rows_in_pass = rows  # named by the error when this pass runs out of memory
        prompts = [rollouts[i].prompt_ids for i in rows]
        completions = [rollouts[i].completion_ids for i in rows]
        batch = collate(prompts, completions, self.tokenizer.pad_token_id or 0)
        logprobs, entropy = completion_logprobs(
            model if model is not None else self.policy,
            batch,
            temperature=self.loss.temperature,
            chunk_size=self.batching.logprob_chunk_size,
            with_grad=grad,
            share_prompts=self.batching.share_prompts,
        )
        return logprobs, entropy, batch.completion_mask.to(logprobs.device, logprobs.dtype)

    @torch.no_grad()
    def _old_logprobs(self, rollouts: list[Rollout], passes: list[Pass]) -> dict[int, torch.Tensor]:
        """Log-probs of this rank's share under the policy before the phase's first update, by rollout."""
        out: dict[int, torch.Tensor] = {}
        for work in passes:
            logprobs, _, _ = self._logprobs(rollouts, work.rows, grad=False)
            for row, i in enumerate(work.rows if work.weight else []):
                out[i] = logprobs[row, : len(rollouts[i].completion_ids)].cpu()
        return out

    @torch.no_grad()
    def _ref_logprobs(self, rollouts: list[Rollout], rows: list[int]) -> torch.Tensor:
        with self._reference_model() as ref:
            logprobs, _, _ = self._logprobs(rollouts, rows, grad=False, model=ref)
        return logprobs

    @contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.ref_policy is not None:
            yield self.ref_policy
        elif is_peft_model(self.policy):  # the reference is the base with the adapters off
            with self.policy.disable_adapter():
                yield self.policy
        else:
            raise RuntimeError("beta > 0 but no reference model was built")

    # ----------------------------------------------------------------------------------- evaluation

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        """Nothing to compute here: the Evaluation callback generates and grades each batch before this step
        (through the rollout engine) and logs pass@k at the end; this only checks that it ran."""
        _require_evaluated(batch)

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        """See `validation_step`."""
        _require_evaluated(batch)


def _rollouts_of(batch: PhaseBatch) -> RolloutBatch:
    if batch.rollouts is None:
        raise RuntimeError(
            f"{batch.phase} batch {batch.index} arrived without rollouts: the RolloutCallback is missing "
            "(use the thinktwice CLI, or add thinktwice_pl.callbacks.RolloutCallback to trainer.callbacks)"
        )
    return batch.rollouts


def _stack(rows: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence values ``[len_i]`` as one right-padded ``[n, C]`` tensor on the mask's device."""
    stacked = pad_sequence(rows, batch_first=True)
    return torch.nn.functional.pad(stacked, (0, mask.shape[1] - stacked.shape[1])).to(mask.device)


def _require_evaluated(batch: EvalBatch) -> None:
    if not getattr(batch, "evaluated", False):
        raise RuntimeError(
            f"evaluation batch {getattr(batch, 'index', '?')} was not evaluated: the Evaluation callback is missing "
            "(use the thinktwice CLI, or add thinktwice_pl.callbacks.Evaluation to trainer.callbacks)"
        )
