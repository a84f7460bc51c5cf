#!/usr/bin/env bash
# gpu_smoke.sh: the GPU-only checks, in a few minutes, on one CUDA GPU, offline.
#
# Which script for which machine: scripts/gpu_check.sh is for the lent GPU machines (torch 2.11, transformers 5.17,
# lightning 2.6.6, peft, no vLLM, nothing installable but carried wheels): tests/test_gpu.py, the recipe's update
# figures and decoding on a Qwen3-4B-shaped model, and one report. This script is for a machine with a full install
# (vLLM on CUDA): what needs vLLM (colocated weight sync on the GPU, sleep levels), plus the memory figures below.
#
#   bash scripts/gpu_smoke.sh            # from the repository root; writes a log to $OUT or runs/gpu_smoke
#
# Assumes a machine with CUDA torch, lightning, transformers and peft installed and no package
# registry: nothing is installed; the package runs from src/ (PYTHONPATH). What it runs:
#   1. the environment: versions, GPU, which optional packages are present (vllm, bitsandbytes, ...);
#   2. tests marked `gpu` (tests/test_gpu.py): a bf16-true fit on CUDA, an FSDP1 fit on one GPU with the
#      gathered rollout weights, and vLLM on CUDA across sleep levels (skipped, and said so, without vllm);
#   3. CUDA memory figures: the peak of chunked token log-probs vs full logits at Qwen3's vocabulary.
# Every skip is printed with its reason (pytest -rs). Exit status: pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-runs/gpu_smoke}
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}

echo "== environment"
"$PY" - <<'PY' 2>&1 | tee "$LOG_DIR/environment.txt"
import importlib, torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "| bf16", torch.cuda.is_bf16_supported())
for name in ("lightning", "transformers", "peft", "torchmetrics", "jsonargparse", "datasets", "math_verify",
             "pandas", "bitsandbytes", "vllm", "pytest"):
    try:
        module = importlib.import_module(name)
        print(f"{name:13s}", getattr(module, "__version__", "present"))
    except Exception as err:  # noqa: BLE001 - report any import failure
        print(f"{name:13s} MISSING ({type(err).__name__}): the checks that need it are skipped")
PY

if ! "$PY" -c "import pytest" 2>/dev/null; then
  echo "pytest is missing: copy a pytest wheel in (pip install --no-index pytest-*.whl) and rerun"; exit 1
fi

echo "== tests marked gpu"
# -o addopts= : the repository's addopts name pytest-timeout, which may be absent here
"$PY" -m pytest -o addopts= -m gpu tests/test_gpu.py -v -rs -s -p no:cacheprovider 2>&1 | tee "$LOG_DIR/pytest.txt"
rc=${PIPESTATUS[0]}

echo "== CUDA memory figures"
"$PY" - <<'PY' 2>&1 | tee "$LOG_DIR/memory.txt"
import torch
from thinktwice_pl.lm_head import token_logprobs
if not torch.cuda.is_available():
    print("skipped: no CUDA GPU"); raise SystemExit(0)
vocab, hidden, n, length = 151_936, 2560, 4, 2048   # Qwen3-4B's vocabulary and width, 4 sequences of 2k tokens
head = torch.nn.Linear(hidden, vocab, bias=False, device="cuda", dtype=torch.bfloat16)
h = torch.randn(n, length, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
targets = torch.randint(vocab, (n, length), device="cuda")
def peak(fn):
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn().sum().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30
def naive():
    logits = head(h).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
def chunked():
    return token_logprobs(h, head, targets, temperature=1.0, chunk_size=1024, with_entropy=False)[0]
def by_weight():  # the hand-written log-softmax (lm_head._HeadLogProbs), with entropies as in the update
    return token_logprobs(h, head.weight, targets, temperature=0.7, chunk_size=1024, with_entropy=True)[0]
def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn().sum().backward(); start.record(); fn().sum().backward(); end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3
print(f"token log-probs + backward, {n}x{length} tokens, vocab {vocab}, bf16:")
print(f"  full logits   peak {peak(naive):6.2f} GiB")
print(f"  chunked (1024) peak {peak(chunked):6.2f} GiB  {timed(chunked):.3f} s")
print(f"  weight head (1024) peak {peak(by_weight):6.2f} GiB  {timed(by_weight):.3f} s")
with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16-mixed: fp32 weight, the product in bf16
    head32 = torch.nn.Linear(hidden, vocab, bias=False, device="cuda")
    h32 = h.detach().float().requires_grad_()
    a = token_logprobs(h32, head32, targets, temperature=0.7, chunk_size=1024)[0]
    b = token_logprobs(h32, head32.weight, targets, temperature=0.7, chunk_size=1024)[0]
    ga = torch.autograd.grad(a.sum(), (h32, head32.weight)); gb = torch.autograd.grad(b.sum(), (h32, head32.weight))
print("  autocast: max |lp diff|", (a - b).abs().max().item(),
      "grad rel diff", [((x - y).norm() / x.norm()).item() for x, y in zip(ga, gb)])
PY
exit "$rc"
