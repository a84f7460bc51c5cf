"""Evaluation inside Lightning's validate/test loops: exact pass@k and transitions with a scripted engine, every
documented key from real tiny-model runs (Trainer and CLI, checkpoint and plain HF directory), the tracker's files."""

from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import pytest
from fit_helpers import quiet_trainer, tiny_module
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from thinktwice_pl.callbacks import Evaluation, RectifyFortifyTracker, RolloutCallback
from thinktwice_pl.cli import main
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule, eval_batches, load_problems
from thinktwice_pl.metrics import pass_at_k
from thinktwice_pl.module import ThinkTwiceModule
from thinktwice_pl.prompts import DEFAULT_REFINE_INSTRUCTION
from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig
from thinktwice_pl.types import Completion, Problem

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def documented_keys(split: str, benchmarks: list[str], ks: list[int]) -> set[str]:
    names = [*benchmarks, "avg"]
    keys = {f"{split}/{b}/{phase}/pass@{k}" for b in names for phase in ("solve", "refine") for k in ks}
    keys |= {f"{split}/{b}/{phase}/greedy_acc" for b in names for phase in ("solve", "refine")}
    return keys | {f"{split}/transition/{name}" for name in ("fix_wrong", "damage_correct", "keep_right", "stay_wrong")}


