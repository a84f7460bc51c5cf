"""The measurements of scripts/gpu_check.sh: one report (JSON and markdown) from one command on one GPU, offline.

    python scripts/bench_gpu.py --out runs/gpu_check          # every part, each in its own process with a time limit
    python scripts/bench_gpu.py --out runs/gpu_check --cpu    # the same logic on a tiny model on CPU (CI)
    python scripts/bench_gpu.py --out DIR --part update       # one part (what the driver runs in a child process)

No weights are read: models are built from their configs with random weights (`random_weights`), a Qwen3-4B-shaped
one on the GPU (Qwen3-4B-Instruct-2507's architecture) and the repository's tiny tokenizer (only its pad and EOS ids
matter). Parts, in the order they run:

- ``tests``: pytest on tests/test_gpu.py (marker ``gpu``);
- ``update``: the paper recipe's update through the project's own code: `ThinkTwiceModule.training_step` under a
  Lightning Trainer (bf16-mixed: fp32 master weights and AdamW state, bf16 autocast), gradient checkpointing, the
  20k-token micro-batch budget, G = 8, 8 problems per optimizer step, prompts and completions at METHOD.md section
  4's limits (5120 / 3000 tokens). Synthetic rollouts (random tokens, rewards alternating in each group) replace
  the rollout callback. Per optimizer step: peak GPU memory, seconds, training tokens/s, model FLOPs utilisation;
- ``decode``: the HF engine's sampling tokens/s on that model (fp32 weights under bf16 autocast, as in training);
- ``head_grad``: the vocabulary-sized weight gradient of the LM head (lm_head._HeadLogProbs backward):
  the in-place fp32 ``addmm_`` of the grad_into path against the plain path's autocast product, TF32,
  and a bf16 product accumulated into the fp32 gradient; per chunk and through `token_logprobs`;
- ``qlora``: a QLoRA fit (4-bit base, LoRA) on CUDA when bitsandbytes is importable, else skipped with the reason.

MFU = 6 * N * tokens / (seconds * peak), N = every parameter (tied embeddings: the embedding is the head's matmul,
counted once), tokens = the distinct tokens of the step (a group's shared prompt once, every completion), recomputation
by gradient checkpointing not counted (it is hardware, not model, FLOPs); ``mfu_with_attention`` adds the causal
attention's 12 * layers * heads * head_dim * context FLOPs per token. Peak: the device's bf16 dense peak
(`PEAK_BF16_TFLOPS`: 989 TFLOP/s for H100/H200 SXM) or --peak-tflops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = float(1 << 30)
PARTS = ("tests", "update", "decode", "head_grad", "qlora")
# seconds each part may take on the GPU (the whole check must end within 8 minutes on one H100) and on CPU
LIMITS_S = {"tests": 150, "update": 170, "decode": 60, "head_grad": 40, "qlora": 70}
LIMITS_CPU_S = {"tests": 60, "update": 90, "decode": 40, "head_grad": 40, "qlora": 40}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}

QWEN3_4B = dict(
    hidden_size=2560,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=9728,
    vocab_size=151_936,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=262_144,
    rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0},
)
TINY = dict(QWEN3_4B, hidden_size=64, intermediate_size=128, vocab_size=512, max_position_embeddings=4096)
TINY.update(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32)
# the update's shape: METHOD.md section 4 on one GPU, and its CPU miniature
RECIPE = dict(problems=24, group=8, mini_batch=8, prompt=5120, completion=3000, token_budget=20_000)
RECIPE_CPU = dict(problems=6, group=4, mini_batch=2, prompt=24, completion=40, token_budget=200)
DECODE = dict(prompts=8, samples=8, prompt=256, new_tokens=256)
DECODE_CPU = dict(prompts=2, samples=2, prompt=16, new_tokens=16)


# ------------------------------------------------------------------------------------------------ shared helpers


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device("cpu" if args.cpu else "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    config = dict(TINY if args.cpu else QWEN3_4B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    elif not args.cpu and torch.cuda.get_device_properties(0).total_memory < 120 * GIB:
        # 4B fp32 weights + gradients + AdamW state are 60 GiB, foreach AdamW's temporary 15 GiB more: half the
        # layers fit an 80 GB card, as half the model's states do on each GPU of the paper's 2-GPU FSDP run
        config["num_hidden_layers"] = 18
    return config


def make_model_dir(root: Path, config: dict[str, Any], save_weights_on: torch.device | None = None) -> Path:
    """A model directory with the config and the repository's tiny tokenizer; no weights, or random bf16 weights
    built on `save_weights_on` and saved (for a loading path that reads them: QLoRA quantises while loading)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from thinktwice_pl.builtin_models import build_tiny_model

    path = build_tiny_model(root / "model")
    for weights in path.glob("*.safetensors"):
        weights.unlink()
    Qwen3Config(**config).save_pretrained(path)
    if save_weights_on is not None:
        torch.manual_seed(0)
        with save_weights_on:
            model = Qwen3ForCausalLM(Qwen3Config(**config)).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
    return path


