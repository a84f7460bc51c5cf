"""Tests of thinktwice_pl.data: loading and validation, procedural problems, base selection, phase batches, resume."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from thinktwice_pl.data import (
    ProblemSource,
    ThinkTwiceDataModule,
    load_problems,
    procedural_problem,
    select_bases,
    text_side,
)
from thinktwice_pl.types import PhaseBatch, Rollout, RolloutBatch

# ------------------------------------------------------------------------------------------------ helpers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rollout(text: str, reward: float, problem_id: str = "p") -> Rollout:
    return Rollout(problem_id, "solve", [1, 2], [3, 4], text, "stop", reward=reward)


def fake_solve_rollouts(batch: PhaseBatch, group_size: int = 4) -> RolloutBatch:
    """G answers per problem, some duplicated, rewards varying with the problem and the pair."""
    rollouts = []
    for p in batch.problems:
        for j in range(group_size):
            text = f"{p.id} answer {j % 3} at pair {batch.pair}"
            rollouts.append(Rollout(p.id, "solve", [1], [2, 3], text, "stop", reward=float((j + batch.pair) % 2)))
    return RolloutBatch(rollouts, group_size=group_size)


def datamodule(num_problems: int = 8, **kwargs) -> ThinkTwiceDataModule:
    kwargs.setdefault("problems_per_batch", 2)
    dm = ThinkTwiceDataModule(ProblemSource(num_problems=num_problems), **kwargs)
    dm.setup("fit")
    return dm


def run(dm: ThinkTwiceDataModule, steps: int) -> list[tuple]:
    """Plays the rollout callback for `steps` phase batches, fetching one ahead like Lightning's prefetcher."""
    seen: list[tuple] = []
    iterator = iter(dm.train_dataloader())
    upcoming = next(iterator, None)
    while len(seen) < steps:
        if upcoming is None:  # end of epoch: Lightning calls iter() again
            iterator = iter(dm.train_dataloader())
            upcoming = next(iterator)
        batch, upcoming = upcoming, next(iterator, None)
        bases = []
        if batch.phase == "refine":
            bases = [b.completion_text for b in dm.bases_for(batch)]
        else:
            batch.rollouts = fake_solve_rollouts(batch)
        seen.append((batch.index, batch.phase, batch.pair, batch.epoch, [p.id for p in batch.problems], bases))
        dm.phase_done(batch)
    return seen


# ------------------------------------------------------------------------------------------------ loading


def test_jsonl_with_field_mapping_converts_numbers_and_strips(tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"question": "  What is 6*7?\n", "final": 42, "uid": "a", "extra": 1},
            {"question": "Half of 5?", "final": 2.5, "uid": 7},
            {"question": "One?", "final": " 1.0 ", "uid": "c"},
        ],
    )
    source = ProblemSource(str(path), problem_field="question", answer_field="final", id_field="uid")
    problems = load_problems(source)
    assert [(p.id, p.prompt_text, p.answer, p.source) for p in problems] == [
        ("a", "What is 6*7?", "42", "train"),
        ("7", "Half of 5?", "2.5", "train"),
        ("c", "One?", "1.0", "train"),  # text stays text
    ]


def test_parquet_and_json_array_default_ids_and_limit(tmp_path):
    frame = pd.DataFrame({"problem": [f"q{i}" for i in range(5)], "answer": [str(i) for i in range(5)]})
    frame.to_parquet(tmp_path / "math.parquet")
    problems = load_problems(ProblemSource(str(tmp_path / "math.parquet"), limit=3))
    assert [(p.id, p.answer, p.source) for p in problems] == [
        ("math-1", "0", "math"),
        ("math-2", "1", "math"),
        ("math-3", "2", "math"),
    ]
    (tmp_path / "set.json").write_text(json.dumps(frame.to_dict("records")))
    assert [p.id for p in load_problems(ProblemSource(str(tmp_path / "set.json")))] == [f"set-{i}" for i in range(1, 6)]


