"""ThinkTwice vs GRPO on SmolLM2-135M-Instruct, on a CPU: base model, both trainings, their evaluations, one report.

    python scripts/reproduce_cpu.py --seeds 0 1 2 --out runs/sums          # sums up to 30 (configs/smollm2)
    python scripts/reproduce_cpu.py --config-dir configs/smollm2-products --seeds 0 1 2 --out runs/products
    python scripts/reproduce_cpu.py --out runs/lr2e-5 -- --model.learning_rate 2e-5   # arguments for every stage
    python scripts/reproduce_cpu.py --smoke --out /tmp/smoke      # the tiny model and minimal sizes: seconds

Stages, each one `thinktwice` command in its own process (logs in <out>/logs/), two at a time by default
(--jobs 2: each process runs one thread, so two of them use the two cores of a small machine; --jobs 1 runs
them one by one):

1. checks (in this process): the two configs differ only in data.refine (model, rollout, eval and problems are
   the same), and the training, validation and test problems share no text (an error otherwise);
2. for each seed: ``thinktwice fit`` of ThinkTwice and of GRPO (seed_everything, data.seed and rollout.seed set to
   the seed), then two ``thinktwice test`` runs of each: the best checkpoint (the paper's model selection: the
   highest validation greedy accuracy, ``checkpoints/best.ckpt``) and the final model (``hf_model``; when the best
   checkpoint is the last step, the best one's results are copied; --no-final skips it); once: ``thinktwice test``
   of the untrained model. All evaluations use the same settings and sampling seeds, so the comparison is paired
   problem by problem;
3. report: ``table.md`` (pass@1 / pass@n before and after refinement, fix-wrong and damage-correct, pooled over
   the seeds and per seed, for both checkpoints, with 95 % intervals and the paired ThinkTwice - GRPO difference:
   thinktwice_pl.comparison), ``summary.csv``, ``records.csv`` (one row per problem and evaluation),
   ``metrics/`` (each training run's metrics.csv), ``dynamics.png`` (the rectify/fortify curves, averaged over
   seeds), ``curves.png`` (training reward and held-out greedy accuracy) and ``timings.json``. --publish DIR
   copies them into DIR and rewrites the README's table of DIR.

Precision: bf16-mixed on a CPU with bf16 hardware, 32-true on others (--precision; the table says which). A rerun
with the same --out skips the stages that finished. Stages inherit OMP_NUM_THREADS (1 when unset).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"thinktwice": "ThinkTwice", "grpo": "GRPO"}  # config file stem -> label
WALL = "wall (this command)"
SELECTION_METRIC = "val/avg/solve/greedy_acc"
CHECKPOINTS = ("best", "final")  # the checkpoint model selection keeps, and the last step
BEST_CHECKPOINT = "checkpoints/best.ckpt"  # written by the configs' ModelCheckpoint on val/avg/solve/greedy_acc
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
    precision = args.precision if args.precision != "auto" else auto_precision()
    if not any(arg.startswith("--trainer.precision") for arg in extra):
        extra = ["--trainer.precision", precision, *extra]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    runner = _Stages(out, env)

    start = time.perf_counter()
    evaluation = check_configs(configs, extra)["eval"]
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
            fit = fits[method]
            best = Stage(  # the paper's model selection: the checkpoint with the best validation greedy accuracy
                f"{method}-best-seed{seed}",
                ["test", "--config", str(config), *extra, "--ckpt_path", str(fit.run_dir / BEST_CHECKPOINT)],
                out,
                f"{method}-best",
                f"seed{seed}",
                after=(fit.stage,),
            )
            final = Stage(
                f"{method}-test-seed{seed}",
                ["test", "--config", str(config), *extra, "--model.model_name_or_path", str(fit.run_dir / "hf_model")],
                out,
                f"{method}-test",
                f"seed{seed}",
                after=(fit.stage, best.stage),
                same_as=_selected_last_step(fit.run_dir, best.run_dir),
            )
            stages += [best] if args.no_final else [best, final]
            runs[(method, seed)] = {"fit": fit.run_dir, "best": best.run_dir}
            if not args.no_final:
                runs[(method, seed)]["final"] = final.run_dir
    runner.run_all(stages, args.jobs)
    wall = round(time.perf_counter() - start, 1)  # a resumed command adds its own time to the earlier runs'
    runner.timings[WALL] = round(runner.timings.get(WALL, 0.0) + wall, 1)
    (out / "timings.json").write_text(json.dumps(runner.timings, indent=2))
    command = " ".join(["python scripts/reproduce_cpu.py", *(sys.argv[1:] if argv is None else argv)])
    report(out, base.run_dir, runs, runner.timings, command, precision_of(extra), evaluation)
    print((out / "table.md").read_text())
    if args.publish is not None:
        publish(out, args.publish)
    return out


PUBLISHED = (
    "table.md",
    "summary.csv",
    "meta.json",
    "records.csv",
    "timings.json",
    "dynamics.png",
    "curves.png",
    "metrics",
)


def publish(out: Path, target: Path, readme: Path = ROOT / "README.md") -> None:
    """Copies the report into `target` (docs/results/<task>) and rewrites the README's table of that folder."""
    from thinktwice_pl.comparison import update_readme

    target.mkdir(parents=True, exist_ok=True)
    for name in PUBLISHED:
        if (out / name).is_dir():
            shutil.rmtree(target / name, ignore_errors=True)  # no file of an earlier publish stays
            shutil.copytree(out / name, target / name)
        else:
            shutil.copy2(out / name, target / name)
    try:
        update_readme(readme, target)
        print(f"published to {target}; {readme} shows its pooled table", flush=True)
    except ValueError as error:
        print(f"published to {target}; the README's table is unchanged: {error}", flush=True)


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
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16-mixed", "32-true"),
        default="auto",
        help="training and sampling precision; auto: bf16-mixed on a CPU with bf16 hardware (AVX512-BF16 or AMX), "
        "32-true on any other, where torch emulates bf16 many times slower",
    )
    parser.add_argument(
        "--no-final",
        action="store_true",
        help="evaluate only the best checkpoint of each run, not also its final model (saves one test per run)",
    )
    parser.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="also copy the report into this folder (docs/results/<task>) and rewrite the README's table of it",
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
    same_as: Callable[[], Path | None] | None = None
    """Checked when the stage is due: a finished run folder whose outputs this stage would repeat (then copied)."""

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
                if self._done(stage):
                    print(f"[{stage.stage}] finished earlier, skipped ({stage.run_dir})", flush=True)
                    pending.remove(stage)
                    finished.add(stage.stage)
                elif stage.same_as is not None and (source := stage.same_as()) is not None:
                    pending.remove(stage)
                    shutil.rmtree(stage.run_dir, ignore_errors=True)
                    shutil.copytree(source, stage.run_dir)
                    print(f"[{stage.stage}] the same model as {source}: its results copied", flush=True)
                    self._finish(stage, 0.0)
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

    def _done(self, stage: Stage) -> bool:
        """Whether `stage` finished in an earlier run of this --out; an error when it ran with other arguments."""
        done = self.out / "done" / stage.stage
        if not done.is_file():
            return False
        with contextlib.suppress(ValueError):  # a marker holding only the seconds: no arguments to compare
            earlier = json.loads(done.read_text())
            marked = self._marker_args(stage)
            if isinstance(earlier, dict) and earlier.get("args") not in (marked, stage.args):
                raise SystemExit(
                    f"{self.out} holds stage {stage.stage} run with other arguments ({earlier.get('args')}, now "
                    f"{marked}): its results would be mixed with this command's; use another --out"
                )
        return True

    def _marker_args(self, stage: Stage) -> list[str]:
        """`stage`'s arguments as its done marker keeps them: a config file as its name and a hash of its text (the
        same file in another checkout matches, an edited one does not), a path inside --out relative to it."""
        marked = []
        for arg in stage.args:
            path = Path(arg)
            if path.suffix == ".yaml" and path.is_file():
                arg = f"{path.name}@sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
            elif path.is_absolute() and path.is_relative_to(self.out):
                arg = f"<out>/{path.relative_to(self.out)}"
            marked.append(arg)
        return marked

    def _finish(self, stage: Stage, seconds: float) -> None:
        self.timings[stage.stage] = round(seconds, 1)
        (self.out / "timings.json").write_text(json.dumps(self.timings, indent=2))
        done = self.out / "done" / stage.stage
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"seconds": round(seconds, 1), "args": self._marker_args(stage)}) + "\n")
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


