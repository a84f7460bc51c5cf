"""Inputs and outputs of the cross-refinement command (`thinktwice_pl.cross_refine`).

Inputs: ``NAME=VALUE`` flags, benchmark specs (a preset name or a YAML/JSON mapping of `ProblemSource` fields), and
base answers written outside (jsonl or parquet), matched to the benchmarks' problems. Outputs, all under ``--out``
and each written atomically: the base answers of every base set (``bases/<name>.jsonl``), one file per finished
cell (``cells/<base>__<refiner>.json``, with each problem's count of right refinements), and the tables and heatmap
drawn from the cells (``matrix.csv``, ``cells.csv``, ``bases.csv``, ``matrix.png``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml

from thinktwice_pl.builtin_models import BUILTIN_PREFIX
from thinktwice_pl.checkpointing import atomic_write_text
from thinktwice_pl.errors import UserError
from thinktwice_pl.metrics import pass_at_k
from thinktwice_pl.sources import PRESETS, ProblemSource
from thinktwice_pl.types import Problem

log = logging.getLogger("thinktwice_pl.cross_refine")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SEPARATOR = "__"  # between the two names of a cell file
Key = tuple[str, str]  # (benchmark, problem id)


# ---------------------------------------------------------------------------------------------- flags


def parse_named(flag: str, values: list[str], fix: str) -> dict[str, str]:
    """``NAME=VALUE`` flags as an ordered mapping; a bad name, a missing ``=`` or a repeated name is an error."""
    named: dict[str, str] = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not rest:
            raise UserError(f"{flag} {value!r} is not NAME=VALUE; write it as {flag} {fix}")
        check_name(flag, name)
        if name in named:
            raise UserError(f"{flag} names {name!r} twice ({named[name]!r} and {rest!r}); give each a name of its own")
        named[name] = rest
    return named


def check_name(flag: str, name: str) -> None:
    """A name becomes part of file names and table headers: letters, digits, ``.``, ``_``, ``-``, no ``__``."""
    if not NAME.match(name) or SEPARATOR in name:
        raise UserError(
            f"{flag} name {name!r} is not usable: use letters, digits, '.', '_' and '-' (starting with a letter or "
            f"digit, without '{SEPARATOR}', which separates the two names of a cell file)"
        )


def benchmark_source(name: str, spec: str) -> ProblemSource:
    """The `ProblemSource` of ``--benchmark NAME=SPEC``: SPEC is a preset name or a YAML/JSON mapping of its fields."""
    if spec in PRESETS:
        return ProblemSource(preset=spec)
    try:
        fields = yaml.safe_load(spec)
    except yaml.YAMLError as error:
        raise UserError(f"--benchmark {name}={spec!r} is not valid YAML/JSON ({error})") from None
    if not isinstance(fields, dict):
        raise UserError(
            f"--benchmark {name}={spec!r} is neither a preset ({', '.join(PRESETS)}) nor a mapping of ProblemSource "
            "fields; write e.g. --benchmark sums='{path: procedural, difficulty: 5, num_problems: 100}' or "
            f"--benchmark {name}='{{path: problems.parquet, id_field: id}}'"
        )
    known = {f.name for f in dataclasses.fields(ProblemSource)}
    unknown = sorted(set(map(str, fields)) - known)
    if unknown:
        raise UserError(
            f"--benchmark {name}: unknown ProblemSource field(s) {', '.join(unknown)}; use {', '.join(sorted(known))}"
        )
    try:
        return ProblemSource(**fields)
    except UserError as error:
        raise UserError(f"--benchmark {name}: {error}") from None


def problems_digest(problems: list[Problem]) -> str:
    """A digest of a benchmark's problems (ids, texts, gold answers), recorded so a changed data set is noticed."""
    digest = hashlib.sha256()
    for p in problems:
        digest.update(json.dumps([p.id, p.prompt_text, p.answer]).encode())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- answers files


