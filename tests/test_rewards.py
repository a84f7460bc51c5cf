"""Rewards: box extraction, the two graders (real math-verify), reward resolution and the fail-safe scorer."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import subprocess
import sys

import pytest

from thinktwice_pl.rewards import (
    RewardScorer,
    ScoreResult,
    boxed_reward,
    boxed_reward_fn,
    extract_last_boxed,
    last_number_reward,
    math_verify_reward,
    math_verify_reward_fn,
    resolve_reward,
)

MARKER = "reward_helpers.marker_reward"  # tests/reward_helpers.py, on sys.path via pytest's rootdir insertion
PATHOLOGICAL = r"so the answer is \boxed{(10^{100})!}"  # sympy keeps comparing it with 5 for far longer than 1 s


@pytest.fixture(scope="module")
def marker_scorer():
    with RewardScorer(MARKER, timeout_s=1.0, num_workers=2) as scorer:
        yield scorer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"thus \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{x^{2} + \sqrt{\frac{a}{b}}}", r"x^{2} + \sqrt{\frac{a}{b}}"),
        (r"first \boxed{1}, then \boxed{2}", "2"),
        (r"\boxed{1} and \fbox{7}", "7"),
        (r"\boxed {\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{}", ""),
        ("the answer is 42", None),
        (r"\boxed{1} then \boxed{2", None),
        (r"\boxed{\frac{1}{2}", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"so \boxed{42}", "42"),
        ("the answer is 42", "42"),  # no box: math-verify reads the last number
        (r"\boxed{42} wait, 7 is not it", "42"),  # the box wins over a later number
        (r"\boxed{\frac{1}{2}}", "1/2"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{0.5}", r"\frac12"),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\frac34}", r"\dfrac{3}{4}"),
        (r"\boxed{1+x^2}", "x^2+1"),
        (r"\boxed{\sqrt 2}", r"\sqrt{2}"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{1000}", "1,000"),
        (r"\boxed{(1, 2)}", "(1,2)"),
        (r"\boxed{3}", "x=3"),
        (r"\boxed{-3}", r"\boxed{-3}"),  # an already boxed gold
    ],
)
def test_math_verify_reward_accepts(completion, gold):
    assert math_verify_reward([completion], [gold]) == [1.0]


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"\boxed{x^2+2}", "x^2+1"),
        ("the answer is 41", "42"),
        ("no number at all", "42"),
        (r"42, but \boxed{7}", "42"),
        (r"\boxed{0.33}", r"\frac13"),
        (r"\boxed{1} then \boxed{2}", "2"),  # math-verify 0.9 reads two boxes as the set {1, 2}
        ("", "0"),
    ],
)
def test_math_verify_reward_rejects(completion, gold):
    assert math_verify_reward([completion], [gold]) == [0.0]


def test_math_verify_reward_batch_keeps_order():
    completions = [r"\boxed{1}", r"\boxed{5}", "it is 3"]
    assert math_verify_reward(completions, ["1", "2", "3"]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("completion", "gold", "expected"),
    [
        (r"so \boxed{42}.", "42", 1.0),
        (r"\boxed{41}", "42", 0.0),
        ("the answer is 42", "42", 0.0),  # no box
        (r"\boxed{42", "42", 0.0),  # unbalanced box
        (r"\boxed{ 4 2 }", "42", 1.0),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\frac12}", r"\frac{1}{2}", 1.0),
        (r"\boxed{\left(1, 2\right)}", "(1,2)", 1.0),
        (r"\boxed{90^\circ}", "90", 1.0),
        (r"\boxed{90^{\circ}}", "90", 1.0),
        (r"\boxed{3.}", "3", 1.0),
        (r"\boxed{10\%}", "10", 1.0),
        (r"\boxed{1,000}", "1000", 1.0),
        (r"\boxed{5\!000}", "5000", 1.0),
        (r"\boxed{x = 5}", "5", 1.0),
        (r"\boxed{\text{(B)}}", "(B)", 1.0),
        (r"\boxed{(B)}", "(C)", 0.0),
        (r"\boxed{1} then \boxed{2}", "2", 1.0),  # last box wins
        (r"\boxed{2}", r"\boxed{2}", 1.0),
        # SymPy fallback
        (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
        (r"\boxed{-\frac{3}{4}}", "-0.75", 1.0),
        (r"\boxed{1+x^2}", "x^2+1", 1.0),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
        (r"\boxed{\pi/2}", r"\frac{\pi}{2}", 1.0),
        (r"\boxed{2^{10}}", "1024", 1.0),
        (r"\boxed{0.33}", r"\frac{1}{3}", 0.0),
        (r"\boxed{x+1}", "x+2", 0.0),
        (r"\boxed{9^{9^{9^{9}}}}", "5", 0.0),  # refused by the fallback, not evaluated
        (r"\boxed{__import__('os').getpid()}", "1", 0.0),  # never reaches sympify
    ],
)
def test_boxed_reward(completion, gold, expected):
    assert boxed_reward([completion], [gold]) == [expected]


def test_builtin_reward_fns_follow_the_trl_contract():
    assert resolve_reward("math_verify") is math_verify_reward_fn
    assert resolve_reward("boxed") is boxed_reward_fn
    kwargs = {"completion_ids": [[1], [2]], "trainer_state": None}
    out = math_verify_reward_fn(["p", "q"], [r"\boxed{2}", "it is 4"], answer=["2", "5"], **kwargs)
    assert out == [1.0, 0.0]
    conversational = [[{"role": "assistant", "content": r"\boxed{7}"}]]
    assert boxed_reward_fn(["p"], conversational, answer=["7"]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        boxed_reward_fn(["p"], [r"\boxed{7}"])


def test_resolve_reward_dotted_paths():
    import reward_helpers

    assert resolve_reward(MARKER) is reward_helpers.marker_reward
    assert resolve_reward("reward_helpers:marker_reward") is reward_helpers.marker_reward
    assert resolve_reward(MARKER)(["a"], ["a=1"], answer=["1"]) == [1.0]


@pytest.mark.parametrize("spec", ["nonsense", "reward_helpers.missing", "no_such_module:fn", "os:sep", ""])
def test_resolve_reward_bad_spec(spec):
    with pytest.raises(ValueError, match=r"rollout\.reward") as info:
        resolve_reward(spec)
    assert repr(spec) in str(info.value)
    with pytest.raises(ValueError, match="math_verify, boxed, or an importable dotted path"):
        RewardScorer(spec, num_workers=0)


def test_import_does_not_pull_heavy_packages():
    code = (
        "import sys, thinktwice_pl.rewards; "
        "bad = [m for m in ('torch', 'vllm', 'bitsandbytes', 'math_verify') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_scorer_in_process_reports_every_failure(caplog):
    previous = signal.getsignal(signal.SIGALRM)
    outer_timer = signal.getitimer(signal.ITIMER_REAL)[0]  # pytest-timeout's signal method arms one
    scorer = RewardScorer(MARKER, timeout_s=1.0, num_workers=0)
    completions = ["a=1", "a=2", "SLEEP", "RAISE", "NONE", "NAN", "STR", "BOOL", "SLEEP again", "b=3"]
    prompts = ["a"] * 9 + ["b"]
    with caplog.at_level(logging.WARNING, logger="thinktwice_pl.rewards"):
        result = scorer.score(prompts, completions, ["1"] * 9 + ["3"])
    assert isinstance(result, ScoreResult)
    assert result.rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    errors = result.errors
    assert errors[:2] == [None, None] and errors[7] is None and errors[9] is None
    assert errors[2] == errors[8] == "timeout after 1.0s"
    assert errors[3] == "ValueError: bad completion"
    assert errors[4] == "reward returned None"
    assert errors[5].startswith("reward returned non-finite")
    assert errors[6].startswith("reward returned non-number str")
    assert result.num_errors == 6
    assert sum("timeout" in r.getMessage() for r in caplog.records) == 1  # logged once per kind
    assert signal.getsignal(signal.SIGALRM) is previous  # handler restored
    remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    assert (0 < remaining <= outer_timer) if outer_timer else remaining == 0  # a caller's timer is re-armed


def test_scorer_in_process_times_out_pathological_math_verify():
    scorer = RewardScorer("math_verify", timeout_s=1.0, num_workers=0)
    result = scorer.score(["p"] * 3, [r"\boxed{42}", PATHOLOGICAL, "x is 1/2"], ["42", "5", r"\frac{1}{2}"])
    assert result.rewards == [1.0, 0.0, 1.0]
    assert result.errors == [None, "timeout after 1.0s", None]


def test_scorer_validates_arguments():
    with pytest.raises(ValueError):
        RewardScorer(timeout_s=0)
    with pytest.raises(ValueError):
        RewardScorer(num_workers=-1)
    with pytest.raises(ValueError, match="length mismatch"):
        RewardScorer(num_workers=0).score(["p"], ["c", "d"], ["a"])
    assert RewardScorer(num_workers=2).score([], [], []) == ScoreResult([], [])  # no pool started


def test_scorer_workers_math_verify_mixed_batch():
    completions = [r"\boxed{42}", PATHOLOGICAL, "the answer is 7", "no number", r"\boxed{\frac{1}{2}}", r"\boxed{3}"]
    answers = ["42", "5", "7", "3", "0.5", "4"]
    with RewardScorer("math_verify", timeout_s=1.0, num_workers=2) as scorer:
        result = scorer.score(["p"] * 6, completions, answers)
        assert result.rewards == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
        assert result.errors == [None, "timeout after 1.0s", None, None, None, None]
        many = scorer.score(["p"] * 40, [rf"\boxed{{{i}}}" for i in range(40)], [str(i % 20) for i in range(40)])
        assert many.rewards == [1.0] * 20 + [0.0] * 20 and many.num_errors == 0


def test_scorer_workers_grade_each_item_with_its_prompt_and_answer(marker_scorer):
    prompts = [f"q{i}" for i in range(20)]
    completions = [f"q{i}={i}" if i % 3 else f"q{i}=wrong" for i in range(20)]
    result = marker_scorer.score(prompts, completions, [str(i) for i in range(20)])
    assert result.rewards == [1.0 if i % 3 else 0.0 for i in range(20)]
    assert result.num_errors == 0


def test_scorer_workers_report_errors_and_grade_the_rest(marker_scorer):
    completions = ["a=1", "SLEEP", "RAISE", "a=1", "NONE", "BOOL", "a=2", "NAN"]
    result = marker_scorer.score(["a"] * 8, completions, ["1"] * 8)
    assert result.rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert result.errors[1] == "timeout after 1.0s"
    assert result.errors[2] == "ValueError: bad completion"
    assert result.errors[4] == "reward returned None"
    assert result.errors[7].startswith("reward returned non-finite")
    assert [result.errors[i] for i in (0, 3, 5, 6)] == [None] * 4


def test_scorer_workers_survive_items_that_ignore_the_alarm_or_kill_the_worker(marker_scorer):
    completions = ["a=1", "STUBBORN", "a=1", "a=2", "CRASH", "a=1"]
    result = marker_scorer.score(["a"] * 6, completions, ["1"] * 6)
    assert result.rewards == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    assert result.errors[1].startswith("timeout after 1.0s") and result.errors[4].startswith("timeout after 1.0s")
    assert [result.errors[i] for i in (0, 2, 3, 5)] == [None] * 4
    assert marker_scorer.score(["a"], ["a=1"], ["1"]).rewards == [1.0]  # the recreated pool works


def test_scorer_close_pickle_and_no_leaked_workers():
    def children() -> set[int]:
        return {p.pid for p in mp.active_children()}

    before = children()
    scorer = RewardScorer(MARKER, timeout_s=1.0, num_workers=1)
    assert scorer.score(["a"], ["a=1"], ["1"]).rewards == [1.0]
    assert children() - before
    clone = pickle.loads(pickle.dumps(scorer))
    assert (clone.reward, clone.timeout_s, clone.num_workers) == (MARKER, 1.0, 1)
    scorer.close()
    scorer.close()  # idempotent
    assert children() <= before
    assert scorer.score(["a"], ["a=1"], ["1"]).rewards == [1.0]  # restarts lazily
    scorer.close()
    assert children() <= before


def test_unparseable_gold_is_an_error_not_a_silent_zero():
    with pytest.raises(ValueError, match="cannot parse the gold answer"):
        math_verify_reward([r"\boxed{5}"], ["\\"])  # math-verify parses a lone backslash to nothing
    with RewardScorer("math_verify", timeout_s=5.0, num_workers=0) as scorer:
        result = scorer.score(["p", "p"], [r"\boxed{5}", r"\boxed{5}"], ["5", "\\"])
    assert result.rewards == [1.0, 0.0]
    assert result.errors[0] is None and "cannot parse the gold answer" in result.errors[1]


def test_last_number_reward_needs_the_number_written():
    completions = [
        "26 + 29 = 55",  # right
        "26 + 29",  # restates the question: math-verify evaluates it to 55, this grader does not
        "26 + 29 = 54",  # wrong
        "The answer is \\boxed{55}.",  # a box is read like any text
        "55 apples. Check: 5 + 5 = 10",  # the last number counts
        "no number at all",
        "1,055 in total",  # thousands separator
        "30-6=24",  # subtraction, not a negative number
        "It is -3.",  # a negative answer
    ]
    golds = ["55", "55", "55", "55", "55", "55", "1055", "24", "-3"]
    # "26 + 29" -> 0 here, 1 with math-verify; "30-6=24" -> 24, not -6 then 24 misread
    assert last_number_reward(completions, golds) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert math_verify_reward(["26 + 29"], ["55"]) == [1.0]  # the exploit this grader closes
    assert resolve_reward("last_number")(prompts=["q"], completions=["x = 7"], answer=["7"]) == [1.0]
    with pytest.raises(ValueError, match=r"needs numeric gold answers, got '\\\\frac\{1\}\{2\}'"):
        last_number_reward(["1/2"], ["\\frac{1}{2}"])