def check_configs(configs: dict[str, Path], extra: list[str]) -> dict[str, Any]:
    """The configs differ only in data.refine (and names and paths); validation, test and training problems share no
    text. Returns the ThinkTwice config as resolved."""
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
    texts = {
        split: {
            p.prompt_text for source in (data.get(split) or {}).values() for p in load_problems(ProblemSource(**source))
        }
        for split in ("val", "test")
    }
    if shared := sorted(texts["val"] & texts["test"]):
        raise SystemExit(
            f"data.val and data.test share {len(shared)} problem texts (e.g. {shared[0]!r}): model selection on the "
            "validation problems would see test problems; for procedural sources use text_split: val on data.val and "
            "text_split: test on data.test"
        )
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
    for method, resolved in (("thinktwice", thinktwice), ("grpo", grpo)):
        selection = {"monitor": SELECTION_METRIC, "mode": "max", "filename": Path(BEST_CHECKPOINT).stem}
        callbacks = resolved["trainer"].get("callbacks") or []
        if not any(
            str(c.get("class_path", "")).endswith("ModelCheckpoint")
            and all((c.get("init_args") or {}).get(k) == v for k, v in selection.items())
            for c in callbacks
        ):
            raise SystemExit(
                f"{configs[method]} keeps no best checkpoint for the test: add a ModelCheckpoint callback with "
                f"{selection} (as configs/smollm2/thinktwice.yaml does)"
            )
    return thinktwice


