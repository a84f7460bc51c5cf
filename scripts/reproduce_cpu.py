"""ThinkTwice vs GRPO on SmolLM2-135M-Instruct, on a CPU: base model, both trainings, both evaluations, one table.

    python scripts/reproduce_cpu.py                               # one seed (docs/results.md)
    python scripts/reproduce_cpu.py --seeds 0 1 2                 # mean and spread over seeds
    python scripts/reproduce_cpu.py --out runs/lr2e-5 -- --model.learning_rate 2e-5   # arguments for every stage
    python scripts/reproduce_cpu.py --smoke --out /tmp/smoke      # the tiny model and minimal sizes: seconds

Stages, each one `thinktwice` command in its own process (logs in <out>/logs/), two at a time by default
(--jobs 2: each process runs one thread, so two of them use the two cores of a small machine; --jobs 1 runs
them one by one):

1. checks (in this process): the two configs differ only in data.refine (model, rollout, eval and problems are
   the same), and no validation or test problem text occurs among the training problems (an error otherwise);
2. for each seed: ``thinktwice fit`` of ThinkTwice and of GRPO (seed_everything, data.seed and rollout.seed set to
   the seed), then ``thinktwice test`` of each exported model; once: ``thinktwice test`` of the untrained model.
   All evaluations use the same settings and sampling seeds, so the comparison is paired problem by problem;
3. report: ``table.md`` (pass@1 / pass@n before and after refinement, fix-wrong and damage-correct, with 95 %
   bootstrap intervals over problems, and the paired ThinkTwice - GRPO difference), ``summary.csv``,
   ``records.csv`` (one row per problem and model), ``metrics/`` (each training run's metrics.csv),
   ``dynamics.png`` (the rectify/fortify overlay of scripts/plot_dynamics.py), ``curves.png`` (training reward
   and held-out greedy accuracy of both runs) and ``timings.json``.

A rerun with the same --out skips the stages that finished. Stages inherit OMP_NUM_THREADS (1 when unset).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"thinktwice": "ThinkTwice", "grpo": "GRPO"}  # config file stem -> label
BOOTSTRAP_RESAMPLES = 2000
SMOKE_ARGS = [
    "--model.model_name_or_path",
    "thinktwice:tiny",
    "--rollout.engine",
    "thinktwice_pl.rollout.HFRolloutEngine",
    "--trainer.precision",
    "32-true",
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--data.problems_per_batch",
    "2",
    "--rollout.num_generations",
    "2",
    "--rollout.max_completion_length",
    "8",
    "--eval.max_completion_length",
    "8",
    "--eval.num_samples",
    "2",
    "--data.eval_problems_per_batch",
    "4",
]
"""--smoke: the tiny built-in model, HF sampling, 4 phases, 2 samples of 8 tokens (plus 4 problems per benchmark)."""


def main(argv: list[str] | None = None) -> Path:
    args = _parse(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    configs = {method: (args.config_dir / f"{method}.yaml").resolve() for method in METHODS}
    for method, path in configs.items():
        if not path.is_file():
            raise SystemExit(f"--config-dir {args.config_dir} has no {method}.yaml")
    extra = list(args.overrides)
    if args.smoke:
        extra = SMOKE_ARGS + _smoke_benchmark_sizes(configs["thinktwice"]) + extra
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    runner = _Stages(out, env)

    start = time.perf_counter()
    check_configs(configs, extra)
    runner.timings["checks"] = round(time.perf_counter() - start, 1)
    base = Stage("base-test", ["test", "--config", str(configs["thinktwice"]), *extra], out, "base-test", "base")
    stages, runs = [], {}
    for seed in args.seeds:
        seeded = ["--seed_everything", str(seed), "--data.seed", str(seed), "--rollout.seed", str(seed)]
        fits = {
            method: Stage(
                f"{method}-fit-seed{seed}",
                ["fit", "--config", str(config), *extra, *seeded],
                out,
                method,
                f"seed{seed}",
            )
            for method, config in configs.items()
        }
        stages += fits.values()
        if seed == args.seeds[0]:
            stages.append(base)  # after the first fits: with --jobs 2 it runs while the shorter fit's lane is free
        for method, config in configs.items():
            model = fits[method].run_dir / "hf_model"
            test = Stage(
                f"{method}-test-seed{seed}",
                ["test", "--config", str(config), *extra, "--model.model_name_or_path", str(model)],
                out,
                f"{method}-test",
                f"seed{seed}",
                after=(fits[method].stage,),
            )
            stages.append(test)
            runs[(method, seed)] = {"fit": fits[method].run_dir, "test": test.run_dir}
    runner.run_all(stages, args.jobs)
    runner.timings["wall (this command)"] = round(time.perf_counter() - start, 1)
    (out / "timings.json").write_text(json.dumps(runner.timings, indent=2))
    command = " ".join(["python scripts/reproduce_cpu.py", *(sys.argv[1:] if argv is None else argv)])
    report(out, base.run_dir, runs, runner.timings, command)
    print((out / "table.md").read_text())
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce_cpu"), help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one pair of runs each)")
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=ROOT / "configs" / "smollm2",
        help="folder with thinktwice.yaml and grpo.yaml",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        choices=(1, 2),
        default=2,
        help="stages at once: 2 = two one-thread processes on two cores, 1 = one by one",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, minimal sizes: checks the pipeline runs")
    parser.add_argument("overrides", nargs="*", help="after --: arguments added to every thinktwice command")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """One `thinktwice` command: its arguments (the logger's are added), its log directory
    ``<out>/runs/<name>/<version>`` and the stages it needs finished first."""

    stage: str
    args: list[str]
    out: Path
    name: str
    version: str
    after: tuple[str, ...] = ()

    @property
    def run_dir(self) -> Path:
        return self.out / "runs" / self.name / self.version

    def command(self) -> list[str]:
        prefix = "--trainer.logger.init_args"
        logger = [
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            f"{prefix}.save_dir",
            str(self.out / "runs"),
            f"{prefix}.name",
            self.name,
            f"{prefix}.version",
            self.version,
        ]
        return [sys.executable, "-m", "thinktwice_pl", *self.args, *logger]


class _Stages:
    """Runs stages as processes, at most `jobs` at a time, each with a log and a wall time; skips finished ones."""

    def __init__(self, out: Path, env: dict[str, str]) -> None:
        self.out, self.env = out, env
        timings = out / "timings.json"
        self.timings: dict[str, float] = json.loads(timings.read_text()) if timings.is_file() else {}

    def run_all(self, stages: list[Stage], jobs: int) -> None:
        """Runs `stages` in list order as their `after` stages finish; the first failure stops the others."""
        pending, finished = list(stages), set()
        running: dict[str, tuple[subprocess.Popen[bytes], Stage, float]] = {}
        while pending or running:
            for stage in [s for s in pending if all(a in finished for a in s.after)]:
                if (self.out / "done" / stage.stage).is_file():
                    print(f"[{stage.stage}] finished earlier, skipped ({stage.run_dir})", flush=True)
                    pending.remove(stage)
                    finished.add(stage.stage)
                elif len(running) < jobs:
                    pending.remove(stage)
                    running[stage.stage] = (self._start(stage), stage, time.perf_counter())
            for name, (process, stage, started) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                seconds = time.perf_counter() - started
                if code != 0:
                    for other, _, _ in running.values():  # the stages this script started, by their handles
                        other.terminate()
                    log = self.out / "logs" / f"{name}.log"
                    tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
                    raise SystemExit(f"[{name}] failed with exit code {code} after {seconds:.0f} s; log: {log}\n{tail}")
                self._finish(stage, seconds)
                finished.add(name)
            if running:
                time.sleep(1.0)
            elif pending and not any(all(a in finished for a in s.after) for s in pending):
                raise SystemExit(f"stages {[s.stage for s in pending]} wait on stages that never run")

    def _start(self, stage: Stage) -> subprocess.Popen[bytes]:
        shutil.rmtree(stage.run_dir, ignore_errors=True)  # a stage that did not finish starts again
        log = self.out / "logs" / f"{stage.stage}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{stage.stage}] {' '.join(stage.command()[1:])}", flush=True)
        with log.open("wb") as f:
            return subprocess.Popen(stage.command(), stdout=f, stderr=subprocess.STDOUT, env=self.env)

    def _finish(self, stage: Stage, seconds: float) -> None:
        self.timings[stage.stage] = round(seconds, 1)
        (self.out / "timings.json").write_text(json.dumps(self.timings, indent=2))
        done = self.out / "done" / stage.stage
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(f"{seconds:.1f}\n")
        print(f"[{stage.stage}] {seconds / 60:.1f} min", flush=True)


def resolved_config(config: Path, extra: list[str]) -> dict[str, Any]:
    """What ``thinktwice fit --config <config> <extra>`` would run, as a plain dict (parsed in this process)."""
    from thinktwice_pl.cli import main as thinktwice

    printed, argv = io.StringIO(), sys.argv
    sys.argv = sys.argv[:1]  # LightningCLI warns when it gets arguments while sys.argv holds this script's
    try:
        with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
            thinktwice(["fit", "--config", str(config), *extra, "--print_config"])
    finally:
        sys.argv = argv
    resolved = yaml.safe_load(printed.getvalue())
    if not isinstance(resolved, dict) or "data" not in resolved:
        raise SystemExit(f"could not resolve {config} {extra}: try thinktwice fit --config {config} --print_config")
    return resolved


def check_configs(configs: dict[str, Path], extra: list[str]) -> None:
    """The configs differ only in data.refine (and names and paths); held-out problems share no text with training."""
    from thinktwice_pl.data import ProblemSource, load_problems

    thinktwice, grpo = (resolved_config(configs[m], extra) for m in METHODS)
    if thinktwice["data"]["refine"] is not True or grpo["data"]["refine"] is not False:
        raise SystemExit(f"{configs['thinktwice']} needs data.refine: true and {configs['grpo']} data.refine: false")
    for section in ("model", "rollout", "eval"):
        if thinktwice[section] != grpo[section]:
            raise SystemExit(
                f"the {section}: sections of {configs['thinktwice']} and {configs['grpo']} differ; a fair comparison "
                "needs the same settings (only data.refine, names and paths may differ)"
            )
    data = thinktwice["data"]
    for key in ("train", "val", "test"):
        if data.get(key) != grpo["data"].get(key):
            raise SystemExit(f"data.{key} differs between the two configs; both methods must use the same problems")
    train_texts = {p.prompt_text for p in load_problems(ProblemSource(**data["train"]))}
    for split in ("val", "test"):
        for name, source in (data.get(split) or {}).items():
            flag = f"data.{split}.{name}"
            problems = load_problems(ProblemSource(**source), flag_prefix=flag)
            shared = sorted({p.prompt_text for p in problems} & train_texts)
            if shared:
                raise SystemExit(
                    f"{flag} shares {len(shared)} of its {len(problems)} problem texts with data.train (e.g. "
                    f"{shared[0]!r}): held-out scores would measure trained problems; for procedural sources set "
                    "data.train.text_split: train and text_split: heldout on the held-out sets"
                )
            print(
                f"[checks] {flag}: {len(problems)} problems, none of them among the {len(train_texts)} distinct "
                "training texts",
                flush=True,
            )
    if not data.get("test"):
        raise SystemExit(f"{configs['thinktwice']} has no data.test benchmarks: the final evaluation needs them")


def _smoke_benchmark_sizes(config: Path) -> list[str]:
    data = yaml.safe_load(config.read_text()).get("data", {})
    return [
        arg
        for split in ("val", "test")
        for name in (data.get(split) or {})
        for arg in (f"--data.{split}.{name}.num_problems", "4")
    ]


# ---------------------------------------------------------------------------------------------- report


def report(
    out: Path, base_dir: Path, runs: dict[tuple[str, int], dict[str, Path]], timings: dict[str, float], command: str
) -> None:
    """Writes table.md, summary.csv, records.csv, metrics/, dynamics.png, curves.png from the stages' outputs."""
    from thinktwice_pl.plotting import plot_dynamics, read_metrics

    records = {("Base", None): read_records(base_dir)}
    for (method, seed), dirs in runs.items():
        records[(METHODS[method], seed)] = read_records(dirs["test"])
    n = int(next(iter(records.values()))["n"].iloc[0])
    rng = np.random.default_rng(0)
    ids = records[("Base", None)]["problem_id"].tolist()
    for key, frame in records.items():
        if frame["problem_id"].tolist() != ids:
            raise SystemExit(f"the test problems of {key} differ from the base model's: evaluate all with one config")
    resamples = rng.integers(0, len(ids), size=(BOOTSTRAP_RESAMPLES, len(ids)))  # the same resamples for every model
    rows = []
    for (label, seed), frame in records.items():
        rows += [
            {"model": label, "seed": seed, "metric": metric, **values}
            for metric, values in bootstrap(frame, n, resamples).items()
        ]
    seeds = sorted({seed for _, seed in runs})
    for seed in seeds:  # paired: same problems, same resamples
        tt, grpo = records[("ThinkTwice", seed)], records[("GRPO", seed)]
        for metric, values in bootstrap(tt, n, resamples, minus=grpo).items():
            rows.append({"model": "ThinkTwice - GRPO", "seed": seed, "metric": metric, **values})
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)
    pd.concat([f.assign(model=label, seed=seed) for (label, seed), f in records.items()]).to_csv(
        out / "records.csv", index=False
    )
    (out / "metrics").mkdir(exist_ok=True)
    fit_metrics = {}
    for (method, seed), dirs in runs.items():
        fit_metrics[(METHODS[method], seed)] = read_metrics(dirs["fit"] / "metrics.csv")
        shutil.copy(dirs["fit"] / "metrics.csv", out / "metrics" / f"{method}-seed{seed}.csv")
    suffix = len(seeds) > 1
    labelled = {(f"{label} (seed {seed})" if suffix else label): m for (label, seed), m in fit_metrics.items()}
    plot_dynamics(labelled, out / "dynamics.png", title="ThinkTwice vs GRPO: rectify / fortify on held-out problems")
    plot_curves(labelled, out / "curves.png")
    phases = {label: phase_counts(m) for label, m in labelled.items()}
    (out / "table.md").write_text(markdown_table(summary, n, len(ids), phases, seeds, timings, command))


