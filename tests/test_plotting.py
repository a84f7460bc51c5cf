"""plot_passk and plot_rounds (plotting.py and their scripts): values against metrics.pass_at_k on hand-made records,
the same numbers from a real evaluation's eval_records.csv and from its metrics.csv, the files and the refusals."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from thinktwice_pl.data import ProblemSource
from thinktwice_pl.metrics import pass_at_k
from thinktwice_pl.plotting import PASSK_COLUMNS, passk_table, read_evaluation, rounds_table

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# two benchmarks, n = 4, two rounds of refinement: correct samples and greedy outcomes of each round
COUNTS = {"x": [[0, 2, 4], [1, 3, 4], [2, 3, 4]], "y": [[1, 0], [1, 1], [0, 4]]}
GREEDY = {"x": [[0, 1, 1], [1, 1, 0], [1, 0, 0]], "y": [[0, 0], [1, 0], [1, 1]]}


def write_records(path: Path) -> Path:
    """Hand-made eval_records.csv: the test evaluation above at step 6, and a validation at step 0 (all wrong)."""
    rows = []
    for split, step in (("val", 0), ("test", 6)):
        for bench, rounds in COUNTS.items():
            for i in range(len(rounds[0])):
                counts = [r[i] if split == "test" else 0 for r in rounds]
                greedy = [g[i] if split == "test" else 0 for g in GREEDY[bench]]
                rows.append(
                    {
                        "split": split,
                        "step": step,
                        "benchmark": bench,
                        "problem_id": f"{bench}{i}",
                        "n": 4,
                        "solve_correct": counts[0],
                        "refine_correct": counts[1],
                        "greedy_correct": greedy[0],
                        "greedy_refine_correct": greedy[1],
                        "refine2_correct": counts[2],
                        "greedy_refine2_correct": greedy[2],
                    }
                )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def script(name: str) -> Any:
    """scripts/<name>.py as a module (its main runs in this process)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mean_pass(counts: list[int], k: int, n: int = 4) -> float:
    return sum(pass_at_k(n, c, k) for c in counts) / len(counts)