class ScriptedEngine(HFRolloutEngine):
    """A RolloutEngine whose answers are known: problem "What is a + b?" gets c = (a + b) % (n + 1) right answers
    (the first c samples); a refinement flips the correctness of the answer it reviews. Records each call. The HF
    engine's no-op weight sync, sleep, wake-up and close are kept; `generate` is scripted."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, SamplingConfig]] = []
        self.texts: list[tuple[list[str], list[str]]] = []  # per call: decoded prompts, first completion of each
        self.setups = 0

    def setup(self, model: Any, tokenizer: Any, compute_dtype: Any = None) -> None:
        super().setup(model, tokenizer, compute_dtype)
        self.setups += 1

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        self.calls.append((len(prompts), n, sampling))
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", text).groups())
            gold = a + b
            if "carefully review your previous solution" in text:  # refine: flip the reviewed answer
                reviewed = re.search(r"The answer is \\boxed\{(-?\d+)\}", text).group(1)  # not the prompt's example
                answers = [gold if int(reviewed) != gold else -1]
            else:
                c = gold % (n + 1) if sampling.temperature > 0 else int(gold % 5 > 0)  # greedy: right iff c > 0
                answers = [gold if j < c else -1 for j in range(n)]
            group = []
            for answer in answers:
                completion = f"The answer is \\boxed{{{answer}}}."
                group.append(Completion(self.tokenizer.encode(completion), completion, "stop"))
            out.append(group)
        self.texts.append(([self.tokenizer.decode(ids) for ids in prompts], [group[0].text for group in out]))
        return out


def test_scripted_validation_gives_the_exact_pass_at_k_and_transitions(tiny_model_dir: Path, tmp_path: Path) -> None:
    n = 4
    sources = {
        "sums": ProblemSource(num_problems=5, difficulty=0),
        "more": ProblemSource(num_problems=3, difficulty=0, seed=7),
    }
    engine = ScriptedEngine()
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=2, num_generations=2, mini_batch_problems=None
    )
    data = ThinkTwiceDataModule(problems_per_batch=2, val=sources, eval_problems_per_batch=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="v"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RolloutCallback(engine=engine, reward_workers=0), Evaluation(num_samples=n, seed=3)],
    )
    [results] = trainer.validate(module, datamodule=data)
    assert engine.setups == 1  # validate sets the engine up itself (no on_fit_start)

    expected: dict[str, float] = {}
    all_base, all_refined = [], []
    for name, source in sources.items():
        golds = [int(p.answer) for p in load_problems(source)]
        counts = [g % (n + 1) for g in golds]
        for k in (1, 2, 4):
            expected[f"val/{name}/solve/pass@{k}"] = sum(pass_at_k(n, c, k) for c in counts) / len(counts)
            # every refinement flips its answer: n - c right after refinement
            expected[f"val/{name}/refine/pass@{k}"] = sum(pass_at_k(n, n - c, k) for c in counts) / len(counts)
        all_base += [g % 5 > 0 for g in golds]
        all_refined += [g % 5 == 0 for g in golds]
        expected[f"val/{name}/solve/greedy_acc"] = sum(g % 5 > 0 for g in golds) / len(golds)
        expected[f"val/{name}/refine/greedy_acc"] = sum(g % 5 == 0 for g in golds) / len(golds)  # flipped
    for phase in ("solve", "refine"):
        for metric in ("pass@1", "pass@2", "pass@4", "greedy_acc"):  # macro averages over the two benchmarks
            expected[f"val/avg/{phase}/{metric}"] = (
                expected[f"val/sums/{phase}/{metric}"] + expected[f"val/more/{phase}/{metric}"]
            ) / 2
    wrong, right = all_base.count(False), all_base.count(True)
    assert wrong and right, "the hand-made problems must have both wrong and right greedy answers"
    expected.update(
        {
            "val/transition/fix_wrong": 1.0,
            "val/transition/stay_wrong": 0.0,
            "val/transition/damage_correct": 1.0,
            "val/transition/keep_right": 0.0,
        }
    )
    assert set(results) == documented_keys("val", ["sums", "more"], [1, 2, 4]) | {"perf/val_s"}
    assert results.pop("perf/val_s") > 0
    assert results == pytest.approx(expected)
    assert len({round(v, 6) for k, v in expected.items() if "pass@1" in k}) > 2  # the values differ: a real check

    # sampling settings reach the engine: sampled answers (METHOD.md section 6 defaults, seeded), greedy rest
    sampled = [s for _, _, s in engine.calls if s.temperature > 0]
    assert {(s.temperature, s.top_p, s.top_k, s.max_new_tokens) for s in sampled} == {(0.7, 0.8, 20, 3000)}
    assert all(s.seed is not None for s in sampled)
    greedy_calls = [(p, k) for p, k, s in engine.calls if s.temperature == 0]
    # per batch of 2 problems: 1 greedy answer each, then one call with 2 * n + 2 refinements
    assert (2, 1) in greedy_calls and (2 * n + 2, 1) in greedy_calls
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    assert documented_keys("val", ["sums", "more"], [1, 2, 4]) <= set(metrics.columns)


def test_fit_validates_on_schedule_and_the_tracker_writes_csv_and_png(tiny_model_dir: Path, tmp_path: Path) -> None:
    module = tiny_module(tiny_model_dir)
    data = ThinkTwiceDataModule(
        train=ProblemSource(num_problems=8),
        problems_per_batch=2,
        val={"arith": ProblemSource(num_problems=3, difficulty=0)},
    )
    tracker = RectifyFortifyTracker(label="tiny")
    callbacks = [
        RolloutCallback(
            num_generations=2, max_completion_length=8, reward="signal_rewards.even_length", reward_workers=0
        ),
        Evaluation(num_samples=2, max_completion_length=8),
        tracker,
    ]
    trainer = quiet_trainer(tmp_path, *callbacks, log="f", max_steps=4, val_check_interval=2)
    trainer.fit(module, datamodule=data)
    log_dir = Path(trainer.logger.log_dir)
    metrics = pd.read_csv(log_dir / "metrics.csv")
    val_rows = metrics[metrics["val/avg/solve/pass@1"].notna()]
    # the base model before the first phase (step 0), then after each solve/refine pair: step = phases completed
    assert val_rows["step"].tolist() == [0, 2, 4]
    assert documented_keys("val", ["arith"], [1, 2]) <= set(metrics.columns)
    for key in documented_keys("val", ["arith"], [1, 2]) - {
        "val/transition/keep_right",
        "val/transition/damage_correct",
        "val/transition/fix_wrong",
        "val/transition/stay_wrong",
    }:
        assert val_rows[key].between(0, 1).all(), key
    # even_length marks about half the answers right: the greedy pairs give defined transition rates
    transitions = val_rows[[c for c in val_rows.columns if c.startswith("val/transition/")]]
    assert transitions.notna().any(axis=None)

    csv = pd.read_csv(log_dir / "rectify_fortify.csv")
    assert {
        "step",
        "val/transition/fix_wrong",
        "val/transition/damage_correct",
        "train/refine/fix_rate",
        "train/refine/keep_rate",
        "train/refine/base_correct_frac",
    } <= set(csv.columns)
    assert csv["train/refine/base_correct_frac"].notna().sum() == 2  # two refine phases
    assert sorted(
        csv.loc[csv["val/transition/stay_wrong"].notna() | csv["val/transition/keep_right"].notna(), "step"].tolist()
    ) == [0, 2, 4]  # three validations
    png = log_dir / "rectify_fortify.png"
    _assert_png(png)


def _assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_cli_test_on_a_plain_hf_model_directory(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    main(
        [
            "test",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--model.model_name_or_path",
            str(tiny_model_dir),
            "--data.test",
            '{"arith": {"path": "procedural", "num_problems": 3, "difficulty": 0}, '
            '"mixed": {"path": "procedural", "num_problems": 2, "difficulty": 2}}',
            "--eval.num_samples",
            "2",
            "--eval.max_completion_length",
            "8",
        ]
    )
    metrics = pd.read_csv(tmp_path / "runs" / "tiny" / "version_0" / "metrics.csv")
    assert documented_keys("test", ["arith", "mixed"], [1, 2]) <= set(metrics.columns)
    row = metrics.iloc[-1]
    assert row["test/avg/solve/pass@1"] == pytest.approx(
        (row["test/arith/solve/pass@1"] + row["test/mixed/solve/pass@1"]) / 2
    )


def test_cli_validate_a_checkpoint_and_a_base_model(tiny_cli_run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = str(ROOT / "configs/tiny.yaml")
    main(["validate", "--config", config, "--ckpt_path", str(tiny_cli_run / "checkpoints" / "last.ckpt")])
    main(["validate", "--config", config])  # the base model of the config (thinktwice:tiny), before training
    keys = documented_keys("val", ["arith"], [1, 2])
    for version in ("version_0", "version_1"):
        metrics = pd.read_csv(tmp_path / "runs" / "tiny" / version / "metrics.csv")
        assert keys <= set(metrics.columns), version
        assert all(0 <= metrics[k].iloc[-1] <= 1 for k in keys if not math.isnan(metrics[k].iloc[-1]))


def test_validate_without_benchmarks_and_without_the_callback_are_clear_errors(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=2, num_generations=2, mini_batch_problems=None
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        callbacks=[RolloutCallback(), Evaluation(num_samples=2)],
    )
    with pytest.raises(ValueError, match=r"no val benchmarks are configured: set data.val"):
        trainer.validate(module, datamodule=ThinkTwiceDataModule(problems_per_batch=2))
    bare = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    data = ThinkTwiceDataModule(problems_per_batch=2, test={"a": ProblemSource(num_problems=1)})
    with pytest.raises(RuntimeError, match="the Evaluation callback is missing"):
        bare.test(module, datamodule=data)


def test_eval_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"eval.ks=\[1, 8\]: pass@k needs 1 <= k <= eval.num_samples=4"):
        Evaluation(num_samples=4, ks=[1, 8])
    assert Evaluation(num_samples=64).ks == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="names 'avg' and 'transition' are taken"):
        ThinkTwiceDataModule(val={"avg": ProblemSource()})


def test_eval_batches_give_every_rank_the_same_number_of_batches() -> None:
    problems = {"a": [Problem(f"a{i}", "q", "1") for i in range(5)], "b": [Problem("b0", "q", "1")]}
    rank0 = eval_batches(problems, per_batch=2, rank=0, world=2)
    rank1 = eval_batches(problems, per_batch=2, rank=1, world=2)
    assert len(rank0) == len(rank1) == 3  # a: 3 problems per rank in 2 batches; b: 1 problem per rank
    assert [p.id for b in rank0 for p in b.problems] == ["a0", "a2", "a4", "b0"]
    assert [p.id for b in rank1 for p in b.problems] == ["a1", "a3", "a0", "b0"]  # padded with a repeat
    counted = [(p.id, c) for b in rank0 + rank1 for p, c in zip(b.problems, b.counted, strict=True) if c]
    assert sorted(pid for pid, _ in counted) == ["a0", "a1", "a2", "a3", "a4", "b0"]  # each problem counted once
    assert [b.benchmark for b in rank0] == ["a", "a", "b"]


def test_refine_prompt_holds_the_review_instruction() -> None:
    # the scripted engine recognises refine prompts by this text; it must stay in the default instruction
    assert "carefully review your previous solution" in DEFAULT_REFINE_INSTRUCTION


class RecordingEngine(HFRolloutEngine):
    """The HF engine, recording the prompts and the (n, temperature) of every generate call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[list[int]]] = []
        self.settings: list[tuple[int, float]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        self.calls.append(prompts)
        self.settings.append((n, sampling.temperature))
        return super().generate(prompts, n, sampling)


def test_greedy_validation_from_step_0_keeps_the_best_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The paper's model selection: greedy validation only (eval.val_num_samples=0) of the base model and every 2
    phases; ModelCheckpoint keeps the best by val/avg/solve/greedy_acc and the newest (last.ckpt links to it)."""
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir),
        problems_per_batch=2,
        num_generations=2,
        mini_batch_problems=None,
        max_completion_length=8,
        learning_rate=1e-2,
    )
    val = {"a": ProblemSource(num_problems=4, difficulty=0), "b": ProblemSource(num_problems=3, seed=5)}
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=16), problems_per_batch=2, val=val)
    engine = RecordingEngine()
    best = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="val/avg/solve/greedy_acc", mode="max", save_top_k=1, filename="best-{step}"
    )
    latest = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="step", mode="max", save_top_k=1, filename="latest-{step}", save_last="link"
    )
    callbacks = [
        RolloutCallback(
            engine=engine,
            num_generations=2,
            max_completion_length=8,
            reward="signal_rewards.even_length",
            reward_workers=0,
        ),
        Evaluation(num_samples=4, val_num_samples=0, max_completion_length=8),
        best,
        latest,
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        val_check_interval=2,
        logger=CSVLogger(tmp_path, name="s"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)

    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    val_rows = metrics[metrics["val/avg/solve/greedy_acc"].notna()].set_index("step")
    assert val_rows.index.tolist() == [0, 2, 4, 6]  # the base model, then every 2 phases (1 optimizer step each)
    for bench in ("a", "b"):
        assert val_rows[f"val/{bench}/solve/greedy_acc"].between(0, 1).all()
    assert val_rows["val/avg/solve/greedy_acc"].tolist() == pytest.approx(
        ((val_rows["val/a/solve/greedy_acc"] + val_rows["val/b/solve/greedy_acc"]) / 2).tolist()
    )  # the macro mean over benchmarks
    assert not [c for c in metrics.columns if "pass@" in c], "greedy-only validation reports no pass@k"
    assert 0.7 not in {t for _, t in engine.settings}, "validation must not sample (the eval temperature is 0.7)"
    assert {n for n, t in engine.settings if t == 0.0} == {1}  # greedy answers and refinements

    scores = val_rows.loc[[2, 4, 6], "val/avg/solve/greedy_acc"]
    best_step = int(scores.idxmax())  # the first of the best: a tie does not replace the kept checkpoint
    assert best.best_model_score is not None and float(best.best_model_score) == pytest.approx(scores.max())
    assert Path(best.best_model_path).name == f"best-step={best_step}.ckpt"  # no checkpoint of the base model
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == "latest-step=6.ckpt"


def test_evaluation_truncates_long_refine_prompts_as_training_does(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = RecordingEngine()

    def validate(max_prompt_length: int) -> None:
        module = ThinkTwiceModule(
            model_name_or_path=str(tiny_model_dir), problems_per_batch=2, num_generations=2, mini_batch_problems=None
        )
        data = ThinkTwiceDataModule(
            problems_per_batch=2, val={"sums": ProblemSource(num_problems=3, difficulty=0)}, eval_problems_per_batch=3
        )
        rollout = RolloutCallback(engine=engine, max_prompt_length=max_prompt_length, reward_workers=0)
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            default_root_dir=tmp_path,
            callbacks=[rollout, Evaluation(num_samples=2, max_completion_length=8)],
        )
        trainer.validate(module, datamodule=data)

    # tiny tokenizer: "What is a + b?" solve prompts take 66 tokens, their refine prompts over 200
    with caplog.at_level(logging.WARNING, logger="thinktwice_pl.callbacks"):
        validate(200)
    # sampled answers, greedy answers, then one greedy call for the 3 x 2 + 3 refinements: all cut to 200 tokens
    assert [[len(p) for p in prompts] for prompts in engine.calls] == [[66] * 3, [66] * 3, [200] * 9]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("9 of 9 refine prompts are longer than rollout.max_prompt_length=200" in m for m in messages) == 1
    assert sum("val evaluation, rank 0: 9 of 9 refine prompts were longer" in m for m in messages) == 1
    with pytest.raises(ValueError, match=r"solve prompt of problem .* has 66 tokens > rollout.max_prompt_length=50"):
        validate(50)


def test_remove_system_prompt_settings_of_training_and_evaluation(tiny_model_dir: Path, tmp_path: Path) -> None:
    """rollout.remove_system_prompt shapes training prompts; evaluation keeps the template's system turn unless
    eval.remove_system_prompt is set (the reference evaluated Olmo-3 with it, trained without it)."""
    from test_prompts import OLMO3_LIKE

    from thinktwice_pl.builtin_models import CHATML_TEMPLATE
    from thinktwice_pl.models import load_tokenizer

    model_dir = tmp_path / "olmo3-like"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.chat_template = OLMO3_LIKE  # inserts a default system turn into a chat without one
    tokenizer.save_pretrained(model_dir)

    def fit(remove: bool, eval_remove: bool) -> tuple[list[str], list[str]]:
        engine = RecordingEngine()
        module = tiny_module(model_dir)
        data = ThinkTwiceDataModule(
            train=ProblemSource(num_problems=4),
            problems_per_batch=2,
            val={"arith": ProblemSource(num_problems=2, difficulty=0)},
        )
        rollout = RolloutCallback(
            engine=engine, num_generations=2, max_completion_length=8, reward_workers=0, remove_system_prompt=remove
        )
        evaluation = Evaluation(num_samples=2, max_completion_length=8, remove_system_prompt=eval_remove)
        trainer = quiet_trainer(
            tmp_path, rollout, evaluation, log=None, max_steps=2, val_check_interval=2, num_sanity_val_steps=0
        )
        trainer.fit(module, datamodule=data)
        # validation of the base model, solve, refine, validation again; each validation makes 3 calls: sampled
        # answers, greedy answers, refinements
        assert len(engine.calls) == 3 + 2 + 3, len(engine.calls)
        texts = [[tokenizer.decode(ids) for ids in prompts] for prompts in engine.calls]
        return [t for call in texts[3:5] for t in call], [t for call in texts[:3] + texts[5:] for t in call]

    def with_system(prompts: list[str]) -> bool:
        return all(p.startswith("<|im_start|>system\nYou are a helpful function-calling AI") for p in prompts)

    def without_system(prompts: list[str]) -> bool:
        return all(p.startswith("<|im_start|>user\n") and "<|im_start|>system" not in p for p in prompts)

    train, val = fit(remove=False, eval_remove=False)
    assert with_system(train) and with_system(val)
    train, val = fit(remove=True, eval_remove=False)  # the Olmo-3 recipe: trained without, evaluated with
    assert without_system(train) and with_system(val)
    train, val = fit(remove=True, eval_remove=True)
    assert without_system(train) and without_system(val)
    # refine prompts: 2 in training, 2 x 2 sampled + 2 greedy answers refined in each of the 2 validations
    assert sum("carefully review your previous solution" in p for p in train) == 2
    assert sum("carefully review your previous solution" in p for p in val) == 2 * (2 * 2 + 2)
    tokenizer.chat_template = "<|im_start|>system\nAlways here.<|im_end|>\n" + CHATML_TEMPLATE  # cannot be cut out
    with pytest.raises(ValueError, match=r"rollout\.remove_system_prompt is set but the chat template writes"):
        RolloutCallback(remove_system_prompt=True).check_chat_template(tokenizer)  # on_fit_start: before any work


def test_records_hold_each_problems_correct_counts(tiny_model_dir: Path, tmp_path: Path) -> None:
    from thinktwice_pl.callbacks.evaluation import RECORD_COLUMNS

    n, source = 4, ProblemSource(num_problems=5, difficulty=0, seed=2)
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=2, num_generations=2, mini_batch_problems=None
    )
    data = ThinkTwiceDataModule(problems_per_batch=2, val={"sums": source}, eval_problems_per_batch=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="r"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RolloutCallback(engine=ScriptedEngine(), reward_workers=0), Evaluation(num_samples=n, records=True)],
    )
    trainer.validate(module, datamodule=data)
    trainer.validate(module, datamodule=data)  # a second evaluation appends its rows
    records = pd.read_csv(Path(trainer.logger.log_dir) / "eval_records.csv")
    assert tuple(records.columns) == RECORD_COLUMNS
    problems = load_problems(source)
    assert records["problem_id"].tolist() == [p.id for p in problems] * 2  # 3 batches of 2, the last one padded
    golds = [int(p.answer) for p in problems] * 2
    # the scripted engine: c = gold % (n + 1) right samples, every refinement flips; greedy right iff gold % 5 > 0
    assert records["solve_correct"].tolist() == [g % (n + 1) for g in golds]
    assert records["refine_correct"].tolist() == [n - g % (n + 1) for g in golds]
    assert records["greedy_correct"].tolist() == [int(g % 5 > 0) for g in golds]
    assert records["greedy_refine_correct"].tolist() == [int(g % 5 == 0) for g in golds]
    assert set(records["split"]) == {"val"} and set(records["n"]) == {n} and set(records["benchmark"]) == {"sums"}
    callbacks = [RolloutCallback(engine=ScriptedEngine(), reward_workers=0), Evaluation(num_samples=n)]
    quiet = pl.Trainer(
        accelerator="cpu", logger=CSVLogger(tmp_path, name="no-records"), enable_progress_bar=False, callbacks=callbacks
    )
    quiet.validate(module, datamodule=data)
    assert not (Path(quiet.logger.log_dir) / "eval_records.csv").exists()  # off by default


# ------------------------------------------------------------------------------ several rounds of refinement

TRANSITION_RATES = ("fix_wrong", "damage_correct", "keep_right", "stay_wrong")


def round_keys(split: str, benchmarks: list[str], ks: list[int], rounds: int, n: int) -> set[str]:
    """The keys that eval.refine_rounds >= 2 adds to `documented_keys`."""
    names = [*benchmarks, "avg"]
    keys: set[str] = set()
    for r in range(2, rounds + 1):
        keys |= {f"{split}/{b}/refine{r}/{m}" for b in names for m in [*(f"pass@{k}" for k in ks), "greedy_acc"]}
        keys |= {f"{split}/transition{r}/{rate}" for rate in TRANSITION_RATES}
    for r in range(1, rounds + 1):
        keys |= {f"{split}/{b}/matched{r}/pass@{k}" for b in names for k in ks if (r + 1) * k <= n}
    return keys


def scripted_validation(tmp_path: Path, name: str, sources: dict[str, ProblemSource], **settings: Any) -> Any:
    """`trainer.validate` with the ScriptedEngine (n = 4, seed 3, records on): (results, engine, log dir)."""
    engine = ScriptedEngine()
    module = ThinkTwiceModule(
        model_name_or_path=str(settings.pop("model_dir")),
        problems_per_batch=2,
        num_generations=2,
        mini_batch_problems=None,
    )
    data = ThinkTwiceDataModule(problems_per_batch=2, val=sources, eval_problems_per_batch=2)
    evaluation = Evaluation(num_samples=4, seed=3, records=True, **settings)
    callbacks = [RolloutCallback(engine=engine, reward_workers=0), evaluation]
    trainer = quiet_trainer(tmp_path, *callbacks, log=name)
    [results] = trainer.validate(module, datamodule=data)
    return results, engine, Path(trainer.logger.log_dir)


def test_three_rounds_refine_the_previous_round_and_log_matched_pass_at_k(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The ScriptedEngine flips the correctness of the answer a refinement reviews: round r is right exactly where
    round r - 1 was wrong, which holds only if round r reviewed round r - 1's text."""
    from thinktwice_pl.callbacks.evaluation import RECORD_COLUMNS

    n, rounds = 4, 3
    sources = {
        "sums": ProblemSource(num_problems=5, difficulty=0),
        "more": ProblemSource(num_problems=3, difficulty=0, seed=7),
    }
    results, engine, log_dir = scripted_validation(
        tmp_path, "r3", sources, model_dir=tiny_model_dir, refine_rounds=rounds
    )
    keys = documented_keys("val", list(sources), [1, 2, 4]) | round_keys("val", list(sources), [1, 2, 4], rounds, n)
    assert set(results) == keys | {"perf/val_s"}
    assert {k for k in keys if "matched" in k and "/sums/" in k} == {
        "val/sums/matched1/pass@1",
        "val/sums/matched1/pass@2",
        "val/sums/matched2/pass@1",
        "val/sums/matched3/pass@1",
    }

    expected: dict[str, float] = {}
    for name, source in sources.items():
        golds = [int(p.answer) for p in load_problems(source)]
        right = [g % (n + 1) for g in golds]  # correct samples of round 0; each round flips every answer
        per_round = [right if r % 2 == 0 else [n - c for c in right] for r in range(rounds + 1)]
        greedy = [[(g % 5 > 0) != (r % 2 == 1) for g in golds] for r in range(rounds + 1)]
        for r, stage in enumerate(["solve", "refine", "refine2", "refine3"]):
            for k in (1, 2, 4):
                expected[f"val/{name}/{stage}/pass@{k}"] = sum(pass_at_k(n, c, k) for c in per_round[r]) / len(golds)
            expected[f"val/{name}/{stage}/greedy_acc"] = sum(greedy[r]) / len(golds)
        for r, k in ((1, 1), (1, 2), (2, 1), (3, 1)):  # the first answers' pass@((r + 1)k)
            expected[f"val/{name}/matched{r}/pass@{k}"] = sum(pass_at_k(n, c, (r + 1) * k) for c in right) / len(golds)
    for key in [k for k in keys if k.startswith("val/sums/")]:
        expected[key.replace("/sums/", "/avg/")] = (expected[key] + expected[key.replace("/sums/", "/more/")]) / 2
    for name in ("transition", "transition2", "transition3"):  # every greedy refinement flips the one before
        expected.update(
            {f"val/{name}/{rate}": float(rate in ("fix_wrong", "damage_correct")) for rate in TRANSITION_RATES}
        )
    results.pop("perf/val_s")
    assert results == pytest.approx(expected)
    assert expected["val/avg/refine2/pass@1"] != expected["val/avg/refine/pass@1"]  # the rounds differ: a real check
    assert expected["val/avg/matched2/pass@1"] != expected["val/avg/solve/pass@2"]

    # per batch: sampled answers, greedy answers, then one greedy call per round over 2 * n + 2 refine prompts
    calls = engine.texts
    assert len(calls) == 5 * 5  # 5 batches: 5 + 3 problems, 2 per batch
    for batch in range(5):
        for r in (1, 2, 3):
            prompts, previous = calls[5 * batch + 1 + r][0], calls[5 * batch + r][1]
            if r == 1:  # round 1 reviews the sampled answers (the first call: n per problem), then the greedy ones
                previous = [f"The answer is \\boxed{{{a}}}." for a in _sampled_answers(calls[5 * batch], n)]
                previous += calls[5 * batch + 1][1]
            assert len(prompts) == len(previous)
            for prompt, answer in zip(prompts, previous, strict=True):
                assert prompt.count("carefully review your previous solution") == 1
                assert prompt.count("The answer is \\boxed{") == 1 and answer in prompt

    records = pd.read_csv(log_dir / "eval_records.csv")
    extra = ("refine2_correct", "greedy_refine2_correct", "refine3_correct", "greedy_refine3_correct")
    assert tuple(records.columns) == RECORD_COLUMNS + extra
    assert (records["refine2_correct"] == records["solve_correct"]).all()
    assert (records["refine3_correct"] == records["refine_correct"]).all()
    assert (records["greedy_refine2_correct"] == records["greedy_correct"]).all()
    assert (records["greedy_refine3_correct"] == 1 - records["greedy_correct"]).all()
    assert records["solve_correct"].tolist() == [
        int(p.answer) % (n + 1) for source in sources.values() for p in load_problems(source)
    ]


def identical(a: float, b: float) -> bool:
    """The same float, NaN included."""
    return a == b or (math.isnan(a) and math.isnan(b))


def _sampled_answers(call: tuple[list[str], list[str]], n: int) -> list[int]:
    """The ScriptedEngine's n sampled answers of each prompt of a solve call (the first c right, then -1)."""
    out = []
    for prompt in call[0]:
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)\?", prompt).groups())
        c = (a + b) % (n + 1)
        out += [a + b if j < c else -1 for j in range(n)]
    return out