def test_gold_is_the_last_boxed_of_a_solution(tmp_path):
    solution = r"First \boxed{1}, then $x = \boxed{\frac{1}{2}}$ since {braces} nest."
    path = write_jsonl(
        tmp_path / "sol.jsonl", [{"problem": "p", "solution": solution}, {"problem": "q", "solution": "7"}]
    )
    problems = load_problems(ProblemSource(str(path), answer_field="solution"))  # auto: boxed cells only
    assert [p.answer for p in problems] == [r"\frac{1}{2}", "7"]
    as_is = load_problems(ProblemSource(str(path), answer_field="solution", answer_is_solution=False))
    assert as_is[0].answer == solution
    with pytest.raises(
        ValueError, match=r"row 2 of sol.jsonl has no \\boxed\{\} in its 'solution'.*answer_is_solution=false"
    ):
        load_problems(ProblemSource(str(path), answer_field="solution", answer_is_solution=True))


def test_bad_rows_name_file_row_and_fix(tmp_path):
    rows = [{"problem": "ok", "answer": "1"}, {"problem": "ok", "answer": "2"}, {"problem": "no answer here"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError) as error:
        load_problems(ProblemSource(str(path)))
    assert str(error.value) == (
        "row 3 of train.jsonl has no 'answer' field (set data.train.answer_field to the column that holds it, "
        "or data.train.on_bad_row=skip to skip such rows)"
    )
    frame = pd.DataFrame({"problem": ["a", "b", "  "], "answer": [1.0, float("nan"), 3.0]})
    frame.to_parquet(tmp_path / "nan.parquet")
    with pytest.raises(ValueError, match=r"row 2 of nan.parquet has a missing \(null/NaN\) 'answer'"):
        load_problems(ProblemSource(str(tmp_path / "nan.parquet")))
    bad_json = tmp_path / "broken.jsonl"
    bad_json.write_text('{"problem": "a", "answer": "1"}\n{"problem": \n')
    with pytest.raises(ValueError, match=r"row 2 of broken\.jsonl is not valid JSON"):
        load_problems(ProblemSource(str(bad_json)))


def test_skipped_rows_are_counted_and_warned(tmp_path):
    rows = [
        {"problem": "a", "answer": "1"},
        {"problem": "", "answer": "2"},
        {"problem": "c"},
        {"problem": "d", "answer": None},
        {"problem": 5, "answer": "5"},
        {"problem": "f", "answer": 6},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.warns(UserWarning, match=r"skipped 4 of 6 rows of train.jsonl: .*first: row 2 of train.jsonl") as rec:
        problems = load_problems(ProblemSource(str(path), on_bad_row="skip"))
    assert len(rec) == 1
    assert [(p.id, p.answer) for p in problems] == [("train-1", "1"), ("train-6", "6")]


def test_missing_column_lists_available_columns(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "solution": "1"}])
    message = "train.jsonl has no column 'problem' (available: 'question', 'solution'); set data.train.problem_field"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_problems(ProblemSource(str(path)))


def test_bad_sources_and_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"problem": "a", "answer": "1", "id": "x"}] * 2)
    with pytest.raises(ValueError, match=r"rows 1 and 2 of dup\.jsonl share the id 'x'"):
        load_problems(ProblemSource(str(path), id_field="id"))
    with pytest.raises(ValueError, match=r"missing.jsonl' does not exist; use a local .jsonl, .json or .parquet"):
        load_problems(ProblemSource(str(tmp_path / "missing.jsonl")))
    (tmp_path / "data.csv").write_text("problem,answer\na,1\n")
    with pytest.raises(ValueError, match=r"unknown suffix '.csv'.*\.parquet file"):
        load_problems(ProblemSource(str(tmp_path / "data.csv")))
    with pytest.raises(ValueError, match="neither an existing file nor a hub name"):
        load_problems(ProblemSource("no/such/dir/file"))
    with pytest.raises(ValueError, match=r"hub dataset 'nobody-xyz/no-such-set'.*HF_DATASETS_OFFLINE.*local \.jsonl"):
        load_problems(ProblemSource("nobody-xyz/no-such-set"))  # conftest sets the hub offline: fails fast
    for bad in [
        dict(difficulty=8),
        dict(difficulty=-1),
        dict(num_problems=0),
        dict(limit=0),
        dict(on_bad_row="ignore"),
    ]:
        with pytest.raises(ValueError, match=f"ProblemSource.{next(iter(bad))}"):
            ProblemSource(**bad)


