"""The paper's grader (``rollout.reward: boxed``), as the reference code runs it (METHOD.md section 5).

:func:`boxed_reward` is the paper's grader (the reference's Hendrycks-MATH grader in its fast mode): no box or an
unclosed box scores 0, so unboxed and truncated answers earn nothing. The box content and the gold are equal
if EITHER their Hendrycks-MATH string normalisations are equal, OR, after a second normalisation (units,
LaTeX to plain text, mixed numbers), they are equal as strings or element by element (tuples and intervals
need the same brackets and length; two plain fractions ``a/b`` must match exactly, so an unreduced fraction is
wrong; an integer gold needs an integer answer) with ``sympy.simplify(gold - answer) == 0`` as the last test.
Deliberate differences from the reference: LaTeX is turned into text by a small converter of our own (the
reference uses pylatexenc, which is not a dependency here) that parenthesises compound fraction parts
(pylatexenc writes ``\\frac{1+\\sqrt5}{2}`` as ``1+√(5)/2``), keeps the degree of ``\\sqrt[n]{}`` and keeps
unknown macros instead of deleting them (``\\binom{5}{2}`` is not ``52``); SymPy only evaluates expressions
that pass a character whitelist and guards against huge powers and factorials, on top of the reference's. The
box is read exactly as the reference reads it (`reference_last_box`: only the last ``\\boxed{``; ``\\fbox`` and
``\\boxed {x}`` score 0).

A gold answer that cannot be graded raises ValueError naming it: the scorer counts that as a grader error
instead of a silent 0. SymPy is imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import re
import unicodedata

from thinktwice_pl.graders import _gold_box_content, reference_last_box
from thinktwice_pl.paper_grader_tables import FUNCTION_NAMES, SECOND_PASS_UNITS, STYLE_MACROS, TEXT_MACROS, UNIT_WORDS


class _NoNormalForm(Exception):
    """The Hendrycks normalisation gives up on this string; the string is then compared as it is."""


@functools.cache
def _unit_word_patterns() -> tuple[re.Pattern[str], ...]:
    words = UNIT_WORDS + tuple(w + "s" for w in UNIT_WORDS)
    return tuple(re.compile(r"(^|\W)" + w + r"($|\W)") for w in words)


def _brace_sqrt_arguments(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``: a root without braces takes the next character."""
    head, *pieces = s.split("\\sqrt")
    for piece in pieces:
        if not piece:
            raise _NoNormalForm("\\sqrt at the end")
        head += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
    return head