@contextlib.contextmanager
def random_weights(device: torch.device) -> Any:
    """`AutoModelForCausalLM.from_pretrained` builds the model from the directory's config with random weights on
    `device`, so the project's own loading (`load_causal_lm`: checkpointing, dropout, attention) runs unchanged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained

    def build(path: str, **kwargs: Any) -> Any:
        torch.manual_seed(0)
        with device:
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), **kwargs)

    AutoModelForCausalLM.from_pretrained = build
    try:
        yield
    finally:
        AutoModelForCausalLM.from_pretrained = real


def memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return float(args.peak_tflops)
    if args.cpu:
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def append_record(out: Path, part: str, record: dict[str, Any]) -> None:
    """One line per result, written at once: a part stopped at its time limit keeps what it measured."""
    with (out / f"{part}.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------ parts


def part_update(args: argparse.Namespace, out: Path) -> None:
    """The paper recipe's update through `ThinkTwiceModule.training_step` under a bf16-mixed Lightning Trainer."""
    _update(args, out, "update", qlora=False)


def part_qlora(args: argparse.Namespace, out: Path) -> None:
    """The same update as QLoRA (4-bit nf4 base loaded by `load_causal_lm` from saved weights, LoRA rank 16 on every
    linear layer) on a 4-layer model of the same width, when bitsandbytes is importable."""
    from thinktwice_pl.optional import BITSANDBYTES

    if not BITSANDBYTES:
        why = "bitsandbytes is not importable (carry its wheel: scripts/gpu_wheels.sh)"
        append_record(out, "qlora", {"kind": "skipped", "reason": why})
        return
    _update(args, out, "qlora", qlora=True)