def test_a_local_dataset_directory_goes_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "mydata").mkdir()
    pd.DataFrame({"problem": ["a", "b"], "answer": [1, 2]}).to_parquet(tmp_path / "mydata" / "train.parquet")
    problems = load_problems(ProblemSource(str(tmp_path / "mydata")))  # the hub branch, on a local directory
    assert [(p.id, p.answer, p.source) for p in problems] == [("mydata-1", "1", "mydata"), ("mydata-2", "2", "mydata")]


# ------------------------------------------------------------------------------------------------ procedural


def test_procedural_problems_are_deterministic_per_seed():
    first = load_problems(ProblemSource(num_problems=50, seed=3))
    assert first == load_problems(ProblemSource(num_problems=50, seed=3))
    assert first[:10] == load_problems(ProblemSource(num_problems=10, seed=3))  # problem i depends on (seed, i) only
    assert [p.prompt_text for p in first] != [p.prompt_text for p in load_problems(ProblemSource(num_problems=50))]
    assert len({p.id for p in first}) == 50
    for difficulty in (2, 3, 4):
        for i in range(100):
            answer = procedural_problem(0, difficulty, i).answer
            assert answer.isdigit(), (difficulty, i, answer)  # a non-negative integer


def test_single_digit_problems_are_arithmetically_right():
    templates = set()
    for p in load_problems(ProblemSource(num_problems=300, difficulty=1)):
        a, b = (int(x) for x in re.findall(r"\d+", p.prompt_text))
        assert a < 10 and b < 10
        if p.prompt_text.endswith("have left?") or "How many more" in p.prompt_text:
            templates.add("subtract")
            assert int(p.answer) == a - b >= 0, p.prompt_text
        else:
            templates.add("together" if "together" in p.prompt_text else "more")
            assert int(p.answer) == a + b, p.prompt_text
    assert templates == {"subtract", "together", "more"}
    assert len({p.prompt_text.split()[0] for p in load_problems(ProblemSource(num_problems=50))}) > 5  # varied names


# ------------------------------------------------------------------------------------------------ base selection


def picks(groups: list[list[Rollout]], mode: str, seeds: int = 4000) -> Counter:
    """How often each outcome (the chosen (problem, text) pairs, in order) comes out of `seeds` seeded selections."""
    return Counter(
        tuple((b.problem_id, b.completion_text) for b in select_bases(groups, mode, random.Random(seed)))  # type: ignore[arg-type]
        for seed in range(seeds)
    )


def test_uniform_selection_draws_samples_not_texts():
    group = [rollout("A", 1.0), rollout("A", 1.0), rollout("A", 1.0), rollout("B", 0.0)]
    counts = picks([group], "uniform")
    assert set(counts) == {(("p", "A"),), (("p", "B"),)}
    assert counts[(("p", "A"),)] / 4000 == pytest.approx(0.75, abs=0.03)  # 3 of 4 samples, not 1 of 2 texts


