#!/usr/bin/env bash
# gpu_check.sh: one command for a GPU machine without a registry (torch, transformers, lightning, peft preinstalled,
# no vLLM): tests/test_gpu.py, the paper recipe's update on a Qwen3-4B-shaped model (peak memory, seconds per
# optimizer step, tokens/s, MFU), the HF engine's decoding tokens/s, the LM head's weight-gradient variants, and
# QLoRA when bitsandbytes came along. Under 8 minutes on one H100; one report, report.json and report.md.
#
#   bash scripts/gpu_wheels.sh        # beforehand, on a machine with a registry: fills build/gpu_wheels (~8 MB)
#   bash scripts/gpu_check.sh         # on the GPU machine, from the repository root; carry build/gpu_wheels
#   bash scripts/gpu_check.sh --cpu   # the same logic on a tiny model on CPU, about a minute (CI runs this)
#
# Installs nothing into the system: the wheels go to a temporary folder on PYTHONPATH (pip --target), the package
# runs from src/. The report goes to $OUT (when set) or runs/gpu_check; the part logs next to it. Models are built
# from their configs with random weights: no weights travel. What needs vLLM on CUDA (colocated weight sync, sleep
# levels) is scripts/gpu_smoke.sh, for a machine with a full install. Other flags go to scripts/bench_gpu.py
# (--layers N, --parts ..., --peak-tflops X). Exit status: 0 when every part ran and passed.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || command -v python || echo python3)}
WHEELS=${GPU_WHEELS:-build/gpu_wheels}
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl \
    || echo "warning: the wheels in $WHEELS did not install; the parts that need them are skipped"
else
  echo "no wheels in $WHEELS (bash scripts/gpu_wheels.sh fills it): the check uses what is installed"
fi
export PYTHONPATH="$PWD/src:$PWD/tests:$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" scripts/bench_gpu.py --out "${OUT:-runs/gpu_check}" "$@"
