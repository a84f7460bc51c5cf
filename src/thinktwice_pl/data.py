"""Problems in, phase-tagged batches out: the ThinkTwice data module.

ThinkTwice (METHOD.md section 1) trains every batch of problems twice: a *solve* phase (plain GRPO)
and then a *refine* phase in which the policy reviews one of its own solve answers (the *base*).
This module owns the data side of that loop:

- `ProblemSource` / `load_problems`: a local ``.jsonl``/``.json``/``.parquet`` file, a hub dataset
  or generated arithmetic (``"procedural"``), validated row by row at load time. The gold answer of
  a full reference solution is the content of its last ``\\boxed{}`` (METHOD.md section 4).
- `select_bases`: which solve answer of each group becomes the base of the refine prompt.
- `ThinkTwiceDataModule`: serves problem batch ``p`` as ``solve`` then ``refine`` (solve only when
  ``refine=False``: the GRPO baseline) and caches the solve rollouts that the refine phase needs.

Resume is exact: the module counts phase batches *completed* (`phase_done`, called by the rollout
callback), not fetched (Lightning prefetches one batch ahead), and every iteration starts at that
cursor. The cursor and the rollout cache travel in the checkpoint through `state_dict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset

from thinktwice_pl.types import EvalBatch, PhaseBatch, Problem, Rollout

BaseSelection = Literal["uniform", "wrong_first", "balanced"]
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
_ACCEPTED = (
    'a local .jsonl, .json or .parquet file, a hub dataset name such as "HuggingFaceH4/MATH-500", or "procedural"'
)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_STATE_VERSION = 1


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
    5 bare add/sub with operands up to 30 ("What is 27 - 9?")."""
    text_split: Literal["all", "train", "heldout"] = "all"
    """Procedural only: "train" or "heldout" keeps one of two halves of the problem texts (split by a hash of the
    text), so a training set and a held-out set never share a problem text, whatever their seeds; "heldout" also
    keeps each text once."""
    seed: int = 0
    """Procedural only: problem i depends only on (seed, difficulty, i)."""
    context_field: str | None = None
    """Column whose text (when non-empty) goes before the problem, separated by a blank line (OlympiadBench)."""
    preset: str | None = None
    """A dataset of the paper by name (see PRESETS: math_train, aime, amc, math500, minerva_math, olympiadbench):
    sets path, split and the column mapping; leave those at their defaults. limit and on_bad_row still apply."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"ProblemSource.path is empty; use {_ACCEPTED}")
        if self.preset is not None:
            if self.preset not in PRESETS:
                raise ValueError(f"ProblemSource.preset={self.preset!r} is unknown; use one of {', '.join(PRESETS)}")
            changed = [f"{name}={getattr(self, name)!r}" for name in _PRESET_FIELDS
                       if getattr(self, name) != _DEFAULTS[name]]  # fmt: skip
            if changed:
                raise ValueError(
                    f"ProblemSource(preset={self.preset!r}) sets path, split and the columns itself, but "
                    f"{', '.join(changed)} is also set: drop one of them (an offline copy written by "
                    "scripts/prepare_data.py is read with path: <file>.parquet and id_field: id, without a preset)"
                )
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"ProblemSource.on_bad_row={self.on_bad_row!r}; use 'error' or 'skip'")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"ProblemSource.limit={self.limit} must be at least 1 (or unset for all problems)")
        if self.num_problems < 1:
            raise ValueError(f"ProblemSource.num_problems={self.num_problems} must be at least 1")
        if not 0 <= self.difficulty <= 5:
            raise ValueError(f"ProblemSource.difficulty={self.difficulty} must be 0, 1, 2, 3, 4 or 5")
        if self.text_split not in ("all", "train", "heldout"):
            raise ValueError(f"ProblemSource.text_split={self.text_split!r}; use 'all', 'train' or 'heldout'")


# ---------------------------------------------------------------------------------------------- presets

_PRESET_FIELDS = ("path", "split", "subset", "problem_field", "answer_field", "id_field", "answer_is_solution",
                  "context_field")  # fmt: skip
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ProblemSource)}

PRESETS: dict[str, dict[str, Any]] = {
    # MATH train (7,500 problems, all subjects and levels): gold = last \boxed{} of the reference solution
    "math_train": {"path": "DigitalLearningGmbH/MATH-lighteval", "split": "train", "answer_field": "solution",
                   "answer_is_solution": True},
    # AIME 2022-2024 (90 problems)
    "aime": {"path": "AI-MO/aimo-validation-aime", "split": "train", "id_field": "id", "answer_is_solution": False},
    # AMC 2022-2023 (83 problems); answers are floats in the hub file (142.0 -> "142")
    "amc": {"path": "AI-MO/aimo-validation-amc", "split": "train", "id_field": "id", "answer_is_solution": False},
    # MATH-500 (500 problems)
    "math500": {"path": "HuggingFaceH4/MATH-500", "split": "test", "id_field": "unique_id",
                "answer_is_solution": False},
    # Minerva Math (272 problems)
    "minerva_math": {"path": "math-ai/minervamath", "split": "test", "problem_field": "question",
                     "answer_is_solution": False},
    # OlympiadBench, English, text-only, math (581 problems): context before the question, the first of the
    # final answers with its $...$ removed (as the reference evaluation does)
    "olympiadbench": {"path": "afraamn/olympiadbench_math_textonly", "split": "test_en", "problem_field": "question",
                      "answer_field": "final_answer", "id_field": "question_id", "context_field": "context",
                      "answer_is_solution": False},
}  # fmt: skip
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
        return procedural_problems(source, flag_prefix)
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
            raise ValueError(
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
                raise ValueError(f"{message} ({bad.fix}, or {flag_prefix}.on_bad_row=skip to skip such rows)") from None
            skipped[bad.what] += 1
            first_skip = first_skip or message
            continue
        if problem.id in row_of_id:
            raise ValueError(
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
        raise ValueError(f"{label} holds no usable problems ({seen} rows read)")
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
            raise ValueError(f"problem file {source.path!r} does not exist; use {_ACCEPTED}")
        if suffix not in FILE_SUFFIXES:
            raise ValueError(f"cannot read {source.path!r} (unknown suffix {suffix!r}); use {_ACCEPTED}")
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return path.name, path.stem, table.column_names, enumerate(table.to_pylist(), 1)
        records = _read_json_records(path)
        columns = list(dict.fromkeys(key for _, row in records if isinstance(row, dict) for key in row))
        return path.name, path.stem, columns, iter(records)
    if not path.is_dir() and (not _HUB_NAME.match(source.path) or suffix in {".csv", ".tsv", ".txt", ".gz"}):
        raise ValueError(f"problem source {source.path!r} is neither an existing file nor a hub name; use {_ACCEPTED}")
    return _open_hub(source)


def _read_json_records(path: Path) -> list[tuple[int, Any]]:
    """Rows of a JSON array file or of a JSON Lines file (numbered by line); unparsable lines become _BadRow."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path.name} is not valid JSON ({e}); use a JSON array of objects or JSON Lines") from e
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
        raise ValueError(
            f"could not load hub dataset {source.path!r} (subset={source.subset!r}, split={source.split!r}): "
            f"{type(e).__name__}: {e}. With HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 only cached datasets load; "
            f"otherwise point the path at a local .jsonl/.json/.parquet file"
        ) from e
    name = Path(source.path).name if Path(source.path).is_dir() else source.path  # a local dataset directory
    where = ([f"subset {source.subset!r}"] if source.subset else []) + [f"split {source.split!r}"]
    return f"{name} ({', '.join(where)})", name, list(dataset.column_names), enumerate(dataset, 1)


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
    try:
        import champ_dataset
    except ImportError as e:
        raise ImportError(
            "data source 'champ' needs the champ-dataset package: pip install champ-dataset (the champ extra) "
            "(or use path: procedural, or a local problem file)"
        ) from e
    problems = [
        Problem(id=f"champ-{key}", prompt_text=str(p.text).strip(), source="champ",
                answer=_strip_math_delimiters(str(p.answer).strip()))
        for key, p in champ_dataset.load("v0").problems.items()
    ]  # fmt: skip
    return problems[: source.limit] if source.limit else problems


