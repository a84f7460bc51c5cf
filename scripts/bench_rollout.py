"""Generate and weight-sync times of the HF and vLLM rollout engines on one model, plus a parity check.

    python scripts/bench_rollout.py                                   # the quickstart model and workload
    python scripts/bench_rollout.py --problems 8 --generations 8 --max-new-tokens 128
    python scripts/bench_rollout.py --model Qwen/Qwen3-4B-Instruct-2507 --dtype bfloat16 --device cuda

Workload: `--problems` solve prompts (procedural arithmetic, the quickstart's) x `--generations`
samples of up to `--max-new-tokens` tokens at `--temperature`, repeated `--repeats` times with a
sync between repeats (as in training: generate, update, sync). Reported per engine: start-up,
generate time per phase (median), sync time (median), completion tokens per second. The vLLM
engine's sampler log-probs are compared with an HF forward of the same weights after a sync
(max |diff|), so a fast but stale engine cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from thinktwice_pl.builtin_models import resolve_model_path
from thinktwice_pl.data import procedural_problem
from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import encode_chat, solve_messages
from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="thinktwice:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--difficulty", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="vLLM KV cache on CPU")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, dtype=args.dtype).to(args.device)
    problems = [procedural_problem(seed=0, difficulty=args.difficulty, index=i) for i in range(args.problems)]
    prompts = [encode_chat(solve_messages(p.prompt_text), tokenizer) for p in problems]
    results = {}
    for name in args.engines.split(","):
        if name == "hf":
            engine = HFRolloutEngine()
        elif name == "vllm":
            from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

            engine = VLLMRolloutEngine(
                enforce_eager=args.device == "cpu",
                gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_memory_bytes=int(args.kv_cache_gib * (1 << 30)) if args.device == "cpu" else None,
                max_model_len=2048,
                sleep_level=0,
            )
        else:
            raise SystemExit(f"--engines: unknown engine {name!r} (hf, vllm)")
        results[name] = _bench(name, engine, model, tokenizer, prompts, args)
        if hasattr(engine, "close"):
            engine.close()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


def _bench(name: str, engine, model, tokenizer, prompts, args) -> dict:
    start = time.perf_counter()
    engine.setup(model, tokenizer)
    setup_s = time.perf_counter() - start
    generate, sync, tokens = [], [], []
    for r in range(args.repeats + 1):  # the first repeat warms up (and makes vLLM's first push)
        sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=r)
        start = time.perf_counter()
        out = engine.generate(prompts, args.generations, sampling)
        g = time.perf_counter() - start
        with torch.no_grad():  # stand-in for an optimizer step: every weight changes a little
            for p in model.parameters():
                p.mul_(1.0 + 1e-4)
        start = time.perf_counter()
        engine.sync_weights(model)
        s = time.perf_counter() - start
        if r > 0:
            generate.append(g)
            sync.append(s)
            tokens.append(sum(len(c.token_ids) for group in out for c in group))
    result = {
        "setup_s": round(setup_s, 2),
        "generate_s_median": round(statistics.median(generate), 3),
        "sync_s_median": round(statistics.median(sync), 4),
        "completion_tokens_per_s": round(sum(tokens) / sum(generate), 1),
        "completion_tokens_per_phase": statistics.mean(tokens),
    }
    if name == "vllm":
        result["max_logprob_gap_after_sync"] = _parity(engine, model, prompts[0], args)
    print(name, result, flush=True)
    return result


@torch.no_grad()
def _parity(engine, model, prompt: list[int], args) -> float:
    sampling = SamplingConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=99)
    completion = engine.generate([prompt], 1, sampling)[0][0]
    ids = torch.tensor([prompt + completion.token_ids], device=args.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / args.temperature
    reference = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0].cpu()
    return float((reference - torch.tensor(completion.logprobs)).abs().max())


if __name__ == "__main__":
    main()
