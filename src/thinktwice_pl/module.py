"""The ThinkTwice LightningModule: one GRPO update per phase batch, solve and refine alike.

Lightning owns the loop. The data module serves each problem batch twice (solve, then refine);
`RolloutCallback` samples and scores the phase's completions before the step. `training_step`
then reads top to bottom: advantages, old log-probs (only when the phase takes several optimizer
steps), the mini-batch loop of optimizer steps, logging. The two phases share this code, the
optimizer state and the learning rate (METHOD.md section 1).

Deliberate shortcuts, each exact for the math:
- sequences with advantage exactly 0 give no gradient when ``beta == 0``: they are not forwarded,
  but their tokens still count in the loss normaliser;
- with one mini-batch and one iteration the ratio is 1, so the detached current log-probs serve
  as "old" log-probs and no extra forward pass is made.

Several ranks (DDP, FSDP2): every rank holds all of the phase's rollouts (the rollout callback gathers
them) and trains its share of each optimizer step's groups; the loss normaliser counts the whole step
on all ranks, and the loss is scaled by the world size because the strategies average gradients.
Ranks run the same number of forward/backward passes (padded with zero-weight micro-batches), since
sharded parameters are gathered collectively in every pass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from thinktwice_pl.data import rank_slice
from thinktwice_pl.grpo import LossType, ScaleRewards, group_advantages, policy_loss, token_logprobs
from thinktwice_pl.models import (
    LoraSettings,
    QuantizationSettings,
    check_update_resolution,
    load_causal_lm,
    load_tokenizer,
    resolve_model_path,
    shard_fsdp2,
)
from thinktwice_pl.types import EvalBatch, PhaseBatch, Rollout

log = logging.getLogger(__name__)
WARN_EVERY_PHASES = 20
# sums over one optimizer step's micro-batches: policy_loss's stats plus the loss and the entropy
# (sampler_*: log-prob gap to the rollout engine, over tokens whose sequences the engine reported log-probs for)
STEP_STATS = (
    "loss", "clip_low", "clip_high", "clip_dual", "kl", "tokens", "entropy",
    "sampler_diff", "sampler_diff_max", "sampler_tokens", "is_capped",
)  # fmt: skip


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
        max_tokens_per_microbatch: at most this many (padded) prompt + completion tokens per forward/backward
            on each rank; sequences are packed by length. None = no token budget. A longer single sequence
            goes alone. The loss normaliser covers the whole optimizer step either way.
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
        logprob_chunk_size: positions per chunk when computing token log-probs (memory knob).
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
        logprob_chunk_size: int = 1024,
        log_completions: int = 2,
        importance_sampling_cap: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(lora, dict):  # hyper-parameters read back from a checkpoint
            lora = LoraSettings(**lora)
        if isinstance(quantization, dict):
            quantization = QuantizationSettings(**quantization)
        if quantization is not None and lora is None:
            raise ValueError("model.quantization (QLoRA) needs model.lora: 4-bit base weights are not trained directly")
        self.lora, self.quantization = lora, quantization
        self.save_hyperparameters()
        # plain python in checkpoints: torch.load(weights_only=True), Lightning's default on resume, refuses classes
        self.hparams["lora"] = dataclasses.asdict(lora) if lora is not None else None
        self.hparams["quantization"] = dataclasses.asdict(quantization) if quantization is not None else None
        mini = mini_batch_problems or problems_per_batch
        if problems_per_batch % mini:
            raise ValueError(
                f"data.problems_per_batch={problems_per_batch} is not divisible by "
                f"model.mini_batch_problems={mini_batch_problems}: each optimizer step takes whole problems"
            )
        if num_generations < 2:
            raise ValueError(f"rollout.num_generations={num_generations}: GRPO needs at least 2 samples per group")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"model.micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        if max_tokens_per_microbatch is not None and max_tokens_per_microbatch < 1:
            raise ValueError(f"model.max_tokens_per_microbatch must be >= 1 or None, got {max_tokens_per_microbatch}")
        if num_iterations < 1:
            raise ValueError(f"model.num_iterations must be >= 1, got {num_iterations}")
        if importance_sampling_cap is not None and importance_sampling_cap <= 0:
            raise ValueError(f"model.importance_sampling_cap must be > 0 or None, got {importance_sampling_cap}")
        if temperature <= 0:
            raise ValueError(f"rollout.temperature={temperature}: training needs sampling (temperature > 0)")
        self.automatic_optimization = False
        self.policy: Any = None
        self.ref_policy: Any = None
        self.tokenizer: Any = None
        self._warned_at: dict[str, int] = {}

    # ----------------------------------------------------------------------------------- set-up

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        hp = self.hparams
        path = resolve_model_path(hp.model_name_or_path)
        self.tokenizer = load_tokenizer(path)
        self.policy = load_causal_lm(
            path,
            dtype=hp.dtype,
            attn_implementation=hp.attn_implementation,
            gradient_checkpointing=hp.gradient_checkpointing,
            disable_dropout=hp.disable_dropout,
            lora=self.lora,
            quantization=self.quantization,
        )
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(self.policy.config, name, None) not in (None, 1.0):
                raise NotImplementedError(f"{path}: models with config.{name} are not supported by the chunked head")
        if hp.beta > 0 and self.lora is None:  # frozen initial policy; kept out of checkpoints (rebuilt from the path)
            self.ref_policy = copy.deepcopy(self.policy).eval().requires_grad_(False)
        mesh = self.device_mesh  # set by ModelParallelStrategy: FSDP2
        if mesh is not None:
            check_strategy(self.trainer.strategy, lora=self.lora is not None, quantized=self.quantization is not None)
            if mesh["tensor_parallel"].size() > 1:
                raise ValueError(
                    f"ModelParallelStrategy tensor_parallel_size={mesh['tensor_parallel'].size()}: only data-parallel "
                    "FSDP2 is supported; set trainer.strategy.init_args.tensor_parallel_size=1 and data_parallel_size "
                    "to the number of devices"
                )
            mp_policy = _fsdp2_mixed_precision(str(self.trainer.precision))
            for model in (self.policy, self.ref_policy):
                if model is not None:
                    shard_fsdp2(model, mesh["data_parallel"], mp_policy=mp_policy)

    def setup(self, stage: str) -> None:
        check_precision(str(self.trainer.precision))
        check_strategy(self.trainer.strategy, lora=self.lora is not None, quantized=self.quantization is not None)
        world = self.trainer.world_size
        mini = self.hparams.mini_batch_problems or self.hparams.problems_per_batch
        for flag, value in (("data.problems_per_batch", self.hparams.problems_per_batch),
                            ("model.mini_batch_problems", mini)):  # fmt: skip
            if value % world:
                raise ValueError(
                    f"{flag}={value} is not divisible by the {world} ranks (trainer.devices x trainer.num_nodes): "
                    "each rank takes an equal share of the problems of every optimizer step"
                )

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        check_update_resolution(self.policy, hp.learning_rate, str(self.trainer.precision), hp.dtype)
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, betas=hp.betas, weight_decay=hp.weight_decay)
        if hp.lr_scheduler == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = self.trainer.max_steps
        if hp.lr_scheduler != "constant" and (total is None or total < 1):
            raise ValueError(f"model.lr_scheduler={hp.lr_scheduler} needs trainer.max_steps (optimizer steps)")

        def factor(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            if hp.lr_scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return 1.0 - progress if hp.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        # FSDP2 saves (and loads) its shards of every key of the module, the reference's included
        for key in [k for k in state if k.startswith("ref_policy.") and self.device_mesh is None]:
            del state[key]
        if self.lora is not None:  # only the adapters: the frozen base comes from the model path again
            trainable = {f"policy.{name}" for name, p in self.policy.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trainable]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ref_policy is not None and "state_dict" in checkpoint:  # the initial policy: from the model path
            for key, value in self.ref_policy.state_dict().items():
                checkpoint["state_dict"][f"ref_policy.{key}"] = value
        if self.lora is not None:  # adapter-only checkpoint: the frozen base weights as loaded
            for key, value in self.policy.state_dict().items():
                checkpoint["state_dict"].setdefault(f"policy.{key}", value)

    # ----------------------------------------------------------------------------------- training

    def training_step(self, batch: PhaseBatch, batch_idx: int) -> None:
        if batch.rollouts is None:
            raise RuntimeError(
                f"{batch.phase} batch {batch.index} arrived without rollouts: the RolloutCallback is missing "
                "(use the thinktwice CLI, or add thinktwice_pl.callbacks.RolloutCallback to trainer.callbacks)"
            )
        hp = self.hparams
        rollouts = batch.rollouts.rollouts
        group_size = batch.rollouts.group_size
        t0 = time.perf_counter()
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)  # [N]
        advantages = group_advantages(rewards, group_size, hp.scale_rewards)  # [N]
        in_loss = torch.tensor(  # [N] sequences whose tokens enter the loss and its normaliser
            [not (hp.mask_truncated_completions and r.truncated) for r in rollouts], dtype=torch.bool
        )
        num_groups = len(rollouts) // group_size
        mini_groups = min(num_groups, hp.mini_batch_problems or num_groups)
        minis = [
            list(range(g * group_size, min(num_groups, g + mini_groups) * group_size))
            for g in range(0, num_groups, mini_groups)
        ]  # rollout indices of each optimizer step
        # rollouts that need a forward pass: nonzero advantage (or any, with a KL term), inside the loss
        trained = [i for i in range(len(rollouts)) if in_loss[i] and (hp.beta > 0 or advantages[i] != 0)]
        needs_old = len(minis) > 1 or hp.num_iterations > 1
        trained_set = set(trained)
        shares = [  # what each rank trains on, over the whole phase
            [i for mini in minis for i in self._share(mini, group_size, rank) if i in trained_set]
            for rank in range(self.trainer.world_size)
        ]
        old_logprobs = self._old_logprobs(rollouts, shares) if needs_old else {}

        opt = self.optimizers()
        sched = self.lr_schedulers()
        # grad_norm, steps (applied) and skipped_steps are the same on every rank: not reduced below
        totals = dict.fromkeys((*STEP_STATS, "grad_norm", "steps", "skipped_steps"), 0.0)
        for _ in range(hp.num_iterations):
            for mini in minis:
                stats = self._optimizer_step(
                    opt, rollouts, mini, group_size, advantages, in_loss, set(trained), old_logprobs
                )
                if sched is not None:
                    sched.step()
                if stats is None:  # non-finite gradient: no update, and its statistics are left out
                    totals["skipped_steps"] += 1
                    self._warn_skipped_step(batch)
                    continue
                for key, value in stats.items():
                    totals[key] = max(totals[key], value) if key.endswith("_max") else totals[key] + value
                totals["steps"] += 1
        opt.zero_grad(set_to_none=True)  # gradients are not needed until the next phase: free them for generation
        totals["trained_sequences"] = float(len(trained))
        if self.trainer.world_size > 1:  # each rank summed the statistics of its own share: add them up
            keys = [k for k in STEP_STATS if not k.endswith("_max")]
            summed = self.trainer.strategy.reduce(torch.tensor([totals[k] for k in keys], dtype=torch.float64),
                                                  reduce_op="sum")  # fmt: skip
            totals.update(zip(keys, summed.tolist(), strict=True))
            for key in (k for k in STEP_STATS if k.endswith("_max")):  # maxima: the largest over the ranks
                totals[key] = float(self.trainer.strategy.reduce(torch.tensor(totals[key]), reduce_op="max"))
        train_s = time.perf_counter() - t0
        self._log_phase(batch, totals, train_s)

    def _optimizer_step(
        self,
        opt: Any,
        rollouts: list[Rollout],
        mini: list[int],
        group_size: int,
        advantages: torch.Tensor,
        in_loss: torch.Tensor,
        trained: set[int],
        old_logprobs: dict[int, torch.Tensor],
    ) -> dict[str, float] | None:
        """One optimizer step over this rank's share of the rollouts `mini` (indices), in micro-batches.

        Returns the stats summed over this rank's micro-batches, or None when the step was skipped because the
        gradient norm was NaN or infinite (no parameter or AdamW state changes; gradients dropped).
        """
        hp = self.hparams
        world = self.trainer.world_size
        # normalisers of the whole optimizer step, fixed before any micro-batch (dapo: token count)
        num_tokens = float(sum(len(rollouts[i].completion_ids) for i in mini if in_loss[i]))
        num_sequences = float(sum(1 for i in mini if in_loss[i]))
        # zero_grad keeps zero tensors (not None) so AdamW steps every parameter, as the reference does
        opt.zero_grad(set_to_none=False)
        stats = dict.fromkeys(STEP_STATS, 0.0)
        plans = [  # micro-batches of every rank, so each rank knows how many passes the others run
            list(self._micro_batches([i for i in self._share(mini, group_size, rank) if i in trained], rollouts))
            for rank in range(world)
        ]
        passes = list(_padded_plan(plans, self.global_rank, filler=mini[:1]))
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)  # DDP: no_sync()
        for n, (micro, weight) in enumerate(passes):
            logprobs, entropy, mask = self._forward_logprobs(rollouts, micro, with_grad=True)  # [n, T] each
            old = (
                torch.stack([_pad_to(old_logprobs[i], mask.shape[1]) for i in micro]).to(logprobs.device)
                if old_logprobs and weight
                else logprobs.detach()
            )
            ref = self._ref_logprobs(rollouts, micro) if hp.beta > 0 else None
            # (a padding pass's statistics go to a scratch dict)
            is_weights = self._sampler_mismatch(rollouts, micro, old, mask, stats if weight else dict(stats))
            loss, loss_stats = policy_loss(
                logprobs, old, advantages[micro].to(logprobs.device), mask,
                epsilon_low=hp.epsilon, epsilon_high=hp.epsilon_high if hp.epsilon_high is not None else hp.epsilon,
                clip_ratio_c=hp.clip_ratio_c, loss_type=hp.loss_type, max_completion_length=hp.max_completion_length,
                ref_logprobs=ref, beta=hp.beta, num_tokens=num_tokens, num_sequences=num_sequences,
                is_weights=is_weights,
            )  # fmt: skip
            # the strategies average gradients over ranks; the normaliser already counts all ranks' tokens. DDP
            # all-reduces once, in the step's last backward (the earlier ones accumulate locally)
            with block_sync() if n < len(passes) - 1 else nullcontext():
                self.manual_backward(loss * (world * weight))
            if not weight:  # a padding pass: same collectives as the other ranks, no gradient, no statistics
                continue
            stats["loss"] += float(loss.detach())
            stats["entropy"] += float((entropy * mask).sum())
            for key, value in loss_stats.items():
                stats[key] += float(value)
        grad_norm = self._clip_gradients()
        if not math.isfinite(grad_norm):  # the norm of the reduced (DDP) or sharded (FSDP2) gradient: same on all ranks
            opt.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient: no moment, no weight decay
            opt.step()  # still an optimizer step for Lightning (trainer.global_step), so phases and steps stay aligned
            return None
        for p in self.policy.parameters():  # a step whose sequences all had advantage 0 still moves AdamW's state
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        opt.step()
        stats["grad_norm"] = grad_norm
        return stats

    def _sampler_mismatch(
        self, rollouts: list[Rollout], micro: list[int], old: torch.Tensor, mask: torch.Tensor, stats: dict[str, float]
    ) -> torch.Tensor | None:
        """Compare the engine's log-probs with the trainer's "old" ones (same weights, other numerics): add
        the gap to `stats`; return the truncated importance weights ``[n, C]`` when the correction is on."""
        cap = self.hparams.importance_sampling_cap
        if any(rollouts[i].sampler_logprobs is None for i in micro):
            if cap is not None:
                raise ValueError(
                    "model.importance_sampling_cap is set but the rollout engine reported no sampler log-probs "
                    "(HFRolloutEngine samples from the policy itself): use the vLLM engine or unset the cap"
                )
            return None
        sampler = torch.stack(
            [_pad_to(torch.tensor(rollouts[i].sampler_logprobs, dtype=torch.float32), mask.shape[1]) for i in micro]
        ).to(old.device)  # [n, C]
        gap = (old.float() - sampler) * mask  # [n, C], log(pi_old / pi_sampler) per token
        stats["sampler_diff"] += float(gap.abs().sum())
        stats["sampler_diff_max"] = max(stats["sampler_diff_max"], float(gap.abs().max()))
        stats["sampler_tokens"] += float(mask.sum())
        if cap is None:
            return None
        ratio = torch.exp(gap.clamp(max=math.log(cap) + 1.0))  # [n, C]; anything past log(cap) is capped anyway
        stats["is_capped"] += float(((ratio > cap).float() * mask).sum())
        return ratio.clamp(max=cap)

    def _clip_gradients(self) -> float:
        params = [p for p in self.policy.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.hparams.max_grad_norm if self.hparams.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
        return float(norm)

    def _share(self, indices: list[int], group_size: int, rank: int | None = None) -> list[int]:
        """The part of `indices` (whole groups) that `rank` (default: this one) trains on."""
        groups = len(indices) // group_size
        part = rank_slice(groups, self.global_rank if rank is None else rank, self.trainer.world_size)
        return indices[part.start * group_size : part.stop * group_size]

    def _micro_batches(self, indices: list[int], rollouts: list[Rollout]) -> Iterator[list[int]]:
        """Split `indices` into micro-batches of similar length, so little padding is computed.

        A micro-batch holds at most `micro_batch_size` sequences and, with `max_tokens_per_microbatch`, at most
        that many padded tokens (rows x longest prompt + rows x longest completion); a single sequence over the
        budget goes alone.
        """
        size = self.hparams.micro_batch_size or max(1, len(indices))
        budget = self.hparams.max_tokens_per_microbatch
        ordered = sorted(indices, key=lambda i: len(rollouts[i].prompt_ids) + len(rollouts[i].completion_ids))
        micro: list[int] = []
        prompt_width = completion_width = 0
        for i in ordered:
            p = max(prompt_width, len(rollouts[i].prompt_ids))
            c = max(completion_width, len(rollouts[i].completion_ids))
            if micro and (len(micro) >= size or (budget is not None and (len(micro) + 1) * (p + c) > budget)):
                yield micro
                micro, p, c = [], len(rollouts[i].prompt_ids), len(rollouts[i].completion_ids)
            micro.append(i)
            prompt_width, completion_width = p, c
        if micro:
            yield micro

    @torch.no_grad()
    def _old_logprobs(self, rollouts: list[Rollout], shares: list[list[int]]) -> dict[int, torch.Tensor]:
        """Log-probs of this rank's share (`shares[rank]`) under the policy before the phase's first update."""
        out: dict[int, torch.Tensor] = {}
        plans = [list(self._micro_batches(share, rollouts)) for share in shares]
        for micro, weight in _padded_plan(plans, self.global_rank, filler=[0]):
            logprobs, _, _ = self._forward_logprobs(rollouts, micro, with_grad=False)
            if not weight:
                continue
            for row, i in enumerate(micro):
                out[i] = logprobs[row, : len(rollouts[i].completion_ids)].cpu()
        return out

    @torch.no_grad()
    def _ref_logprobs(self, rollouts: list[Rollout], micro: list[int]) -> torch.Tensor:
        with self._reference_model() as ref:
            logprobs, _, _ = self._forward_logprobs(rollouts, micro, with_grad=False, model=ref)
        return logprobs

    @contextmanager
    def _reference_model(self) -> Iterator[Any]:
        if self.ref_policy is not None:
            yield self.ref_policy
        elif hasattr(self.policy, "disable_adapter"):  # peft: the reference is the base with adapters off
            with self.policy.disable_adapter():
                yield self.policy
        else:
            raise RuntimeError("beta > 0 but no reference model was built")

    def _forward_logprobs(
        self, rollouts: list[Rollout], micro: list[int], *, with_grad: bool, model: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token log-probs of each completion in `micro`: ``(logprobs [n, C], entropy [n, C], mask [n, C])``.

        Prompts are left-padded and completions right-padded, so completion token t of every row sits
        at position P + t; only the completion positions go through the LM head. The forward enters through
        the model itself, with an empty `logits_to_keep` (under FSDP2 the root unit's forward gathers the
        embeddings and the head, which stay gathered until backward); a hook takes the decoder's last hidden
        state and the head is applied to it in chunks (`token_logprobs`).
        """
        model = model if model is not None else self.policy
        pad_id = self.tokenizer.pad_token_id or 0
        prompt_width = max(len(rollouts[i].prompt_ids) for i in micro)
        width = max(len(rollouts[i].completion_ids) for i in micro)
        n = len(micro)
        input_ids = torch.full((n, prompt_width + width), pad_id, dtype=torch.long)  # [n, P + C]
        attention = torch.zeros((n, prompt_width + width), dtype=torch.long)  # [n, P + C]
        for row, i in enumerate(micro):
            p, c = rollouts[i].prompt_ids, rollouts[i].completion_ids
            input_ids[row, prompt_width - len(p) : prompt_width] = torch.tensor(p)
            input_ids[row, prompt_width : prompt_width + len(c)] = torch.tensor(c)
            attention[row, prompt_width - len(p) : prompt_width + len(c)] = 1
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)  # [n, P + C], left padding does not shift positions
        device = self.device
        input_ids, attention, position_ids = input_ids.to(device), attention.to(device), position_ids.to(device)
        decoder, head = _decoder_and_head(model)
        captured: list[torch.Tensor] = []
        hook = decoder.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
        with nullcontext() if with_grad else torch.no_grad():
            try:
                model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, use_cache=False,
                      logits_to_keep=torch.zeros(0, dtype=torch.long, device=device))  # fmt: skip
            finally:
                hook.remove()
            hidden = captured[-1][:, prompt_width - 1 : prompt_width + width - 1]  # [n, C, H]: t predicts t + 1
            targets = input_ids[:, prompt_width:]  # [n, C]
            logprobs, entropy = token_logprobs(
                hidden, head, targets, temperature=self.hparams.temperature,
                chunk_size=self.hparams.logprob_chunk_size, with_entropy=with_grad,
            )  # fmt: skip
        mask = attention[:, prompt_width:].to(logprobs.dtype)  # [n, C]
        return logprobs, (entropy if entropy is not None else torch.zeros_like(logprobs)), mask

    # ----------------------------------------------------------------------------------- evaluation

    def validation_step(self, batch: EvalBatch, batch_idx: int) -> None:
        """Nothing to compute here: the Evaluation callback generates and grades each batch before this step
        (through the rollout engine) and logs pass@k at the end; this only checks that it ran."""
        _require_evaluated(batch)

    def test_step(self, batch: EvalBatch, batch_idx: int) -> None:
        """See `validation_step`."""
        _require_evaluated(batch)

    # ----------------------------------------------------------------------------------- logging

    def _log_phase(self, batch: PhaseBatch, totals: dict[str, float], train_s: float) -> None:
        assert batch.rollouts is not None
        rb = batch.rollouts
        rollouts = rb.rollouts
        phase = batch.phase
        g = rb.group_size
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)  # [N]
        grouped = rewards.view(-1, g)  # [groups, G]
        zero_std = (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item()
        lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
        truncated = sum(r.truncated for r in rollouts) / len(rollouts)
        tokens = max(totals["tokens"], 1.0)
        steps = max(totals["steps"], 1.0)  # applied optimizer steps
        metrics = {
            "reward_mean": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            "frac_zero_std_groups": zero_std,
            "completion_len_mean": lengths.mean().item(),
            "truncated_frac": truncated,
            "loss": totals["loss"] / steps,
            "clip_frac_low": totals["clip_low"] / tokens,
            "clip_frac_high": totals["clip_high"] / tokens,
            "clip_frac_dual": totals["clip_dual"] / tokens,
            "kl": totals["kl"] / tokens,
            "entropy": totals["entropy"] / tokens,
            "grad_norm": totals["grad_norm"] / steps,
            "reward_errors": float(rb.reward_errors),
            "trained_frac": totals["trained_sequences"] / len(rollouts),  # entered the backward pass
            "skipped_steps": totals["skipped_steps"],  # optimizer steps skipped on a non-finite gradient norm
        }
        if totals["steps"] == 0:  # every step was skipped: no loss or gradient statistics
            metrics["loss"] = metrics["grad_norm"] = float("nan")
        if totals["sampler_tokens"] > 0:
            metrics["sampler_logprob_diff_mean"] = totals["sampler_diff"] / totals["sampler_tokens"]
            metrics["sampler_logprob_diff_max"] = totals["sampler_diff_max"]
            if self.hparams.importance_sampling_cap is not None:
                metrics["is_capped_frac"] = totals["is_capped"] / totals["sampler_tokens"]
        if phase == "refine":
            metrics.update(refine_signals(rollouts))
            metrics["truncated_prompts"] = float(rb.truncated_prompts)  # left-truncated to rollout.max_prompt_length
        if totals["tokens"] == 0:  # nothing was forwarded (all advantages 0): token statistics are undefined
            for key in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "kl", "entropy"):
                metrics[key] = float("nan")
        phase_metrics = {f"train/{phase}/{key}": value for key, value in metrics.items() if not math.isnan(value)}
        all_tokens = sum(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
        wall = rb.generate_s + rb.score_s + train_s
        phase_metrics.update({
            "perf/generate_s": rb.generate_s, "perf/score_s": rb.score_s, "perf/train_s": train_s,
            "perf/tokens_per_s": all_tokens / wall if wall > 0 else 0.0,
        })  # fmt: skip
        # callback_metrics (monitors, early stopping) and the progress bar go through self.log; the loggers
        # get one row per phase from on_train_batch_end, because Lightning would repeat the other phase's
        # last values in every row
        for key, value in phase_metrics.items():
            self.log(key, value, on_step=True, on_epoch=False, batch_size=len(rollouts), logger=False)
        self.log(f"{phase}_reward", metrics["reward_mean"], prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=len(rollouts), logger=False)  # fmt: skip
        batch.extras["metrics"] = phase_metrics
        self._warn_if_learning_nothing(batch, truncated, zero_std)
        self._log_samples(batch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Write the phase's metrics as one logger row, at step = phase index (each phase is one step, as in
        the reference code); runs after the callbacks, so the rollout callback's weight-sync time is in it."""
        metrics = dict(batch.extras.get("metrics", {}))
        if "sync_s" in batch.extras:
            metrics["perf/sync_s"] = float(batch.extras["sync_s"])
        metrics["epoch"] = float(batch.epoch)
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=batch.index)

    def _warn_if_learning_nothing(self, batch: PhaseBatch, truncated: float, zero_std: float) -> None:
        """The two usual causes of a run that silently learns nothing; warned at most every 20 phases."""
        checks = {
            "truncated": (truncated > 0.5, f"{truncated:.0%} of {batch.phase} completions hit "
                          "rollout.max_completion_length: raise it, or the model is not finishing its answers"),
            "zero_std": (zero_std > 0.9, f"{zero_std:.0%} of {batch.phase} groups have the same reward for all "
                         "samples (zero advantage, no gradient): problems too easy/hard, or the grader never "
                         "matches (check the sample completions and rollout.reward)"),
        }  # fmt: skip
        for key, (bad, message) in checks.items():
            last = self._warned_at.get(key)
            if bad and (last is None or batch.index - last >= WARN_EVERY_PHASES):
                self._warned_at[key] = batch.index
                rank_zero_warn(f"phase batch {batch.index}: {message}")

    def _warn_skipped_step(self, batch: PhaseBatch) -> None:
        last = self._warned_at.get("nonfinite")
        if last is None or batch.index - last >= WARN_EVERY_PHASES:
            self._warned_at["nonfinite"] = batch.index
            rank_zero_warn(
                f"phase batch {batch.index} ({batch.phase}): the gradient norm is NaN or infinite, so this optimizer "
                "step was skipped (no update, gradients dropped) and counted in train/<phase>/skipped_steps; the run "
                "goes on. Repeated skips point at the data (a degenerate completion), the learning rate or precision"
            )

    def _log_samples(self, batch: PhaseBatch) -> None:
        """Write a few sample completions: to TensorBoard as text, and always to <log_dir>/samples.jsonl."""
        k = self.hparams.log_completions
        if k <= 0 or self.trainer is None or batch.rollouts is None:
            return
        log_dir = self.trainer.log_dir  # on every rank: with several, it is a broadcast from rank 0
        if not self.trainer.is_global_zero:
            return
        group_size = batch.rollouts.group_size
        picks = batch.rollouts.rollouts[: k * group_size : group_size]  # first sample of the first k groups
        problems = {p.id: p for p in batch.problems}
        records = [
            {"step": self.trainer.global_step, "phase": batch.phase, "problem": problems[r.problem_id].prompt_text,
             "answer": problems[r.problem_id].answer, "base": r.base_text, "completion": r.completion_text,
             "reward": r.reward, "finish_reason": r.finish_reason}
            for r in picks
        ]  # fmt: skip
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(log_dir) / "samples.jsonl", "a") as f:
                for record in records:
                    f.write(json.dumps(record) + "\n")
        for logger in self.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):  # TensorBoard
                text = "\n\n---\n\n".join(f"**reward {r['reward']}**\n\n```\n{r['completion']}\n```" for r in records)
                experiment.add_text(f"samples/{batch.phase}", text, self.trainer.global_step)


