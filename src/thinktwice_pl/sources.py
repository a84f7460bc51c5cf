"""Where problems come from: `ProblemSource` (a local file, a hub dataset, the procedural generator or the champ
benchmark), the presets of the paper's datasets, and `load_problems`, which validates every row.

The gold answer of a full reference solution is the content of its last ``\\boxed{}`` (METHOD.md section 4).
A bad row stops loading with the file, the row number and the fix (or is skipped and counted, on request).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from thinktwice_pl.errors import UserError
from thinktwice_pl.optional import CHAMP, require
from thinktwice_pl.procedural import procedural_problems
from thinktwice_pl.types import Problem

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_ACCEPTED = (
    'a local .jsonl, .json or .parquet file, a hub dataset name such as "HuggingFaceH4/MATH-500", or "procedural"'
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class ProblemSource:
    """Where training problems come from and how their columns map onto `Problem`."""

    path: str = "procedural"
    """A local .jsonl/.json/.parquet file, a hub dataset name, or "procedural" (generated arithmetic)."""
    split: str = "train"
    """Split of a hub dataset (ignored for local files and procedural problems)."""
    subset: str | None = None
    """Configuration name of a hub dataset (`name=` of datasets.load_dataset)."""
    problem_field: str = "problem"
    """Column holding the problem text."""
    answer_field: str = "answer"
    """Column holding the gold answer, or a full solution whose last \\boxed{} is the answer."""
    id_field: str | None = None
    """Column holding unique problem ids; unset: "<file stem>-<row number>"."""
    answer_is_solution: bool | None = None
    """Unset: take the last \\boxed{} when the answer cell has one; true: always (no box is an error); false: as-is."""
    limit: int | None = None
    """Keep only the first N valid problems."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What to do with a row without a usable problem or answer: stop with an error, or skip it (counted, warned)."""
    num_problems: int = 1024
    """Procedural only: how many problems to generate."""
    difficulty: int = 1
    """Procedural only: 0 bare one-digit sums, 1 one-digit add/sub stories, 2 two-digit, 3 adds mul/div, 4 two-step,
    5 bare add/sub with operands up to 30 ("What is 27 - 9?"), 6 three one-digit operands ("What is 8 - 3 + 6?"),
    7 products of a factor 2-12 and one 2-25 ("What is 16 * 9?")."""
    text_split: Literal["all", "train", "heldout", "val", "test"] = "all"
    """Procedural only: "train" or "heldout" keeps one of two halves of the problem texts (split by a hash of the
    text), so a training set and a held-out set never share a problem text, whatever their seeds; "val" and "test"
    keep one of two halves of the held-out texts, so model selection on a "val" set never sees a "test" problem.
    Every split but "train" keeps each text once."""
    seed: int = 0
    """Procedural only: problem i depends only on (seed, difficulty, i)."""
    context_field: str | None = None
    """Column whose text (when non-empty) goes before the problem, separated by a blank line (OlympiadBench)."""
    preset: str | None = None
    """A dataset of the paper by name (see PRESETS: math_train, aime, amc, math500, minerva_math, olympiadbench):
    sets path, split and the column mapping; leave those at their defaults. limit and on_bad_row still apply."""

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError(f"ProblemSource.path is empty; use {_ACCEPTED}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise UserError(f"ProblemSource.preset={self.preset!r} is unknown; use one of {', '.join(PRESETS)}")
            changed = [
                f"{name}={getattr(self, name)!r}" for name in _PRESET_FIELDS if getattr(self, name) != _DEFAULTS[name]
            ]
            if changed:
                raise UserError(
                    f"ProblemSource(preset={self.preset!r}) sets path, split and the columns itself, but "
                    f"{', '.join(changed)} is also set: drop one of them (an offline copy written by "
                    "scripts/prepare_data.py is read with path: <file>.parquet and id_field: id, without a preset)"
                )
        if self.on_bad_row not in ("error", "skip"):
            raise UserError(f"ProblemSource.on_bad_row={self.on_bad_row!r}; use 'error' or 'skip'")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"ProblemSource.limit={self.limit} must be at least 1 (or unset for all problems)")
        if self.num_problems < 1:
            raise UserError(f"ProblemSource.num_problems={self.num_problems} must be at least 1")
        if not 0 <= self.difficulty <= 7:
            raise UserError(f"ProblemSource.difficulty={self.difficulty} must be an integer from 0 to 7")
        if self.text_split not in ("all", "train", "heldout", "val", "test"):
            raise UserError(
                f"ProblemSource.text_split={self.text_split!r}; use 'all', 'train', 'heldout', 'val' or 'test'"
            )