def write_parquet(problems: list[Problem], path: str | Path) -> Path:
    """Writes `problems` as a parquet file with columns id, problem, answer, source; read it back with
    ``ProblemSource(path=<file>, id_field="id")``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        "id": [p.id for p in problems], "problem": [p.prompt_text for p in problems],
        "answer": [p.answer for p in problems], "source": [p.source for p in problems],
    })  # fmt: skip
    pq.write_table(table, out)
    return out


def _extract_gold(solution: str) -> str | None:
    from thinktwice_pl.rewards import extract_last_boxed  # one extraction rule for gold and completions

    return extract_last_boxed(solution)


# ---------------------------------------------------------------------------------------------- procedural

_NAMES = [
    ("Mia", "she"), ("Liam", "he"), ("Ava", "she"), ("Noah", "he"), ("Emma", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Lucas", "he"), ("Zoe", "she"), ("Ben", "he"), ("Priya", "she"), ("Kenji", "he"),
]  # fmt: skip
_OBJECTS = [
    ("apple", "apples"), ("marble", "marbles"), ("pencil", "pencils"), ("sticker", "stickers"), ("book", "books"),
    ("cookie", "cookies"), ("shell", "shells"), ("card", "cards"), ("stamp", "stamps"), ("balloon", "balloons"),
    ("candy", "candies"), ("toy car", "toy cars"),
]  # fmt: skip
_CONTAINERS = ["bags", "boxes", "jars", "packs"]


def procedural_problems(source: ProblemSource, flag_prefix: str = "data.train") -> list[Problem]:
    """The problems of a procedural `source`: problem i of the generator for every i, or, with a `text_split`, the
    generator's problems whose text falls on that side of `text_side` (held-out side: each text once)."""
    n = min(source.num_problems, source.limit or source.num_problems)
    if source.text_split == "all":
        return [procedural_problem(source.seed, source.difficulty, i) for i in range(n)]
    problems: list[Problem] = []
    seen: set[str] = set()
    index = misses = 0
    while len(problems) < n:
        problem = procedural_problem(source.seed, source.difficulty, index)
        index += 1
        text = problem.prompt_text
        if text_side(text) != source.text_split or (source.text_split == "heldout" and text in seen):
            misses += 1
            if misses > 10_000:  # the side's distinct texts are used up
                raise ValueError(
                    f"{flag_prefix} asks for {n} problems from the {source.text_split!r} side of difficulty "
                    f"{source.difficulty}, which has only {len(problems)} distinct texts; lower "
                    f"{flag_prefix}.num_problems or pick a difficulty with more possible problems"
                )
            continue
        misses = 0
        seen.add(text)
        problems.append(problem)
    return problems