def phase_counts(metrics: pd.DataFrame) -> dict[str, int]:
    """Training phases of a run by kind, from its metrics.csv (one row with a reward per phase)."""
    return {
        phase: int(metrics[column].notna().sum())
        for phase in ("solve", "refine")
        if (column := f"train/{phase}/reward_mean") in metrics.columns
    }


def read_records(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "eval_records.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the configs need eval.records: true")
    frame = pd.read_csv(path)
    return frame[frame["split"] == "test"].reset_index(drop=True)


def bootstrap(
    frame: pd.DataFrame, n: int, resamples: np.ndarray, minus: pd.DataFrame | None = None
) -> dict[str, dict[str, float]]:
    """Each table metric of `frame` (minus that of `minus`, problem by problem: a paired difference) on all problems,
    and its 95 % percentile interval over the bootstrap `resamples` of the problems ([resamples, problems] indices)."""
    ours = _per_problem(frame, n)
    theirs = _per_problem(minus, n) if minus is not None else None
    every = np.arange(len(frame))
    out = {}
    for metric, (num, den) in ours.items():

        def statistic(index: np.ndarray, metric: str = metric, num: np.ndarray = num, den: np.ndarray = den) -> Any:
            value = _ratio(num[index], den[index])
            if theirs is not None:
                value = value - _ratio(theirs[metric][0][index], theirs[metric][1][index])
            return value

        samples = statistic(resamples)
        finite = samples[np.isfinite(samples)]
        lo, hi = np.percentile(finite, [2.5, 97.5]) if len(finite) else (np.nan, np.nan)
        out[metric] = {"value": float(statistic(every)), "lo": float(lo), "hi": float(hi)}
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> Any:
    with np.errstate(invalid="ignore", divide="ignore"):
        return num.sum(-1) / den.sum(-1)


