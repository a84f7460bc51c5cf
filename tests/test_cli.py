"""The thinktwice command: every shipped YAML parses, links work, --help documents arguments, a real CLI fit."""

from __future__ import annotations

import gc
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from metrics_helpers import train_phases

from thinktwice_pl.cli import ThinkTwiceCLI, main
from thinktwice_pl.data import BENCHMARKS, ThinkTwiceDataModule
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
        "qwen3-4b/drgrpo.yaml",
        "qwen3-4b/dapo.yaml",
        "qwen3-4b/thinktwice-dapo.yaml",
        "qwen3-4b/lora.yaml",
        "qwen3-4b/qlora.yaml",
        "olmo3-7b/thinktwice.yaml",
        "olmo3-7b/grpo.yaml",
        "olmo3-7b/drgrpo.yaml",
        "olmo3-7b/dapo.yaml",
        "smollm2/thinktwice.yaml",
        "smollm2/grpo.yaml",
        "smollm2/dapo.yaml",
        "smollm2-chains/thinktwice.yaml",
        "smollm2-chains/grpo.yaml",
        "smollm2-products/thinktwice.yaml",
        "smollm2-products/grpo.yaml",
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


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if "procedural" in c.read_text()], ids=lambda p: str(p.relative_to(ROOT / "configs"))
)
def test_procedural_validation_and_test_sums_never_occur_among_training_problems(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config that generates its problems evaluates on texts that training never saw, so its validation figures
    measure held-out problems."""
    from thinktwice_pl.sources import load_problems

    monkeypatch.chdir(tmp_path)
    cli = ThinkTwiceCLI(ThinkTwiceModule, ThinkTwiceDataModule, run=False, args=["--config", str(config)])
    data = cli.datamodule
    train = {p.prompt_text for p in load_problems(data.train_source)}
    for split in ("val", "test"):
        for name, problems in data.eval_problems(split).items():
            seen = [p.prompt_text for p in problems if p.prompt_text in train]
            assert not seen, f"{config.name}: data.{split}.{name} holds training texts {seen[:3]}"


def test_linked_arguments_reach_the_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = ThinkTwiceCLI(
        ThinkTwiceModule,
        ThinkTwiceDataModule,
        run=False,
        args=[
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--rollout.num_generations",
            "3",
            "--rollout.temperature",
            "0.9",
            "--data.problems_per_batch",
            "6",
            "--model.mini_batch_problems",
            "3",
        ],
    )
    hp = cli.model.hparams
    assert (hp.num_generations, hp.temperature, hp.problems_per_batch, hp.mini_batch_problems) == (3, 0.9, 6, 3)
    assert hp.max_completion_length == 16  # from rollout.max_completion_length in tiny.yaml


def test_geometry_error_at_startup_names_the_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = r"data\.problems_per_batch=5 is not divisible by model\.mini_batch_problems=2"
    with pytest.raises(ValueError, match=expected):
        ThinkTwiceCLI(
            ThinkTwiceModule,
            ThinkTwiceDataModule,
            run=False,
            args=["--config", str(ROOT / "configs/tiny.yaml"), "--data.problems_per_batch", "5"],
        )


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


def test_cli_fit_tiny_config(tiny_cli_run: Path) -> None:
    run = tiny_cli_run
    metrics = pd.read_csv(run / "metrics.csv").sort_values("step")
    assert train_phases(metrics) == ["solve", "refine", "solve", "refine"]
    val_rows = metrics[metrics["val/avg/solve/pass@1"].notna()]
    assert val_rows["step"].tolist() == [0, 4]  # the base model, then after the fourth phase (val_check_interval: 4)
    assert (run / "rectify_fortify.csv").exists() and (run / "rectify_fortify.png").exists()
    assert (run / "config.yaml").exists() and (run / "samples.jsonl").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    # save_last: link: the newest checkpoint is written once, last.ckpt names it
    files = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.is_symlink())
    assert files == ["epoch=0-step=8.ckpt"] and (run / "checkpoints" / "last.ckpt").is_symlink()
    assert (run / "checkpoints" / "last.ckpt").resolve() == (run / "checkpoints" / files[0]).resolve()


def test_validation_counts_phases_across_data_epochs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An epoch of 6 phases (12 problems, 4 per batch, solve + refine) and a validation every 4 phases: the count
    runs over the whole run, so phase 8 (in the second epoch) validates, as a run with longer epochs would."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THINKTWICE_HOME", str(tmp_path / "home"))
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--data.train.num_problems",
            "12",
            "--model.mini_batch_problems",
            "null",
            "--trainer.max_steps",
            "8",
            "--trainer.val_check_interval",
            "4",
            "--eval.num_samples",
            "1",
            "--model.log_completions",
            "0",
        ]
    )
    metrics = pd.read_csv(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv")
    assert metrics[metrics["val/avg/solve/pass@1"].notna()]["step"].tolist() == [0, 4, 8]  # per epoch: [0, 4]
    assert metrics["epoch"].max() == 1  # the run did cross into a second data epoch


def test_module_entry_point_and_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "thinktwice_pl", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fit" in out.stdout and "validate" in out.stdout and "predict" in out.stdout
    script = Path(sys.executable).parent / "thinktwice"
    assert script.exists(), "pip install -e . should create the thinktwice console script"


def test_the_command_freezes_the_objects_of_its_imports(capsys: pytest.CaptureFixture[str]) -> None:
    """The command (`main()` reading sys.argv) moves what exists at its start out of the collector's reach (full
    collections walked ~450k import objects, 0.4-0.5 s each); a call from Python with arguments freezes nothing."""
    code = """