def test_uniform_selection_skips_a_text_chosen_for_another_problem():
    # q's only text is X; p sampled X three times and Y once. Visiting p then q (1/2): p takes X (3/4), q has no
    # untaken text left, and its place goes to the batch's last untaken text, p's Y: both bases review p.
    # Otherwise (q first, or p took Y) each problem gets one base: q X, p Y. So 3/8 against 5/8.
    p_group = [rollout("X", 1.0, "p"), rollout("X", 1.0, "p"), rollout("X", 1.0, "p"), rollout("Y", 0.0, "p")]
    q_group = [rollout("X", 1.0, "q")]
    counts = picks([p_group, q_group], "uniform")
    assert set(counts) == {(("p", "X"), ("p", "Y")), (("p", "Y"), ("q", "X"))}  # never X twice
    assert counts[(("p", "X"), ("p", "Y"))] / 4000 == pytest.approx(3 / 8, abs=0.03)
    # with enough distinct texts every problem gets one base, in batch order, and no text is reviewed twice
    groups = [[rollout(f"t{(g + j) % 5}", 0.0, f"p{g}") for j in range(4)] for g in range(4)]
    for seed in range(200):
        bases = select_bases(groups, "uniform", random.Random(seed))
        assert [b.problem_id for b in bases] == ["p0", "p1", "p2", "p3"]
        assert len({b.completion_text for b in bases}) == 4


def test_fewer_distinct_texts_than_problems_repeat_texts_to_keep_b_prompts():
    # the reference would refine a single prompt here; we keep B = 3 prompts (all the samples there are)
    same = [[rollout("A", 0.0, f"p{g}")] for g in range(3)]
    assert [(b.problem_id, b.completion_text) for b in select_bases(same, "uniform", random.Random(0))] == [
        ("p0", "A"),
        ("p1", "A"),
        ("p2", "A"),
    ]
    # two problems, one text: the first place is distinct, the second repeats the text on any unchosen sample
    counts = picks([[rollout("A", 0.0, "p"), rollout("A", 0.0, "p")], [rollout("A", 0.0, "q")] * 2], "uniform")
    assert set(counts) == {(("p", "A"), ("q", "A")), (("p", "A"), ("p", "A")), (("q", "A"), ("q", "A"))}
    for mode in ("wrong_first", "balanced"):
        assert len(select_bases(same, mode, random.Random(1))) == 3  # type: ignore[arg-type]


def test_wrong_first_takes_wrong_bases_for_the_whole_batch_before_any_right_one():
    g0 = [rollout("w0a", 0.0, "g0"), rollout("w0b", 0.0, "g0"), rollout("r0", 1.0, "g0")]
    g1 = [rollout("r1a", 1.0, "g1"), rollout("r1b", 1.0, "g1")]  # all right
    g2 = [rollout("w2", 0.0, "g2"), rollout("r2", 1.0, "g2")]
    for seed in range(100):
        bases = select_bases([g0, g1, g2], "wrong_first", random.Random(seed))
        # g0 and g2 get one wrong base each, the third place is g0's other wrong answer; all-right g1 gets nothing
        # (one base per problem would have reviewed a right answer of g1)
        assert [(b.problem_id, b.completion_text) for b in bases] == [("g0", "w0a"), ("g0", "w0b"), ("g2", "w2")]
    # once the batch's wrong texts are used up, right samples of the whole batch fill the rest, uniformly
    counts = picks([[rollout("w", 0.0, "p"), rollout("r", 1.0, "p")], g1], "wrong_first")
    assert set(counts) == {(("p", "w"), ("p", "r")), (("p", "w"), ("g1", "r1a")), (("p", "w"), ("g1", "r1b"))}
    assert counts[(("p", "w"), ("p", "r"))] / 4000 == pytest.approx(1 / 3, abs=0.03)