def text_side(text: str) -> Literal["train", "heldout"]:
    """Which half of the problem texts `text` belongs to: the first byte of its sha256, even = train, odd = heldout.

    It depends on the text alone, so procedural sets drawn with any seeds from different sides are disjoint.
    """
    return "train" if hashlib.sha256(text.encode()).digest()[0] % 2 == 0 else "heldout"


def procedural_problem(seed: int, difficulty: int, index: int) -> Problem:
    """Generates arithmetic word problem `index`; it depends only on (seed, difficulty, index).

    Args:
        seed: generator seed.
        difficulty: 0 bare one-digit sums ("What is 3 + 4?"), 1 single-digit add/sub stories, 2 two-digit
            add/sub, 3 add/sub/mul/div, 4 two-step problems, 5 bare add/sub with operands 1 to 30 ("What is
            27 - 9?", never negative; 1365 distinct texts).
        index: position of the problem in the set.

    Returns:
        A problem whose answer is a non-negative integer string.
    """
    rng = random.Random(f"thinktwice-{seed}-{difficulty}-{index}")
    if difficulty == 0:  # small models (the CPU quickstart) need a task they sometimes get right
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return _problem(seed, difficulty, index, f"What is {a} + {b}?", a + b)
    if difficulty == 5:  # the CPU comparison (configs/smollm2): SmolLM2-135M gets about a quarter right
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        if rng.random() < 0.5:
            return _problem(seed, difficulty, index, f"What is {a} + {b}?", a + b)
        a, b = max(a, b), min(a, b)  # no negative results
        return _problem(seed, difficulty, index, f"What is {a} - {b}?", a - b)
    (name, pronoun), (other, _) = rng.sample(_NAMES, 2)
    one, many = rng.choice(_OBJECTS)
    box, she = rng.choice(_CONTAINERS), pronoun.capitalize()
    has_now, has_left = f"How many {many} does {name} have now?", f"How many {many} does {name} have left?"

    def n(count: int) -> str:
        return f"{count} {one if count == 1 else many}"

    if difficulty == 4:
        kind = rng.choice(["buy_boxes", "give_find", "share", "box_give"])
        if kind == "buy_boxes":
            a, b, c = rng.randint(2, 30), rng.randint(2, 6), rng.randint(2, 10)
            text, answer = f"{name} has {n(a)}. {she} buys {b} {box} with {c} {many} in each. {has_now}", a + b * c
        elif kind == "give_find":
            a = rng.randint(10, 50)
            b, c = rng.randint(1, a), rng.randint(2, 20)
            text = f"{name} has {n(a)}. {she} gives {b} to {other} and then finds {c} more. {has_now}"
            answer = a - b + c
        elif kind == "share":
            c, answer = rng.randint(2, 6), rng.randint(2, 10)
            a = rng.randint(1, c * answer - 1)
            text = (
                f"{name} has {n(a)} and buys {c * answer - a} more. {she} shares them equally among {c} friends. "
                f"How many {many} does each friend get?"
            )
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 12)
            c = rng.randint(1, a * b)
            text, answer = f"{name} buys {a} {box} of {b} {many} and gives {c} to {other}. {has_left}", a * b - c
        return _problem(seed, difficulty, index, text, answer)

    kind = rng.choice(["add", "combine", "remove", "compare"] + ["multiply", "divide"] * 2 * (difficulty == 3))
    low, high = (1, 9) if difficulty == 1 else (10, 99)
    a, b = sorted((rng.randint(low, high), rng.randint(low, high)), reverse=True)  # a >= b: no negative results
    if kind == "add":
        text, answer = f"{name} has {n(a)} and {rng.choice(['buys', 'finds', 'gets'])} {b} more. {has_now}", a + b
    elif kind == "combine":
        text, answer = f"{name} has {n(a)} and {other} has {n(b)}. How many {many} do they have together?", a + b
    elif kind == "remove":
        verb = rng.choice([f"gives {b} to {other}", f"loses {b}"])
        text, answer = f"{name} has {n(a)}. {she} {verb}. {has_left}", a - b
    elif kind == "compare":
        if a == b:  # "how many more" with equal counts reads oddly
            a, b = (a + 1, b) if a < high else (a, b - 1)
        text = f"{name} has {n(a)} and {other} has {n(b)}. How many more {many} does {name} have than {other}?"
        answer = a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        if kind == "multiply":
            text = f"{name} has {a} {box} with {b} {many} in each. How many {many} does {name} have in total?"
            answer = a * b
        else:
            text = f"{name} shares {a * b} {many} equally among {b} friends. How many {many} does each friend get?"
            answer = a
    return _problem(seed, difficulty, index, text, answer)


