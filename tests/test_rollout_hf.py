"""HFRolloutEngine on the tiny model: shapes, finish reasons, EOS handling, seeding, left padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import encode_chat, solve_messages
from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> HFRolloutEngine:
    eng = HFRolloutEngine()
    eng.setup(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    return eng


def _prompts(engine: HFRolloutEngine) -> list[list[int]]:
    return [encode_chat(solve_messages(q), engine.tokenizer) for q in ("What is 2 + 3?", "Tom has 12 books. How many?")]


def test_n_samples_per_prompt_with_finish_reasons(engine: HFRolloutEngine) -> None:
    prompts = _prompts(engine)
    assert len(prompts[0]) != len(prompts[1])  # different lengths: exercises left padding
    out = engine.generate(prompts, 3, SamplingConfig(temperature=1.0, max_new_tokens=10, seed=1))
    assert [len(group) for group in out] == [3, 3]
    eos = engine.tokenizer.eos_token_id
    for completion in (c for group in out for c in group):
        assert 1 <= len(completion.token_ids) <= 10
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] == eos and eos not in completion.token_ids[:-1]
        else:
            assert completion.finish_reason == "length" and len(completion.token_ids) == 10
            assert eos not in completion.token_ids
        assert completion.text == engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(engine: HFRolloutEngine) -> None:
    prompts = _prompts(engine)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=7))
    after = torch.rand(1)
    b = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=7))
    c = engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=8))
    ids = lambda out: [x.token_ids for g in out for x in g]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert torch.equal(before, after)  # sampling ran on a forked RNG


def test_greedy_batched_equals_greedy_alone(engine: HFRolloutEngine) -> None:
    prompts = _prompts(engine)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    together = engine.generate(prompts, 1, greedy)
    alone = [engine.generate([p], 1, greedy)[0] for p in prompts]
    assert [g[0].token_ids for g in together] == [g[0].token_ids for g in alone]  # padding does not leak


def test_max_batch_sequences_splits_calls_without_changing_greedy_output(tiny_model_dir: Path) -> None:
    small = HFRolloutEngine(max_batch_sequences=2)
    small.setup(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    prompts = _prompts(small)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    whole = HFRolloutEngine()
    whole.setup(small.model, small.tokenizer)
    assert [c.token_ids for g in small.generate(prompts, 2, greedy) for c in g] == [
        c.token_ids for g in whole.generate(prompts, 2, greedy) for c in g
    ]
    assert small.model.training  # generation switched to eval and back


def test_sampling_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


def test_model_generation_defaults_do_not_reshape_sampling(tiny_model_dir: Path) -> None:
    """A model's generation_config (repetition penalty, n-gram blocking, minimum length) must not leak into
    rollouts: the loss assumes samples from the plain softmax. Greedy output must equal a bare argmax loop."""
    model = load_causal_lm(str(tiny_model_dir))
    tok = load_tokenizer(str(tiny_model_dir))
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 8
    model.generation_config.min_length = 200
    eng = HFRolloutEngine()
    eng.setup(model, tok)
    prompt = encode_chat(solve_messages("What is 2 + 3?"), tok)
    got = eng.generate([prompt], 1, SamplingConfig(temperature=0.0, max_new_tokens=8))[0][0].token_ids
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(nxt)
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
    assert got == expected


def _decoder_calls(model: torch.nn.Module) -> tuple[list[tuple[int, int]], object]:
    """(rows, positions) of every decoder forward while the returned hook handle is registered."""
    calls: list[tuple[int, int]] = []
    decoder = model.get_decoder()
    handle = decoder.register_forward_pre_hook(
        lambda _m, args, kwargs: calls.append(
            tuple((kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[:2])
        ),
        with_kwargs=True,
    )
    return calls, handle


def _transformers_greedy(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Each left-padded prompt's greedy continuation by transformers' own ``generate`` (no penalties), up to and
    including the first EOS."""
    from torch.nn.utils.rnn import pad_sequence

    from thinktwice_pl.rollout.hf import eos_token_ids

    rows = [torch.tensor(p) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=tok.pad_token_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_ids(model, tok),
            pad_token_id=tok.pad_token_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            min_new_tokens=0,
        )
    model.train(was_training)
    eos, continuations = set(eos_token_ids(model, tok)), []
    for row in out[:, ids.shape[1] :].tolist():
        stop = next((k for k, t in enumerate(row) if t in eos), None)
        continuations.append(row if stop is None else row[: stop + 1])
    return continuations