# ---------------------------------------------------------------------------------------------- presets

_PRESET_FIELDS = (
    "path",
    "split",
    "subset",
    "problem_field",
    "answer_field",
    "id_field",
    "answer_is_solution",
    "context_field",
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ProblemSource)}

PRESETS: dict[str, dict[str, Any]] = {
    # MATH train (7,500 problems, all subjects and levels): gold = last \boxed{} of the reference solution
    "math_train": {
        "path": "DigitalLearningGmbH/MATH-lighteval",
        "split": "train",
        "answer_field": "solution",
        "answer_is_solution": True,
    },
    # AIME 2022-2024 (90 problems)
    "aime": {"path": "AI-MO/aimo-validation-aime", "split": "train", "id_field": "id", "answer_is_solution": False},
    # AMC 2022-2023 (83 problems); answers are floats in the hub file (142.0 -> "142")
    "amc": {"path": "AI-MO/aimo-validation-amc", "split": "train", "id_field": "id", "answer_is_solution": False},
    # MATH-500 (500 problems)
    "math500": {
        "path": "HuggingFaceH4/MATH-500",
        "split": "test",
        "id_field": "unique_id",
        "answer_is_solution": False,
    },
    # Minerva Math (272 problems)
    "minerva_math": {
        "path": "math-ai/minervamath",
        "split": "test",
        "problem_field": "question",
        "answer_is_solution": False,
    },
    # OlympiadBench, English, text-only, math (581 problems): context before the question, the first of the
    # final answers with its $...$ removed (as the reference evaluation does)
    "olympiadbench": {
        "path": "afraamn/olympiadbench_math_textonly",
        "split": "test_en",
        "problem_field": "question",
        "answer_field": "final_answer",
        "id_field": "question_id",
        "context_field": "context",
        "answer_is_solution": False,
    },
}
"""Hub names and column mappings of the paper's training set and its five benchmarks (METHOD.md sections 4 and 6),
as in the ThinkTwice reference code's data preparation."""

BENCHMARKS = ("aime", "amc", "math500", "minerva_math", "olympiadbench")
"""The five evaluation benchmarks of the paper (1,526 problems)."""


def resolve_source(source: ProblemSource, path: str | None = None) -> ProblemSource:
    """`source` with its preset applied (path, split, columns); `path` replaces the hub name, e.g. by a local
    file of the same schema. A source without a preset is returned unchanged (with `path` if given)."""
    settings = dataclasses.asdict(source)
    settings.update(PRESETS[source.preset] if source.preset else {}, preset=None)
    if path is not None:
        settings["path"] = path
    return ProblemSource(**settings)


# ---------------------------------------------------------------------------------------------- loading


