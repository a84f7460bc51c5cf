"""Peak memory of one GRPO training step: thinktwice_pl's path against a naive full-logits implementation.

    python scripts/bench_memory.py                       # defaults: vocab 151,936 (Qwen3), 4 x (256 + 1024) tokens
    python scripts/bench_memory.py --device cuda --hidden 2560 --layers 4 --completion 3000

Both variants run one optimizer step's forward and backward on the same randomly initialised Qwen3-shaped
model (the vocabulary is what matters: the LM head's logits dominate activation memory at long lengths).

- naive: ``model(ids).logits`` for every position, ``log_softmax`` in fp32, gather, clipped loss, backward
  (what a straightforward implementation does: [sequences, length, vocab] fp32 logits live at once);
- thinktwice_pl: `ThinkTwiceModule._optimizer_step` with its defaults: logits only for completion tokens, in
  chunks of ``--chunk`` positions recomputed in backward, micro-batches by ``--max-tokens-per-microbatch``
  with the loss normaliser fixed over the whole step.

Each variant runs in a fresh process. On CPU the peak is the rise of the process's resident-set high-water
mark over its resident set just before the step (the model, optimizer-free, is loaded already); on CUDA it
is ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _build_model(out: Path, args: argparse.Namespace) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from thinktwice_pl.builtin_models import build_tiny_model

    build_tiny_model(out)  # for its tokenizer; the model is replaced below
    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        head_dim=128,
        max_position_embeddings=args.prompt + args.completion + 8,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)


def _rollouts(args: argparse.Namespace) -> list:
    from thinktwice_pl.types import Rollout

    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(5, args.vocab, (n,), generator=g).tolist()

    return [
        Rollout(
            problem_id=f"p{i // 2}",
            phase="solve",
            prompt_ids=tokens(args.prompt),
            completion_ids=tokens(args.completion),
            completion_text="",
            finish_reason="stop",
            reward=float(i % 2),
        )
        for i in range(args.sequences)
    ]


def _run_variant(args: argparse.Namespace) -> dict[str, float]:
    from thinktwice_pl.batching import plan_phase
    from thinktwice_pl.grpo import group_advantages, policy_loss
    from thinktwice_pl.module import ThinkTwiceModule

    device = torch.device(args.device)
    module = ThinkTwiceModule(
        model_name_or_path=args.model_dir,
        dtype=args.dtype,
        problems_per_batch=args.sequences // 2,
        mini_batch_problems=args.sequences // 2,
        num_generations=2,
        max_grad_norm=None,
        logprob_chunk_size=args.chunk,
        max_tokens_per_microbatch=args.max_tokens_per_microbatch,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    module.configure_model()
    module.to(device)
    rollouts = _rollouts(args)
    advantages = group_advantages(torch.tensor([r.reward for r in rollouts]), 2)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    start = time.perf_counter()
    if args.variant == "naive":
        ids = torch.tensor([r.prompt_ids + r.completion_ids for r in rollouts], device=device)  # [N, P + C]
        logits = module.policy(input_ids=ids).logits  # [N, P + C, V], every position
        logprobs = torch.log_softmax(logits.float(), -1)[:, args.prompt - 1 : -1]  # [N, C, V] fp32
        token_lp = logprobs.gather(-1, ids[:, args.prompt :, None])[..., 0]  # [N, C]
        mask = torch.ones_like(token_lp)
        loss, _ = policy_loss(token_lp, token_lp.detach(), advantages.to(device), mask)
        loss.backward()
    else:
        module._trainer = SimpleNamespace(world_size=1, global_rank=0, strategy=None)
        module.manual_backward = lambda loss: loss.backward()
        opt = SimpleNamespace(zero_grad=lambda set_to_none: None, step=lambda: None)  # the step's memory, not Adam's
        module.optimizers = lambda: opt
        n = len(rollouts)
        lengths = [(len(r.prompt_ids), len(r.completion_ids)) for r in rollouts]
        plan = plan_phase(
            lengths,
            2,
            [True] * n,
            [True] * n,
            mini_batch_groups=None,
            micro_batch_size=None,
            max_tokens=args.max_tokens_per_microbatch,
        )
        module._optimizer_step(rollouts, plan.steps[0], advantages, {})
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak_gib": peak / 2**30, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=4, help="sequences in the optimizer step (even)")
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completion", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256, help="model.logprob_chunk_size")
    parser.add_argument("--max-tokens-per-microbatch", type=int, default=2560)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=["naive", "thinktwice_pl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.variant:  # a child process: one variant, JSON on stdout
        print(json.dumps(_run_variant(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _build_model(Path(tmp), args)
        results = {}
        for variant in ("naive", "thinktwice_pl"):
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--model-dir", tmp],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
    tokens = args.sequences * (args.prompt + args.completion)
    print(
        f"one training step: {args.sequences} sequences x ({args.prompt} prompt + {args.completion} completion) "
        f"tokens = {tokens}, vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.dtype}, "
        f"{args.device}"
    )
    print(f"{'variant':<16}{'peak GiB':>10}{'seconds':>10}")
    for variant, r in results.items():
        print(f"{variant:<16}{r['peak_gib']:>10.2f}{r['seconds']:>10.1f}")
    print(f"naive / thinktwice_pl peak: {results['naive']['peak_gib'] / results['thinktwice_pl']['peak_gib']:.1f}x")


if __name__ == "__main__":
    main()
