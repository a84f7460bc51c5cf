"""scripts/gpu_check.sh in its CPU mode: every part of the GPU check runs for real on a tiny model and the report
holds the fields a GPU run fills (the figures themselves mean nothing on CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_mode_writes_one_report_with_every_part(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "OUT": str(tmp_path / "report"),
        "GPU_WHEELS": str(tmp_path / "no-wheels"),
        "PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = tmp_path / "report"
    report = json.loads((out / "report.json").read_text())
    assert "# GPU check" in (out / "report.md").read_text()
    parts = report["parts"]
    assert set(parts) == {"tests", "update", "decode", "head_grad", "qlora"}
    assert all(part["status"] == "ok" for part in parts.values()), {k: p["status"] for k, p in parts.items()}
    assert report["environment"]["mode"] == "cpu (tiny model)"

    # (a) tests/test_gpu.py ran: on CPU each test is skipped with its reason
    cases = parts["tests"]["records"][-1]["cases"]
    assert len(cases) >= 4 and all(c["status"] == "skipped" and "CUDA" in c["message"] for c in cases)

    # (b) the update: 6 problems in mini-batches of 2 = 3 optimizer steps, each with its figures
    steps = [r for r in parts["update"]["records"] if r["kind"] == "step"]
    assert len(steps) == 3
    for step in steps:
        assert step["seconds"] > 0 and step["tokens_per_s"] > 0 and math.isfinite(step["grad_norm"])
        assert step["sequences"] == 8 and step["completion_tokens"] == 8 * 40
        assert step["distinct_tokens"] == 2 * 24 + 8 * 40  # each group's shared prompt once
        assert step["peak_rss_gib"] > 0 and step["mfu"] is None  # no peak FLOP/s for a CPU
    done_record = parts["update"]["records"][-1]
    assert done_record["kind"] == "done" and done_record["optimizer_steps"] == 3
    shape = parts["update"]["records"][0]
    model = next(r for r in parts["update"]["records"] if r["kind"] == "model")
    assert shape["parameters"] == model["trained_parameters"]  # the FLOP count's N is the model's own
    summary = report["summary"]["update"]
    assert summary["optimizer_steps_measured"] == 2 and summary["seconds_per_optimizer_step"] > 0

    # (c) decoding
    generated = [r for r in parts["decode"]["records"] if r["kind"] == "generate"]
    assert generated and all(0 < r["new_tokens"] <= 2 * 2 * 16 and r["tokens_per_s"] > 0 for r in generated)

    # every variant of the head's weight gradient measured or its error recorded; the fp32 one exact
    chunks = {r["variant"]: r for r in parts["head_grad"]["records"] if r["kind"] == "chunk"}
    assert len(chunks) == 5
    assert chunks["fp32_addmm (grad_into now)"]["relative_error"] < 1e-5
    assert chunks["autocast_product_then_add (plain path)"]["relative_error"] < 2e-2
    through = [r for r in parts["head_grad"]["records"] if r["kind"] == "token_logprobs"]
    assert len(through) == 3 and all(r["ms"] > 0 for r in through)

    # (d) QLoRA: run where bitsandbytes is installed, else skipped with the reason
    qlora = parts["qlora"]["records"]
    assert qlora[-1]["kind"] in ("done", "skipped")
    if qlora[-1]["kind"] == "done":
        assert qlora[-1]["optimizer_steps"] == 2
        adapters = next(r for r in qlora if r["kind"] == "model")
        assert 0 < adapters["trained_parameters"] < shape["parameters"]  # the adapters only