def _brace_frac_arguments(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``; other forms are left as they are."""
    head, *pieces = s.split("\\frac")
    for piece in pieces:
        if not piece:
            raise _NoNormalForm("\\frac at the end")
        if piece[0] != "{":
            if len(piece) < 2:
                return s
            a, b, tail = piece[0], piece[1], piece[2:]
            piece = "{" + a + "}" + (b + tail if b == "{" else "{" + b + "}" + tail)
        head += "\\frac" + piece
    return head


def _hendrycks_normalize(answer: str) -> str:
    """The Hendrycks-MATH string normalisation (first test of the paper's grader)."""
    s = answer.strip()
    if m := re.search(r"^\\text\{(?P<text>.+?)\}$", s):  # an answer wrapped whole in \text{}
        s = m.group("text").strip()
    try:
        return _hendrycks_strip(s)
    except _NoNormalForm:
        return s


def _hendrycks_strip(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s).replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    if (cut := re.sub(r"\\text{.*?}$", "", s).strip()) and cut != s:  # a unit at the end: "10\text{ cm}"
        s = cut
    for _ in range(2):
        for pattern in _unit_word_patterns():
            if cut := pattern.sub(r"\1\2", s):
                s = cut
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # a unit written "\text{ cm}" somewhere: keep what precedes it
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise _NoNormalForm("several \\text{ } units")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(sides := s.split("=")) == 2 and len(sides[0]) <= 2:  # "k = 5" -> " 5"
        s = sides[1]
    s = _brace_frac_arguments(_brace_sqrt_arguments(s).replace(" ", ""))
    if s == "0.5":
        return "\\frac{1}{2}"
    if len(sides := s.split("/")) == 2:  # "3/4" -> "\frac{3}{4}", integers only
        with_ints = _int_or_none(sides[0]), _int_or_none(sides[1])
        if None not in with_ints and s == f"{with_ints[0]}/{with_ints[1]}":
            return f"\\frac{{{with_ints[0]}}}{{{with_ints[1]}}}"
    return s


def _int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _is_whole(x: float) -> bool:
    try:
        return abs(x - round(x)) <= 1e-7
    except (OverflowError, ValueError):  # inf, nan
        return False


def _drop_thousands_commas(s: str) -> str:
    while (dropped := re.sub(r"(\d),(\d\d\d)($|\D)", r"\1\2\3", s)) != s:
        s = dropped
    return s


def _is_int_text(s: str) -> bool:
    x = _float_or_none(_drop_thousands_commas(s))
    return x is not None and _is_whole(x)


def _second_normalize(expr: str) -> str:
    """Units, currency and LaTeX out, mixed numbers made sums, lower case: the form that is compared with SymPy."""
    if m := re.search(r"^\\text\{(?P<text>.+?)\}$", expr):
        expr = m.group("text")
    expr = expr.replace("\\%", "").replace("\\$", "").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit in SECOND_PASS_UNITS:
        expr = re.sub(unit + r"(es)?(s)? *(\^[0-9]+)?", "", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr[:1] == "{" and expr[-1:] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    if (x := _float_or_none(expr)) is not None and _is_whole(x):
        expr = str(round(x))
    if "\\" in expr:
        with contextlib.suppress(RecursionError):  # braces nested thousands deep: compare the raw text
            expr = _latex_to_text(expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")).strip()
    expr = re.sub(r"- *", "-", expr)
    expr = re.sub(r"([0-9]) +([0-9])", r"\1+\2", expr)  # a mixed number "7 3/4" is 7+3/4
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _is_int_text(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


_TWO_ARGUMENT_MACROS = {"frac", "nicefrac", "cfrac", "binom", "dbinom", "tbinom"}
_MACRO_NAME = re.compile(r"[A-Za-z]+")


def _group_end(s: str, i: int) -> int:
    """Index of the brace closing the one at ``s[i]``, or ``len(s)`` when it is never closed."""
    depth = 0
    while i < len(s):
        if s[i] == "\\":
            i += 2
            continue
        depth += (s[i] == "{") - (s[i] == "}")
        if depth == 0:
            return i
        i += 1
    return len(s)


def _read_macro_name(s: str, i: int) -> tuple[str, int]:
    """``s[i]`` is a backslash: return the macro's name (letters, or one other character) and the index after."""
    if m := _MACRO_NAME.match(s, i + 1):
        return m.group(), m.end()
    return s[i + 1 : i + 2], min(i + 2, len(s))


def _read_argument(s: str, i: int) -> tuple[str, int]:
    """A macro argument at ``s[i:]``: a braced group, a macro, or one character; as text, and the index after."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return "", i
    if s[i] == "{":
        end = _group_end(s, i)
        return _latex_to_text(s[i + 1 : end]), end + 1
    if s[i] == "\\":
        name, i = _read_macro_name(s, i)
        return _macro_to_text(name, s, i)
    return s[i], i + 1


def _macro_to_text(name: str, s: str, i: int) -> tuple[str, int]:
    """Render macro ``name`` whose arguments start at ``s[i:]``; return the text and the index after them."""
    if name in _TWO_ARGUMENT_MACROS:
        a, i = _read_argument(s, i)
        b, i = _read_argument(s, i)
        if name.endswith("binom"):
            return f"binom({a},{b})", i

        def part(t: str) -> str:  # keep "1/2" bare (the fraction rule needs it), bracket compound parts
            t = t.strip()
            return t if re.fullmatch(r"-?[\w.]+", t) else f"({t})"

        return f" {part(a)}/{part(b)}", i  # the leading space makes "7\frac{3}{4}" the mixed number "7 3/4"
    if name == "sqrt":
        j, degree = len(s) - len(s[i:].lstrip(" ")), ""
        if s[j : j + 1] == "[" and (end := s.find("]", j)) != -1:  # \sqrt[3]{x}
            degree, i = _latex_to_text(s[j + 1 : end]), end + 1
        radicand, i = _read_argument(s, i)
        return (f"({radicand})^(1/({degree}))" if degree else f"sqrt({radicand})"), i
    if name in STYLE_MACROS:
        return "", i
    if name in TEXT_MACROS:
        return TEXT_MACROS[name], i
    if name in FUNCTION_NAMES:
        return name, i
    letter = name[3:] if name.startswith("var") else name  # \varepsilon is an epsilon
    case = "CAPITAL" if letter[:1].isupper() else "SMALL"
    try:
        return unicodedata.lookup(f"GREEK {case} LETTER {letter.upper().replace('LAMBDA', 'LAMDA')}"), i
    except KeyError:
        return "\\" + name, i  # unknown: kept, so it can only match itself (pylatexenc would delete it)


def _latex_to_text(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "{":
            end = _group_end(s, i)
            out.append(_latex_to_text(s[i + 1 : end]))
            i = end + 1
        elif ch == "\\":
            name, i = _read_macro_name(s, i)
            text, i = _macro_to_text(name, s, i)
            out.append(text)
        else:
            out.append("" if ch == "}" else ch)
            i += 1
    return "".join(out)


_SYMPY_CHARS = re.compile(r"[0-9a-z.+\-*/^()!,]+")
_SAFE_EXPONENT = re.compile(r"\^(?=-?(?:\d(?:\.\d+)?(?![\d^.])|[a-z]))")  # one digit (or a letter) per power
_MAX_SYMPY_CHARS = 300


def _safe_for_sympy(expr: str) -> bool:
    """Whether ``expr`` (normalised: lower case, no spaces) may go to ``parse_expr``, which runs ``eval``.

    The reference's guards (at most two distinct letters besides ``sqrt``/``frac``; no ``^{``, ``^(``, ``^2^`` or
    multi-digit powers) keep SymPy from hanging; ours add a character whitelist and no attribute access (so
    ``eval`` only sees arithmetic), a length cap, factorials of at most three digits, and no power of a
    letter-free bracket that itself holds a power or factorial (``((9^9)^9)^9`` computes a huge integer in C,
    where no alarm can stop it).
    """
    if len(expr) > _MAX_SYMPY_CHARS or not _SYMPY_CHARS.fullmatch(expr) or re.search(r"[a-z)]\.", expr):
        return False
    if len(set(re.sub(r"[^a-z]", "", expr.replace("sqrt", "").replace("frac", "")))) > 2:
        return False
    if expr.count("^") != len(_SAFE_EXPONENT.findall(expr)) or re.search(r"(?<!\d)!|\d{4,}!", expr):
        return False
    for m in re.finditer(r"\)\^", expr):
        depth, j = 0, m.start()
        while j >= 0:
            depth += (expr[j] == ")") - (expr[j] == "(")
            if depth == 0:
                break
            j -= 1
        base = expr[j + 1 : m.start()]
        if not re.search(r"[a-z]", base) and re.search(r"[\^!]", base):
            return False
    return True


def _sympy_equal(gold: str, given: str) -> bool:
    expr = f"({gold})-({given})"
    if not _safe_for_sympy(expr):
        return False
    import sympy
    from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

    try:
        diff = parse_expr(
            expr.replace("^", "**"), transformations=(*standard_transformations, implicit_multiplication_application)
        )
        return bool(sympy.simplify(diff) == 0)
    except Exception:  # not an expression SymPy can read or subtract (tuples, text): not equal
        return False


_PLAIN_FRACTION = re.compile(r"-?[0-9]+.?/0*[1-9][0-9]*.?")


def _elements(expr: str) -> list[str]:
    """A tuple or interval such as ``(1,2]`` split into its elements; anything else is one element."""
    expr = _drop_thousands_commas(expr)
    if len(expr) > 2 and expr[0] in "()[]" and expr[-1] in "()[]" and not re.search(r"[()\[\]]", expr[1:-1]):
        return [e.strip() for e in expr[1:-1].split(",")]
    return [expr] if expr else []


def _second_pass_equal(gold: str, given: str) -> bool:
    """Equal strings, or the same brackets and length with every element pair equal under the paper's rules."""
    if gold == given:
        return True
    if not given:
        return False
    golds, givens = _elements(gold), _elements(given)
    if len(golds) > 1 and (gold[0] != given[0] or gold[-1] != given[-1]):
        return False  # (1,2) is not [1,2]
    if len(golds) != len(givens):
        return False
    for g, a in zip(golds, givens):
        if _PLAIN_FRACTION.fullmatch(g) and _PLAIN_FRACTION.fullmatch(a):
            ok = g == a  # two plain fractions: 2/4 is not 1/2 (an unreduced answer is wrong)
        elif _is_int_text(g) != _is_int_text(a):
            ok = False  # an integer needs an integer: 4/2 is not 2
        else:
            ok = _sympy_equal(g, a)
        if not ok:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def _gold_forms(answer: str) -> tuple[str, str]:
    """The gold's two normal forms, or ValueError when there is nothing left to compare with."""
    gold = _gold_box_content(answer, "boxed grader")
    first, second = _hendrycks_normalize(gold), _second_normalize(gold)
    if not first.strip() and not second:
        raise ValueError(
            f"the boxed grader cannot use the gold answer {answer!r}: it is empty once normalised; fix it in the data"
        )
    return first, second


def boxed_reward(completions: list[str], answers: list[str]) -> list[float]:
    """The paper's grader: the last ``\\boxed{}`` against the gold (see the module docstring for the rules).

    Args:
        completions: Model outputs; no box or an unclosed last box scores 0.0.
        answers: Gold final answers (``"42"``, ``"\\$18.90"``, ``"10\\text{ cm}"``, or a full solution whose last
            box is the answer).

    Returns:
        1.0 for a correct answer, else 0.0.

    Raises:
        ValueError: A gold answer that is empty, empty once normalised, or has an unclosed box.
    """
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        gold_first, gold_second = _gold_forms(str(answer))
        given = reference_last_box(completion)
        ok = given is not None and (
            _hendrycks_normalize(given) == gold_first or _second_pass_equal(gold_second, _second_normalize(given))
        )
        out.append(1.0 if ok else 0.0)
    return out
