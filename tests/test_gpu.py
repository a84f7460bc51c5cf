"""GPU-only checks (marker ``gpu``): bf16 steps, FSDP1, vLLM on CUDA with sleep/wake. Run by scripts/gpu_check.sh (the
lent GPU machines, no vLLM: its test skips) and scripts/gpu_smoke.sh (a machine with a full install).

On a CPU machine every test here is skipped with its reason; nothing in them is mocked.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from fit_helpers import quiet_trainer, tiny_module

from thinktwice_pl.callbacks import RolloutCallback
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu_check.sh there)"),
]


def _fit(
    model_dir: Path,
    root: Path,
    *,
    strategy: Any = "auto",
    max_steps: int = 4,
    precision: str = "bf16-true",
    dtype: str = "bfloat16",
    lr: float = 1e-3,
) -> tuple[Any, pd.DataFrame]:
    pl.seed_everything(0)
    module = tiny_module(
        model_dir, dtype=dtype, num_generations=4, max_completion_length=12, learning_rate=lr, mini_batch_problems=1
    )
    data = ThinkTwiceDataModule(train=ProblemSource(path="procedural", num_problems=16), problems_per_batch=2)
    rollout = RolloutCallback(
        num_generations=4, max_completion_length=12, reward="signal_rewards.even_length", reward_workers=0
    )
    trainer = quiet_trainer(
        root, rollout, accelerator="gpu", devices=1, precision=precision, strategy=strategy, max_steps=max_steps
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=data)
    print(f"peak CUDA memory of the fit: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    return module, pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")


def test_bf16_fit_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    module, metrics = _fit(tiny_model_dir, tmp_path)
    assert next(module.policy.parameters()).dtype == torch.bfloat16
    assert next(module.policy.parameters()).device.type == "cuda"
    assert metrics["train/solve/loss"].notna().any() and metrics["train/refine/loss"].notna().any()
    assert metrics.filter(like="grad_norm").stack().apply(math.isfinite).all()


def test_bf16_mixed_fit_on_cuda_keeps_fp32_weights_and_moves_them_at_lr_1e6(tmp_path: Path) -> None:
    from thinktwice_pl.builtin_models import build_tiny_model
    from thinktwice_pl.models import load_causal_lm

    model_dir = build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)  # every weight gets a gradient
    initial = dict(load_causal_lm(str(model_dir)).named_parameters())
    module, _ = _fit(model_dir, tmp_path, precision="bf16-mixed", dtype="float32", lr=1e-6, max_steps=1)
    params = dict(module.policy.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    moved = sum(int((params[n].detach().cpu() != initial[n].detach()).sum()) for n in params)
    total = sum(p.numel() for p in params.values())
    print(f"bf16-mixed on CUDA, lr 1e-6: {moved / total:.1%} of the weights moved in one optimizer step")
    assert moved / total > 0.9


def test_fsdp1_fit_and_gathered_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    from thinktwice_pl.models import load_causal_lm
    from thinktwice_pl.rollout.weights import rollout_weights

    strategy = FSDPStrategy(auto_wrap_policy={Qwen2DecoderLayer}, activation_checkpointing_policy={Qwen2DecoderLayer})
    module, metrics = _fit(tiny_model_dir, tmp_path, strategy=strategy)
    assert metrics["train/refine/loss"].notna().any()
    gathered = dict(rollout_weights(module.policy))
    reference = load_causal_lm(str(tiny_model_dir))
    assert set(gathered) == {name for name, _ in reference.named_parameters()}  # wrapper names stripped
    for name, param in reference.named_parameters():
        assert gathered[name].shape == param.shape, name


def test_vllm_on_cuda_sync_across_sleep_levels(tiny_model_dir: Path) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed on this GPU machine")
    from vllm_helpers import GREEDY, max_gap

    from thinktwice_pl.models import load_causal_lm, load_tokenizer
    from thinktwice_pl.prompts import encode_chat, solve_messages
    from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir)).cuda()
    prompt = encode_chat(solve_messages("What is 3 + 4?"), tokenizer)
    for level in (1, 2):
        engine = VLLMRolloutEngine(
            gpu_memory_utilization=0.2, max_model_len=1024, sleep_level=level, enforce_eager=True
        )
        engine.setup(model, tokenizer)
        try:
            engine.generate([prompt], 2, GREEDY)
            engine.sleep()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            engine.sync_weights(model)
            engine.wake_up()
            completion = engine.generate([prompt], 1, GREEDY)[0][0]
            gap = max_gap(model, prompt, completion)
            print(f"sleep level {level}: max log-prob gap after sync {gap:.2e}")
            assert gap < 1e-3
        finally:
            engine.close()


def test_hf_decoding_and_shared_prompt_update_on_cuda_bf16(tiny_model_dir: Path) -> None:
    """The HF engine's own decoding loop (reserved KV buffers, inverse-CDF sampler) and the shared-prompt forward of
    the update, on CUDA: greedy tokens (fp32) equal transformers' generate; under bf16 autocast sampled tokens are
    valid and shared-prompt log-probs and gradients match the joint forward to bf16 precision."""
    from thinktwice_pl.batching import collate
    from thinktwice_pl.logprobs import completion_logprobs
    from thinktwice_pl.models import load_causal_lm, load_tokenizer
    from thinktwice_pl.prompts import encode_chat, solve_messages
    from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir)).cuda()
    engine = HFRolloutEngine()
    engine.setup(model, tok)
    prompts = [encode_chat(solve_messages(q), tok) for q in ("What is 2 + 3?", "Tom has 12 books. How many?")]
    greedy = engine.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=8))
    engine.setup(model, tok, torch.bfloat16)
    sampled = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0))
    assert all(0 <= t < model.config.vocab_size for g in sampled for c in g for t in c.token_ids)
    model.eval()
    with torch.no_grad():
        for prompt, group in zip(prompts, greedy, strict=True):
            ids = torch.tensor([prompt], device="cuda")
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=8,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            expected = out[0, len(prompt) :].tolist()
            assert group[0].token_ids == expected[: len(group[0].token_ids)]
    model.train()
    batch = collate([prompts[i // 4] for i in range(8)], [c.token_ids for g in sampled for c in g], tok.pad_token_id)
    results = []
    for share in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logprobs, _ = completion_logprobs(
                model, batch, temperature=1.0, chunk_size=64, with_grad=True, share_prompts=share
            )
        (logprobs * batch.completion_mask.cuda()).sum().backward()
        results.append((logprobs.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (shared, shared_grad), (joint, joint_grad) = results
    mask = batch.completion_mask.cuda().bool()
    gap = (shared - joint)[mask].abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(shared_grad, joint_grad, dim=0).item()
    print(f"shared-prompt forward on CUDA bf16: max log-prob gap {gap:.2e}, gradient cosine {cosine:.5f}")
    assert gap < 5e-2 and cosine > 0.999
