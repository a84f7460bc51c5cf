"""The last-box rule of METHOD.md section 5 and the math-verify grader; the paper's grader is in `paper_grader`.

Both graders read the LAST ``\\boxed{}`` of a completion, because a refinement that corrects itself ("first
\\boxed{13}, after checking \\boxed{14}") means the last one (math-verify also reads ``\\fbox{}`` when there is no
``\\boxed``).

- :func:`math_verify_reward`, for small models that never box (the CPU quickstart): math-verify on the last box's
  content alone, 0 for an unclosed last box, and math-verify on the whole text (its last number) without a box.
- :func:`last_number_reward`, for plain numeric answers (the CPU comparison, configs/smollm2): the last number
  written, so restating the question ("26 + 29", which math-verify evaluates to 55) earns nothing.

A gold answer that cannot be graded raises ValueError naming it: the scorer counts that as a grader error
instead of a silent 0. math-verify and SymPy are imported lazily.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import signal
import threading
from typing import Any

_BOX_RE = re.compile(r"\\boxed\s*\{")
_FBOX_RE = re.compile(r"\\fbox\s*\{")
_MV_TIMEOUT_S = 5  # math-verify's own per-call alarm, used only when no outer timer is armed


def extract_last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` in ``text`` (of the last ``\\fbox{...}`` if it has none).

    Args:
        text: A model completion or a reference solution.

    Returns:
        The content between the balanced braces (nested and escaped braces handled), or None when there is no
        box or the last box is not closed.
    """
    starts = list(_BOX_RE.finditer(text)) or list(_FBOX_RE.finditer(text))
    if not starts:
        return None
    begin = i = starts[-1].end()
    depth = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def reference_last_box(text: str) -> str | None:
    """The box rule of the paper's grader, exactly as the reference code reads it: the content of the last
    ``\\boxed`` when it opens its brace at once (``\\boxed{``), braces counted as written (escaped ones too).

    ``\\fbox{}``, ``\\boxed {x}`` (a space) and a last ``\\boxed`` that is cut off all give None (score 0 there),
    even when an earlier box is complete: the reference looks only at the last ``\\boxed``.
    """
    start = text.rfind("\\boxed")
    if start < 0 or not text.startswith("\\boxed{", start):
        return None
    begin = start + len("\\boxed{")
    depth = 1
    for i in range(begin, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if depth == 0:
            return text[begin:i]
    return None


def _has_box(text: str) -> bool:
    return bool(_BOX_RE.search(text) or _FBOX_RE.search(text))


def _gold_box_content(answer: str, grader: str) -> str:
    """A gold that holds a box (a full solution) is reduced to its last box; an unclosed one is a data error."""
    if not _has_box(answer):
        return answer
    content = extract_last_boxed(answer)
    if content is None:
        raise ValueError(f"the gold answer {answer!r} has an unclosed \\boxed{{}}; fix it in the data ({grader})")
    return content


# ------------------------------------------------------------------------------------------------- math-verify


def _outer_timer_armed() -> bool:
    return hasattr(signal, "getitimer") and signal.getitimer(signal.ITIMER_REAL)[0] > 0


def _drop_mv_timeout_notice(record: logging.LogRecord) -> bool:
    # math-verify logs "Timeout is disabled ... provide the logic yourself" when we pass None: an outer timer does.
    return not (record.getMessage().startswith("Timeout is disabled") and _outer_timer_armed())


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_mv_timeout_notice)


def _math_verify_timeout() -> int | None:
    """math-verify's own SIGALRM timeout: only in the main thread, and never over an armed timer (which it would
    cancel): the scorer's per-item deadline, or a test runner's."""
    in_main = threading.current_thread() is threading.main_thread()
    return _MV_TIMEOUT_S if in_main and not _outer_timer_armed() else None


_MV_TRAILING_UNIT = re.compile(r"(?<=\S)\s*\\(?:text|mbox|textrm|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}(\^\{?[23]\}?)?$")
_MV_NUMBER_IN_TEXT = re.compile(r"^\\(?:text|mbox|textrm)\s*\{\s*(-?[\d,]*\.?\d+)\s+[A-Za-z][A-Za-z .]*\}$")