def _update(args: argparse.Namespace, out: Path, part: str, *, qlora: bool) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from thinktwice_pl.models import LoraSettings, QuantizationSettings
    from thinktwice_pl.module import ThinkTwiceModule
    from thinktwice_pl.types import PhaseBatch, Problem, Rollout, RolloutBatch

    device, shape = device_of(args), dict(RECIPE_CPU if args.cpu else RECIPE)
    config = model_config(args)
    if qlora:  # saved weights are read (4-bit quantisation happens while loading): a smaller model, fewer steps
        config["num_hidden_layers"] = min(config["num_hidden_layers"], 4)
        shape["problems"] = 2 * shape["mini_batch"]
    params = parameter_count(config)
    full = TINY if args.cpu else QWEN3_4B
    steps = shape["problems"] // shape["mini_batch"]
    scale = (
        f"{config['num_hidden_layers']} of the model's {full['num_hidden_layers']} layers; one phase of "
        f"{shape['problems']} problems x {shape['group']} samples ({steps} optimizer steps of "
        f"{shape['mini_batch']} problems; the paper's phase: 32 problems, 4 steps)"
    )
    append_record(
        out,
        part,
        {
            "kind": "shape",
            "scale": scale,
            **shape,
            "model": config,
            "parameters": params,
            "precision": "bf16-mixed",
            "gradient_checkpointing": True,
            "logprob_chunk_size": 256,
            "qlora": qlora,
        },
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model_dir = make_model_dir(Path(tmp), config, save_weights_on=device if qlora else None)
        module = ThinkTwiceModule(
            model_name_or_path=str(model_dir),
            dtype="float32",
            gradient_checkpointing=True,
            problems_per_batch=shape["problems"],
            num_generations=shape["group"],
            mini_batch_problems=shape["mini_batch"],
            max_tokens_per_microbatch=shape["token_budget"],
            max_completion_length=shape["completion"],
            learning_rate=1e-6,
            log_completions=0,
            lora=LoraSettings(rank=16, alpha=32) if qlora else None,
            quantization=QuantizationSettings(compute_dtype="bfloat16") if qlora else None,
        )
        with random_weights(device) if not qlora else contextlib.nullcontext():
            module.configure_model()
        module.policy.to(device)
        sync(device)
        trained = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
        append_record(
            out, part, {"kind": "model", "trained_parameters": trained, "build_s": time.perf_counter() - start}
        )

    g = torch.Generator().manual_seed(0)
    vocab = config["vocab_size"]

    def tokens(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    rollouts = []
    for problem in range(shape["problems"]):
        prompt = tokens(shape["prompt"])  # the group's samples share their prompt
        rollouts += [
            Rollout(
                problem_id=f"p{problem}",
                phase="refine",
                prompt_ids=prompt,
                completion_ids=tokens(shape["completion"]),
                completion_text="",
                finish_reason="stop",
                reward=float(j % 2),
            )
            for j in range(shape["group"])
        ]
    problems = [Problem(id=f"p{i}", prompt_text="", answer="") for i in range(shape["problems"])]
    batch = PhaseBatch(phase="refine", problems=problems, index=0, pair=0, epoch=0)

    class SyntheticRollouts(Callback):  # in place of the rollout callback: the phase's rollouts, already scored
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            batch.rollouts = RolloutBatch(rollouts, group_size=shape["group"])

    layers, heads = config["num_hidden_layers"], config["num_attention_heads"] * config["head_dim"]
    tflops = peak_tflops(args)
    optimizer_step = module._optimizer_step

    def timed_step(rows: list[Rollout], step: Any, advantages: torch.Tensor, old: Any) -> Any:
        mine = sorted({i for work in step.passes if work.weight for i in work.rows})
        prompts = {rows[i].problem_id: len(rows[i].prompt_ids) for i in mine}
        completion = sum(len(rows[i].completion_ids) for i in mine)
        distinct = sum(prompts.values()) + completion
        # causal attention: sum over distinct tokens of their context (a prompt once, each completion after it)
        context = sum(p * (p + 1) / 2 for p in prompts.values()) + sum(
            len(rows[i].completion_ids) * len(rows[i].prompt_ids) + len(rows[i].completion_ids) ** 2 / 2 for i in mine
        )
        sync(device)
        reset_peak(device)
        begin = time.perf_counter()
        stats = optimizer_step(rows, step, advantages, old)
        sync(device)
        seconds = time.perf_counter() - begin
        flops = 6.0 * params * distinct
        attention = 12.0 * layers * heads * context
        record = {
            "kind": "step",
            "seconds": seconds,
            "passes": len(step.passes),
            "sequences": len(mine),
            "completion_tokens": completion,
            "distinct_tokens": distinct,
            "sequence_tokens": sum(len(rows[i].prompt_ids) + len(rows[i].completion_ids) for i in mine),
            "tokens_per_s": distinct / seconds,
            "completion_tokens_per_s": completion / seconds,
            "model_tflops_per_s": flops / seconds / 1e12,
            "attention_tflops_per_s": attention / seconds / 1e12,
            "mfu": flops / seconds / (tflops * 1e12) if tflops else None,
            "mfu_with_attention": (flops + attention) / seconds / (tflops * 1e12) if tflops else None,
            "grad_norm": stats.grad_norm,
            **memory(device),
        }
        append_record(out, part, record)
        return stats

    module._optimizer_step = timed_step
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision="bf16-mixed",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[SyntheticRollouts()],
        default_root_dir=str(out / "lightning"),
    )
    loader = DataLoader([batch], batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    append_record(out, part, {"kind": "done", "optimizer_steps": trainer.global_step, **memory(device)})


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a Qwen3 config: attention, MLP and norms per layer, the embedding (and an untied head)."""
    h, hd = config["hidden_size"], config["head_dim"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * config["intermediate_size"] + 2 * h + 2 * hd
    embedding = config["vocab_size"] * h * (1 if config["tie_word_embeddings"] else 2)
    return config["num_hidden_layers"] * layer + embedding + h


def part_decode(args: argparse.Namespace, out: Path) -> None:
    """The HF engine's sampling throughput on the recipe's model, in the trainer's compute dtype (bf16 autocast)."""
    from thinktwice_pl.models import load_causal_lm, load_tokenizer
    from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig

    device, shape = device_of(args), dict(DECODE_CPU if args.cpu else DECODE)
    config = model_config(args)
    with tempfile.TemporaryDirectory() as tmp, random_weights(device):
        model_dir = make_model_dir(Path(tmp), config)
        model = load_causal_lm(str(model_dir), gradient_checkpointing=True)  # as the update holds it
        tokenizer = load_tokenizer(str(model_dir))
    engine = HFRolloutEngine()
    engine.setup(model, tokenizer, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(10, config["vocab_size"], (shape["prompt"],), generator=g).tolist()
        for _ in range(shape["prompts"])
    ]
    append_record(
        out,
        "decode",
        {
            "kind": "shape",
            **shape,
            "layers": config["num_hidden_layers"],
            "weights": "float32",
            "compute": "bf16 autocast",
            "temperature": 1.0,
        },
    )
    engine.generate(prompts[:1], 1, SamplingConfig(temperature=1.0, max_new_tokens=4, seed=0))  # warm-up
    for _ in range(2):
        sync(device)
        reset_peak(device)
        begin = time.perf_counter()
        sampling = SamplingConfig(temperature=1.0, max_new_tokens=shape["new_tokens"], seed=0)
        groups = engine.generate(prompts, shape["samples"], sampling)
        sync(device)
        seconds = time.perf_counter() - begin
        new = sum(len(c.token_ids) for group in groups for c in group)
        append_record(
            out,
            "decode",
            {
                "kind": "generate",
                "seconds": seconds,
                "new_tokens": new,
                "sequences": shape["prompts"] * shape["samples"],
                "tokens_per_s": new / seconds,
                **memory(device),
            },
        )


def part_head_grad(args: argparse.Namespace, out: Path) -> None:
    """The head's [V, H] weight gradient per chunk (lm_head._HeadLogProbs backward), four ways, and `token_logprobs`
    forward + backward under bf16 autocast with and without the in-place path."""
    from thinktwice_pl.lm_head import token_logprobs

    device = device_of(args)
    vocab, hidden = (TINY if args.cpu else QWEN3_4B)["vocab_size"], (TINY if args.cpu else QWEN3_4B)["hidden_size"]
    chunk, repeats = 256, 3 if args.cpu else 10
    g = torch.Generator(device=device).manual_seed(0)
    grad_logits = torch.randn(chunk, vocab, device=device, generator=g) / vocab  # [chunk, V] fp32, as in backward
    hid = torch.randn(chunk, hidden, device=device, generator=g)  # [chunk, H] fp32: the final norm's output
    grad = torch.zeros(vocab, hidden, device=device)  # [V, H] fp32 .grad
    exact = grad_logits.double().t() @ hid.double()  # [V, H]
    tf32 = torch.backends.cuda.matmul.allow_tf32

    def fp32_addmm() -> None:  # the grad_into path now: autocast does not reach an in-place op
        grad.addmm_(grad_logits.t(), hid)

    def autocast_then_add() -> None:  # the plain path: a bf16 product, cast to fp32 by autograd and summed
        with torch.autocast(device.type, dtype=torch.bfloat16):
            product = grad_logits.t() @ hid  # [V, H] bf16
        grad.add_(product.float())

    def bf16_product_add() -> None:  # a bf16 product added into the fp32 gradient (no fp32 temporary)
        grad.add_(grad_logits.t().bfloat16() @ hid.bfloat16())

    def bf16_addmm_fp32_out() -> None:  # bf16 inputs, fp32 accumulation into the fp32 gradient (torch >= 2.8)
        torch.addmm(grad, grad_logits.t().bfloat16(), hid.bfloat16(), out_dtype=torch.float32, out=grad)

    variants = {
        "fp32_addmm (grad_into now)": (fp32_addmm, False),
        "tf32_addmm": (fp32_addmm, True),
        "autocast_product_then_add (plain path)": (autocast_then_add, False),
        "bf16_product_add": (bf16_product_add, False),
        "bf16_addmm_fp32_out": (bf16_addmm_fp32_out, False),
    }
    flops = 2.0 * vocab * chunk * hidden
    for name, (fn, allow_tf32) in variants.items():
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            grad.zero_()
            fn()
            error = float((grad.double() - exact).norm() / exact.norm())
            seconds = _time(fn, device, repeats)
            record = {
                "kind": "chunk",
                "variant": name,
                "ms": seconds * 1e3,
                "tflops_per_s": flops / seconds / 1e12,
                "relative_error": error,
            }
        except Exception as err:  # an unsupported variant is a result
            record = {"kind": "chunk", "variant": name, "error": f"{type(err).__name__}: {err}"[:300]}
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        append_record(out, "head_grad", record)
    del exact
    append_record(out, "head_grad", {"kind": "chunk_shape", "chunk": chunk, "vocab": vocab, "hidden": hidden})

    # the real function: 16 rows of 512 completion positions (GPU), the module's chunk size 256
    rows, length = (2, 32) if args.cpu else (16, 512)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden, device=device, generator=g) * 0.02)
    hidden_states = torch.randn(rows, length, hidden, device=device, generator=g, requires_grad=True)
    targets = torch.randint(vocab, (rows, length), device=device, generator=g)

    def through_head(keep_grad: bool) -> Any:
        def run() -> None:
            if not keep_grad:
                weight.grad = None  # the first micro-batch: autograd allocates and sums the chunks' gradients
            with torch.autocast(device.type, dtype=torch.bfloat16):
                lp, _ = token_logprobs(
                    hidden_states,
                    weight,
                    targets,
                    temperature=1.0,
                    chunk_size=chunk,
                    with_entropy=True,
                    grad_into=weight,
                )
            lp.sum().backward()

        return run

    for name, keep, allow_tf32 in (
        ("plain (no .grad yet)", False, False),
        ("grad_into fp32", True, False),
        ("grad_into tf32", True, True),
    ):
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            weight.grad = torch.zeros_like(weight) if keep else None
            seconds = _time(through_head(keep), device, repeats)
            append_record(
                out,
                "head_grad",
                {
                    "kind": "token_logprobs",
                    "variant": name,
                    "ms": seconds * 1e3,
                    "positions": rows * length,
                    "chunk": chunk,
                },
            )
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32