def refine_signals(rollouts: list[Rollout]) -> dict[str, float]:
    """Refine-phase signals of METHOD.md section 8 (rectify vs fortify), from one phase's rollouts.

    base_correct_frac: share of refinements whose base answer was right; fix_rate: share of
    refinements of wrong bases that are right; keep_rate: same for right bases;
    reward_share_from_wrong: share of the phase's total reward earned on wrong bases.
    """
    on_right = [r for r in rollouts if r.base_correct]
    on_wrong = [r for r in rollouts if r.base_correct is False]
    total_reward = sum(r.reward for r in rollouts)
    return {
        "base_correct_frac": len(on_right) / max(1, len(on_right) + len(on_wrong)),
        "fix_rate": sum(r.correct for r in on_wrong) / len(on_wrong) if on_wrong else float("nan"),
        "keep_rate": sum(r.correct for r in on_right) / len(on_right) if on_right else float("nan"),
        "reward_share_from_wrong": sum(r.reward for r in on_wrong) / total_reward if total_reward else 0.0,
    }


def _require_evaluated(batch: EvalBatch) -> None:
    if not getattr(batch, "evaluated", False):
        raise RuntimeError(
            f"evaluation batch {getattr(batch, 'index', '?')} was not evaluated: the Evaluation callback is missing "
            "(use the thinktwice CLI, or add thinktwice_pl.callbacks.Evaluation to trainer.callbacks)"
        )