def _selected_last_step(fit_dir: Path, best_dir: Path) -> Callable[[], Path | None]:
    """For the final model's test: the best checkpoint's test folder when model selection kept the last step."""

    def check() -> Path | None:
        metrics = pd.read_csv(fit_dir / "metrics.csv")
        return best_dir if best_step(metrics) == int(metrics["step"].max()) else None

    return check


def precision_of(extra: list[str]) -> str:
    """The --trainer.precision value among the stages' arguments (the last one wins, as in the CLI)."""
    values = [extra[i + 1] for i, arg in enumerate(extra[:-1]) if arg == "--trainer.precision"]
    values += [arg.split("=", 1)[1] for arg in extra if arg.startswith("--trainer.precision=")]
    return values[-1] if values else "the configs' precision"


def auto_precision(cpuinfo: str | None = None) -> str:
    """bf16-mixed where the CPU computes in bf16 natively (AVX512-BF16 or AMX flags in `cpuinfo`, by default
    /proc/cpuinfo), else 32-true."""
    if cpuinfo is None:
        cpuinfo = ""
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text()
    return "bf16-mixed" if "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo else "32-true"


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
    out: Path,
    base_dir: Path,
    runs: dict[tuple[str, int], dict[str, Path]],
    timings: dict[str, float],
    command: str,
    precision: str,
    evaluation: dict[str, Any],
) -> None:
    """Writes table.md, summary.csv, meta.json, records.csv, metrics/, dynamics.png, curves.png from the stages'
    outputs."""
    from thinktwice_pl.comparison import markdown_table, summarize
    from thinktwice_pl.plotting import plot_dynamics, read_metrics

    records = {("Base", "base", None): read_records(base_dir)}
    for (method, seed), dirs in runs.items():
        for checkpoint in CHECKPOINTS:
            if checkpoint in dirs:
                records[(METHODS[method], checkpoint, seed)] = read_records(dirs[checkpoint])
    n = int(records[("Base", "base", None)]["n"].iloc[0])
    ids = records[("Base", "base", None)]["problem_id"].tolist()
    for key, frame in records.items():
        if frame["problem_id"].tolist() != ids:
            raise SystemExit(f"the test problems of {key} differ from the base model's: evaluate all with one config")
    summary = summarize(records, n)
    summary.to_csv(out / "summary.csv", index=False)
    seeds = sorted({seed for _, seed in runs})
    meta = {"seeds": seeds, "precision": precision, "machine": f"{os.cpu_count()} cores, {_cpu_name()}"}
    (out / "meta.json").write_text(json.dumps({**meta, "command": command}, indent=2))
    pd.concat([f.assign(model=m, checkpoint=c, seed=s) for (m, c, s), f in records.items()]).to_csv(
        out / "records.csv", index=False
    )
    (out / "metrics").mkdir(exist_ok=True)
    by_method: dict[str, list[pd.DataFrame]] = {}
    best_steps = {}
    for (method, seed), dirs in runs.items():
        metrics = read_metrics(dirs["fit"] / "metrics.csv")
        by_method.setdefault(METHODS[method], []).append(metrics)
        best_steps[(METHODS[method], seed)] = best_step(metrics)
        shutil.copy(dirs["fit"] / "metrics.csv", out / "metrics" / f"{method}-seed{seed}.csv")
    label = f" (mean of {len(seeds)} seeds)" if len(seeds) > 1 else ""
    averaged = {f"{m}{label}": pd.concat(frames) for m, frames in by_method.items()}  # plots average per step
    plot_dynamics(averaged, out / "dynamics.png", title="ThinkTwice vs GRPO: rectify / fortify on held-out problems")
    plot_curves(averaged, out / "curves.png")
    phases = {m: phase_counts(frames[0]) for m, frames in by_method.items()}
    sections = [
        f"## Pooled over seeds {', '.join(map(str, seeds))}: best checkpoint (validation greedy accuracy)\n",
        markdown_table(summary, n, "best"),
    ]
    checkpoints = [c for c in CHECKPOINTS if any(c in dirs for dirs in runs.values())]
    if "final" in checkpoints:
        sections += ["## Pooled: final checkpoint\n", markdown_table(summary, n, "final")]
    sections += ["## Validation greedy accuracy during training (mean over seeds)\n", validation_table(by_method)]
    sections += [
        "## Validation transitions during training (greedy answer -> greedy refinement, mean over seeds)\n",
        validation_table(by_method, VALIDATION_TRANSITIONS),
    ]
    for seed in seeds:
        for checkpoint in checkpoints:
            sections += [f"## Seed {seed}: {checkpoint} checkpoint\n", markdown_table(summary, n, checkpoint, seed)]
    text = "\n".join(sections) + notes(n, len(ids), phases, best_steps, timings, command, precision, evaluation)
    (out / "table.md").write_text(text)


