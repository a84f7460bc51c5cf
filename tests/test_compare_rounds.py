"""scripts/compare_rounds.py end to end on the tiny model: a real `thinktwice test` per model with refinement in rounds,
the rounds and pass@k tables from their records, and a rerun that skips what finished."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_rounds", ROOT / "scripts" / "compare_rounds.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_two_models_three_rounds_one_command_and_a_rerun_skips_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("THINKTWICE_HOME", str(tmp_path / "home"))
    argv = [
        "--out",
        str(tmp_path / "rounds"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--rounds",
        "3",
        "--model",
        "A=thinktwice:tiny",
        "--model",
        "B=thinktwice:tiny",
        "--",
        "--data.test",
        "{arith: {path: procedural, num_problems: 4, difficulty: 0, seed: 1}}",
        "--eval.num_samples",
        "4",
        "--eval.refine_temperature",
        "0.7",
        "--rollout.reward",
        "signal_rewards.even_length",
        "--rollout.reward_workers",
        "0",
    ]
    out = _script().main(argv)
    table = pd.read_csv(out / "rounds.csv")
    assert sorted(set(table["run"])) == ["A", "B"]
    assert table.groupby("run")["round"].apply(list).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert table["pass@1"].between(0, 1).all()
    # n = 4: the compute-matched pass@(r + 1) of first answers exists for every round up to 3
    assert table.loc[table["round"] >= 1, "matched_pass@1"].notna().all()
    a, b = (table[table["run"] == run].reset_index(drop=True) for run in ("A", "B"))
    pd.testing.assert_frame_equal(a.drop(columns="run"), b.drop(columns="run"))  # same model, same seeds
    records = pd.read_csv(out / "runs" / "A" / "eval_records.csv")
    assert {"refine2_correct", "refine3_correct", "greedy_refine3_correct"} <= set(records.columns)
    assert (out / "rounds.png").stat().st_size > 0 and (out / "passk.png").stat().st_size > 0
    capsys.readouterr()
    _script().main(argv)
    printed = capsys.readouterr().out
    assert "[A] finished earlier, skipped" in printed and "[B] finished earlier, skipped" in printed
    with pytest.raises(SystemExit, match="rounds"):  # another R would mix into the finished tests
        _script().main([*argv[:4], "--rounds", "2", *argv[6:]])
    with pytest.raises(SystemExit, match="given twice"):
        _script().main(["--out", str(tmp_path / "x"), "--config", argv[3], "--model", "A=a", "--model", "A=b"])
