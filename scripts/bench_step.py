"""Seconds per optimizer step of one config, split into generate / score / train / sync, for the solve and refine
phases separately, with tokens per second and peak resident memory.

    python scripts/bench_step.py --config configs/quickstart.yaml                     # 6 phases (3 pairs)
    python scripts/bench_step.py --config configs/quickstart.yaml --phases 8 --json out.json -- --data.refine false
    python scripts/bench_step.py --config configs/quickstart.yaml -- \
        --rollout.engine thinktwice_pl.rollout.vllm.VLLMRolloutEngine --rollout.engine.init_args.enforce_eager true

It runs ``thinktwice fit`` in this process, in a scratch folder (no validation; the run's files are deleted after),
and stops it after ``--phases`` phase batches; anything after ``--`` is passed to ``thinktwice fit`` unchanged.
Per phase it reads the phase's own ``perf/*`` timings (those of metrics.csv: `RolloutCallback` times generation,
grading and the weight sync, the module its update) and the wall time between consecutive phase ends ("step":
everything a phase costs, callbacks and logging included). A sampling thread reads the resident set (/proc/self/statm)
every 10 ms and attributes each reading to what runs: ``generate`` (the engine's generate call) or ``update``
(``training_step``); the process's high-water mark (``ru_maxrss``) is reported too.

The first phase of each kind is a warm-up (first-use allocations, lazy imports) and is left out of the medians.
With one optimizer step per phase (the quickstart), "per phase" is "per optimizer step"; the summary also divides
by the optimizer steps of each phase. Timings depend on threads: set ``OMP_NUM_THREADS`` as for the run you mean.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = float(1 << 30)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssSampler:
    """Reads the resident set every `interval` seconds in a daemon thread; keeps the peak per label."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.label = "other"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def take(self) -> dict[str, int]:
        """The peaks since the last take, and start over."""
        peaks, self.peaks = self.peaks, {}
        return peaks

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(self.label)

    def _sample(self, label: str) -> None:
        rss = rss_bytes()
        if rss > self.peaks.get(label, 0):
            self.peaks[label] = rss

    @contextlib.contextmanager
    def labelled(self, label: str) -> Any:
        """Attributes the samples taken meanwhile to `label`; also samples on entry and exit, so a call shorter than
        the sampling interval still has a reading."""
        before, self.label = self.label, label
        self._sample(label)
        try:
            yield
        finally:
            self._sample(label)
            self.label = before


def _wrap(obj: Any, name: str, sampler: RssSampler, label: str) -> None:
    method = getattr(obj, name)

    @functools.wraps(method)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with sampler.labelled(label):
            return method(*args, **kwargs)

    setattr(obj, name, wrapped)


