"""LoRA (peft) and QLoRA (bitsandbytes 4-bit, CPU backend) fits on the tiny model: only adapters move and are
checkpointed, the KL reference is the model with adapters disabled, export merges the adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from fit_helpers import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from thinktwice_pl.callbacks import HFExport, RolloutCallback
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.models import LoraSettings, QuantizationSettings
from thinktwice_pl.module import ThinkTwiceModule


def _fit(
    model_dir: Path,
    root: Path,
    *,
    max_steps: int,
    callbacks: list[Any] | None = None,
    ckpt_path: str | None = None,
    **module_kw: Any,
) -> tuple[ThinkTwiceModule, pd.DataFrame, pl.Trainer]:
    pl.seed_everything(0)
    kwargs = {"mini_batch_problems": 1, "learning_rate": 5e-2, "weight_decay": 0.0, **module_kw}
    module = ThinkTwiceModule(
        model_name_or_path=str(model_dir), problems_per_batch=2, num_generations=4, max_completion_length=10, **kwargs
    )
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=8), problems_per_batch=2, seed=0)
    rollout = RolloutCallback(
        num_generations=4, max_completion_length=10, reward="signal_rewards.even_length", reward_workers=0
    )
    checkpoints = any(isinstance(c, ModelCheckpoint) for c in callbacks or [])
    trainer = quiet_trainer(root, rollout, *(callbacks or []), max_steps=max_steps, enable_checkpointing=checkpoints)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv"), trainer


def _split(module: ThinkTwiceModule) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors, base tensors) of the policy, cloned."""
    adapters, base = {}, {}
    for name, p in module.policy.named_parameters():
        (adapters if "lora_" in name else base)[name] = p.detach().clone()
    return adapters, base


def test_lora_fit_trains_and_checkpoints_only_adapters_and_export_merges(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    export = HFExport(dirpath=str(tmp_path / "export"))
    lora = LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    module, metrics, trainer = _fit(tiny_model_dir, tmp_path / "a", max_steps=4, lora=lora, callbacks=[ckpt])
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    adapters, base = _split(module)
    assert adapters and all(p.requires_grad == ("lora_" in n) for n, p in module.policy.named_parameters())
    lora_b = {n: p for n, p in adapters.items() if "lora_B" in n}
    assert all(p.abs().sum() > 0 for p in lora_b.values()), "lora_B starts at 0: every B must have moved"
    for name, value in base.items():  # peft names: base_model.model.<hf name> with .base_layer for adapted ones
        hf_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, initial[hf_name]), f"base weight {hf_name} changed"
    assert {"train/solve/loss", "train/refine/loss"} <= set(metrics.columns)

    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"]), "only adapters in the checkpoint"
    assert saved["hyper_parameters"]["lora"]["rank"] == 4
    resumed, _, _ = _fit(
        tiny_model_dir, tmp_path / "b", max_steps=4, lora=lora, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    )
    for name, value in _split(resumed)[0].items():  # resumed after solve, refine again: same adapters
        torch.testing.assert_close(value, adapters[name], rtol=0, atol=0)

    export.on_train_end(trainer, module)  # the merged export of the trained policy, and the adapter beside it
    assert (tmp_path / "export" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in k for k in merged.state_dict())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, module.policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_kl_reference_is_the_model_with_adapters_disabled(tiny_model_dir: Path, tmp_path: Path) -> None:
    module, metrics, _ = _fit(
        tiny_model_dir, tmp_path, max_steps=2, beta=0.1, mini_batch_problems=2, lora=LoraSettings(rank=4, alpha=8)
    )
    assert module.ref_policy is None  # no second copy of the weights
    kl = metrics["train/solve/kl"].dropna().tolist() + metrics["train/refine/kl"].dropna().tolist()
    assert kl[0] == pytest.approx(0.0, abs=1e-7)  # lora_B = 0 at the start: adapters off == adapters on
    assert kl[-1] > 0