def test_each_prompt_is_prefilled_once_for_its_samples(engine: HFRolloutEngine) -> None:
    prompts = _prompts(engine)
    calls, handle = _decoder_calls(engine.model)
    try:
        engine.generate(prompts, 4, SamplingConfig(temperature=1.0, max_new_tokens=6, seed=3))
    finally:
        handle.remove()
    width = max(map(len, prompts))
    # one forward over the prompts (B = 2 rows, all tokens but the last), then one token per step for the 8 rows
    assert calls[0] == (2, width - 1)
    assert all(call == (8, 1) for call in calls[1:]) and 2 <= len(calls) <= 7


def test_prefill_in_passes_writes_the_cache_of_one_pass(engine: HFRolloutEngine) -> None:
    """With a prefill budget smaller than the prompts, the prefill runs in passes of whole prompts, each written into
    the reserved buffers: the same KV cache as one pass, and the same greedy tokens."""
    from thinktwice_pl.rollout.hf import _ReservedLayer

    questions = ("What is 2 + 3?", "Tom has 12 books. How many?", "What is 7 + 1?", "Add 4 and 4.", "What is 9?")
    prompts = [encode_chat(solve_messages(q), engine.tokenizer) for q in questions]
    width = max(map(len, prompts)) - 1  # the prefill runs all prompt tokens but the last
    passes = HFRolloutEngine(max_prefill_tokens=2 * width + 1)  # two prompts per pass: passes of 2, 2 and 1
    passes.setup(engine.model, engine.tokenizer)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    calls, handle = _decoder_calls(engine.model)
    try:
        got = passes.generate(prompts, 3, greedy)
    finally:
        handle.remove()
    assert calls[:4] == [(2, width), (2, width), (1, width), (5, 1)]  # greedy: one row per prompt
    assert [c.token_ids for g in got for c in g] == [
        c.token_ids for g in engine.generate(prompts, 3, greedy) for c in g
    ]

    rows = [torch.tensor(p) for p in prompts]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=0, padding_side="left")[:, :-1]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    mask = mask[:, :-1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    engine.model.eval()
    with torch.no_grad():
        split = passes._prefill(ids, mask, positions, 2, width + 4, False)
        whole = engine._prefill(ids, mask, positions, 2, width + 4, False)
    engine.model.train()
    assert all(type(layer) is _ReservedLayer for layer in split.layers)
    for a, b in zip(split.layers, whole.layers, strict=True):
        assert a.keys.shape == b.keys.shape == (10, a.keys.shape[1], width, a.keys.shape[-1])
        assert a._key_buffer.shape[-2] == width + 4
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.keys[0::2], a.keys[1::2])  # each prompt's two samples: rows 2i and 2i + 1


def test_a_sliding_window_model_is_prefilled_in_one_pass_and_decodes_as_generate(tiny_model_dir: Path) -> None:
    """Layers other than plain full attention (here a sliding window of 6 in the second layer) keep their own cache
    kind: the prefill runs in one pass whatever the budget, and greedy tokens equal transformers' `generate`."""
    from transformers import AutoConfig, Qwen2ForCausalLM

    settings = AutoConfig.from_pretrained(str(tiny_model_dir)).to_dict()
    settings.update(use_sliding_window=True, sliding_window=6, max_window_layers=1)
    settings.pop("layer_types", None)
    config = AutoConfig.for_model(**settings)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_model_dir), config=config)
    engine = HFRolloutEngine(max_prefill_tokens=8)
    engine.setup(model, load_tokenizer(str(tiny_model_dir)))
    tok = engine.tokenizer
    prompts = [encode_chat(solve_messages(q), tok) for q in ("What is 2 + 3?", "Tom has 12 books.", "What is 7 + 1?")]
    calls, handle = _decoder_calls(model)
    try:
        got = engine.generate(prompts, 2, SamplingConfig(temperature=0.0, max_new_tokens=8))
    finally:
        handle.remove()
    assert calls[0] == (3, max(map(len, prompts)) - 1)  # one pass
    expected = [row for row in _transformers_greedy(model, tok, prompts, 8) for _ in range(2)]
    assert [c.token_ids for g in got for c in g] == expected


def test_max_prefill_tokens_rejects_non_positive_values() -> None:
    with pytest.raises(ValueError, match="max_prefill_tokens must be >= 1 or None, got 0"):
        HFRolloutEngine(max_prefill_tokens=0)


def test_decoding_from_the_reserved_cache_equals_transformers_generate(engine: HFRolloutEngine) -> None:
    """Greedy decoding of left-padded prompts of different lengths (prefill once, KV written in place into reserved
    buffers, one token per step) gives the tokens of transformers' own ``generate``."""

    prompts, tok, model = _prompts(engine), engine.tokenizer, engine.model
    got = engine.generate(prompts, 2, SamplingConfig(temperature=0.0, max_new_tokens=12))
    expected = [row for row in _transformers_greedy(model, tok, prompts, 12) for _ in range(2)]
    assert [c.token_ids for g in got for c in g] == expected