def test_balanced_gives_right_bases_to_the_first_half_of_b_then_wrong_ones():
    def mixed(name: str) -> list[Rollout]:
        return [rollout(f"{name} right", 1.0, name), rollout(f"{name} wrong", 0.0, name)]

    wrong_only = [[rollout(f"{name} wrong {j}", 0.0, name) for j in range(2)] for name in ("u0", "u1")]
    # B = 4 with two mixed problems: B // 2 = 2 right bases, so both mixed problems get a right base (one right and
    # one wrong per problem would be the per-problem reading); the other 2 places are drawn from the whole batch
    for seed in range(100):
        bases = select_bases([mixed("m0"), mixed("m1"), *wrong_only], "balanced", random.Random(seed))
        assert len(bases) == 4 and len({b.completion_text for b in bases}) == 4
        assert {"m0 right", "m1 right"} <= {b.completion_text for b in bases}
    # four mixed problems: two right bases, two wrong ones, one per problem, which ones is random
    seen = set()
    for seed in range(100):
        bases = select_bases([mixed(f"m{g}") for g in range(4)], "balanced", random.Random(seed))
        assert [b.problem_id for b in bases] == ["m0", "m1", "m2", "m3"]
        assert sum(b.correct for b in bases) == 2
        seen.add(tuple(b.correct for b in bases))
    assert len(seen) == 6  # every choice of 2 of the 4 problems occurs
    with pytest.raises(ValueError, match="unknown base selection"):
        select_bases(wrong_only, "best", random.Random(0))  # type: ignore[arg-type]


def test_selection_depends_only_on_the_rng_state():
    groups = [[rollout(f"{g}-{j}", float(j % 2), f"p{g}") for j in range(4)] for g in range(6)]
    for mode in ("uniform", "wrong_first", "balanced"):
        first = select_bases(groups, mode, random.Random("thinktwice-bases-0-3"))  # type: ignore[arg-type]
        assert select_bases(groups, mode, random.Random("thinktwice-bases-0-3")) == first  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ phase batches


def test_phases_alternate_and_refine_off_serves_solve_only():
    seen = run(datamodule(), 6)
    assert [(s[0], s[1], s[2]) for s in seen] == [
        (0, "solve", 0),
        (1, "refine", 0),
        (2, "solve", 1),
        (3, "refine", 1),
        (4, "solve", 2),
        (5, "refine", 2),
    ]
    assert seen[0][4] == seen[1][4] != seen[2][4]  # refine reviews the same problems
    assert all(len(bases) == 2 and bases[0].startswith(ids[0]) for _, _, _, _, ids, bases in seen[1::2])
    baseline = run(datamodule(refine=False), 6)
    assert [s[1] for s in baseline] == ["solve"] * 6
    assert [s[2] for s in baseline] == list(range(6))


def test_epochs_cover_every_problem_and_reshuffle():
    dm = datamodule(num_problems=9, problems_per_batch=2, seed=1)  # 4 pairs per epoch, 1 problem sits out
    assert dm.phase_batches_per_epoch == 8
    seen = run(dm, 24)
    epochs = [[i for s in seen if s[3] == e and s[1] == "solve" for i in s[4]] for e in range(3)]
    assert [s[3] for s in seen] == [0] * 8 + [1] * 8 + [2] * 8
    assert all(len(set(order)) == 8 for order in epochs) and len({tuple(o) for o in epochs}) == 3
    assert run(datamodule(num_problems=9, seed=1), 24) == seen  # orders are seeded by (seed, epoch)
    in_order = run(datamodule(num_problems=9, shuffle=False), 16)
    solve_ids = [i for s in in_order if s[1] == "solve" for i in s[4]]
    assert solve_ids == [f"procedural-d1-s0-{i}" for i in range(8)] * 2


def test_too_few_problems_and_misuse_give_clear_errors():
    with pytest.raises(ValueError, match=r"gives 3 problems, fewer than data\.problems_per_batch=4"):
        datamodule(num_problems=3, problems_per_batch=4)
    dm = datamodule()
    first = next(iter(dm.train_dataloader()))
    with pytest.raises(RuntimeError, match="refine batch for pair 0 but no cached solve rollouts"):
        dm.bases_for(dm.phase_batch(1))
    with pytest.raises(RuntimeError, match="finished with no rollouts"):
        dm.phase_done(first)
    with pytest.raises(RuntimeError, match="phase_done got phase batch 1 but the next batch to complete is 0"):
        dm.phase_done(dm.phase_batch(1))