def _problem(seed: int, difficulty: int, index: int, text: str, answer: int) -> Problem:
    return Problem(f"procedural-d{difficulty}-s{seed}-{index}", text, str(answer), source="procedural")


# ---------------------------------------------------------------------------------------------- base selection


def select_bases(groups: list[list[Rollout]], mode: BaseSelection, rng: random.Random) -> list[Rollout]:
    """Picks one solve answer per group to place in that problem's refine prompt (METHOD.md section 1).

    Choices are made among distinct completion texts, so a text sampled several times is not favoured.

    Args:
        groups: the G solve rollouts of each problem.
        mode: ``uniform`` (the paper: any answer, right or wrong), ``wrong_first`` (a wrong answer when the
            group has one), ``balanced`` (of the groups with both right and wrong answers, half get a right
            base and half a wrong one; the others uniform).
        rng: source of randomness; the same state gives the same choice.

    Returns:
        One rollout per group, in group order.
    """
    if mode not in ("uniform", "wrong_first", "balanced"):
        raise ValueError(f"unknown base selection {mode!r}; use uniform, wrong_first or balanced")
    for g, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {g} has no solve rollouts to choose a base from")

    def pick(candidates: list[Rollout]) -> Rollout:
        text = rng.choice(list(dict.fromkeys(r.completion_text for r in candidates)))
        return next(r for r in candidates if r.completion_text == text)

    if mode == "uniform":
        return [pick(group) for group in groups]
    if mode == "wrong_first":
        return [pick([r for r in group if not r.correct] or group) for group in groups]
    mixed = [g for g, group in enumerate(groups) if len({r.correct for r in group}) == 2]
    num_right = len(mixed) // 2 + (len(mixed) % 2 if rng.random() < 0.5 else 0)  # odd count: floor or ceil
    right = set(rng.sample(mixed, num_right))
    return [
        pick([r for r in group if r.correct == (g in right)] if g in mixed else group) for g, group in enumerate(groups)
    ]