def check_precision(precision: str) -> None:
    """Refuse fp16 AMP: its loss scaler would have to be unscaled before our gradient clipping and norm logging."""
    if precision in ("16-mixed", "16"):
        raise ValueError(
            f"trainer.precision={precision}: fp16 loss scaling is not supported with GRPO's manual optimization; "
            "use bf16-mixed, bf16-true or 32-true"
        )


def check_strategy(strategy: Any, *, lora: bool, quantized: bool) -> None:
    """Refuse the strategy/adapter combinations that are not tested, naming the flags (at set-up, before any work)."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    name = type(strategy).__name__
    processes = getattr(strategy, "num_processes", 1) * getattr(strategy, "num_nodes", 1)
    if isinstance(strategy, FSDPStrategy) and processes > 1:
        raise ValueError(
            f"trainer.strategy=fsdp (FSDP1) on {processes} devices is not supported: the rollout engine generates "
            "outside the FSDP root's forward, where FSDP1 holds only flat shards. Use FSDP2: trainer.strategy="
            "lightning.pytorch.strategies.ModelParallelStrategy with init_args {data_parallel_size: <devices>, "
            "tensor_parallel_size: 1} (see configs/qwen3-4b/thinktwice.yaml)"
        )
    if quantized and (processes > 1 or isinstance(strategy, FSDPStrategy | ModelParallelStrategy)):
        raise ValueError(
            f"model.quantization (QLoRA) with trainer.strategy={name} on {processes} device(s): 4-bit weights are "
            "supported on one device without sharding (trainer.devices=1, trainer.strategy=auto); drop "
            "model.quantization to use LoRA or full fine-tuning on several devices"
        )
    if lora and isinstance(strategy, ModelParallelStrategy | FSDPStrategy):
        raise ValueError(
            f"model.lora with trainer.strategy={name} (FSDP) is not supported; LoRA runs on one device or with "
            "trainer.strategy=ddp (adapters are small: sharding them saves little)"
        )
    if not isinstance(strategy, SingleDeviceStrategy | DDPStrategy | ModelParallelStrategy | FSDPStrategy):
        raise ValueError(
            f"trainer.strategy={name} is not supported; use auto (one device), ddp, or ModelParallelStrategy (FSDP2)"
        )


def _fsdp2_mixed_precision(precision: str) -> Any:
    """FSDP2's mixed precision for trainer.precision=bf16-mixed: bf16 compute and gathers, fp32 weights and grads."""
    if precision != "bf16-mixed":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def _decoder_and_head(model: Any) -> tuple[Any, Any]:
    """The transformer body (returns hidden states) and the LM head of an HF causal LM (peft-wrapped or not)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _padded_plan(plans: list[list[list[int]]], rank: int, filler: list[int]) -> Iterator[tuple[list[int], int]]:
    """This rank's micro-batches with weight 1, then `filler` passes with weight 0 up to the longest plan of any rank.

    Sharded strategies gather parameters collectively in every forward and reduce gradients in every backward,
    so all ranks must run the same number of passes even when their shares differ (zero-advantage skipping,
    token budgets).
    """
    longest = max(len(plan) for plan in plans)
    for micro in plans[rank]:
        yield micro, 1
    for _ in range(longest - len(plans[rank])):
        yield filler, 0


def _pad_to(values: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(values, (0, width - values.shape[0]))