# ------------------------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("done", [3, 8, 11])  # after a solve (mid-pair), at an epoch boundary, mid-pair epoch 1
def test_resume_continues_at_the_next_phase_batch(done):
    reference = run(datamodule(seed=5), 20)
    dm = datamodule(seed=5)
    assert run(dm, done) == reference[:done]
    next(iter(dm.train_dataloader()))  # a prefetched batch that never completed must not count
    state = torch.load(_roundtrip(dm.state_dict()), weights_only=True)  # plain python survives weights_only
    fresh = ThinkTwiceDataModule(ProblemSource(num_problems=8), problems_per_batch=2, seed=5)
    fresh.load_state_dict(state)  # before setup, as when a module is restored early
    fresh.setup("fit")
    assert fresh.cursor == done
    assert run(fresh, 20 - done) == reference[done:]  # includes the refine of the pair and its identical bases


def test_resume_on_different_data_or_layout_is_refused():
    dm = datamodule()
    run(dm, 1)
    assert [entry["pair"] for entry in dm.state_dict()["cache"]] == [0]  # the solve rollouts wait for their refine
    run(dm, 1)
    state = dm.state_dict()
    assert state["cursor"] == 2 and state["cache"] == []  # refined: nothing left to carry
    with pytest.raises(ValueError, match=r"checkpoint was trained on 8 problems .* now gives 10"):
        datamodule(num_problems=10).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.problems_per_batch=4 \(checkpoint: 2\)"):
        datamodule(problems_per_batch=4).load_state_dict(state)