def load_problems(source: ProblemSource, *, flag_prefix: str = "data.train") -> list[Problem]:
    """Loads and validates the problems of `source`.

    Args:
        source: where the problems come from.
        flag_prefix: how the source is addressed on the command line; used in error messages.

    Returns:
        The problems in source order, whitespace stripped, at most `source.limit` of them.

    Raises:
        ValueError: unknown path, missing column, a bad row (with `on_bad_row="error"`), duplicate ids.
    """
    if source.preset is not None:
        source = resolve_source(source)
    if source.path == "procedural":
        n = min(source.num_problems, source.limit or source.num_problems)
        return procedural_problems(n, source.seed, source.difficulty, source.text_split, flag_prefix)
    if source.path == "champ":
        return _champ_problems(source)
    label, stem, columns, rows = _open_rows(source)
    required = {"problem_field": source.problem_field, "answer_field": source.answer_field}
    if source.id_field is not None:
        required["id_field"] = source.id_field
    if source.context_field is not None:
        required["context_field"] = source.context_field
    for flag, column in required.items():
        if column not in columns:
            raise UserError(
                f"{label} has no column {column!r} (available: {', '.join(map(repr, columns)) or 'none'}); "
                f"set {flag_prefix}.{flag} to one of them"
            )
    problems: list[Problem] = []
    row_of_id: dict[str, int] = {}
    skipped: Counter[str] = Counter()
    first_skip = ""
    seen = 0
    for row_number, row in rows:
        if source.limit is not None and len(problems) >= source.limit:
            break
        seen += 1
        try:
            problem = _problem_from_row(source, row, row_number, stem, flag_prefix)
        except _BadRow as bad:
            message = f"row {row_number} of {label} {bad.what}"
            if source.on_bad_row == "error":
                raise UserError(f"{message} ({bad.fix}, or {flag_prefix}.on_bad_row=skip to skip such rows)") from None
            skipped[bad.what] += 1
            first_skip = first_skip or message
            continue
        if problem.id in row_of_id:
            raise UserError(
                f"rows {row_of_id[problem.id]} and {row_number} of {label} share the id {problem.id!r} "
                f"(set {flag_prefix}.id_field to a column of unique ids, or unset it to number the rows)"
            )
        row_of_id[problem.id] = row_number
        problems.append(problem)
    if skipped:
        reasons = "; ".join(f"{count} {what}" for what, count in skipped.most_common())
        warnings.warn(
            f"skipped {skipped.total()} of {seen} rows of {label}: {reasons} (first: {first_skip})", stacklevel=2
        )
    if not problems:
        raise UserError(f"{label} holds no usable problems ({seen} rows read)")
    return problems


class _BadRow(Exception):
    def __init__(self, what: str, fix: str) -> None:
        super().__init__(what)
        self.what, self.fix = what, fix


def _open_rows(source: ProblemSource) -> tuple[str, str, list[str], Iterator[tuple[int, Any]]]:
    """Returns (label for messages, source name, column names, iterator of (1-based row number, row))."""
    path = Path(source.path).expanduser()
    suffix = path.suffix.lower()
    if suffix in FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise UserError(f"problem file {source.path!r} does not exist; use {_ACCEPTED}")
        if suffix not in FILE_SUFFIXES:
            raise UserError(f"cannot read {source.path!r} (unknown suffix {suffix!r}); use {_ACCEPTED}")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            _require_rows(path.name, table.num_rows, source)
            return path.name, path.stem, table.column_names, enumerate(table.to_pylist(), 1)
        records = _read_json_records(path)
        _require_rows(path.name, len(records), source)
        columns = list(dict.fromkeys(key for _, row in records if isinstance(row, dict) for key in row))
        return path.name, path.stem, columns, iter(records)
    if not path.is_dir() and (not _HUB_NAME.match(source.path) or suffix in {".csv", ".tsv", ".txt", ".gz"}):
        raise UserError(f"problem source {source.path!r} is neither an existing file nor a hub name; use {_ACCEPTED}")
    return _open_hub(source)


