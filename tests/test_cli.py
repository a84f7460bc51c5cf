"""The thinktwice command: every shipped YAML parses, links work, --help documents arguments, a real CLI fit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from metrics_helpers import train_phases

from thinktwice_pl.cli import ThinkTwiceCLI, main
from thinktwice_pl.data import ThinkTwiceDataModule
from thinktwice_pl.module import ThinkTwiceModule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist() -> None:
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    assert {
        "tiny.yaml",
        "quickstart.yaml",
        "qwen3-4b/thinktwice.yaml",
        "qwen3-4b/grpo.yaml",
        "qwen3-4b/lora.yaml",
        "qwen3-4b/qlora.yaml",
        "olmo3-7b/thinktwice.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "rollout:" in printed
    header = config.read_text().splitlines()[0]
    assert header.startswith(f"# {config.name}:"), "each config starts with what it is for"
    assert "thinktwice fit --config" in config.read_text(), "each config states its launch command"


def test_linked_arguments_reach_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = ThinkTwiceCLI(
        ThinkTwiceModule,
        ThinkTwiceDataModule,
        run=False,
        args=["--config", str(ROOT / "configs/tiny.yaml"), "--rollout.num_generations", "3",
              "--rollout.temperature", "0.9", "--data.problems_per_batch", "6", "--model.mini_batch_problems", "3"],
    )  # fmt: skip
    hp = cli.model.hparams
    assert (hp.num_generations, hp.temperature, hp.problems_per_batch, hp.mini_batch_problems) == (3, 0.9, 6, 3)
    assert hp.max_completion_length == 16  # from rollout.max_completion_length in tiny.yaml


def test_geometry_error_at_startup_names_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = r"data\.problems_per_batch=5 is not divisible by model\.mini_batch_problems=2"
    with pytest.raises(ValueError, match=expected):
        ThinkTwiceCLI(ThinkTwiceModule, ThinkTwiceDataModule, run=False,
                      args=["--config", str(ROOT / "configs/tiny.yaml"), "--data.problems_per_batch", "5"])  # fmt: skip


def test_help_shows_argument_docs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "--rollout.num_generations" in text and "samples per prompt in both phases" in text
    assert "--model.loss_type" in text and "token mean over the optimizer step" in text
    assert "--data.refine_selection" in text
    with pytest.raises(SystemExit):
        main(["fit", "--data.train.help", "ProblemSource"])
    assert "Procedural only: how many problems to generate" in capsys.readouterr().out  # attribute docstrings


def test_cli_fit_tiny_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps", "8"])
    run = tmp_path / "runs" / "tiny" / "version_0"
    metrics = pd.read_csv(run / "metrics.csv").sort_values("step")
    assert train_phases(metrics) == ["solve", "refine", "solve", "refine"]
    val_rows = metrics[metrics["val/avg/solve/pass@1"].notna()]
    assert val_rows["step"].tolist() == [0, 4]  # the base model, then after the fourth phase (val_check_interval: 4)
    assert (run / "rectify_fortify.csv").exists() and (run / "rectify_fortify.png").exists()
    assert (run / "config.yaml").exists() and (run / "samples.jsonl").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_module_entry_point_and_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "thinktwice_pl", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fit" in out.stdout and "validate" in out.stdout and "predict" in out.stdout
    script = Path(sys.executable).parent / "thinktwice"
    assert script.exists(), "pip install -e . should create the thinktwice console script"


def test_importing_never_pulls_vllm_or_bitsandbytes() -> None:
    code = """
import importlib, pkgutil, sys
for name in ("vllm", "bitsandbytes"):
    sys.modules[name] = None  # any import of them now raises ImportError
import thinktwice_pl
assert "torch" not in sys.modules, "import thinktwice_pl must stay light"
for info in pkgutil.walk_packages(thinktwice_pl.__path__, "thinktwice_pl."):
    if info.name != "thinktwice_pl.__main__":
        importlib.import_module(info.name)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