def test_a_one_token_prompt_decodes_without_a_prefill(engine: HFRolloutEngine) -> None:
    model, bos = engine.model, engine.tokenizer.bos_token_id or 0
    got = engine.generate([[bos]], 1, SamplingConfig(temperature=0.0, max_new_tokens=6))[0][0].token_ids
    ids, expected = [bos], []
    with torch.no_grad():
        for _ in range(len(got)):
            expected.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            ids.append(expected[-1])
    assert got == expected


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, None, 1.0), (0.7, 20, 1.0), (1.3, None, 0.8), (0.6, 50, 0.9), (1.0, 5, 0.5)],
)
def test_sampling_distribution_is_that_of_transformers_warpers(
    temperature: float, top_k: int | None, top_p: float
) -> None:
    """Temperature, then top-k, then top-p: the probabilities of every vocabulary entry equal those of transformers'
    logits warpers applied in generate()'s order."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from thinktwice_pl.rollout.hf import sampling_distribution

    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)) * 3
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    expected = torch.softmax(warpers(None, logits.clone()), dim=-1)
    probs, candidates = sampling_distribution(logits, sampling)
    full = torch.zeros_like(logits)
    full.scatter_(-1, candidates, probs) if candidates is not None else full.copy_(probs)
    torch.testing.assert_close(full / full.sum(-1, keepdim=True), expected, atol=1e-6, rtol=1e-5)


def test_sampler_draws_each_token_with_its_probability() -> None:
    """40,000 draws from one row of logits: token frequencies within 4.5 standard errors of the distribution,
    tokens outside the top-k / top-p set never drawn, greedy is the argmax."""
    from thinktwice_pl.rollout.hf import sample_next_tokens

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]).repeat(40_000, 1)
    torch.manual_seed(0)
    for sampling, kept in (
        (SamplingConfig(temperature=0.8), 8),
        (SamplingConfig(temperature=1.2, top_k=3), 3),
        (SamplingConfig(temperature=1.0, top_p=0.75), 3),
    ):
        drawn = sample_next_tokens(logits, sampling)
        freq = torch.bincount(drawn, minlength=8).double() / len(drawn)
        probs = torch.softmax(logits[0].double() / sampling.temperature, -1)
        top = probs.argsort(descending=True)[:kept]
        expected = torch.zeros(8, dtype=torch.float64)
        expected[top] = probs[top] / probs[top].sum()
        stderr = (expected * (1 - expected) / len(drawn)).sqrt()
        assert ((freq - expected).abs() <= 4.5 * stderr + 1e-12).all(), (sampling, freq, expected)
    assert (sample_next_tokens(logits[:3], SamplingConfig(temperature=0.0)) == 0).all()


def test_sampled_tokens_have_the_log_probs_of_a_plain_forward(engine: HFRolloutEngine) -> None:
    """The distribution each token was drawn from (the head's logits during decoding from the expanded cache) is the
    policy's: per token, log-softmax(logits / T) equals that of one unpadded forward over prompt + completion."""
    prompts, model, temperature = _prompts(engine), engine.model, 0.7
    head_out: list[torch.Tensor] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: head_out.append(out.detach()))
    try:
        groups = engine.generate(prompts, 3, SamplingConfig(temperature=temperature, max_new_tokens=8, seed=5))
    finally:
        handle.remove()
    steps = torch.cat([o[:, -1:] for o in head_out if o.shape[1] > 0], dim=1)  # [B * G, steps, V]
    completions = [c for g in groups for c in g]
    samples = []
    for row, c in enumerate(completions):
        logprobs = torch.log_softmax(steps[row, : len(c.token_ids)] / temperature, -1)  # [T, V]
        samples.append(logprobs[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)])
    distinct = 0
    with torch.no_grad():
        for i, group in enumerate(groups):
            distinct += len({tuple(c.token_ids) for c in group}) > 1
            for j, c in enumerate(group):
                ids = torch.tensor([prompts[i] + c.token_ids])
                logits = model(input_ids=ids).logits[0, len(prompts[i]) - 1 : -1] / temperature  # [C, V]
                plain = torch.log_softmax(logits, -1)[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
                torch.testing.assert_close(samples[i * 3 + j], plain, atol=1e-5, rtol=1e-5)
    assert distinct == len(groups)  # the G samples of a prompt are not copies of one another
