"""Rewards: box extraction, the two graders (real math-verify), reward resolution and the fail-safe scorer."""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from thinktwice_pl.paper_grader import _safe_for_sympy
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
# Passes every guard of the paper's grader (two letters, one-digit powers), then sympy.simplify of (x) - (this)
# takes about 8 s: only the deadline stops it (the reference, which has no deadline in fast mode, would wait).
SLOW_SIMPLIFY = r"so \boxed{\frac{(x+1)^9(y+2)^9(x+y)^9-(x+2)^9(y+1)^9(x-y)^9}{(x+3)^9(y+3)^9}}"


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
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{7}", "1"),  # \fbox only counts when there is no \boxed at all
        (r"\boxed {\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{}", ""),
        ("the answer is 42", None),
        (r"\boxed{1} then \boxed{2", None),  # the last box is cut off: no answer, not the earlier box
        (r"\boxed{\frac{1}{2}", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


SELF_CORRECTION = "First \\boxed{13}, after checking the final answer is \\boxed{14}."


def read_cases(name: str) -> list[tuple[str, str, float, str]]:
    """(completion, gold, expected reward, why) from the tab-separated file `name` next to this test."""
    lines = Path(__file__).with_name(name).read_text(encoding="utf-8").splitlines()
    cases = []
    for line in lines:
        if line and not line.startswith("#"):
            completion, gold, expected, *why = line.split("\t")
            cases.append((completion, gold, float(expected), "".join(why)))
    return cases


@pytest.mark.parametrize(
    ("completion", "gold"),
    [
        (r"so \boxed{42}", "42"),
        ("the answer is 42", "42"),  # no box: math-verify reads the last number (the CPU quickstart relies on it)
        (r"\boxed{42} wait, 7 is not it", "42"),  # the box wins over a later number
        (SELF_CORRECTION, "14"),  # the last box alone; math-verify on the whole text reads the set {13, 14}
        (r"\boxed{1} then \boxed{2}", "2"),
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
        (r"\boxed{\{1, 2\}}", r"\{1,2\}"),  # one box holding a set is still a set
        (r"\boxed{3}", "x=3"),
        (r"\boxed{x = 3}", "3"),
        (r"\boxed{-3}", r"\boxed{-3}"),  # an already boxed gold
        (r"\boxed{-3}", r"so $x = \boxed{-3}$."),  # a full solution as gold: its last box
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
        (r"42, but \boxed{7}", "42"),  # the box is the answer, not an earlier number
        (SELF_CORRECTION, "13"),  # the corrected answer counts, not the first one
        (r"\boxed{0.33}", r"\frac13"),
        (r"\boxed{13} so the answer is \boxed{14", "14"),  # cut off in the last box: 0, even with a closed box before
        (r"\boxed{13} so the answer is \boxed{14", "13"),
        (r"so \boxed{", "0"),
        ("", "0"),
    ],
)
def test_math_verify_reward_rejects(completion, gold):
    assert math_verify_reward([completion], [gold]) == [0.0]


def test_math_verify_reward_batch_keeps_order():
    completions = [r"\boxed{1}", r"\boxed{5}", "it is 3"]
    assert math_verify_reward(completions, ["1", "2", "3"]) == [1.0, 0.0, 1.0]


# Golds with currency, units, \text{} and degrees. Before the fix a "\$" made the gold look math-delimited and it
# did not parse at all; each must parse now, accept the right answer and reject a wrong one.
@pytest.mark.parametrize(
    ("gold", "right", "wrong"),
    [
        (r"\$18.90", "18.9", "18.80"),
        (r"\$1,000", "1000", "100"),
        (r"\$\frac{1}{2}", "0.5", "2"),
        (r"10\text{ cm}", "10", "100"),
        (r"5\text{ m}^2", "5", "25"),
        (r"\text{5 dollars}", "5", "6"),  # math-verify alone reads "5dollars"
        (r"\text{(C)}", "(C)", "(D)"),
        (r"\text{(C)}", r"\text{C}", "(B)"),
        (r"30^\circ", "30", "60"),
        (r"90^{\circ}", r"90^\circ", "45"),
        (r"25\%", "25", "26"),
        (r"25\%", "0.25", "0.26"),  # math-verify takes a percent as either form
        (r"1\frac{1}{2}", r"\frac{3}{2}", r"\frac{1}{2}"),
        (r"1\frac{1}{2}", "1.5", "2"),
        (r"\text{Monday}", r"\text{Monday}", r"\text{Tuesday}"),
    ],
)
def test_math_verify_reward_parses_golds_with_units_currency_and_text(gold, right, wrong):
    assert math_verify_reward([rf"so \boxed{{{right}}}.", rf"so \boxed{{{wrong}}}."], [gold, gold]) == [1.0, 0.0]


@pytest.mark.parametrize(
    ("gold", "message"),
    [
        ("\\", "math-verify cannot parse the gold answer"),  # math-verify parses a lone backslash to nothing
        ("", "math-verify cannot parse the gold answer"),
        (r"so \boxed{5", "unclosed"),  # a solution whose box is cut off
    ],
)
def test_math_verify_reward_unusable_gold_raises(gold, message):
    with pytest.raises(ValueError, match=message) as info:
        math_verify_reward([r"\boxed{5}"], [gold])
    assert repr(gold) in str(info.value)


# Inputs the paper's grader must refuse before SymPy or eval sees them (all score 0).
GUARDED_CASES = [
    (r"\boxed{9^{9^{9^{9}}}}", "5", 0.0, "refused by the guards, not evaluated"),
    (r"\boxed{(10^{100})!}", "x", 0.0, "factorial of a huge number: refused"),
    (r"\boxed{99999!}", "x", 0.0, "factorials of at most three digits"),
    (r"\boxed{__import__('os').getpid()}", "1", 0.0, "never reaches eval"),
    (r"\boxed{x.n()}", "x", 0.0, "no attribute access"),
]
# The paper's grader (METHOD.md section 5): the cases of paper_grader_cases.tsv, then the guarded inputs.
PAPER_GRADER_CASES = [*read_cases("paper_grader_cases.tsv"), *GUARDED_CASES]


# Where `boxed` and the reference's grader disagree, known from the reference's code: its LaTeX-to-text conversion
# (pylatexenc) drops parentheses, root degrees and unknown macros before SymPy. Ours keeps them, so these score
# otherwise than in the paper's tables; README.md lists each ("Grader differences").
REFERENCE_DIFFERENCES = [  # (boxed answer, gold, ours, the reference's)
    (r"(1+\sqrt5)/2", r"\frac{1+\sqrt{5}}{2}", 1.0, 0.0),  # it reads the answer as 1 + sqrt(5)/2
    (r"1+\frac{\sqrt5}{2}", r"\frac{1+\sqrt{5}}{2}", 0.0, 1.0),  # it reads the gold as 1 + sqrt(5)/2
    (r"\sqrt{2}", r"\sqrt[3]{2}", 0.0, 1.0),  # the root's degree is dropped
    (r"52", r"\binom{5}{2}", 0.0, 1.0),  # \binom is deleted, leaving 52
]


@pytest.mark.parametrize(("answer", "gold", "ours", "reference"), REFERENCE_DIFFERENCES)
def test_documented_differences_from_the_reference_grader(answer, gold, ours, reference):
    assert ours != reference
    assert boxed_reward([f"so the answer is \\boxed{{{answer}}}"], [gold]) == [ours]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"`{answer}`" in readme and f"`{gold}`" in readme, "README.md lists every documented difference"


@pytest.mark.parametrize(("completion", "gold", "expected", "why"), PAPER_GRADER_CASES)
def test_boxed_reward(completion, gold, expected, why):
    assert boxed_reward([completion], [gold]) == [expected], why


def test_boxed_reward_refuses_guarded_inputs_at_once():
    """Guarded inputs are refused, not timed out: under a 2 s deadline each is graded 0 without an error."""
    completions, golds = [c for c, *_ in GUARDED_CASES], [g for _, g, *_ in GUARDED_CASES]
    result = RewardScorer("boxed", timeout_s=2.0, num_workers=0).score(["p"] * len(golds), completions, golds)
    assert result.rewards == [0.0] * len(golds) and result.num_errors == 0


@pytest.mark.parametrize(
    ("expr", "safe"),
    [
        ("(x+1)^2-(x^2+2x+1)", True),
        ("(1/2)^2", True),  # a power of a small bracket is fine
        ("sqrt(2)/2+pi", True),  # sqrt is not counted as letters; p and i are two
        ("x^2.5+2^x+x^-1", True),
        ("9^9*99999999^9", True),  # one-digit powers of any number: at most a few thousand digits
        ("abc", False),  # three unknown letters
        ("2^10", False),  # multi-digit power
        ("9^9^9", False),  # power tower
        ("3^-9^9", False),  # the same through a minus sign
        ("2^(10)", False),
        ("(((((((9^9)^9)^9)^9)^9)^9)^9)^9", False),  # 9^(9^8): tens of millions of digits computed in C
        ("(5!)!", False),
        ("1000!", False),
        ("x.n()", False),  # attribute access
        ("__import__('os')", False),  # outside the character whitelist
        ("1" * 301, False),  # too long
    ],
)
def test_paper_grader_sympy_guard(expr, safe):
    assert _safe_for_sympy(expr) is safe


@pytest.mark.parametrize(
    ("gold", "message"),
    [
        ("", "empty once normalised"),
        ("   ", "empty once normalised"),
        (r"\text{ }", "empty once normalised"),
        (r"\boxed{}", "empty once normalised"),
        (r"the answer is \boxed{5", "unclosed"),
    ],
)
def test_boxed_reward_unusable_gold_raises(gold, message):
    with pytest.raises(ValueError, match=message) as info:
        boxed_reward([r"\boxed{5}"], [gold])
    assert repr(gold) in str(info.value) and "fix it in the data" in str(info.value)


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
    with pytest.raises(ValueError, match="math_verify, boxed, last_number, or an importable dotted path"):
        RewardScorer(spec, num_workers=0)


def test_import_does_not_pull_heavy_packages():
    code = (
        "import sys, thinktwice_pl.rewards; "
        "bad = [m for m in ('torch', 'vllm', 'bitsandbytes', 'math_verify', 'sympy') if m in sys.modules]; "
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
    completions += [SELF_CORRECTION, r"\boxed{13}, no: \boxed{14", r"\boxed{18.9}", r"\boxed{5}"]
    answers = ["42", "5", "7", "3", "0.5", "4", "14", "13", r"\$18.90", "\\"]
    with RewardScorer("math_verify", timeout_s=1.0, num_workers=2) as scorer:
        result = scorer.score(["p"] * 10, completions, answers)
        assert result.rewards == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
        assert result.errors[:9] == [None, "timeout after 1.0s"] + [None] * 7
        assert "cannot parse the gold answer" in result.errors[9]  # counted, not a silent 0
        many = scorer.score(["p"] * 40, [rf"\boxed{{{i}}}" for i in range(40)], [str(i % 20) for i in range(40)])
        assert many.rewards == [1.0] * 20 + [0.0] * 20 and many.num_errors == 0


def test_scorer_workers_boxed_mixed_batch():
    completions = [r"\boxed{42}", SLOW_SIMPLIFY, "The answer is 42.", r"so \boxed{4", SELF_CORRECTION]
    completions += [r"\boxed{18.9}", r"\boxed{1\frac{1}{2}}", r"\boxed{\frac{6}{8}}", r"\boxed{5}"]
    answers = ["42", "x", "42", "42", "14", r"\$18.90", "1.5", r"\frac34", ""]
    with RewardScorer("boxed", timeout_s=1.0, num_workers=1) as scorer:
        result = scorer.score(["p"] * 9, completions, answers)
        assert result.rewards == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
        assert result.errors[:8] == [None, "timeout after 1.0s"] + [None] * 6  # no box / cut off: 0, not errors
        assert "empty once normalised" in result.errors[8]
        again = scorer.score(["p"] * 2, [r"\boxed{0.75}", r"\boxed{(2,1)}"], [r"\frac{3}{4}", "(1,2)"])
        assert again.rewards == [1.0, 0.0] and again.num_errors == 0  # the worker outlived the timeout


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


@pytest.mark.parametrize(("reward", "message"), [("math_verify", "cannot parse the gold answer"), ("boxed", "empty")])
def test_unusable_gold_is_an_error_not_a_silent_zero(reward, message):
    with RewardScorer(reward, timeout_s=5.0, num_workers=0) as scorer:
        result = scorer.score(["p", "p"], [r"\boxed{5}", r"\boxed{5}"], ["5", ""])
    assert result.rewards == [1.0, 0.0]
    assert result.errors[0] is None and message in result.errors[1]


def test_rewards_reexports_the_graders():
    from thinktwice_pl import graders, paper_grader, rewards

    for module, name in (
        (paper_grader, "boxed_reward"),
        (graders, "math_verify_reward"),
        (graders, "extract_last_boxed"),
    ):
        assert getattr(rewards, name) is getattr(module, name)


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