def read_answers(name: str, path: Path, benchmarks: dict[str, list[Problem]], solve_suffix: str) -> dict[Key, str]:
    """The base answers of ``--answers NAME=FILE``, keyed by (benchmark, problem id).

    A row names its problem by ``id`` (within its ``benchmark`` when it has that column) or by its exact ``problem``
    text (the problem alone, or the solve prompt's text: problem, a space, the solve instruction). Every problem of
    every benchmark needs exactly one row; an unmatched, ambiguous or duplicate row is an error naming the row.
    """
    flag = f"--answers {name}={path}"
    rows = _answer_rows(flag, path)
    by_id: dict[str, list[Key]] = {}
    by_text: dict[str, list[Key]] = {}
    for bench, problems in benchmarks.items():
        for p in problems:
            by_id.setdefault(p.id, []).append((bench, p.id))
            for text in {p.prompt_text.strip(), f"{p.prompt_text} {solve_suffix}".strip()}:
                by_text.setdefault(text, []).append((bench, p.id))
    answers: dict[Key, str] = {}
    row_of: dict[Key, int] = {}
    for number, row in rows:
        where = f"{flag}: row {number}"
        answer = row.get("answer")
        if not isinstance(answer, str):
            raise UserError(f"{where} has a {type(answer).__name__} in its 'answer' column; give the answer's text")
        in_bench = _optional_text(row.get("benchmark"))
        if in_bench is not None and in_bench not in benchmarks:
            raise UserError(
                f"{where} names benchmark {in_bench!r}, which is not one of the --benchmark names {list(benchmarks)}"
            )

        row_id, problem = _optional_text(row.get("id")), _optional_text(row.get("problem"))
        found = _within(by_id.get(row_id, []), in_bench) if row_id is not None else []
        how = f"id {row_id!r}"
        if not found and problem is not None:
            found, how = _within(by_text.get(problem.strip(), []), in_bench), "its problem text"
        found = list(dict.fromkeys(found))
        if not found:
            shown = f"id {row_id!r}" if row_id is not None else f"problem {(problem or '')[:80]!r}"
            raise UserError(
                f"{where} ({shown}) matches no problem of the benchmarks {list(benchmarks)}: give the id or the exact "
                "problem text of a benchmark problem, or leave the row out"
            )
        if len(found) > 1:
            raise UserError(
                f"{where} matches {len(found)} problems by {how} ({', '.join(f'{b}/{i}' for b, i in found[:3])}): "
                "add a 'benchmark' column, or match by an 'id' column of unique ids"
            )
        key = found[0]
        if key in answers:
            raise UserError(
                f"{flag}: rows {row_of[key]} and {number} both answer problem {key[1]!r} of benchmark {key[0]!r}; "
                "keep one answer per problem"
            )
        answers[key], row_of[key] = answer, number
    missing = [(b, p.id) for b, problems in benchmarks.items() for p in problems if (b, p.id) not in answers]
    if missing:
        raise UserError(
            f"{flag} answers {len(answers)} of {len(answers) + len(missing)} problems; no row for e.g. problem "
            f"{missing[0][1]!r} of benchmark {missing[0][0]!r}: every problem of every --benchmark needs one answer "
            "(add the rows, or drop the benchmarks it does not cover)"
        )
    return answers


def _within(keys: list[Key], benchmark: str | None) -> list[Key]:
    return [key for key in keys if benchmark is None or key[0] == benchmark]


