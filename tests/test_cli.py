"""The thinktwice command: every shipped YAML parses, links work, --help documents arguments, a real CLI fit."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
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
        "smollm2/thinktwice.yaml",
        "smollm2/grpo.yaml",
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


# ------------------------------------------------------------------------------------------------ recipe pairs

_ABSENT = object()


def resolved_config(config: Path, capsys: pytest.CaptureFixture[str], *overrides: str) -> dict[str, Any]:
    """The config `thinktwice fit` would run (defaults filled in, links applied), as a plain dict."""
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), *overrides, "--print_config"])
    resolved: dict[str, Any] = yaml.safe_load(capsys.readouterr().out)
    return resolved


def config_differences(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """Every leaf where two resolved configs differ: dotted key (list items by index) -> (value in a, value in b);
    a key present on one side only shows the other side as None."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(a) | set(b), key=str):
            out.update(config_differences(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}{key}."))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {k: v for i, (x, y) in enumerate(zip(a, b, strict=True))
                for k, v in config_differences(x, y, f"{prefix}{i}.").items()}  # fmt: skip
    if a == b:
        return {}
    return {prefix.rstrip("."): (None if a is _ABSENT else a, None if b is _ABSENT else b)}


NAMES_AND_PATHS = re.compile(r"\.(name|label|dirpath|save_dir|version)$")
"""Keys allowed to differ between the two halves of a method comparison besides data.refine."""


def test_config_differences_finds_every_changed_leaf() -> None:
    a = {"data": {"refine": True, "val": {"x": {"seed": 1}}}, "cbs": [{"dirpath": "a"}, 3], "only_a": 1}
    b = {"data": {"refine": False, "val": {"x": {"seed": 1}}}, "cbs": [{"dirpath": "b"}, 4], "only_b": 2}
    assert config_differences(a, b) == {"data.refine": (True, False), "cbs.0.dirpath": ("a", "b"), "cbs.1": (3, 4),
                                        "only_a": (1, None), "only_b": (None, 2)}  # fmt: skip
    assert config_differences(a, a) == {}
    assert config_differences({"l": [1, 2]}, {"l": [1]}) == {"l": ([1, 2], [1])}  # lengths differ: the whole list


def test_smollm2_pair_differs_only_in_refine_names_and_paths(capsys: pytest.CaptureFixture[str]) -> None:
    thinktwice = resolved_config(ROOT / "configs/smollm2/thinktwice.yaml", capsys)
    grpo = resolved_config(ROOT / "configs/smollm2/grpo.yaml", capsys)
    differences = config_differences(thinktwice, grpo)
    assert differences.pop("data.refine") == (True, False)
    assert "trainer.logger.init_args.name" in differences  # the runs do not write into each other
    assert all(NAMES_AND_PATHS.search(key) for key in differences), differences