def _time(fn: Any, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - begin) / repeats


def part_tests(args: argparse.Namespace, out: Path) -> None:
    xml = out / "pytest.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-o",
        "addopts=",
        "-m",
        "gpu",
        str(ROOT / "tests/test_gpu.py"),
        "-rs",
        "-s",
        "-p",
        "no:cacheprovider",
        f"--junitxml={xml}",
    ]
    with (out / "pytest.txt").open("w") as log:
        rc = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    record: dict[str, Any] = {"kind": "pytest", "returncode": rc, "log": "pytest.txt"}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        cases = []
        for case in suite.iter("testcase"):
            status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            message = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
            cases.append(
                {
                    "test": case.get("name"),
                    "status": status,
                    "seconds": float(case.get("time", 0)),
                    "message": message[:300],
                }
            )
        record["cases"] = cases
    append_record(out, "tests", record)


# ------------------------------------------------------------------------------------------------ the driver


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import importlib

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "mode": "cpu (tiny model)" if args.cpu else "gpu",
        "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    packages = (
        "lightning",
        "transformers",
        "peft",
        "torchmetrics",
        "jsonargparse",
        "datasets",
        "math_verify",
        "bitsandbytes",
        "vllm",
        "pytest",
        "pytest_timeout",
    )
    for name in packages:
        try:
            env[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as err:  # a missing package is a finding
            env[name] = f"missing ({type(err).__name__})"
    if torch.cuda.is_available() and not args.cpu:
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": p.name, "memory_gib": p.total_memory / GIB, "peak_bf16_tflops": peak_tflops(args)}
    return env


def run_parts(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Each part in a child process with its time limit (cut to what is left of --budget-s); results stay in
    ``<part>.jsonl`` even when the child is stopped."""
    limits = LIMITS_CPU_S if args.cpu else LIMITS_S
    deadline = time.monotonic() + args.budget_s
    parts: dict[str, Any] = {}
    for part in args.parts:
        left = deadline - time.monotonic()
        limit = min(limits[part], left)
        if limit < 5:
            parts[part] = {"status": "not run: the check's time budget was spent", "records": []}
            continue
        command = [sys.executable, __file__, "--part", part, "--out", str(out)]
        command += ["--cpu"] * args.cpu + (["--layers", str(args.layers)] if args.layers else [])
        command += ["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []
        begin = time.monotonic()
        print(f"== {part} (limit {limit:.0f} s)", flush=True)
        with (out / f"{part}.log").open("w") as log:
            try:
                rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=limit, cwd=ROOT).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc}, see {part}.log)"
            except subprocess.TimeoutExpired:
                status = f"stopped at its time limit ({limit:.0f} s): the records below are what it measured"
        path = out / f"{part}.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        if part == "tests" and records and records[-1]["returncode"] != 0 and status == "ok":
            status = f"failed (pytest exit {records[-1]['returncode']}, see pytest.txt)"
        parts[part] = {"status": status, "seconds": time.monotonic() - begin, "records": records}
        print(f"   {status} in {parts[part]['seconds']:.0f} s", flush=True)
    return parts


def summarize(parts: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: medians over the update's steps after the first (a warm-up) and the second generate."""
    summary: dict[str, Any] = {}
    records = parts.get("update", {}).get("records", [])
    steps = [r for r in records if r["kind"] == "step"]
    measured = steps[1:] or steps
    if measured:
        med = {
            k: sorted(r[k] for r in measured)[len(measured) // 2] if measured[0][k] is not None else None
            for k in ("seconds", "tokens_per_s", "mfu", "mfu_with_attention")
        }
        summary["update"] = {
            "scale": records[0].get("scale"),
            "optimizer_steps_measured": len(measured),
            "first_step_left_out": len(steps) > 1,
            "seconds_per_optimizer_step": med["seconds"],
            "training_tokens_per_s": med["tokens_per_s"],
            "mfu": med["mfu"],
            "mfu_with_attention": med["mfu_with_attention"],
            "peak_gib": max(r.get("peak_allocated_gib", r.get("peak_rss_gib", 0.0)) for r in steps),
        }
    generated = [r for r in parts.get("decode", {}).get("records", []) if r["kind"] == "generate"]
    if generated:
        summary["decode"] = {"tokens_per_s": generated[-1]["tokens_per_s"], "seconds": generated[-1]["seconds"]}
    chunks = [r for r in parts.get("head_grad", {}).get("records", []) if r["kind"] == "chunk" and "ms" in r]
    if chunks:
        summary["head_grad_ms_per_chunk"] = {r["variant"]: round(r["ms"], 3) for r in chunks}
    tests = parts.get("tests", {}).get("records", [])
    if tests and "cases" in tests[-1]:
        counts: dict[str, int] = {}
        for case in tests[-1]["cases"]:
            counts[case["status"]] = counts.get(case["status"], 0) + 1
        summary["tests"] = counts
    return summary


def markdown(report: dict[str, Any]) -> str:
    env, lines = report["environment"], ["# GPU check", ""]
    gpu = env.get("gpu", {})
    lines += [
        f"- mode: {env['mode']}; device: {gpu.get('name', 'cpu')}; torch {env['torch']} (CUDA {env['cuda']}); "
        f"transformers {env['transformers']}; lightning {env['lightning']}; peft {env['peft']}",
        f"- command: `{report['command']}`; wall time {report['wall_s']:.0f} s",
        "",
    ]
    for name, part in report["parts"].items():
        lines += [f"## {name}: {part['status']}", ""]
        for record in part["records"]:
            cases = record.pop("cases", None)
            lines.append("- " + ", ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
            for case in cases or []:
                lines.append(f"  - {case['test']}: {case['status']} ({case['seconds']:.1f} s) {case['message']}")
        lines.append("")
    lines += ["## summary", "", "```", json.dumps(report["summary"], indent=1), "```", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="report folder")
    parser.add_argument("--cpu", action="store_true", help="a tiny model on CPU: the check's logic, in about a minute")
    parser.add_argument("--part", choices=PARTS, help="run one part in this process (the driver's children)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts the driver runs")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 36, or 18 on a GPU under 120 GiB)")
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 dense peak for MFU (default: by name)")
    parser.add_argument("--budget-s", type=float, default=440.0, help="the driver's total time for all parts")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    elif not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run with --cpu for the tiny CPU version")
    if args.part:
        (out / f"{args.part}.jsonl").unlink(missing_ok=True)
        globals()[f"part_{args.part}"](args, out)
        return
    begin = time.monotonic()
    report: dict[str, Any] = {
        "command": " ".join(["python", "scripts/bench_gpu.py", *sys.argv[1:]]),
        "environment": environment(args),
    }
    report["parts"] = run_parts(args, out)
    report["summary"] = summarize(report["parts"])
    report["wall_s"] = time.monotonic() - begin
    report["ok"] = all(p["status"] == "ok" for p in report["parts"].values())
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(markdown(json.loads(json.dumps(report))))
    print(json.dumps({"ok": report["ok"], "wall_s": round(report["wall_s"]), **report["summary"]}, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