class _TinyModule(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: PhaseBatch, batch_idx: int) -> torch.Tensor:
        assert isinstance(batch, PhaseBatch)
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _RolloutPlayer(Callback):
    """Stands in for the rollout callback: fills solve rollouts, asks for bases, marks batches done."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        dm = trainer.datamodule
        if batch.phase == "refine":
            batch.bases = dm.bases_for(batch)
        else:
            batch.rollouts = fake_solve_rollouts(batch)
        self.seen.append(
            (
                batch.index,
                batch.phase,
                batch.epoch,
                [p.id for p in batch.problems],
                [b.completion_text for b in batch.bases or []],
            )
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.datamodule.phase_done(batch)


def _fit(tmp_path: Path, max_steps: int, ckpt_path: Path | None = None) -> list[tuple]:
    player = _RolloutPlayer()
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoints, player],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    dm = ThinkTwiceDataModule(ProblemSource(num_problems=6), problems_per_batch=2, seed=2)
    trainer.fit(_TinyModule(), datamodule=dm, ckpt_path=ckpt_path)
    return player.seen


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_lightning_fit_resumes_exactly_from_mid_pair_and_epoch_boundary_checkpoints(tmp_path):
    reference = _fit(tmp_path / "a", 14)  # 6 phase batches per epoch
    assert [s[0] for s in reference] == list(range(14)) and reference[6][2] == 1
    for done in (3, 6):
        resumed = _fit(tmp_path / f"b{done}", 14, ckpt_path=tmp_path / "a" / "ckpt" / f"step={done}.ckpt")
        assert resumed == reference[done:]


def _roundtrip(state: dict) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_difficulty_zero_is_bare_one_digit_sums():
    for p in load_problems(ProblemSource(num_problems=50, difficulty=0)):
        a, b = (int(x) for x in re.fullmatch(r"What is (\d) \+ (\d)\?", p.prompt_text).groups())
        assert int(p.answer) == a + b


def test_difficulty_five_is_bare_add_sub_up_to_thirty():
    problems = load_problems(ProblemSource(num_problems=300, difficulty=5))
    ops = set()
    for p in problems:
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", p.prompt_text).groups()
        a, b = int(a), int(b)
        assert 1 <= a <= 30 and 1 <= b <= 30
        assert int(p.answer) == (a + b if op == "+" else a - b) >= 0
        ops.add(op)
    assert ops == {"+", "-"}


def test_difficulty_six_is_two_steps_of_one_digit_sums_read_left_to_right():
    problems = load_problems(ProblemSource(num_problems=2000, difficulty=6))
    patterns = set()
    for p in problems:
        a, first, b, second, c = re.fullmatch(r"What is (\d) ([+-]) (\d) ([+-]) (\d)\?", p.prompt_text).groups()
        middle = int(a) + int(b) if first == "+" else int(a) - int(b)
        assert middle >= 0, p.prompt_text  # never negative on the way
        assert int(p.answer) == (middle + int(c) if second == "+" else middle - int(c)) >= 0
        patterns.add(first + second)
    assert patterns == {"++", "+-", "-+", "--"}
    assert len({p.prompt_text for p in problems}) > 1000  # of the 1899 possible texts


def test_difficulty_seven_is_products_of_a_small_and_a_larger_factor_in_either_order():
    problems = load_problems(ProblemSource(num_problems=3000, difficulty=7))
    large_first = set()  # of the problems with a factor above 12: whether it comes first
    for p in problems:
        a, b = (int(x) for x in re.fullmatch(r"What is (\d+) \* (\d+)\?", p.prompt_text).groups())
        assert 2 <= min(a, b) <= 12 and 2 <= max(a, b) <= 25
        assert int(p.answer) == a * b
        if max(a, b) > 12:
            large_first.add(a > 12)
    assert large_first == {True, False}
    assert len({p.prompt_text for p in problems}) > 380  # of the 407 possible texts
    test_side = load_problems(ProblemSource(num_problems=90, difficulty=7, seed=1, text_split="test"))
    assert len({p.prompt_text for p in test_side}) == 90  # configs/smollm2-products tests 80 of these 90 texts
    with pytest.raises(ValueError, match="which has only 90 distinct texts"):
        load_problems(ProblemSource(num_problems=91, difficulty=7, seed=1, text_split="test"))


def test_text_split_makes_training_and_held_out_sets_disjoint_by_text():
    train = load_problems(ProblemSource(num_problems=3000, difficulty=5, text_split="train"))
    heldout = load_problems(ProblemSource(num_problems=200, difficulty=5, seed=1, text_split="heldout"))
    train_texts, heldout_texts = {p.prompt_text for p in train}, [p.prompt_text for p in heldout]
    assert len(heldout) == 200 and len(set(heldout_texts)) == 200  # the held-out side keeps each text once
    assert not train_texts & set(heldout_texts)
    assert len(train_texts) > 600  # 3000 draws cover nearly all of the training half of the 1365 texts
    assert {text_side(t) for t in train_texts} == {"train"} and {text_side(t) for t in heldout_texts} == {"heldout"}
    # the same seed without a split overlaps both halves: the split is what makes them disjoint
    everything = {p.prompt_text for p in load_problems(ProblemSource(num_problems=3000, difficulty=5))}
    assert everything & train_texts and everything & set(heldout_texts)
    assert heldout[:50] == load_problems(ProblemSource(num_problems=50, difficulty=5, seed=1, text_split="heldout"))
    expected = r"data\.test\.h asks for 800 problems from the 'heldout' side of difficulty 5, which has only \d+ "
    with pytest.raises(ValueError, match=expected):
        load_problems(ProblemSource(num_problems=800, difficulty=5, text_split="heldout"), flag_prefix="data.test.h")
    with pytest.raises(ValueError, match=r"ProblemSource\.text_split='testing'"):
        ProblemSource(text_split="testing")  # type: ignore[arg-type]
    # the held-out half splits again: validation and test sets never share a text, and both are held out
    val = load_problems(ProblemSource(num_problems=64, difficulty=5, seed=1, text_split="val"))
    test = load_problems(ProblemSource(num_problems=200, difficulty=5, seed=1, text_split="test"))
    val_texts, test_texts = {p.prompt_text for p in val}, {p.prompt_text for p in test}
    assert len(val_texts) == 64 and len(test_texts) == 200 and not val_texts & test_texts
    assert {text_side(t) for t in val_texts | test_texts} == {"heldout"}