# ---------------------------------------------------------------------------------------------- data module


class ThinkTwiceDataModule(LightningDataModule):
    """Serves each problem batch twice, solve then refine, and keeps the solve rollouts for the refine phase.

    Phase batch ``i`` is fully determined by ``i``: pair ``p = i // 2`` (``i`` itself with ``refine=False``),
    epoch ``p // pairs_per_epoch``, the problems at slot ``p % pairs_per_epoch`` of that epoch's order. The
    rollout callback calls `bases_for` before a refine batch and `phase_done` after every batch.
    """

    def __init__(
        self,
        train: ProblemSource | None = None,
        problems_per_batch: int = 32,
        refine: bool = True,
        refine_selection: BaseSelection = "uniform",
        shuffle: bool = True,
        seed: int = 0,
        val: dict[str, ProblemSource] | None = None,
        test: dict[str, ProblemSource] | None = None,
        eval_problems_per_batch: int = 8,
    ) -> None:
        """Creates the data module; problems are loaded in `setup`.

        Args:
            train: where the training problems come from; unset: generated arithmetic (``ProblemSource()``).
            problems_per_batch: problems per batch (B); each phase samples B * num_generations completions.
                An epoch is floor(num_problems / B) batches; the remainder is left out of that epoch.
            refine: serve every problem batch a second time for the refine phase; false gives the GRPO baseline.
            refine_selection: which solve answer becomes the base of the refine prompt: ``uniform`` (the paper),
                ``wrong_first`` or ``balanced`` (ablations, see `select_bases`).
            shuffle: a fresh problem order each epoch, seeded by (seed, epoch); false keeps the source order.
            seed: seed of the epoch orders and of the base selection.
            val: named validation benchmarks (``name: source``), evaluated during fit and by ``thinktwice validate``;
                e.g. ``{aime: {preset: aime}}`` or ``{arith: {path: procedural, num_problems: 16}}``.
            test: named test benchmarks, evaluated by ``thinktwice test``.
            eval_problems_per_batch: problems per validation/test batch (each gets eval.num_samples samples).
        """
        super().__init__()
        if problems_per_batch < 1:
            raise ValueError(f"data.problems_per_batch={problems_per_batch} must be at least 1")
        if refine_selection not in ("uniform", "wrong_first", "balanced"):
            raise ValueError(f"data.refine_selection={refine_selection!r}; use uniform, wrong_first or balanced")
        if isinstance(train, dict):  # hyper-parameters read back from a checkpoint (load_from_checkpoint)
            train = ProblemSource(**train)
        if eval_problems_per_batch < 1:
            raise ValueError(f"data.eval_problems_per_batch={eval_problems_per_batch} must be at least 1")
        self.train_source = train if train is not None else ProblemSource()
        self.eval_sources = {"val": _named_sources(val, "data.val"), "test": _named_sources(test, "data.test")}
        self.eval_problems_per_batch = eval_problems_per_batch
        self.save_hyperparameters()
        # Plain python in checkpoints: torch.load(weights_only=True), Lightning's default on resume, refuses classes.
        self.hparams["train"] = dataclasses.asdict(self.train_source)
        for split, sources in self.eval_sources.items():
            self.hparams[split] = {name: dataclasses.asdict(source) for name, source in sources.items()} or None
        self._eval_problems: dict[str, dict[str, list[Problem]]] = {}
        self.problems_per_batch = problems_per_batch
        self.refine = refine
        self.refine_selection: BaseSelection = refine_selection
        self.shuffle = shuffle
        self.seed = seed
        self._problems: list[Problem] | None = None
        self._cursor = 0  # phase batches completed (phase_done), not fetched: Lightning prefetches one ahead
        self._cache: dict[int, tuple[int, list[Rollout]]] = {}  # pair -> (group size, its solve rollouts)
        self._pending_state: dict[str, Any] | None = None  # load_state_dict before setup
        self._order: tuple[int, list[int]] = (-1, [])  # (epoch, problem order) of the last epoch served

    # --- problems and layout

    def setup(self, stage: str | None = None) -> None:
        """Loads the training problems once (later calls do nothing); the benchmarks when first needed."""
        if self._problems is not None or stage not in (None, "fit"):
            return
        problems = load_problems(self.train_source)
        n, size = len(problems), self.problems_per_batch
        if n < size:
            raise ValueError(
                f"data.train ({self.train_source.path}) gives {n} problems, fewer than data.problems_per_batch="
                f"{size}; lower data.problems_per_batch or give more problems (data.train.num_problems, .limit)"
            )
        if n % size:
            rank_zero_info(
                f"{n % size} of {n} training problems do not fill a batch of {size} and sit out each epoch "
                f"({'a different subset each epoch' if self.shuffle else 'always the last ones'})"
            )
        self._problems = problems
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._restore(state)

    @property
    def problems(self) -> list[Problem]:
        """The training problems in source order."""
        if self._problems is None:
            raise RuntimeError("ThinkTwiceDataModule has no problems yet; call setup('fit') first")
        return self._problems

    @property
    def cursor(self) -> int:
        """Number of phase batches completed; the next training iteration starts here."""
        return self._cursor

    @property
    def phase_batches_per_epoch(self) -> int:
        """Phase batches in one epoch: problem batches times phases (2 with refine, else 1)."""
        return len(self.problems) // self.problems_per_batch * (2 if self.refine else 1)

    def phase_batch(self, index: int) -> PhaseBatch:
        """Builds phase batch `index` (counted from the start of training)."""
        pair, step = divmod(index, 2) if self.refine else (index, 0)
        epoch, slot = divmod(pair, len(self.problems) // self.problems_per_batch)
        if self._order[0] != epoch:
            order = list(range(len(self.problems)))
            if self.shuffle:
                random.Random(f"thinktwice-order-{self.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        chosen = self._order[1][slot * self.problems_per_batch : (slot + 1) * self.problems_per_batch]
        return PhaseBatch(
            phase="solve" if step == 0 else "refine",
            problems=[self.problems[i] for i in chosen],
            index=index,
            pair=pair,
            epoch=epoch,
        )

    def train_dataloader(self) -> DataLoader[PhaseBatch]:
        """Phase batches from the cursor to the end of the cursor's epoch (one Lightning epoch)."""
        self.setup("fit")
        return DataLoader(_PhaseBatches(self), batch_size=None, collate_fn=_identity, num_workers=0)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """Returns phase and evaluation batches unchanged: they hold no tensors (callbacks build them on device).

        Lightning's default would deep-copy the batch and refuses the frozen `Problem` records.
        """
        if isinstance(batch, PhaseBatch | EvalBatch):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # --- validation and test benchmarks

    def eval_problems(self, split: Literal["val", "test"]) -> dict[str, list[Problem]]:
        """The problems of each named benchmark of `split` (loaded once, validated like the training problems)."""
        if split not in self._eval_problems:
            self._eval_problems[split] = {
                name: load_problems(source, flag_prefix=f"data.{split}.{name}")
                for name, source in self.eval_sources[split].items()
            }
        return self._eval_problems[split]

    def val_dataloader(self) -> DataLoader[EvalBatch]:
        """Batches of the ``data.val`` benchmarks, one benchmark after the other; this rank's share only."""
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader[EvalBatch]:
        """Batches of the ``data.test`` benchmarks; this rank's share only."""
        return self._eval_dataloader("test")

    def _eval_dataloader(self, split: Literal["val", "test"]) -> DataLoader[EvalBatch]:
        trainer = getattr(self, "trainer", None)
        fitting = trainer is not None and trainer.state.fn == "fit"
        if not self.eval_sources[split] and not fitting:
            raise ValueError(
                f"no {split} benchmarks are configured: set data.{split} (e.g. {{aime: {{preset: aime}}}} or "
                f"{{arith: {{path: procedural, num_problems: 32}}}})"
            )
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = eval_batches(self.eval_problems(split), self.eval_problems_per_batch, rank, world)
        return DataLoader(batches, batch_size=None, collate_fn=_identity, num_workers=0, shuffle=False)  # type: ignore[arg-type]

    # --- the rollout cache

    def phase_done(self, batch: PhaseBatch) -> None:
        """Marks `batch` completed; call once per training batch, in order, from ``on_train_batch_end``.

        After a solve batch (with refine on) its rollouts are cached for the refine batch of the same pair.
        """
        if batch.index != self._cursor:
            raise RuntimeError(
                f"phase_done got phase batch {batch.index} but the next batch to complete is {self._cursor}; "
                "call it exactly once per training batch, in order, from on_train_batch_end"
            )
        if batch.phase == "solve" and self.refine:
            if batch.rollouts is None or batch.rollouts.num_groups != len(batch.problems):
                got = "no rollouts" if batch.rollouts is None else f"{batch.rollouts.num_groups} groups"
                raise RuntimeError(
                    f"solve batch {batch.index} (pair {batch.pair}) finished with {got} for {len(batch.problems)} "
                    "problems; the rollout callback must set batch.rollouts (one group per problem) before phase_done"
                )
            # Only the records: tensors built on the batch are not kept. Older pairs are never refined again.
            self._cache = {batch.pair: (batch.rollouts.group_size, list(batch.rollouts.rollouts))}
        elif batch.phase == "refine":
            self._cache.pop(batch.pair, None)  # no longer needed: keeps checkpoints after a refine batch small
        self._cursor += 1

    def bases_for(self, batch: PhaseBatch) -> list[Rollout]:
        """The solve answer of each problem of refine `batch` to place in its prompt (one per problem, in order).

        The choice is seeded by (seed, pair), so it is the same after a resume.
        """
        if batch.phase != "refine":
            raise ValueError(f"bases_for needs a refine batch; phase batch {batch.index} is a {batch.phase} batch")
        cached = self._cache.get(batch.pair)
        if cached is None:
            raise RuntimeError(
                f"refine batch for pair {batch.pair} but no cached solve rollouts: the solve batch of that pair "
                f"must end with phase_done(batch) and batch.rollouts set (cached pairs: {sorted(self._cache)})"
            )
        size, rollouts = cached
        groups = [rollouts[start : start + size] for start in range(0, len(rollouts), size)]
        expected = [p.id for p in batch.problems]
        if [{r.problem_id for r in group} for group in groups] != [{i} for i in expected]:
            raise RuntimeError(
                f"cached solve rollouts of pair {batch.pair} do not match its problems {expected[:4]}...: "
                "they must be group-major, one group per problem, in batch order"
            )
        return select_bases(groups, self.refine_selection, random.Random(f"thinktwice-bases-{self.seed}-{batch.pair}"))

    # --- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        """Cursor, cached solve rollouts (plain python) and a fingerprint of the problems, for exact resume."""
        if self._problems is None:
            return dict(self._pending_state or {})
        return {
            "version": _STATE_VERSION,
            "cursor": self._cursor,
            "fingerprint": _fingerprint(self._problems),
            "layout": self._layout(),
            "cache": [
                {"pair": pair, "group_size": size, "rollouts": [dataclasses.asdict(r) for r in rollouts]}
                for pair, (size, rollouts) in self._cache.items()
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores `state_dict`; checked against the problems once they are loaded."""
        if self._problems is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(state_dict)

    def _layout(self) -> dict[str, Any]:
        return {"problems_per_batch": self.problems_per_batch, "refine": self.refine, "shuffle": self.shuffle,
                "seed": self.seed}  # fmt: skip

    def _restore(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data module state version {state.get('version')!r} is not {_STATE_VERSION}")
        ours, theirs = _fingerprint(self.problems), state["fingerprint"]
        if ours != theirs:
            raise ValueError(
                f"the checkpoint was trained on {theirs['count']} problems (ids sha256 {theirs['ids_sha256'][:12]}) "
                f"but data.train ({self.train_source.path}) now gives {ours['count']} (ids sha256 "
                f"{ours['ids_sha256'][:12]}); resume with the same data.train settings, or start a fresh run"
            )
        changed = [f"data.{k}={v!r} (checkpoint: {state['layout'][k]!r})" for k, v in self._layout().items()
                   if state["layout"].get(k) != v]  # fmt: skip
        if changed:
            raise ValueError(
                f"the checkpoint's batches were laid out differently: {', '.join(changed)}; "
                "set them as in the checkpoint to resume it, or start a fresh run (with an OnExceptionCheckpoint "
                "callback Lightning resumes from its file automatically: delete that file to start fresh)"
            )
        self._cursor = int(state["cursor"])
        self._cache = {
            int(entry["pair"]): (int(entry["group_size"]), [Rollout(**r) for r in entry["rollouts"]])
            for entry in state["cache"]
        }


class _PhaseBatches(IterableDataset[PhaseBatch]):
    """One Lightning epoch of phase batches: from the data module's cursor, read at iter() time, to its epoch's end.

    When the cursor sits exactly on an epoch boundary this is the whole next epoch. No ``__len__``: after a
    mid-epoch resume the epoch is shorter.
    """

    def __init__(self, datamodule: ThinkTwiceDataModule) -> None:
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[PhaseBatch]:
        dm = self.datamodule
        start, per_epoch = dm.cursor, dm.phase_batches_per_epoch
        end = (start // per_epoch + 1) * per_epoch
        return (dm.phase_batch(i) for i in range(start, end))  # a generator expression: `start` is read now


def rank_slice(num_items: int, rank: int, world_size: int) -> slice:
    """The contiguous share of `num_items` (problems or groups) that `rank` of `world_size` ranks works on.

    Every rank gets the same batch of problems; each generates for and trains on its own share, so the
    G samples of a problem (its group) always stay on one rank.
    """
    if num_items % world_size:
        raise ValueError(f"{num_items} problems cannot be split evenly over {world_size} ranks")
    size = num_items // world_size
    return slice(rank * size, (rank + 1) * size)


def _identity(batch: Any) -> Any:
    return batch


def _named_sources(sources: dict[str, Any] | None, flag: str) -> dict[str, ProblemSource]:
    """``{name: ProblemSource}`` from the config (dicts read back from a checkpoint become ProblemSources)."""
    out: dict[str, ProblemSource] = {}
    for name, source in (sources or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ValueError(
                f"{flag}: benchmark name {name!r} must be letters, digits, '_', '-', '.' (it names metrics)"
            )
        if name in ("avg", "transition"):
            raise ValueError(f"{flag}.{name}: the names 'avg' and 'transition' are taken by the summary metrics")
        out[str(name)] = ProblemSource(**source) if isinstance(source, dict) else source
    return out


def eval_batches(
    benchmarks: dict[str, list[Problem]], per_batch: int, rank: int = 0, world: int = 1
) -> list[EvalBatch]:
    """This rank's evaluation batches: problem i of a benchmark goes to rank i % world; ranks that get fewer
    problems are padded with repeats (``counted=False``) so that every rank runs the same number of batches."""
    batches: list[EvalBatch] = []
    for name, problems in benchmarks.items():
        share = problems[rank::world]
        counted = [True] * len(share)
        per_rank = -(-len(problems) // world)  # ceil
        while len(share) < per_rank:  # only when len(problems) % world != 0
            share.append(problems[0])
            counted.append(False)
        for start in range(0, len(share), per_batch):
            batches.append(EvalBatch(name, share[start : start + per_batch], len(batches),
                                     counted[start : start + per_batch]))  # fmt: skip
    return batches


def _fingerprint(problems: list[Problem]) -> dict[str, Any]:
    ids = "\n".join(p.id for p in problems).encode()
    return {"count": len(problems), "ids_sha256": hashlib.sha256(ids).hexdigest()}