def test_plot_passk_script_writes_every_k_by_the_unbiased_estimator(tmp_path: Path) -> None:
    records = write_records(tmp_path / "run" / "eval_records.csv")
    other = write_records(tmp_path / "other" / "eval_records.csv")
    out = tmp_path / "plots" / "curves.png"
    command = [sys.executable, str(ROOT / "scripts/plot_passk.py"), "--run", f"A={records.parent}", "--run"]
    done = subprocess.run([*command, f"B={other}", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    table = pd.read_csv(out.with_suffix(".csv"))
    assert tuple(table.columns) == PASSK_COLUMNS
    assert set(table["run"]) == {"A", "B"} and set(table["stage"]) == {"solve", "refine", "refine2"}
    assert sorted(set(table["k"])) == [1, 2, 3, 4]  # every k, not only powers of two
    for (run, bench, stage, k), value in table.set_index(["run", "benchmark", "stage", "k"])["pass@k"].items():
        r = ["solve", "refine", "refine2"].index(stage)
        expected = [mean_pass(COUNTS[b][r], k) for b in COUNTS] if bench == "avg" else [mean_pass(COUNTS[bench][r], k)]
        assert value == pytest.approx(sum(expected) / len(expected)), (run, bench, stage, k)  # the test rows (step 6)
    assert len(table) == 2 * 3 * 3 * 4  # runs x (x, y, avg) x stages x k

    val = tmp_path / "val.png"
    script("plot_passk").main(["--run", f"A={records}", "--split", "val", "--step", "0", "--out", str(val)])
    assert set(pd.read_csv(val.with_suffix(".csv"))["pass@k"]) == {0.0}  # the validation rows: nothing right
    assert val.read_bytes()[:8] == PNG_SIGNATURE


def test_plot_rounds_table_holds_pass_at_k_matched_greedy_and_transitions(tmp_path: Path) -> None:
    records = write_records(tmp_path / "run" / "eval_records.csv")
    out = tmp_path / "rounds.png"
    script("plot_rounds").main(["--run", f"ThinkTwice={records.parent}", "--out", str(out)])
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    table = pd.read_csv(out.with_suffix(".csv"))
    assert list(table.columns) == [
        "run", "round", "pass@1", "pass@2", "pass@4", "matched_pass@1", "matched_pass@2", "matched_pass@4",
        "greedy_acc", "fix_wrong", "damage_correct",
    ]  # fmt: skip
    assert table["round"].tolist() == [0, 1, 2] and set(table["run"]) == {"ThinkTwice"}

    def macro(r: int, k: int) -> float:
        return (mean_pass(COUNTS["x"][r], k) + mean_pass(COUNTS["y"][r], k)) / 2

    for r in range(3):
        row = table.iloc[r]
        for k in (1, 2, 4):
            assert row[f"pass@{k}"] == pytest.approx(macro(r, k))
            matched = macro(0, (r + 1) * k) if (r + 1) * k <= 4 else None  # the first answers' pass@((r + 1)k)
            assert (
                row[f"matched_pass@{k}"] == pytest.approx(matched)
                if matched is not None
                else pd.isna(row[f"matched_pass@{k}"])
            )
    # greedy: x right 2/3, 2/3, 1/3; y right 0, 1/2, 1 (macro means); fix/damage pooled over x and y
    assert table["greedy_acc"].tolist() == pytest.approx([1 / 3, 7 / 12, 2 / 3])
    assert table["fix_wrong"].tolist() == pytest.approx([float("nan"), 2 / 3, 1 / 2], nan_ok=True)
    assert table["damage_correct"].tolist() == pytest.approx([float("nan"), 1 / 2, 1 / 3], nan_ok=True)


def test_records_and_metrics_of_a_real_evaluation_give_the_same_numbers(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_evaluation import scripted_validation

    sources = {
        "s": ProblemSource(num_problems=5, difficulty=0),
        "t": ProblemSource(num_problems=3, difficulty=0, seed=7),
    }
    _, _, log_dir = scripted_validation(tmp_path, "r", sources, model_dir=tiny_model_dir, refine_rounds=2)
    from_records = read_evaluation(log_dir)
    from_metrics = read_evaluation(log_dir / "metrics.csv")
    assert from_records[0] == "records" and from_metrics[0] == "metrics"
    assert len(from_records[1]) == 8 and set(from_records[1]["split"]) == {"val"}

    rounds = rounds_table(*from_records)
    logged = rounds_table(*from_metrics)
    assert list(logged.columns) == list(rounds.columns) and rounds["round"].tolist() == [0, 1, 2]
    pd.testing.assert_frame_equal(logged, rounds, rtol=1e-6)  # the logged keys are float32
    assert rounds["pass@1"].nunique() == 2 and rounds["matched_pass@1"].is_monotonic_increasing

    curves = passk_table(*from_records).set_index(["benchmark", "stage", "k"])["pass@k"]
    logged_curves = passk_table(*from_metrics).set_index(["benchmark", "stage", "k"])["pass@k"]
    assert sorted(set(logged_curves.index.get_level_values("k"))) == [1, 2, 4]  # the logged k only
    assert sorted(set(curves.index.get_level_values("k"))) == [1, 2, 3, 4]
    assert logged_curves.to_dict() == pytest.approx(curves[logged_curves.index].to_dict(), rel=1e-6)


def test_plot_inputs_and_outputs_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = write_records(tmp_path / "run" / "eval_records.csv")
    main = script("plot_passk").main
    out = str(tmp_path / "c.png")
    for argv, message in (
        (["--run", f"A={records}", "--out", str(tmp_path / "run" / "eval_records.png")], "would overwrite the input"),
        (["--run", f"A={records}", "--out", str(tmp_path / "curves.svg")], "name a .png file"),
        (["--run", str(records), "--out", out], "write LABEL=PATH"),
        (["--run", f"A={records}", "--run", f"A={records}", "--out", out], "the label 'A' is used twice"),
        (["--run", f"A={records}", "--step", "3", "--out", out], r"has test evaluations at steps [6]"),
        (["--run", f"A={tmp_path / 'missing'}", "--out", out], "no such file or directory"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    greedy_only = pd.read_csv(records).assign(n=0)
    greedy_only.to_csv(tmp_path / "greedy.csv", index=False)
    with pytest.raises(SystemExit):
        main(["--run", f"A={tmp_path / 'greedy.csv'}", "--out", out])
    assert "no sampled answers (n = 0" in capsys.readouterr().err
    assert pd.read_csv(records).shape == (10, 11) and not Path(out).exists()  # inputs untouched, nothing written
