"""scripts/reproduce_cpu.py, the CPU comparison of ThinkTwice and GRPO: its whole pipeline on the tiny model (--smoke),
the bootstrap behind the table's intervals, and the refusal to compare on trained problems."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from thinktwice_pl.checkpointing import checkpoint_progress

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
    text = (out / "table.md").read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == [
        "## Pooled over seeds 0: best checkpoint (validation greedy accuracy)",
        "## Pooled: final checkpoint",
        "## Validation greedy accuracy during training (mean over seeds)",
        "## Validation transitions during training (greedy answer -> greedy refinement, mean over seeds)",
        "## Seed 0: best checkpoint",
        "## Seed 0: final checkpoint",
    ]
    lines = text.splitlines()[2:]  # the first table
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
    rows = [line for line in lines[2:6]]
    assert [row.split("|")[1].strip() for row in rows] == ["Base", "GRPO", "ThinkTwice", "ThinkTwice - GRPO"]
    assert all(len(row.strip("|").split("|")) == len(header) for row in rows)
    notes = text.splitlines()
    assert "the command's wall time, over all its runs" in notes[-1]
    assert "ThinkTwice: 2 solve + 2 refine phases; GRPO: 4 solve phases" in text  # --smoke: 4 steps
    assert "Precision: 32-true." in text
    assert re.search(r"GRPO seed 0: step [24], ThinkTwice seed 0: step [24]", text)

    records = pd.read_csv(out / "records.csv")
    counts = records.groupby(["model", "checkpoint"]).size().to_dict()  # --smoke: 4 problems
    assert counts == {("Base", "base"): 4, **{(m, c): 4 for m in ("GRPO", "ThinkTwice") for c in ("best", "final")}}
    summary = pd.read_csv(out / "summary.csv")
    scores = summary[(summary["model"] != "ThinkTwice - GRPO") & summary["metric"].str.contains("pass@")]
    assert scores["value"].between(0, 1).all() and (scores["lo"] <= scores["value"] + 1e-9).all()
    for name in ("dynamics.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    for method in ("thinktwice", "grpo"):
        metrics = pd.read_csv(out / "metrics" / f"{method}-seed0.csv")
        best = checkpoint_progress(out / "runs" / method / "seed0" / "checkpoints" / "best.ckpt")
        assert best.global_step == script.best_step(metrics)  # the step the report names is the one kept
        assert metrics["train/solve/reward_mean"].notna().any()
        refined = "train/refine/reward_mean" in metrics.columns and metrics["train/refine/reward_mean"].notna().any()
        assert refined == (method == "thinktwice")
    stages = {"base-test"} | {
        f"{method}-{stage}-seed0" for method in ("thinktwice", "grpo") for stage in ("fit", "best", "test")
    }
    assert set(json.loads((out / "timings.json").read_text())) == stages | {"checks", "wall (this command)"}

    capsys.readouterr()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- table: results/sums -->\nold\n<!-- /table -->\n\nafter\n")
    script.main(["--smoke", "--out", str(out)])  # a rerun skips what finished and rebuilds the report
    assert capsys.readouterr().out.count("finished earlier, skipped") == len(stages)
    script.publish(out, tmp_path / "results" / "sums", readme=readme)
    published = tmp_path / "results" / "sums"
    assert {p.name for p in published.iterdir()} == set(script.PUBLISHED)
    assert (published / "summary.csv").read_text() == (out / "summary.csv").read_text()
    shown = readme.read_text()
    assert "old" not in shown and shown.endswith("<!-- /table -->\n\nafter\n")
    assert text.split("\n\n")[1] + "\n" in shown  # the pooled best-checkpoint table
    assert "Best checkpoint of each run; 1 training seed pooled; 32-true;" in shown

    script.main(["--smoke", "--no-final", "--out", str(out)])  # the best checkpoints only
    assert "final" not in " ".join(line for line in (out / "table.md").read_text().splitlines() if line[:2] == "##")
    assert set(pd.read_csv(out / "records.csv")["checkpoint"]) == {"base", "best"}
    with pytest.raises(SystemExit, match=r"holds stage thinktwice-fit-seed0 run with other arguments"):
        script.main(["--smoke", "--out", str(out), "--", "--model.learning_rate", "1e-3"])
    # the done markers know a config by its text and a run by its place in --out: the same files elsewhere and a
    # moved --out resume, an edited config is refused
    copy, moved = tmp_path / "configs", tmp_path / "moved"
    shutil.copytree(ROOT / "configs" / "smollm2", copy)
    shutil.copytree(out, moved)
    capsys.readouterr()
    script.main(["--smoke", "--no-final", "--config-dir", str(copy), "--out", str(moved)])
    assert capsys.readouterr().out.count("finished earlier, skipped") == len(stages) - 2  # no final tests
    (copy / "grpo.yaml").write_text((copy / "grpo.yaml").read_text().replace("max_steps: 48", "max_steps: 40"))
    with pytest.raises(SystemExit, match=r"holds stage grpo-fit-seed0 run with other arguments"):
        script.main(["--smoke", "--no-final", "--config-dir", str(copy), "--out", str(moved)])


def test_the_final_model_reuses_the_best_checkpoints_results_only_when_it_is_the_last_step(
    script: ModuleType, tmp_path: Path
) -> None:
    fit, best = tmp_path / "fit", tmp_path / "best"
    fit.mkdir()
    rows = [(0, 0.1), (12, 0.5), (24, 0.7), (36, 0.7), (48, 0.6)]  # the first maximum is step 24
    pd.DataFrame(rows, columns=["step", script.SELECTION_METRIC]).to_csv(fit / "metrics.csv", index=False)
    assert script._selected_last_step(fit, best)() is None
    rows[-1] = (48, 0.9)
    pd.DataFrame(rows, columns=["step", script.SELECTION_METRIC]).to_csv(fit / "metrics.csv", index=False)
    assert script._selected_last_step(fit, best)() == best
    rows = [(0, 0.9), (12, 0.5), (24, 0.6)]  # the validation before training keeps no checkpoint
    assert script.best_step(pd.DataFrame(rows, columns=["step", script.SELECTION_METRIC])) == 24


def test_precision_follows_the_cpu_and_the_arguments(script: ModuleType) -> None:
    assert script.auto_precision("flags : fpu avx2 avx512f avx512_bf16 amx_tile") == "bf16-mixed"
    assert script.auto_precision("flags : fpu avx2 amx_bf16") == "bf16-mixed"
    assert script.auto_precision("flags : fpu sse4_2 avx2 fma") == "32-true"
    assert script.precision_of(["--trainer.precision", "bf16-mixed", "--x", "1", "--trainer.precision=32-true"]) == (
        "32-true"
    )
    assert script.precision_of([]) == "the configs' precision"


def test_held_out_problems_among_the_training_problems_stop_the_run(script: ModuleType, tmp_path: Path) -> None:
    configs = {m: ROOT / "configs" / "smollm2" / f"{m}.yaml" for m in ("thinktwice", "grpo")}
    with pytest.raises(SystemExit, match=r"data\.val\.heldout shares \d+ of its 64 problem texts with data\.train"):
        script.check_configs(configs, ["--data.train.text_split", "all"])  # training draws from every text
    hotter = tmp_path / "grpo.yaml"  # the baseline with another learning rate: not a fair comparison
    hotter.write_text(configs["grpo"].read_text().replace("learning_rate: 1.0e-5", "learning_rate: 3.0e-5"))
    assert hotter.read_text() != configs["grpo"].read_text()
    with pytest.raises(SystemExit, match=r"the model: sections .* differ"):
        script.check_configs({"thinktwice": configs["thinktwice"], "grpo": hotter}, [])
    unselected = tmp_path / "thinktwice.yaml"  # model selection on another metric: not the paper's
    unselected.write_text(
        configs["thinktwice"].read_text().replace("monitor: val/avg/solve/", "monitor: val/avg/refine/")
    )
    with pytest.raises(SystemExit, match=r"thinktwice\.yaml keeps no best checkpoint for the test"):
        script.check_configs({"thinktwice": unselected, "grpo": configs["grpo"]}, [])
