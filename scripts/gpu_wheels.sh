#!/usr/bin/env bash
# Fill build/gpu_wheels with the small wheels scripts/gpu_check.sh installs on a GPU machine (it reaches no registry).
#
#   bash scripts/gpu_wheels.sh                 # here, with registry access; then carry build/gpu_wheels with the call
#
# The GPU machines hold torch 2.11 (CUDA 13), transformers 5.17, lightning 2.6.6, peft, torchmetrics, pytest; the
# check imports nothing else from the package's dependencies (jsonargparse is imported by thinktwice_pl.cli only,
# datasets and math-verify inside the functions that use them), so it carries only:
#   - pytest-timeout 2.4.0 (14 KB): the repository's per-test timeout for tests/test_gpu.py;
#   - bitsandbytes 0.50.2 (the QLoRA part) cut down to its CUDA 13 and CPU libraries: about 8 MB of its 41 MiB
#     wheel (the CUDA 11/12, ROCm and XPU builds are dropped; the wheel's RECORD is rewritten to match).
# The total is printed at the end; the carried working tree and wheels must stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEELS:-build/gpu_wheels}
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
rm -rf "$DIR" && mkdir -p "$DIR/full"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$DIR/full" \
  pytest-timeout==2.4.0 bitsandbytes==0.50.2
"$PY" - "$DIR" <<'PY'
import re, sys, zipfile
from pathlib import Path

out = Path(sys.argv[1])
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+|xpu\d+)\.so$")
for wheel in sorted((out / "full").glob("*.whl")):
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if drop.search(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.search(line.split(",")[0])).encode()
            dst.writestr(info, data)
total = 0
for wheel in sorted(out.glob("*.whl")):
    size = wheel.stat().st_size
    total += size
    print(f"{size / 2**20:8.2f} MiB  {wheel.name}")
print(f"{total / 2**20:8.2f} MiB  in all ({out})")
PY
rm -rf "$DIR/full"
