"""Refinement in rounds for several trained models, one command: a test run of each, then the table and figures.

    python scripts/compare_rounds.py --out runs/rounds --config configs/smollm2/thinktwice.yaml --rounds 3 \\
        --model ThinkTwice=runs/smollm2-thinktwice/version_0/hf_model --model GRPO=runs/smollm2-grpo/version_0/hf_model
    python scripts/compare_rounds.py --out runs/rounds ... -- --trainer.precision 32-true   # arguments for every test

For each ``--model LABEL=PATH`` (an HF directory or a built-in name) it runs ``thinktwice test --config <config>
--model.model_name_or_path PATH --eval.refine_rounds R --eval.records true`` in its own process (log in
``<out>/logs/<label>.log``, run in ``<out>/runs/<label>``), the same evaluation and sampling seeds for every model.
Then it writes ``rounds.png`` / ``rounds.csv`` (accuracy against round beside the compute-matched pass@((r+1)k) of
first answers, `scripts/plot_rounds.py`), ``passk.png`` / ``passk.csv`` (`scripts/plot_passk.py`) and
``timings.json``. A rerun with the same --out skips the models whose test finished, and refuses other settings.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from thinktwice_pl.plotting import plot_passk, plot_rounds, read_runs


def main(argv: list[str] | None = None) -> Path:
    args = _parse(argv)
    out: Path = args.out.resolve()
    models = _models(args.model)
    _check_settings(out, {"config": str(args.config.resolve()), "rounds": args.rounds, "overrides": args.overrides})
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    for label, path in models.items():
        done = out / "done" / label
        if done.is_file():
            earlier = json.loads(done.read_text())["model"]
            if earlier != path:
                raise SystemExit(f"--model {label}={path}: {out} holds a finished test of {label}={earlier}")
            print(f"[{label}] finished earlier, skipped", flush=True)
            continue
        run = out / "runs" / label
        shutil.rmtree(run, ignore_errors=True)  # a test that did not finish starts again
        command = [
            sys.executable,
            "-m",
            "thinktwice_pl",
            "test",
            "--config",
            str(args.config),
            "--model.model_name_or_path",
            path,
            "--eval.refine_rounds",
            str(args.rounds),
            "--eval.records",
            "true",
            *args.overrides,
            "--trainer.logger",
            "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir",
            str(out / "runs"),
            "--trainer.logger.init_args.name",
            label,
            "--trainer.logger.init_args.version",
            "",
        ]
        log = out / "logs" / f"{label}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[{label}] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        with log.open("wb") as f:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise SystemExit(f"[{label}] failed with exit code {code}; log: {log}\n{tail}")
        timings[label] = round(time.perf_counter() - start, 1)
        timings_file.write_text(json.dumps(timings, indent=2))
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"model": path, "seconds": timings[label]}) + "\n")
        print(f"[{label}] {timings[label] / 60:.1f} min", flush=True)
    runs = read_runs([f"{label}={out / 'runs' / label}" for label in models], "test")
    for written in (*plot_rounds(runs, out / "rounds.png"), *plot_passk(runs, out / "passk.png")):
        print(written)
    print((out / "rounds.csv").read_text())
    return out


def _models(specs: list[str]) -> dict[str, str]:
    """``{label: path}`` of the ``--model LABEL=PATH`` options; a label names a folder, so it is checked."""
    models: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or not path or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", label):
            raise SystemExit(
                f"--model {spec}: write LABEL=PATH with a label of letters, digits, '_', '-', '.', e.g. "
                "--model GRPO=runs/grpo/version_0/hf_model"
            )
        if label in models:
            raise SystemExit(f"--model {spec}: the label {label} is given twice")
        models[label] = path
    return models


def _check_settings(out: Path, settings: dict[str, object]) -> None:
    """Record the settings every test of `out` runs with; a rerun with other settings is refused (its tests would
    not be comparable with the finished ones)."""
    path = out / "settings.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            raise SystemExit(
                f"{out} was run with {earlier}, not {settings}: rerun with the same --config, --rounds and arguments "
                "after --, or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (a rerun resumes it)")
    parser.add_argument("--config", type=Path, required=True, help="the config whose test evaluation is run")
    parser.add_argument("--model", action="append", required=True, metavar="LABEL=PATH", help="a model to test")
    parser.add_argument("--rounds", type=int, default=3, help="eval.refine_rounds (default 3)")
    parser.add_argument("overrides", nargs="*", help="after --: arguments added to every thinktwice test command")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    return args


if __name__ == "__main__":
    main()