def test_sampled_refinements_seed_each_round_and_one_round_keeps_its_records(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from thinktwice_pl.callbacks.evaluation import RECORD_COLUMNS
    from thinktwice_pl.callbacks.rollout import phase_seed

    sources = {"sums": ProblemSource(num_problems=3, difficulty=0)}
    two, engine, _ = scripted_validation(
        tmp_path, "s2", sources, model_dir=tiny_model_dir, refine_rounds=2, refine_temperature=0.5
    )
    refine_calls = [(p, s) for p, k, s in engine.calls if s.temperature == 0.5]
    # each batch (index 0, 1): round 1 with the seed after the answers', round 2 with the next one
    assert [s.seed for _, s in refine_calls] == [phase_seed(3, b, 0) + r for b in (0, 1) for r in (1, 2)]
    assert [(p, k, s.temperature) for p, k, s in engine.calls[:6]] == [
        (2, 4, 0.7), (2, 1, 0.0), (8, 1, 0.5), (2, 1, 0.0), (8, 1, 0.5), (2, 1, 0.0)
    ]  # fmt: skip
    one, _, log_dir = scripted_validation(tmp_path, "s1", sources, model_dir=tiny_model_dir)
    assert set(one) == documented_keys("val", ["sums"], [1, 2, 4]) | {"perf/val_s"}
    assert all(identical(one[k], two[k]) for k in one if k != "perf/val_s")
    assert tuple(pd.read_csv(log_dir / "eval_records.csv").columns) == RECORD_COLUMNS
    with pytest.raises(ValueError, match=r"eval.refine_rounds=0 must be an integer >= 1"):
        Evaluation(refine_rounds=0)
    with pytest.raises(ValueError, match=r"eval_records.csv has the columns .* but eval.refine_rounds=2 writes"):
        module = ThinkTwiceModule(
            model_name_or_path=str(tiny_model_dir), problems_per_batch=2, num_generations=2, mini_batch_problems=None
        )
        evaluation = Evaluation(num_samples=4, records=True, refine_rounds=2)
        trainer = quiet_trainer(log_dir, RolloutCallback(engine=ScriptedEngine()), evaluation, log=None)
        trainer.validate(module, datamodule=ThinkTwiceDataModule(problems_per_batch=2, val=sources), verbose=False)


class ChainEngine(HFRolloutEngine):
    """The HF engine (a real tiny model), recording the prompt ids and completion texts of every generate call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[list[list[int]], list[list[str]], float]] = []

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        out = super().generate(prompts, n, sampling)
        self.calls.append((prompts, [[c.text for c in group] for group in out], sampling.temperature))
        return out


def tiny_test_run(tiny_model_dir: Path, tmp_path: Path, name: str, rounds: int) -> tuple[dict, ChainEngine, Path, Any]:
    """`trainer.test` of the tiny model with the HF engine, n = 3 answers of 6 tokens, records on; graded by
    `signal_rewards.even_length` (right iff the text has an even length), so about half the answers are right."""
    engine = ChainEngine()
    rollout = RolloutCallback(engine=engine, reward="signal_rewards.even_length", reward_workers=0)
    evaluation = Evaluation(num_samples=3, max_completion_length=6, records=True, seed=1, refine_rounds=rounds)
    module = ThinkTwiceModule(
        model_name_or_path=str(tiny_model_dir), problems_per_batch=2, num_generations=2, mini_batch_problems=None
    )
    test = {"a": ProblemSource(num_problems=3, difficulty=0), "b": ProblemSource(num_problems=2, seed=4)}
    data = ThinkTwiceDataModule(problems_per_batch=2, test=test, eval_problems_per_batch=3)
    trainer = quiet_trainer(tmp_path, rollout, evaluation, log=name)
    [results] = trainer.test(module, datamodule=data, verbose=False)
    results.pop("perf/test_s")
    return results, engine, Path(trainer.logger.log_dir), (rollout, module.tokenizer, data)


def test_two_rounds_on_the_tiny_model_chain_real_texts_and_leave_round_one_unchanged(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from thinktwice_pl.callbacks.evaluation import RECORD_COLUMNS

    two, engine, log_dir, (rollout, tokenizer, data) = tiny_test_run(tiny_model_dir, tmp_path, "r2", rounds=2)
    assert set(two) == documented_keys("test", ["a", "b"], [1, 2, 3]) | round_keys("test", ["a", "b"], [1, 2, 3], 2, 3)
    assert {k for k in two if "matched" in k and "/a/" in k} == {"test/a/matched1/pass@1", "test/a/matched2/pass@1"}

    # per batch: sampled, greedy, round 1 and round 2 (greedy refinements): round 2 reviews round 1's texts
    assert len(engine.calls) == 4 * 2 and {t for *_, t in engine.calls} == {0.7, 0.0}
    problems = [b.problems for b in data.test_dataloader()]
    for batch, owners in enumerate(problems):
        (_, sampled, _), (_, greedy, _), (_, first, _), (ids, second, _) = engine.calls[4 * batch : 4 * batch + 4]
        owners_of_refinements = [p for p in owners for _ in range(3)] + owners
        reviewed = [t for group in first for t in group]
        assert ids == rollout.prompts(owners_of_refinements, tokenizer, reviewed, remove_system_prompt=False).ids
        assert reviewed != [t for group in sampled for t in group] + [t for g in greedy for t in g]  # a real chain
        assert len(second) == len(first) == 3 * len(owners) + len(owners)

    records = pd.read_csv(log_dir / "eval_records.csv")
    assert tuple(records.columns) == (*RECORD_COLUMNS, "refine2_correct", "greedy_refine2_correct")
    even = [[[len(t) % 2 == 0 for t in group] for group in texts] for _, texts, _ in engine.calls]
    for batch in range(len(problems)):
        rows = records.iloc[3 * batch : 3 * batch + len(problems[batch])]
        third = even[4 * batch + 3]
        assert rows["refine2_correct"].tolist() == [
            sum(g[0] for g in third[3 * i : 3 * i + 3]) for i in range(len(rows))
        ]
        assert rows["greedy_refine2_correct"].tolist() == [int(g[0]) for g in third[3 * len(rows) :]]
    # the logged values are those of the records: pass@k, matched pass@((r + 1)k), transitions of round 2
    for bench, rows in records.groupby("benchmark"):
        for k in (1, 2, 3):
            value = rows["refine2_correct"].map(lambda c, k=k: pass_at_k(3, int(c), k)).mean()
            assert two[f"test/{bench}/refine2/pass@{k}"] == pytest.approx(value)
        assert two[f"test/{bench}/matched1/pass@1"] == pytest.approx(two[f"test/{bench}/solve/pass@2"])
        assert two[f"test/{bench}/matched2/pass@1"] == pytest.approx(two[f"test/{bench}/solve/pass@3"])
        assert two[f"test/{bench}/refine2/greedy_acc"] == pytest.approx(rows["greedy_refine2_correct"].mean())
    before, after = records["greedy_refine_correct"], records["greedy_refine2_correct"]
    rates = {
        "fix_wrong": ((before == 0) & (after == 1)).sum() / (before == 0).sum(),
        "damage_correct": ((before == 1) & (after == 0)).sum() / (before == 1).sum(),
    }
    for rate, value in rates.items():
        assert two[f"test/transition2/{rate}"] == pytest.approx(value, nan_ok=True)
    assert records["refine2_correct"].tolist() != records["refine_correct"].tolist()

    # refine_rounds=1 is the one-round evaluation: the same calls and bit-identical values, no extra keys or columns
    one, engine_one, log_dir_one, _ = tiny_test_run(tiny_model_dir, tmp_path, "r1", rounds=1)
    assert set(one) == documented_keys("test", ["a", "b"], [1, 2, 3])
    assert all(identical(one[k], two[k]) for k in one)
    assert engine_one.calls == [call for i, call in enumerate(engine.calls) if i % 4 != 3]
    records_one = pd.read_csv(log_dir_one / "eval_records.csv")
    assert records_one.equals(records[list(RECORD_COLUMNS)])
