"""HFRolloutEngine on the tiny model: shapes, finish reasons, EOS handling, seeding, left padding."""

from __future__ import annotations

from pathlib import Path

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