def test_qlora_fit_on_cpu_trains_adapters_over_frozen_4bit_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    quant = QuantizationSettings(compute_dtype="float32")
    pl.seed_everything(0)
    module, metrics, _ = _fit(
        tiny_model_dir, tmp_path, max_steps=4, lora=LoraSettings(rank=4, alpha=8), quantization=quant
    )
    four_bit = [m for m in module.policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    adapters, _ = _split(module)
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)
    # the 4-bit base did not move: re-quantising the original weights gives the same packed bytes
    fresh = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir),
        problems_per_batch=2,
        mini_batch_problems=1,
        num_generations=4,
        lora=LoraSettings(rank=4, alpha=8),
        quantization=quant,
    )
    fresh.configure_model()
    packed = {n: m.weight.data for n, m in module.policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    for name, m in fresh.policy.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert torch.equal(m.weight.data, packed[name]), name
    assert metrics["train/refine/grad_norm"].dropna().gt(0).all()


def test_qlora_generation_keeps_its_kv_cache_under_gradient_checkpointing(tiny_model_dir: Path) -> None:
    """A 4-bit policy generates in train mode (eval mode would break its next backward), where transformers drops
    the KV cache when gradient checkpointing is on: every step would recompute the whole sequence. The engine pauses
    checkpointing while it decodes, so each step runs one token per row, and the next backward still works."""
    pytest.importorskip("bitsandbytes")
    from thinktwice_pl.prompts import encode_chat, solve_messages
    from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig

    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir),
        lora=LoraSettings(rank=4, alpha=8),
        quantization=QuantizationSettings(compute_dtype="float32"),
        gradient_checkpointing=True,
    )
    module.configure_model()
    policy, tok = module.policy, module.tokenizer
    checkpointed = [m for m in policy.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert checkpointed and policy.training
    engine = HFRolloutEngine()
    engine.setup(policy, tok)
    prompt = encode_chat(solve_messages("What is 2 + 3?"), tok)
    tokens: list[int] = []
    handle = policy.get_decoder().register_forward_pre_hook(
        lambda _m, args, kwargs: tokens.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        ),
        with_kwargs=True,
    )
    try:
        out = engine.generate([prompt], 2, SamplingConfig(temperature=1.0, max_new_tokens=6, seed=0))
    finally:
        handle.remove()
    assert tokens[0] == len(prompt) - 1 and all(t == 1 for t in tokens[1:])  # prefill once, then one token a step
    assert all(getattr(m, "gradient_checkpointing", False) is True for m in checkpointed) and policy.training
    ids = torch.tensor([prompt + out[0][0].token_ids])
    policy(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in policy.named_parameters() if "lora_" in n and p.requires_grad)


def test_quantization_without_lora_is_refused() -> None:
    with pytest.raises(ValueError, match=r"model\.quantization \(QLoRA\) needs model\.lora"):
        ThinkTwiceModule(quantization=QuantizationSettings())


def test_bad_combinations_are_refused_at_setup_naming_the_flags() -> None:
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from thinktwice_pl.parallel import check_strategy

    two = [torch.device("cpu")] * 2
    with pytest.raises(ValueError, match=r"trainer\.strategy=fsdp \(FSDP1\) on 2 devices .*ModelParallelStrategy"):
        check_strategy(FSDPStrategy(parallel_devices=two), lora=False, quantized=False)
    check_strategy(FSDPStrategy(parallel_devices=two[:1]), lora=False, quantized=False)  # one GPU: nothing sharded
    with pytest.raises(ValueError, match=r"model\.quantization \(QLoRA\) with trainer\.strategy=DDPStrategy on 2"):
        check_strategy(DDPStrategy(parallel_devices=two), lora=True, quantized=True)
    with pytest.raises(ValueError, match=r"model\.lora with trainer\.strategy=ModelParallelStrategy"):
        check_strategy(ModelParallelStrategy(), lora=True, quantized=False)
    check_strategy(SingleDeviceStrategy("cpu"), lora=True, quantized=True)
    check_strategy(DDPStrategy(parallel_devices=two), lora=True, quantized=False)
    check_strategy(ModelParallelStrategy(), lora=False, quantized=False)