def _answer_rows(flag: str, path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(1-based row number, row) of a jsonl or parquet file holding an 'answer' and a 'problem' or 'id' column."""
    if not path.is_file():
        raise UserError(f"{flag}: no such file; give a .jsonl or .parquet file of base answers")
    suffix = path.suffix.lower()
    rows: list[tuple[int, Any]] = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = list(enumerate(pq.read_table(path).to_pylist(), 1))
    elif suffix in (".jsonl", ".json"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise UserError(f"{flag}: line {number} is not valid JSON ({error.msg}); fix the line") from None
    else:
        raise UserError(f"{flag}: cannot read {suffix or 'a file without suffix'}; give a .jsonl or .parquet file")
    if not rows:
        raise UserError(f"{flag} has no rows; give one row per problem with the columns 'problem' and 'answer'")
    for number, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{flag}: row {number} is a {type(row).__name__}, not an object with named fields")
        if "answer" not in row or not ("problem" in row or "id" in row):
            raise UserError(
                f"{flag}: row {number} has the columns {sorted(row)}; it needs 'answer' (the answer's text) and "
                "'problem' (the exact problem text) or 'id' (the benchmark's problem id); 'benchmark' is optional"
            )
    return rows


def _optional_text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------------------------------------- files under --out


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(value, indent=1) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cell_path(out: Path, base: str, refiner: str) -> Path:
    return out / "cells" / f"{base}{SEPARATOR}{refiner}.json"


def cell_value(cell: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(macro average, per benchmark) pass@k of a cell, from its saved per-problem counts of right refinements."""
    n = k = int(cell["samples"])
    per = {
        bench: sum(pass_at_k(n, c, k) for c in entry["correct"]) / len(entry["correct"])
        for bench, entry in cell["benchmarks"].items()
    }
    return sum(per.values()) / len(per), per


def greedy_accuracy(rows: list[dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """(macro average, per benchmark) accuracy of a base set's answers."""
    per: dict[str, list[bool]] = {}
    for row in rows:
        per.setdefault(row["benchmark"], []).append(bool(row["correct"]))
    accuracy = {bench: sum(flags) / len(flags) for bench, flags in per.items()}
    return sum(accuracy.values()) / len(accuracy), accuracy


# ---------------------------------------------------------------------------------------------- settings on disk


def settings_record(
    settings: Any, benchmarks: dict[str, list[Problem]], answer_files: dict[str, Path]
) -> dict[str, Any]:
    """What ``<out>/settings.json`` holds: the run's `CrossRefineSettings`, local model paths made absolute, each
    benchmark's problem count and digest, each answers file's digest."""
    record = dataclasses.asdict(settings)
    record["models"] = {name: _model_identity(path) for name, path in settings.models.items()}
    record["benchmarks"] = {
        name: {
            **dataclasses.asdict(source),
            "problems": len(benchmarks[name]),
            "digest": problems_digest(benchmarks[name]),
        }
        for name, source in settings.benchmarks.items()
    }
    record["answers"] = {
        name: {"path": str(path.resolve()), "digest": file_digest(path)} for name, path in answer_files.items()
    }
    as_read: dict[str, Any] = json.loads(json.dumps(record))  # as it reads back
    return as_read


def _model_identity(path: str) -> str:
    """A local model path made absolute (a rerun from another folder names the same model); other names as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if not path.startswith(BUILTIN_PREFIX) and local.exists() else path


GROWING = ("models", "answers")
"""Settings a rerun may extend: new models and answers sets only add cells; the ones both runs name must agree."""


def check_or_record(out: Path, record: dict[str, Any]) -> None:
    """Records the settings of a new ``--out``; continues one recorded with the same settings, where new models and
    answers sets may be added (their cells are computed, the others reused); refuses, naming what differs, any other
    change."""
    file = out / "settings.json"
    if not file.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_json(file, record)
        return
    recorded = read_json(file)
    differences = {
        key: (recorded.get(key), record.get(key))
        for key in sorted(set(record) | set(recorded))
        if key not in GROWING and record.get(key) != recorded.get(key)
    }
    for key in GROWING:
        ours, theirs = record.get(key) or {}, recorded.get(key) or {}
        differences.update(
            {
                f"{key}.{name}": (theirs[name], ours[name])
                for name in sorted(ours.keys() & theirs.keys())
                if ours[name] != theirs[name]
            }
        )
    if differences:
        details = "; ".join(
            f"{key}: recorded {json.dumps(old)[:200]}, now {json.dumps(new)[:200]}"
            for key, (old, new) in differences.items()
        )
        raise UserError(
            f"--out {out} holds a cross-refinement with other settings ({details}); rerun with the recorded settings "
            f"({file}) to continue it (adding models or answers sets is allowed), or give another --out"
        )
    merged = {**recorded, **{key: {**(recorded.get(key) or {}), **(record.get(key) or {})} for key in GROWING}}
    added = [name for key in GROWING for name in (record.get(key) or {}) if name not in (recorded.get(key) or {})]
    if added:
        write_json(file, merged)
        log.info("--out %s: continuing, with %s added", out, ", ".join(added))
    else:
        log.info("--out %s: continuing (same settings as recorded)", out)


# ---------------------------------------------------------------------------------------------- tables, heatmap


def write_tables(
    out: Path,
    bases: dict[str, list[dict[str, Any]]],
    refiners: list[str],
    cells: dict[tuple[str, str], dict[str, Any]],
) -> dict[tuple[str, str], float]:
    """``matrix.csv`` (rows: base sets, columns: refiners, then the base set's greedy accuracy), ``cells.csv`` (one
    row per cell and benchmark, and its macro average as benchmark ``avg``) and ``bases.csv`` (each base set's
    greedy accuracy per benchmark); a cell not computed yet is left empty. Returns the matrix's values."""
    matrix = {key: cell_value(cell)[0] for key, cell in cells.items()}
    greedy = {name: greedy_accuracy(rows) for name, rows in bases.items()}
    table = [["base", *refiners, "base_greedy_acc"]]
    for base in bases:
        values = [_number(matrix.get((base, refiner))) for refiner in refiners]
        table.append([base, *values, _number(greedy[base][0])])
    rows: list[list[Any]] = [
        ["base", "refiner", "benchmark", "problems", "samples", "pass_at_k", "mean_correct", "base_greedy_acc"]
    ]
    for (base, refiner), cell in cells.items():
        total, per = cell_value(cell)
        n = int(cell["samples"])
        for bench, entry in cell["benchmarks"].items():
            counts = entry["correct"]
            mean = sum(counts) / (n * len(counts))
            rows.append([base, refiner, bench, len(counts), n, _number(per[bench]), _number(mean)])
            rows[-1].append(_number(greedy[base][1][bench]))
        rows.append([base, refiner, "avg", "", n, _number(total), "", _number(greedy[base][0])])
    accuracy: list[list[Any]] = [["base", "benchmark", "problems", "greedy_acc"]]
    for base, base_rows in bases.items():
        for bench, value in greedy[base][1].items():
            accuracy.append([base, bench, sum(r["benchmark"] == bench for r in base_rows), _number(value)])
        accuracy.append([base, "avg", "", _number(greedy[base][0])])
    for name, content in (("matrix.csv", table), ("cells.csv", rows), ("bases.csv", accuracy)):
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(content)
        atomic_write_text(out / name, buffer.getvalue())
    return matrix


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def draw_heatmap(
    path: Path, matrix: dict[tuple[str, str], float], bases: dict[str, float], refiners: list[str], k: int
) -> None:
    """The K x K (plus answer sets) heatmap: rows the base sets (with their greedy accuracy), columns the refiners,
    each cell's pass@k written in it (percent); cells not computed yet are blank."""
    import numpy as np
    from matplotlib.figure import Figure

    values = np.full((len(bases), len(refiners)), np.nan)
    for i, base in enumerate(bases):
        for j, refiner in enumerate(refiners):
            values[i, j] = 100 * matrix.get((base, refiner), math.nan)
    figure = Figure(figsize=(3.0 + 1.0 * len(refiners), 1.6 + 0.55 * len(bases)), layout="constrained")
    axes = figure.add_subplot()
    finite = values[~np.isnan(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    image = axes.imshow(values, cmap="viridis", vmin=low, vmax=max(high, low + 1.0))
    middle = (low + high) / 2
    for i in range(len(bases)):
        for j in range(len(refiners)):
            if not math.isnan(values[i, j]):
                color = "black" if values[i, j] > middle else "white"
                axes.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=color, fontsize=9)
    axes.set_xticks(range(len(refiners)), refiners, rotation=30, ha="right")
    axes.set_yticks(range(len(bases)), [f"{b} ({100 * acc:.1f})" for b, acc in bases.items()])
    axes.set_xlabel("refined by")
    axes.set_ylabel("base answers by (greedy %)")
    axes.set_title(f"cross-refinement pass@{k} (%)", fontsize=10)
    figure.colorbar(image, ax=axes, shrink=0.8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