def _latex_for_math_verify(answer: str) -> str:
    """Drop currency and units that math-verify reads wrongly or not at all: ``\\$18.90`` -> ``18.90``,
    ``10\\text{ cm}^2`` -> ``10``, ``\\text{5 dollars}`` -> ``5``, ``30^\\circ`` -> ``30``. ``\\%`` stays
    (math-verify accepts both 25 and 0.25 for ``25\\%``)."""
    s = answer.strip().replace("\\$", "").replace("\\textdollar", "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = _MV_NUMBER_IN_TEXT.sub(r"\1", s)
    return _MV_TRAILING_UNIT.sub("", s).strip()


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import parse

    text = _latex_for_math_verify(_gold_box_content(answer, "math_verify grader"))
    # A bare gold ("\\frac{1}{2}", "x^2+1") only parses as LaTeX inside math delimiters ("\\$" is not one).
    delimited = bool(re.search(r"(?<!\\)\$", text))
    parsed = parse(text if delimited else f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)
    if not parsed:  # a data problem, not a wrong answer: surfaces as a counted grader error
        raise ValueError(
            f"math-verify cannot parse the gold answer {answer!r} (read as {text!r}); fix it in the data "
            "or use rollout.reward=boxed"
        )
    return tuple(parsed)


def math_verify_reward(completions: list[str], answers: list[str]) -> list[float]:
    """Grade completions with math-verify, ``verify(parse(gold), parse(answer))``, on the last box when there is one.

    With a box, only the last box's content is parsed (wrapped in ``\\boxed{}``, after dropping currency and units
    as for the gold), and an unclosed last box scores 0.0: the answer was cut off. Without any box, math-verify
    parses the whole text (its last number), which small models that never box rely on. Runs in-process;
    math-verify's own ``signal.alarm`` timeouts are used only in the main thread with no timer armed.

    Args:
        completions: Model outputs.
        answers: Gold final answers, one per completion (``"42"``, ``"\\frac{1}{2}"``, ``"\\$18.90"``, or a full
            solution whose last box is the answer).

    Returns:
        1.0 for a correct answer, else 0.0.

    Raises:
        ValueError: A gold answer that math-verify cannot parse even after dropping currency and units.
    """
    from math_verify import parse, verify

    timeout = _math_verify_timeout()
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        gold = list(_parse_gold(str(answer), timeout))
        if _has_box(completion):
            content = extract_last_boxed(completion)
            if content is None:
                out.append(0.0)
                continue
            pred = parse(f"\\boxed{{{_latex_for_math_verify(content)}}}", parsing_timeout=timeout)
        else:
            pred = parse(completion, parsing_timeout=timeout)
        ok = bool(pred) and verify(gold, pred, timeout_seconds=timeout)
        out.append(1.0 if ok else 0.0)
    return out


_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d+(?:\.\d+)?")  # a minus sign only where it cannot be subtraction
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_number_reward(completions: list[str], answers: list[str]) -> list[float]:
    """The last number written in the completion vs a numeric gold answer (thousands separators ignored).

    For problems whose answers are plain numbers, with models that do not box them (configs/smollm2). Unlike
    math-verify, which evaluates the last expression of an unboxed answer, a completion that only restates the
    question ("26 + 29": math-verify grades it equal to 55) scores 0 here: the number has to be written.

    Args:
        completions: Model outputs.
        answers: Gold answers, each a number such as ``"42"`` or ``"-3.5"``.

    Returns:
        1.0 when the last number equals the gold, else 0.0 (also when the completion has no number).

    Raises:
        ValueError: a gold answer that is not a number (a data problem, counted as a grader error).
    """
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        try:
            gold = float(_THOUSANDS_RE.sub("", str(answer).strip()))
        except ValueError:
            raise ValueError(f"the last_number reward needs numeric gold answers, got {answer!r}") from None
        numbers_found = _NUMBER_RE.findall(_THOUSANDS_RE.sub("", completion))
        out.append(1.0 if numbers_found and math.isclose(float(numbers_found[-1]), gold, abs_tol=1e-9) else 0.0)
    return out
