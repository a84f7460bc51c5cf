"""scripts/reproduce_cpu.py, the CPU comparison of ThinkTwice and GRPO: its whole pipeline on the tiny model (--smoke),
the bootstrap behind the table's intervals, and the refusal to compare on trained problems."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reproduce_cpu", ROOT / "scripts" / "reproduce_cpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce_cpu"] = module
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_the_table_plots_and_raw_metrics(
    script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = script.main(["--smoke", "--jobs", "2", "--out", str(tmp_path / "out")])
    lines = (out / "table.md").read_text().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == [
        "model",
        "solve pass@1",
        "solve pass@2",
        "refine pass@1",
        "refine pass@2",
        "fix-wrong",
        "damage-correct",
    ]
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == ["Base", "GRPO", "ThinkTwice", "ThinkTwice - GRPO"]
    assert all(len(row.strip("|").split("|")) == len(header) for row in rows)
    assert "Wall time" in lines[-1]
    assert "ThinkTwice: 2 solve + 2 refine phases; GRPO: 4 solve phases" in "\n".join(lines)  # --smoke: 4 steps

    records = pd.read_csv(out / "records.csv")
    assert records.groupby("model").size().to_dict() == {"Base": 4, "GRPO": 4, "ThinkTwice": 4}  # --smoke: 4 problems
    summary = pd.read_csv(out / "summary.csv")
    scores = summary[(summary["model"] != "ThinkTwice - GRPO") & summary["metric"].str.contains("pass@")]
    assert scores["value"].between(0, 1).all() and (scores["lo"] <= scores["value"] + 1e-9).all()
    for name in ("dynamics.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    for method in ("thinktwice", "grpo"):
        metrics = pd.read_csv(out / "metrics" / f"{method}-seed0.csv")
        assert metrics["train/solve/reward_mean"].notna().any()
        refined = "train/refine/reward_mean" in metrics.columns and metrics["train/refine/reward_mean"].notna().any()
        assert refined == (method == "thinktwice")
    stages = {"base-test", "thinktwice-fit-seed0", "grpo-fit-seed0", "thinktwice-test-seed0", "grpo-test-seed0"}
    assert set(json.loads((out / "timings.json").read_text())) == stages | {"checks", "wall (this command)"}

    capsys.readouterr()
    script.main(["--smoke", "--out", str(out)])  # a rerun skips what finished and rebuilds the report
    assert capsys.readouterr().out.count("finished earlier, skipped") == len(stages)


def test_held_out_problems_among_the_training_problems_stop_the_run(script: ModuleType, tmp_path: Path) -> None:
    configs = {m: ROOT / "configs" / "smollm2" / f"{m}.yaml" for m in ("thinktwice", "grpo")}
    with pytest.raises(SystemExit, match=r"data\.val\.heldout shares \d+ of its 64 problem texts with data\.train"):
        script.check_configs(configs, ["--data.train.text_split", "all"])  # training draws from every text
    hotter = tmp_path / "grpo.yaml"  # the baseline with another learning rate: not a fair comparison
    hotter.write_text(configs["grpo"].read_text().replace("learning_rate: 1.0e-5", "learning_rate: 3.0e-5"))
    assert hotter.read_text() != configs["grpo"].read_text()
    with pytest.raises(SystemExit, match=r"the model: sections .* differ"):
        script.check_configs({"thinktwice": configs["thinktwice"], "grpo": hotter}, [])


def test_bootstrap_intervals_and_paired_differences(script: ModuleType) -> None:
    # 4 problems, n = 2: pass@1 per problem 1, 0.5, 0, 0 -> 0.375; greedy right on the first two, the refinement
    # fixes problem 3 and breaks problem 2 -> fix-wrong 1/2, damage-correct 1/2
    frame = pd.DataFrame(
        {
            "n": 2,
            "solve_correct": [2, 1, 0, 0],
            "refine_correct": [2, 0, 1, 0],
            "greedy_correct": [1, 1, 0, 0],
            "greedy_refine_correct": [1, 0, 1, 0],
        }
    )
    resamples = np.random.default_rng(0).integers(0, 4, size=(500, 4))
    stats = script.bootstrap(frame, 2, resamples)
    assert stats["solve/pass@1"]["value"] == pytest.approx(0.375)
    assert stats["solve/pass@2"]["value"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert stats["refine/pass@1"]["value"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert stats["transition/fix_wrong"]["value"] == pytest.approx(0.5)
    assert stats["transition/damage_correct"]["value"] == pytest.approx(0.5)
    assert 0 <= stats["solve/pass@1"]["lo"] < 0.375 < stats["solve/pass@1"]["hi"] <= 1
    same = script.bootstrap(frame, 2, resamples, minus=frame)
    assert all(v == {"value": 0.0, "lo": 0.0, "hi": 0.0} for v in same.values())  # paired: no spread
    better = frame.assign(solve_correct=[2, 2, 1, 0])  # +0.5 and +0.5 on two problems: +0.25 on average
    diff = script.bootstrap(better, 2, resamples, minus=frame)["solve/pass@1"]
    assert diff["value"] == pytest.approx(0.25) and 0 <= diff["lo"] <= 0.25 <= diff["hi"] <= 0.5