import gc, sys
from thinktwice_pl.cli import main
sys.argv[1:] = ["--help"]
try:
    main()
except SystemExit:
    pass
print(gc.get_freeze_count())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 100_000
    before = gc.get_freeze_count()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert gc.get_freeze_count() == before


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


# --------------------------------------------------------------------------------------------- recipe fidelity


@dataclass(frozen=True)
class Twin:
    """A config that is another config (its twin) with a few settings changed: the paper's baselines (METHOD.md
    section 9) are one experiment with one method swapped, same devices, strategy, precision, token budget, grader,
    evaluation and number of optimizer steps.

    `changes` is every resolved key where `config` differs from `twin`, with `config`'s value; run names, plot labels
    and output paths differ besides. `holds` are values `config` must have that its twin shares (defaults included),
    so the method's whole definition is checked, not only what changed."""

    twin: str
    config: str
    changes: dict[str, Any]
    holds: dict[str, Any] = field(default_factory=dict)


GRPO = {"data.refine": False}  # ThinkTwice without its refine phase
DRGRPO = {"model.loss_type": "dr_grpo", "model.epsilon_high": 0.2}  # Liu et al. 2025
DRGRPO_HOLDS = {"model.scale_rewards": "none", "model.epsilon": 0.2, "rollout.max_completion_length": 3000}
DAPO = {"model.clip_ratio_c": 10.0, "rollout.dynamic_sampling": True, "rollout.overlong_buffer": 750}  # Yu et al.
DAPO_HOLDS = {
    "model.epsilon": 0.2,
    "model.epsilon_high": 0.28,
    "model.loss_type": "dapo",
    "rollout.max_sampling_rounds": 10,
    "rollout.overlong_penalty_factor": 1.0,
}
CHAINS = {  # two steps need more room than one: 48 tokens instead of 32
    **{f"data.{split}.difficulty": 6 for split in ("train", "val.heldout", "test.heldout")},
    "rollout.max_completion_length": 48,
    "eval.max_completion_length": 48,
}
PRODUCTS = {  # products: 48 tokens as well, and 80 of the 90 test-side texts
    **{f"data.{split}.difficulty": 7 for split in ("train", "val.heldout", "test.heldout")},
    "data.test.heldout.num_problems": 80,
    "rollout.max_completion_length": 48,
    "eval.max_completion_length": 48,
}
TWINS = [
    Twin("qwen3-4b/thinktwice.yaml", "qwen3-4b/grpo.yaml", GRPO),
    Twin("olmo3-7b/thinktwice.yaml", "olmo3-7b/grpo.yaml", GRPO),
    Twin("smollm2/thinktwice.yaml", "smollm2/grpo.yaml", GRPO),
    Twin("qwen3-4b/grpo.yaml", "qwen3-4b/drgrpo.yaml", DRGRPO, DRGRPO_HOLDS),
    Twin("olmo3-7b/grpo.yaml", "olmo3-7b/drgrpo.yaml", DRGRPO, DRGRPO_HOLDS),
    Twin("qwen3-4b/grpo.yaml", "qwen3-4b/dapo.yaml", DAPO, DAPO_HOLDS),
    Twin("olmo3-7b/grpo.yaml", "olmo3-7b/dapo.yaml", DAPO, DAPO_HOLDS),
    Twin("qwen3-4b/thinktwice.yaml", "qwen3-4b/thinktwice-dapo.yaml", DAPO, DAPO_HOLDS),
    # the CPU miniature: 32-token completions, so the overlong buffer keeps the paper's ratio L_max / 4
    Twin("smollm2/grpo.yaml", "smollm2/dapo.yaml", {**DAPO, "rollout.overlong_buffer": 8}, DAPO_HOLDS),
    Twin("smollm2-chains/thinktwice.yaml", "smollm2-chains/grpo.yaml", GRPO),
    # the other CPU tasks: the same recipe on two-step sums and on products
    Twin("smollm2/thinktwice.yaml", "smollm2-chains/thinktwice.yaml", CHAINS),
    Twin("smollm2-products/thinktwice.yaml", "smollm2-products/grpo.yaml", GRPO),
    Twin("smollm2/thinktwice.yaml", "smollm2-products/thinktwice.yaml", PRODUCTS),
]
BASELINE_NAMES = ("grpo.yaml", "drgrpo.yaml", "dapo.yaml", "thinktwice-dapo.yaml")
PAPER_CONFIGS = [
    "qwen3-4b/thinktwice.yaml",
    "qwen3-4b/grpo.yaml",
    "qwen3-4b/drgrpo.yaml",
    "qwen3-4b/dapo.yaml",
    "qwen3-4b/thinktwice-dapo.yaml",
    "qwen3-4b/lora.yaml",
    "qwen3-4b/qlora.yaml",
    "olmo3-7b/thinktwice.yaml",
    "olmo3-7b/grpo.yaml",
    "olmo3-7b/drgrpo.yaml",
    "olmo3-7b/dapo.yaml",
]


