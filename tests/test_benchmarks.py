"""Benchmark presets (hub schema -> problems, read from local files of that schema), prepare_data.py, champ,
and the rectify/fortify plot from metrics files (plotting.py and scripts/plot_dynamics.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from thinktwice_pl.data import BENCHMARKS, PRESETS, ProblemSource, load_problems, resolve_source
from thinktwice_pl.plotting import dynamics, plot_dynamics

ROOT = Path(__file__).resolve().parents[1]

# One row per preset in the schema of its hub dataset (column names and value types as published).
HUB_ROWS = {
    "math_train": {
        "problem": "What is $1+1$?",
        "level": "Level 1",
        "type": "Algebra",
        "solution": "We add: $1+1=\\boxed{2}$.",
    },
    "aime": {
        "id": 60,
        "problem": "Find the remainder.",
        "solution": "... so \\boxed{204}.",
        "answer": "204",
        "url": "https://artofproblemsolving.com/x",
    },
    "amc": {"id": 0, "problem": "How many integers?", "answer": 142.0, "url": "https://artofproblemsolving.com/y"},
    "math500": {
        "problem": "Convert $(0,3)$ to polar.",
        "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    "minerva_math": {"question": "Compute the mass.", "answer": "1.3e-7"},
    "olympiadbench": {
        "id": 1,
        "question": "Find all $n$.",
        "context": "Let $n$ be a positive integer.",
        "final_answer": ["$\\frac{1}{2}$", "$3$"],
        "question_id": 2231,
        "subfield": "Algebra",
        "answer_type": "Numerical",
    },
}
EXPECTED = {  # (problem text, gold answer, id)
    "math_train": ("What is $1+1$?", "2", None),
    "aime": ("Find the remainder.", "204", "60"),
    "amc": ("How many integers?", "142", "0"),
    "math500": ("Convert $(0,3)$ to polar.", "\\left( 3, \\frac{\\pi}{2} \\right)", "test/precalculus/807.json"),
    "minerva_math": ("Compute the mass.", "1.3e-7", None),
    "olympiadbench": ("Let $n$ be a positive integer.\n\nFind all $n$.", "\\frac{1}{2}", "2231"),
}


def _hub_file(tmp_path: Path, preset: str) -> Path:
    path = tmp_path / f"{preset}_raw.jsonl"
    path.write_text(json.dumps(HUB_ROWS[preset]) + "\n")
    return path


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_map_their_hub_schema(preset: str, tmp_path: Path) -> None:
    source = resolve_source(ProblemSource(preset=preset), path=str(_hub_file(tmp_path, preset)))
    assert source.preset is None and source.split == PRESETS[preset]["split"]
    [problem] = load_problems(source)
    text, answer, problem_id = EXPECTED[preset]
    assert (problem.prompt_text, problem.answer) == (text, answer)
    if problem_id is not None:
        assert problem.id == problem_id


def test_presets_name_the_paper_datasets() -> None:
    assert BENCHMARKS == ("aime", "amc", "math500", "minerva_math", "olympiadbench")
    assert PRESETS["aime"]["path"] == "AI-MO/aimo-validation-aime"
    assert PRESETS["amc"]["path"] == "AI-MO/aimo-validation-amc"
    assert PRESETS["math500"]["path"] == "HuggingFaceH4/MATH-500"
    assert PRESETS["minerva_math"]["path"] == "math-ai/minervamath"
    assert PRESETS["math_train"]["path"] == "DigitalLearningGmbH/MATH-lighteval"


def test_preset_misuse_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"preset='aimee' is unknown; use one of math_train, aime"):
        ProblemSource(preset="aimee")
    with pytest.raises(ValueError, match=r"path='data/aime.parquet' is also set: drop one of them"):
        ProblemSource(preset="aime", path="data/aime.parquet")
    # offline, the hub dataset does not load: the error says how to use a local copy
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not load hub dataset 'AI-MO/aimo-validation-aime'.*local"):
        load_problems(ProblemSource(preset="aime"))


def test_champ_without_the_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from thinktwice_pl import optional

    monkeypatch.setattr(optional.CHAMP, "available", False, raising=False)  # as if champ-dataset were missing
    with pytest.raises(ImportError, match=r"data source 'champ' needs a package .* pip install champ-dataset"):
        load_problems(ProblemSource(path="champ"))


@pytest.mark.skipif(importlib.util.find_spec("champ_dataset") is None, reason="champ-dataset is not installed")
def test_champ_gives_270_problems() -> None:
    problems = load_problems(ProblemSource(path="champ"))
    assert len(problems) == 270 and all(p.answer for p in problems)


def test_prepare_data_writes_parquet_from_a_local_file_of_the_hub_schema(tmp_path: Path) -> None:
    raw = _hub_file(tmp_path, "olympiadbench")
    script = str(ROOT / "scripts/prepare_data.py")
    command = [sys.executable, script, "olympiadbench", "--out-dir", str(tmp_path / "data"), "--source-file", str(raw)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "olympiadbench: 1 problems" in out.stdout
    parquet = tmp_path / "data" / "olympiadbench.parquet"
    assert list(pd.read_parquet(parquet).columns) == ["id", "problem", "answer", "source"]
    [problem] = load_problems(ProblemSource(path=str(parquet), id_field="id"))
    assert (problem.prompt_text, problem.answer, problem.id) == EXPECTED["olympiadbench"]


def _run_metrics(fix: list[float], damage: list[float], keep: list[float]) -> pd.DataFrame:
    """A metrics.csv as the CSVLogger writes it: training rows per phase, validation rows at some steps."""
    rows = [
        {"step": 2 * i + 1, "train/refine/fix_rate": 0.2 + 0.05 * i, "train/refine/keep_rate": k}
        for i, k in enumerate(keep)
    ]
    rows += [
        {"step": 4 * i + 3, "val/transition/fix_wrong": f, "val/transition/damage_correct": d}
        for i, (f, d) in enumerate(zip(fix, damage, strict=True))
    ]
    return pd.DataFrame(rows)


def test_dynamics_table_has_the_expected_series() -> None:
    table = dynamics(_run_metrics(fix=[0.18, 0.23], damage=[0.015, 0.0], keep=[0.9, 0.95, 0.99, 1.0]))
    val_fix = table[(table["curve"] == "fix_wrong") & (table["source"] == "val")]
    assert val_fix["step"].tolist() == [3, 7] and val_fix["rate"].tolist() == [0.18, 0.23]
    train_damage = table[(table["curve"] == "damage_correct") & (table["source"] == "train")]
    assert train_damage["rate"].tolist() == pytest.approx([0.1, 0.05, 0.01, 0.0])  # 1 - keep_rate
    with pytest.raises(ValueError, match="none of val/transition/fix_wrong"):
        dynamics(pd.DataFrame({"step": [0], "train/solve/loss": [1.0]}))


def test_plot_dynamics_script_overlays_two_runs(tmp_path: Path) -> None:
    thinktwice = tmp_path / "thinktwice" / "version_0" / "metrics.csv"
    grpo = tmp_path / "grpo" / "version_0" / "metrics.csv"
    for path, fix in ((thinktwice, [0.18, 0.23]), (grpo, [0.18, 0.18])):
        path.parent.mkdir(parents=True)
        _run_metrics(fix=fix, damage=[0.015, 0.01], keep=[0.9, 0.95]).to_csv(path, index=False)
    out_png = tmp_path / "overlay.png"
    script = str(ROOT / "scripts/plot_dynamics.py")
    command = [
        sys.executable,
        script,
        str(thinktwice),
        str(grpo),
        "--labels",
        "ThinkTwice",
        "GRPO",
        "--out",
        str(out_png),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import matplotlib.image

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out_png).shape[:2] == (400, 1100)  # figsize 11 x 4 at 100 dpi


def test_plot_dynamics_draws_one_line_per_run_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    saved: list[matplotlib.figure.Figure] = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: saved.append(self))
    runs = {"A": _run_metrics([0.1, 0.2], [0.02, 0.01], [0.9, 0.95]), "B": _run_metrics([0.1], [0.02], [0.9])}
    plot_dynamics(runs, tmp_path / "x.png")
    fix_ax, damage_ax = saved[0].axes
    labels = [line.get_label() for line in fix_ax.get_lines()]
    assert labels == [
        "A (validation, greedy)",
        "A (training, sampled)",
        "B (validation, greedy)",
        "B (training, sampled)",
    ]
    assert list(damage_ax.get_lines()[0].get_ydata()) == pytest.approx([2.0, 1.0])  # percent


def test_bench_step_splits_each_phase_and_reports_memory(tmp_path: Path) -> None:
    """scripts/bench_step.py on the tiny config: 4 phases, a record each, medians per phase kind, peak RSS."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "THINKTWICE_HOME": str(tmp_path / "home")}
    script, config = str(ROOT / "scripts/bench_step.py"), str(ROOT / "configs/tiny.yaml")
    overrides = ["--", "--rollout.max_completion_length", "8"]
    command = [sys.executable, script, "--config", config, "--phases", "4", "--json", str(out), *overrides]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["phase"] for r in data["records"]] == ["solve", "refine", "solve", "refine"]
    assert all(r["optimizer_steps"] == 2 for r in data["records"])  # tiny.yaml: 2 mini-batches per phase
    assert all(0 < r["completion_tokens"] <= 8 * r["sequences"] for r in data["records"])
    for phase in ("solve", "refine"):
        summary = data["summary"][phase]
        assert summary["phases_measured"] == 1  # the first of each kind is the warm-up
        assert summary["generate_s"] > 0 and summary["train_s"] > 0 and summary["sync_s"] >= 0
        assert summary["step_s"] >= summary["generate_s"] + summary["train_s"]
        assert summary["peak_rss_gib"]["generate"] > 0.1 and summary["peak_rss_gib"]["update"] > 0.1
    assert data["summary"]["peak_rss_gib"] >= data["summary"]["solve"]["peak_rss_gib"]["generate"] * 0.99
    assert data["summary"]["pair_s"] == data["summary"]["solve"]["step_s"] + data["summary"]["refine"]["step_s"]
    assert not list(tmp_path.glob("runs"))  # the run's files went into a scratch folder
