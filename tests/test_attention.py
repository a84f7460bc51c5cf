"""Grouped-query SDPA on CPU (thinktwice_pl.attention): the model trains and samples as with transformers' sdpa."""

from __future__ import annotations

from pathlib import Path

import torch

from thinktwice_pl.attention import NAME
from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import encode_chat, solve_messages
from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig


def _pair(tiny_model_dir: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    grouped = load_causal_lm(str(tiny_model_dir))
    plain = load_causal_lm(str(tiny_model_dir))
    plain.set_attn_implementation("sdpa")
    return grouped, plain


def test_grouped_attention_gives_sdpa_outputs_and_gradients(tiny_model_dir: Path) -> None:
    grouped, plain = _pair(tiny_model_dir)
    assert grouped.config._attn_implementation == NAME and plain.config._attn_implementation == "sdpa"
    assert grouped.config.num_key_value_heads < grouped.config.num_attention_heads  # the tiny model is GQA
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0  # left padding: the masked path, where transformers' sdpa repeats the K/V heads on CPU
    results = []
    for model in (grouped, plain):
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (logits_g, grads_g), (logits_p, grads_p) = results
    assert torch.equal(logits_g, logits_p)
    for g, p in zip(grads_g, grads_p, strict=True):
        torch.testing.assert_close(g, p, rtol=1e-5, atol=1e-6)  # summation order only


def test_grouped_attention_samples_the_same_tokens(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [encode_chat(solve_messages(q), tokenizer) for q in ("What is 2 + 3?", "Tom has 12 books. How many?")]
    outputs = []
    for model in _pair(tiny_model_dir):
        engine = HFRolloutEngine()
        engine.setup(model, tokenizer)
        outputs.append(engine.generate(prompts, 3, SamplingConfig(temperature=1.0, max_new_tokens=12, seed=4)))
    assert [[c.token_ids for c in g] for g in outputs[0]] == [[c.token_ids for c in g] for g in outputs[1]]


def test_other_attention_choices_are_left_alone(tiny_model_dir: Path) -> None:
    assert load_causal_lm(str(tiny_model_dir), attn_implementation="eager").config._attn_implementation == "eager"