def _read_json_records(path: Path) -> list[tuple[int, Any]]:
    """Rows of a JSON array file or of a JSON Lines file (numbered by line); unparsable lines become _BadRow."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path.name} is not valid JSON ({e}); use a JSON array of objects or JSON Lines") from e
        return list(enumerate(data, 1))
    records: list[tuple[int, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((number, _BadRow(f"is not valid JSON ({e.msg})", "fix the line")))
    return records


def _open_hub(source: ProblemSource) -> tuple[str, str, list[str], Iterator[tuple[int, Any]]]:
    import datasets

    try:
        dataset = datasets.load_dataset(source.path, name=source.subset, split=source.split)
    except Exception as e:
        raise UserError(
            f"could not load hub dataset {source.path!r} (subset={source.subset!r}, split={source.split!r}): "
            f"{type(e).__name__}: {e}. With HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 only cached datasets load; "
            f"otherwise point the path at a local .jsonl/.json/.parquet file"
        ) from e
    name = Path(source.path).name if Path(source.path).is_dir() else source.path  # a local dataset directory
    where = ([f"subset {source.subset!r}"] if source.subset else []) + [f"split {source.split!r}"]
    label = f"{name} ({', '.join(where)})"
    _require_rows(label, len(dataset), source)
    return label, name, list(dataset.column_names), enumerate(dataset, 1)


def _require_rows(label: str, count: int, source: ProblemSource) -> None:
    if count == 0:
        raise UserError(
            f"{label} has no rows: give it one problem per row, with the fields {source.problem_field!r} and "
            f"{source.answer_field!r} (JSON Lines: one object per line)"
        )


def _problem_from_row(source: ProblemSource, row: Any, row_number: int, stem: str, prefix: str) -> Problem:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"is a {type(row).__name__}, not an object with named fields", "make every row an object")
    text = _cell(row, source.problem_field, "problem_field", prefix, numbers_ok=False)
    if source.context_field is not None and isinstance(row.get(source.context_field), str):
        context = row[source.context_field].strip()
        text = f"{context}\n\n{text}" if context else text
    value = row.get(source.answer_field)
    if isinstance(value, list | tuple):  # several final answers (OlympiadBench): the first, as the reference code
        if not value:
            raise _BadRow(f"has an empty list in its {source.answer_field!r}", "fill it in")
        row = {**row, source.answer_field: value[0]}
    answer = _strip_math_delimiters(_cell(row, source.answer_field, "answer_field", prefix, numbers_ok=True))
    has_box = "\\boxed" in answer
    if source.answer_is_solution or (source.answer_is_solution is None and has_box):
        if not has_box:
            raise _BadRow(
                f"has no \\boxed{{}} in its {source.answer_field!r}",
                f"set {prefix}.answer_is_solution=false to use the cell as the answer",
            )
        boxed = _extract_gold(answer)
        if not boxed or not boxed.strip():
            raise _BadRow(f"has an empty or unclosed \\boxed{{}} in its {source.answer_field!r}", "fix the row")
        answer = boxed.strip()
    if source.id_field is None:
        problem_id = f"{stem}-{row_number}"
    else:
        problem_id = _cell(row, source.id_field, "id_field", prefix, numbers_ok=True)
    return Problem(id=problem_id, prompt_text=text, answer=answer, source=stem)


def _cell(row: dict[str, Any], column: str, flag: str, prefix: str, *, numbers_ok: bool) -> str:
    """The stripped, non-empty text of `row[column]`; numbers become text where `numbers_ok`."""
    if column not in row:
        raise _BadRow(f"has no {column!r} field", f"set {prefix}.{flag} to the column that holds it")
    value = row[column]
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise _BadRow(f"has a missing (null/NaN) {column!r}", "fill it in")
    if numbers_ok and isinstance(value, numbers.Real) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise _BadRow(f"has a non-finite {column!r} ({value})", "fix the row")
        value = str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str):
        kind = "text or a number" if numbers_ok else "text"
        raise _BadRow(f"has a {column!r} of type {type(value).__name__}, expected {kind}", "fix the row")
    if not value.strip():
        raise _BadRow(f"has an empty {column!r}", "fill it in")
    return value.strip()


def _strip_math_delimiters(answer: str) -> str:
    """``$x$`` -> ``x``: a gold answer wrapped in one pair of inline-math dollars is the same answer."""
    if len(answer) > 2 and answer.startswith("$") and answer.endswith("$") and "$" not in answer[1:-1]:
        return answer[1:-1].strip() or answer
    return answer


def _champ_problems(source: ProblemSource) -> list[Problem]:
    """The 270 competition problems of CHAMP (MIT licence, the PyPI package champ-dataset), offline."""
    require(
        CHAMP,
        "data source 'champ'",
        "pip install champ-dataset (the champ extra), or use path: procedural or a local problem file",
    )
    import champ_dataset

    problems = [
        Problem(
            id=f"champ-{key}",
            prompt_text=str(p.text).strip(),
            source="champ",
            answer=_strip_math_delimiters(str(p.answer).strip()),
        )
        for key, p in champ_dataset.load("v0").problems.items()
    ]
    return problems[: source.limit] if source.limit else problems


def write_parquet(problems: list[Problem], path: str | Path) -> Path:
    """Writes `problems` as a parquet file with columns id, problem, answer, source; read it back with
    ``ProblemSource(path=<file>, id_field="id")``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": [p.id for p in problems],
            "problem": [p.prompt_text for p in problems],
            "answer": [p.answer for p in problems],
            "source": [p.source for p in problems],
        }
    )
    pq.write_table(table, out)
    return out


def _extract_gold(solution: str) -> str | None:
    from thinktwice_pl.rewards import extract_last_boxed  # one extraction rule for gold and completions

    return extract_last_boxed(solution)