class PhaseBench(Callback):
    """Records every phase's timings, tokens and memory; writes them as JSON to $BENCH_STEP_OUT at the end of fit."""

    def __init__(self) -> None:
        self.sampler = RssSampler()
        self.records: list[dict[str, Any]] = []
        self._outputs: dict[str, Any] | None = None
        self._batch: Any = None
        self._last = 0.0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        from thinktwice_pl.callbacks.rollout import RolloutCallback

        rollout = next(c for c in trainer.callbacks if isinstance(c, RolloutCallback))
        _wrap(rollout.engine, "generate", self.sampler, "generate")
        _wrap(pl_module, "training_step", self.sampler, "update")
        self.sampler.start()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last = time.perf_counter()
        self.sampler.take()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._flush()  # the previous phase: its weight sync has run by now (batch.sync_s)
        rollouts = batch.rollouts.rollouts
        peaks = self.sampler.take()
        self.records.append(
            {
                "phase": batch.phase,
                "index": batch.index,
                "step_s": now - self._last,
                "optimizer_steps": None,
                "sequences": len(rollouts),
                "prompt_tokens": sum(len(r.prompt_ids) for r in rollouts),
                "completion_tokens": sum(len(r.completion_ids) for r in rollouts),
                "peak_rss_gib": {k: v / GIB for k, v in peaks.items()},
                "global_step": trainer.global_step,
            }
        )
        self._outputs = outputs if isinstance(outputs, dict) else {}
        self._batch = batch
        self._last = now
        if len(self.records) >= int(os.environ.get("BENCH_STEP_PHASES", "0") or 1 << 30):
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush()
        self.sampler.stop()
        steps = [r["global_step"] for r in self.records]
        for record, before in zip(self.records, [0, *steps[:-1]], strict=True):
            record["optimizer_steps"] = record.pop("global_step") - before
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        out = {"records": self.records, "ru_maxrss_gib": peak}
        Path(os.environ["BENCH_STEP_OUT"]).write_text(json.dumps(out))

    def _flush(self) -> None:
        if self._outputs is not None and self.records:
            record = self.records[-1]
            for key in ("generate_s", "score_s", "train_s"):
                record[key] = float(self._outputs.get(f"perf/{key}", float("nan")))
            sync_s = self._batch.sync_s
            record["sync_s"] = float("nan") if sync_s is None else sync_s
            self._outputs = self._batch = None


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Medians per phase kind (the first phase of each kind left out), and the ratios the issue tracks."""
    summary: dict[str, Any] = {}
    for phase in ("solve", "refine"):
        rows = [r for r in data["records"] if r["phase"] == phase][1:]
        if not rows:
            continue

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        per_sequence = {
            key: statistics.median(r[f"{key}_tokens"] / r["sequences"] for r in rows)
            for key in ("prompt", "completion")
        }
        peaks = {
            label: max(r["peak_rss_gib"].get(label, 0.0) for r in data["records"] if r["phase"] == phase)
            for label in ("generate", "update", "other")
        }
        summary[phase] = {
            "phases_measured": len(rows),
            "optimizer_steps_per_phase": med("optimizer_steps"),
            "step_s": med("step_s"),
            "generate_s": med("generate_s"),
            "score_s": med("score_s"),
            "train_s": med("train_s"),
            "sync_s": med("sync_s"),
            "prompt_tokens_per_sequence": per_sequence["prompt"],
            "completion_tokens_per_sequence": per_sequence["completion"],
            "generate_ms_per_completion_token": 1000
            * statistics.median(r["generate_s"] / max(r["completion_tokens"], 1) for r in rows),
            "completion_tokens_per_generate_s": statistics.median(
                r["completion_tokens"] / r["generate_s"] for r in rows if r["generate_s"] > 0
            ),
            "tokens_per_step_s": statistics.median(
                (r["prompt_tokens"] + r["completion_tokens"]) / r["step_s"] for r in rows
            ),
            "peak_rss_gib": peaks,
        }
    if "solve" in summary and "refine" in summary:
        s, r = summary["solve"], summary["refine"]
        summary["refine_over_solve_generate_per_completion_token"] = (
            r["generate_ms_per_completion_token"] / s["generate_ms_per_completion_token"]
        )
        summary["pair_s"] = s["step_s"] + r["step_s"]
    summary["peak_rss_gib"] = data["ru_maxrss_gib"]
    return summary


def main() -> None:
    command = ["python", "scripts/bench_step.py", *sys.argv[1:]]
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a thinktwice config (e.g. configs/quickstart.yaml)")
    parser.add_argument("--phases", type=int, default=6, help="phase batches to run (default 6: 3 solve/refine pairs)")
    parser.add_argument("--json", help="also write the per-phase records and the summary to this file")
    args = parser.parse_args(argv)
    if args.phases < 2:
        parser.error(f"--phases {args.phases}: at least 2 (the first phase of each kind is a warm-up)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config = Path(args.config).resolve()
    if not config.is_file():
        parser.error(f"--config {args.config}: no such file")
    home = Path(os.environ.get("THINKTWICE_HOME", "checkpoints")).resolve()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # PhaseBench by class path: bench_step.PhaseBench
    from thinktwice_pl.cli import main as thinktwice

    sys.argv = sys.argv[:1]  # the fit's arguments are passed below (LightningCLI warns when sys.argv holds others)

    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp, contextlib.chdir(tmp):
        os.environ["BENCH_STEP_OUT"] = str(Path(tmp) / "bench.json")
        os.environ["BENCH_STEP_PHASES"] = str(args.phases)
        os.environ.setdefault("THINKTWICE_HOME", str(home))  # built-in models: where a run from here keeps them
        thinktwice(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.max_steps",
                "1000000",
                "--trainer.limit_val_batches",
                "0",
                "--trainer.callbacks+=bench_step.PhaseBench",
                "--eval.validate_before_training",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                *extra,
            ]
        )
        data = json.loads(Path(os.environ["BENCH_STEP_OUT"]).read_text())
    data["summary"] = summarize(data)
    data["command"] = command
    data["threads"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    print(json.dumps(data["summary"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