VALIDATION_ACCURACY = {"solve": SELECTION_METRIC, "refine": "val/avg/refine/greedy_acc"}
VALIDATION_TRANSITIONS = {"fix-wrong": "val/transition/fix_wrong", "damage-correct": "val/transition/damage_correct"}


def validation_table(by_method: dict[str, list[pd.DataFrame]], columns: dict[str, str] = VALIDATION_ACCURACY) -> str:
    """A validation metric per validation step, the mean over a method's seeds: by default the solve and refine
    greedy accuracy (whether the runs had stopped improving when training ended)."""
    curves = {}
    for method, frames in by_method.items():
        for phase, column in columns.items():
            values = pd.concat(frames)[["step", column]].dropna().groupby("step")[column].mean()
            curves[f"{method} {phase}"] = values
    steps = sorted({int(step) for values in curves.values() for step in values.index})
    lines = ["| step | " + " | ".join(curves) + " |", "|---|" + "---|" * len(curves)]
    for step in steps:
        cells = [f"{values[step]:.3f}" if step in values.index else "" for values in curves.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_step(metrics: pd.DataFrame) -> int:
    """The step of the checkpoint that model selection keeps: the first maximum of the validation greedy accuracy."""
    rows = metrics[["step", SELECTION_METRIC]].dropna()
    rows = rows[rows["step"] > 0]  # the validation before training saves no checkpoint
    if rows.empty:
        raise SystemExit(f"the run logged no {SELECTION_METRIC}: model selection needs data.val benchmarks")
    return int(rows["step"].iloc[int(np.argmax(rows[SELECTION_METRIC].to_numpy()))])


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


def notes(
    n: int,
    num_problems: int,
    phases: dict[str, dict[str, int]],
    best_steps: dict[tuple[str, int], int],
    timings: dict[str, float],
    command: str,
    precision: str,
    evaluation: dict[str, Any],
) -> str:
    """The text under the tables: protocol, interval method, training, selected steps, command, machine, times."""
    from thinktwice_pl.comparison import RESAMPLES

    wall = timings.get(WALL, sum(timings.values()))
    per_stage = {stage: seconds for stage, seconds in timings.items() if not stage.startswith("wall")}
    total = sum(per_stage.values())
    stages = ", ".join(f"{stage} {seconds / 60:.1f}" for stage, seconds in per_stage.items())
    trained = "; ".join(
        f"{label}: " + " + ".join(f"{count} {phase}" for phase, count in counts.items()) + " phases"
        for label, counts in phases.items()
    )
    selected = ", ".join(f"{label} seed {seed}: step {step}" for (label, seed), step in sorted(best_steps.items()))
    lines = [
        "",
        f"{num_problems} test problems, {n} samples each (temperature {evaluation['temperature']}, top-p "
        f"{evaluation['top_p']}, top-k {evaluation['top_k']}, at most {evaluation['max_completion_length']} tokens) "
        "and one greedy refinement of each; fix-wrong / damage-correct: one greedy answer and its greedy refinement "
        "per problem. [95 % intervals. One seed: percentile bootstrap over the problems, "
        f"{RESAMPLES} resamples. Pooled: value +- t(0.975, seeds - 1) x sqrt(variance of the per-seed values / seeds "
        "+ bootstrap variance over the problems), thinktwice_pl.comparison. The difference rows are paired: the same "
        "problems, seed s against seed s.]",
        "",
        f"Training (one optimizer step per phase): {trained}. Precision: {precision}. Best checkpoint: the first "
        f"maximum of {SELECTION_METRIC} over the validations ({selected}); final: the model at the last step, "
        "where evaluated.",
        "",
        f"Command: `{command}`. Machine: {os.cpu_count()} CPU cores ({_cpu_name()}), "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}. The stages took {total / 60:.1f} min in all "
        f"(minutes per stage: {stages}); the command's wall time, over all its runs: {wall / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


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
                rows = rows.groupby("step", as_index=False)[column].mean()  # several seeds: their mean
                if len(rows):
                    smooth = rows[column].rolling(5, min_periods=1).mean()
                    axes[0].plot(rows["step"], smooth, style, color=color, label=f"{label} {phase}")
            column = f"val/avg/{phase}/greedy_acc"
            if column in metrics.columns:
                rows = metrics[["step", column]].dropna().groupby("step", as_index=False)[column].mean()
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