def resolved_config(config: str | Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The config as LightningCLI resolves it (defaults, class paths and links filled in)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / config), "--print_config"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{config} does not parse: {printed.err[-2000:]}"
    return yaml.safe_load(printed.out)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b[0].c": leaf}`` for nested dicts and lists; callbacks are keyed by class name, not position."""
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}.{key}" if prefix else key).items()
        }
    if isinstance(value, list) and value and all(isinstance(v, dict) and "class_path" in v for v in value):
        names = [v["class_path"].rsplit(".", 1)[-1] for v in value]
        keys = [f"{n}#{names[:i].count(n)}" for i, n in enumerate(names)]  # ModelCheckpoint#0, ModelCheckpoint#1
        return {
            k: v for key, item in zip(keys, value, strict=True) for k, v in flatten(item, f"{prefix}[{key}]").items()
        }
    return {prefix: value}


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every leaf where two resolved configs differ: ``{path: (value in a, value in b)}``."""
    flat_a, flat_b = flatten(a), flatten(b)
    return {
        key: (flat_a.get(key), flat_b.get(key))
        for key in sorted(flat_a.keys() | flat_b.keys())
        if flat_a.get(key) != flat_b.get(key)
    }


def _is_name_or_output_path(key: str) -> bool:
    return key == "trainer.logger.init_args.name" or key.endswith(
        (".dirpath", "[RectifyFortifyTracker#0].init_args.label")
    )


@pytest.mark.parametrize("twin", TWINS, ids=[t.config for t in TWINS])
def test_twin_differs_only_in_its_method_and_names(twin: Twin, capsys) -> None:
    config = resolved_config(twin.config, capsys)
    differences = config_differences(resolved_config(twin.twin, capsys), config)
    changed = {key: differences[key][1] for key in twin.changes if key in differences}
    assert changed == twin.changes, f"{twin.config} changes {changed} of {twin.twin} (a key left out is unchanged)"
    unexpected = {k: v for k, v in differences.items() if k not in twin.changes and not _is_name_or_output_path(k)}
    assert not unexpected, f"{twin.config} must be {twin.twin} with {twin.changes}; it also differs in {unexpected}"
    assert "trainer.logger.init_args.name" in differences, "a baseline logs under its own name, not its twin's"
    flat = flatten(config)
    missing = {key: (flat.get(key), value) for key, value in twin.holds.items() if flat.get(key) != value}
    assert not missing, f"{twin.config}: (value, expected) of the settings that define its method: {missing}"


def test_every_baseline_config_is_held_to_a_twin() -> None:
    baselines = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS if p.name in BASELINE_NAMES}
    assert baselines == {t.config for t in TWINS if Path(t.config).name in BASELINE_NAMES}


def test_config_differences_sees_a_changed_leaf_in_a_callback_list() -> None:
    a = {"trainer": {"callbacks": [{"class_path": "x.ModelCheckpoint", "init_args": {"monitor": "m"}}]}}
    b = {"trainer": {"callbacks": [{"class_path": "x.ModelCheckpoint", "init_args": {"monitor": "n"}}]}}
    assert config_differences(a, b) == {"trainer.callbacks[ModelCheckpoint#0].init_args.monitor": ("m", "n")}
    assert config_differences(a, a) == {}


def test_qwen3_recipe_is_the_papers(capsys) -> None:
    """configs/qwen3-4b/thinktwice.yaml against METHOD.md sections 1-6, value by value."""
    flat = flatten(resolved_config("qwen3-4b/thinktwice.yaml", capsys))
    expected = {
        # section 4: optimizer, geometry, clipping, loss
        "model.learning_rate": 1e-6,
        "model.betas": [0.9, 0.999],
        "model.weight_decay": 0.01,
        "model.max_grad_norm": 1.0,
        "model.lr_scheduler": "constant",
        "model.warmup_steps": 0,
        "data.problems_per_batch": 32,
        "rollout.num_generations": 8,
        "model.mini_batch_problems": 8,
        "model.epsilon": 0.2,
        "model.epsilon_high": 0.28,
        "model.clip_ratio_c": 3.0,
        "model.loss_type": "dapo",
        "model.scale_rewards": "none",
        "model.beta": 0.0,
        "model.num_iterations": 1,
        # sampling and lengths
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "rollout.top_k": None,
        "rollout.max_completion_length": 3000,
        "rollout.max_prompt_length": 5120,
        "rollout.engine.init_args.max_model_len": 8192,
        # precision: fp32 master weights and AdamW state, bf16 compute; memory
        "trainer.precision": "bf16-mixed",
        "model.dtype": "float32",
        "model.gradient_checkpointing": True,
        "model.max_tokens_per_microbatch": 20000,
        # data, grader, refine selection (sections 1, 4, 5)
        "data.train.preset": "math_train",
        "rollout.reward": "boxed",
        "data.refine": True,
        "data.refine_selection": "uniform",
        # model selection: greedy validation every 10 phases from the base model on, best by mean greedy accuracy
        "trainer.val_check_interval": 10,
        "eval.val_num_samples": 0,
        "eval.validate_before_training": True,
        "trainer.callbacks[ModelCheckpoint#0].init_args.monitor": "val/avg/solve/greedy_acc",
        "trainer.callbacks[ModelCheckpoint#0].init_args.mode": "max",
        # section 6: the test protocol
        "eval.num_samples": 64,
        "eval.temperature": 0.7,
        "eval.top_p": 0.8,
        "eval.top_k": 20,
        "eval.max_completion_length": 3000,
        "eval.refine_temperature": 0.0,
        "eval.transitions": True,
    }
    wrong = {key: (flat.get(key), value) for key, value in expected.items() if flat.get(key) != value}
    assert not wrong, f"(config, METHOD.md) where they differ: {wrong}"
    for split in ("val", "test"):
        assert {k.split(".")[2] for k in flat if k.startswith(f"data.{split}.")} == set(BENCHMARKS)


@pytest.mark.parametrize("config", PAPER_CONFIGS)
def test_paper_family_configs_share_data_evaluation_and_model_selection(config: str, capsys) -> None:
    flat = flatten(resolved_config(config, capsys))
    assert flat["data.train.preset"] == "math_train"  # the training set written the same way everywhere
    assert flat["trainer.precision"] == "bf16-mixed" and flat["rollout.reward"] == "boxed"
    assert {k.split(".")[2] for k in flat if k.startswith("data.val.")} == set(BENCHMARKS)
    assert {k.split(".")[2] for k in flat if k.startswith("data.test.")} == set(BENCHMARKS)
    assert flat["trainer.callbacks[ModelCheckpoint#0].init_args.monitor"] == "val/avg/solve/greedy_acc"
    assert "trainer.callbacks[RectifyFortifyTracker#0].class_path" in flat
    header = (ROOT / "configs" / config).read_text().split("seed_everything")[0]
    assert "GPU" in header and "estimated" in header, "the header states its GPUs and that memory is estimated"