def _per_problem(frame: pd.DataFrame, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (numerator, denominator) per problem; the metric is sum(numerator) / sum(denominator): the mean over
    problems for pass@k, the share of wrong (right) greedy answers that the greedy refinement fixes (breaks)."""
    from thinktwice_pl.metrics import pass_at_k

    ones = np.ones(len(frame))
    solve, refine = frame["solve_correct"].to_numpy(), frame["refine_correct"].to_numpy()
    greedy, greedy_refine = frame["greedy_correct"].to_numpy(), frame["greedy_refine_correct"].to_numpy()
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k in sorted({1, n}):
        out[f"solve/pass@{k}"] = (np.array([pass_at_k(n, int(c), k) for c in solve]), ones)
        out[f"refine/pass@{k}"] = (np.array([pass_at_k(n, int(c), k) for c in refine]), ones)
    out["transition/fix_wrong"] = (((greedy == 0) & (greedy_refine == 1)).astype(float), (greedy == 0).astype(float))
    out["transition/damage_correct"] = (
        ((greedy == 1) & (greedy_refine == 0)).astype(float),
        (greedy == 1).astype(float),
    )
    return out


def markdown_table(
    summary: pd.DataFrame,
    n: int,
    num_problems: int,
    phases: dict[str, dict[str, int]],
    seeds: list[int],
    timings: dict[str, float],
    command: str,
) -> str:
    """The results table: one row per model and seed (and, with several seeds, the mean and spread over seeds)."""
    metrics = [
        "solve/pass@1",
        f"solve/pass@{n}",
        "refine/pass@1",
        f"refine/pass@{n}",
        "transition/fix_wrong",
        "transition/damage_correct",
    ]
    header = [
        "model",
        "solve pass@1",
        f"solve pass@{n}",
        "refine pass@1",
        f"refine pass@{n}",
        "fix-wrong",
        "damage-correct",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in ("Base", "GRPO", "ThinkTwice", "ThinkTwice - GRPO"):
        rows = summary[summary["model"] == model]
        for seed in [None] if model == "Base" else seeds:
            at_seed = rows[rows["seed"].isna()] if seed is None else rows[rows["seed"] == seed]
            values = {r.metric: _cell(r) for r in at_seed.itertuples()}
            name = model if seed is None or len(seeds) == 1 else f"{model} (seed {seed})"
            lines.append("| " + " | ".join([name, *(values.get(m, "n/a") for m in metrics)]) + " |")
        if model != "Base" and len(seeds) > 1:
            spread = rows.groupby("metric")["value"].agg(["mean", "std"])
            cells = [
                f"{spread.loc[m, 'mean']:.3f} ± {spread.loc[m, 'std']:.3f}" if m in spread.index else "n/a"
                for m in metrics
            ]
            lines.append("| " + " | ".join([f"{model}: mean ± sd over {len(seeds)} seeds", *cells]) + " |")
    wall = timings.get("wall (this command)", sum(timings.values()))
    stages = ", ".join(
        f"{stage} {seconds / 60:.1f}" for stage, seconds in timings.items() if not stage.startswith("wall")
    )
    trained = "; ".join(
        f"{label}: " + " + ".join(f"{count} {phase}" for phase, count in counts.items()) + " phases"
        for label, counts in phases.items()
    )
    notes = [
        "",
        f"{num_problems} held-out problems, {n} samples each (temperature 0.7, top-p 0.8, top-k 20) and one greedy "
        "refinement of each; fix-wrong / damage-correct: one greedy answer and its greedy refinement per problem. "
        f"[95 % bootstrap interval over problems, {BOOTSTRAP_RESAMPLES} resamples; the difference row is paired: "
        "same problems, same resamples.] "
        f"Training (one optimizer step per phase): {trained}.",
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}. Wall time {wall / 60:.1f} min "
        f"(minutes per stage: {stages}).",
    ]
    return "\n".join(lines + notes) + "\n"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _cell(row: Any) -> str:
    if not np.isfinite(row.value):
        return "n/a"
    if not np.isfinite(row.lo):
        return f"{row.value:.3f}"
    return f"{row.value:.3f} [{row.lo:.3f}, {row.hi:.3f}]"


def plot_curves(runs: dict[str, pd.DataFrame], out: Path) -> Path:
    """Training reward (solve, and refine where there is one; 5-phase moving average) and the held-out greedy
    accuracy of validation (solve and refine) against step, one color per run."""
    from thinktwice_pl.plotting import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, metrics) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        for phase, style in (("solve", "-"), ("refine", "--")):
            column = f"train/{phase}/reward_mean"
            if column in metrics.columns:
                rows = metrics[["step", column]].dropna()
                if len(rows):
                    smooth = rows[column].rolling(5, min_periods=1).mean()
                    axes[0].plot(rows["step"], smooth, style, color=color, label=f"{label} {phase}")
            column = f"val/avg/{phase}/greedy_acc"
            if column in metrics.columns:
                rows = metrics[["step", column]].dropna()
                if len(rows):
                    axes[1].plot(rows["step"], rows[column], style, marker="o", color=color, label=f"{label} {phase}")
    axes[0].set_title("training reward (5-phase moving average)")
    axes[1].set_title("held-out greedy accuracy (validation)")
    for ax in axes:
        ax.set_xlabel("step (phase)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
