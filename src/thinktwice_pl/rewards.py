"""Binary math rewards (METHOD.md section 5) and a scorer that never hangs or crashes training.

Three graders: :func:`math_verify_reward` (default; math-verify, robust on LaTeX forms and unboxed answers),
:func:`boxed_reward` (the reference code: last ``\\boxed{}`` vs gold after light normalisation, then SymPy) and
:func:`last_number_reward` (the last number written, for plain numeric answers that small models do not box).
Reward callables follow the TRL contract ``fn(prompts, completions, **columns) -> list[float | None]`` with the
gold answers in ``columns["answer"]``; :func:`resolve_reward` maps a config string to one. :class:`RewardScorer`
grades item by item under a per-item deadline, in spawned worker processes or in the calling process.

This module imports neither torch nor vLLM; math-verify and SymPy are imported lazily.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import itertools
import logging
import math
import multiprocessing as mp
import numbers
import os
import queue
import re
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[Any]]
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_MV_TIMEOUT_S = 5  # math-verify's own per-call alarm, used only when no outer deadline is active
_DEADLINE_ACTIVE = False  # True while _deadline() holds SIGALRM: math-verify must not re-arm (and cancel) it
_MAX_CHUNK = 8  # items per worker task; bounds the wait when an item ignores the in-worker alarm


def _drop_mv_timeout_notice(record: logging.LogRecord) -> bool:
    # math-verify logs "Timeout is disabled ... provide the logic yourself" when we pass None: we do, under _deadline.
    return not (_DEADLINE_ACTIVE and record.getMessage().startswith("Timeout is disabled"))


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_drop_mv_timeout_notice)


class _GradeTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that graders' ``except Exception`` cannot swallow it."""


def extract_last_boxed(text: str) -> str | None:
    """Return the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``.

    Args:
        text: A model completion.

    Returns:
        The content between the balanced braces (nested and escaped braces handled), or None when there is no
        box or the last box is not closed.
    """
    starts = list(_BOX_RE.finditer(text))
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


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> tuple[Any, ...]:
    from math_verify import parse

    # A bare gold ("\\frac{1}{2}", "x^2+1") only parses as LaTeX inside math delimiters.
    text = answer if ("$" in answer or "\\boxed" in answer) else f"${answer}$"
    return tuple(parse(text, parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout))


def math_verify_reward(completions: list[str], answers: list[str]) -> list[float]:
    """Grade completions with math-verify: ``verify(parse(gold), parse(completion))``.

    The completion is parsed with math-verify's defaults (boxed answers first, else the last LaTeX or plain
    number); the gold is parsed inside ``$...$``. Runs in-process; math-verify's ``signal.alarm`` timeouts are
    used only in the main thread outside a :class:`RewardScorer` deadline.

    Args:
        completions: Model outputs.
        answers: Gold final answers, one per completion (plain strings such as ``"42"`` or ``"\\frac{1}{2}"``).

    Returns:
        1.0 for a correct answer, else 0.0.
    """
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    timeout = _MV_TIMEOUT_S if in_main and not _DEADLINE_ACTIVE else None
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        gold = list(_parse_gold(str(answer), timeout))
        if not gold:  # a data problem, not a wrong answer: surfaces as a counted grader error
            raise ValueError(
                f"math-verify cannot parse the gold answer {answer!r}; fix it in the data or use another grader"
            )
        pred = parse(completion, parsing_timeout=timeout)
        ok = bool(pred) and verify(gold, pred, timeout_seconds=timeout)
        out.append(1.0 if ok else 0.0)
    return out


def _normalize(s: str) -> str:
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s.strip())
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "$", "\\%", "%"):
        s = s.replace(token, "")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"[a-zA-Z]=(.+)", s)
    return m.group(1) if m else s


_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|sqrt|pi|[a-z]|\*\*|[-+*/()]")


def _to_sympy(s: str) -> Any:
    """Parse a small numeric/polynomial LaTeX answer with SymPy, or return None (never evaluates arbitrary code)."""
    for _ in range(5):
        s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        s = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = re.sub(r"\^\{(\d{1,2})\}", r"^\1", s).replace("^", "**").replace("{", "(").replace("}", ")")
    tokens = _TOKEN_RE.findall(s)
    if not s or len(s) > 60 or "".join(tokens) != s or re.search(r"\*\*(?!\d{1,2}(?![\d.*]))", s):
        return None  # unknown syntax, too long, or an exponent that could be astronomically large
    expr = ""
    for prev, tok in zip([None, *tokens], tokens):
        implicit = prev is not None and (prev[0].isalnum() or prev == ")") and prev != "sqrt"
        expr += ("*" if implicit and (tok[0].isalnum() or tok == "(") else "") + tok
    import sympy

    try:
        return sympy.sympify(expr)
    except Exception:
        return None


def boxed_reward(completions: list[str], answers: list[str]) -> list[float]:
    """The reference grader: last ``\\boxed{}`` content vs gold, normalised string match, then SymPy equality.

    Normalisation strips spaces, ``\\left``/``\\right``, thin spaces, ``$``, ``%``, a trailing ``.``, degree signs,
    ``\\text{}`` wrappers, thousands separators and a leading ``x=``; ``\\dfrac`` becomes ``\\frac``. Units are not
    handled. A completion without a box scores 0.0.

    Args:
        completions: Model outputs.
        answers: Gold final answers (bare or boxed).

    Returns:
        1.0 for a correct answer, else 0.0.
    """
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        pred, gold = extract_last_boxed(completion), str(answer)
        gold = extract_last_boxed(gold) or gold
        ok = False
        if pred is not None:
            pred, gold = _normalize(pred), _normalize(gold)
            ok = pred == gold
            if not ok and (a := _to_sympy(pred)) is not None and (b := _to_sympy(gold)) is not None:
                try:
                    ok = bool(__import__("sympy").simplify(a - b) == 0)
                except Exception:
                    ok = False
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


def _completion_text(c: Any) -> str:
    """TRL passes conversational completions as message lists; grade the last message's content."""
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return str(c)


def _trl_wrapper(grader: Callable[[list[str], list[str]], list[float]], name: str) -> RewardFn:
    def reward_fn(prompts: list[Any], completions: list[Any], answer: list[str] | None = None, **_: Any) -> list[Any]:
        if answer is None:
            raise ValueError(f"the {name} reward needs an `answer` column")
        return list(grader([_completion_text(c) for c in completions], list(answer)))

    reward_fn.__name__ = reward_fn.__qualname__ = f"{name}_reward_fn"
    return reward_fn


math_verify_reward_fn = _trl_wrapper(math_verify_reward, "math_verify")
boxed_reward_fn = _trl_wrapper(boxed_reward, "boxed")
last_number_reward_fn = _trl_wrapper(last_number_reward, "last_number")
_BUILTIN: dict[str, RewardFn] = {"math_verify": math_verify_reward_fn, "boxed": boxed_reward_fn,
                                 "last_number": last_number_reward_fn}  # fmt: skip


def resolve_reward(spec: str) -> RewardFn:
    """Map a reward spec to a TRL-style callable ``fn(prompts, completions, **columns) -> list[float | None]``.

    Args:
        spec: ``"math_verify"``, ``"boxed"``, ``"last_number"``, or a dotted path ``"package.module.function"`` /
            ``"package.module:function"``.

    Returns:
        The reward callable.

    Raises:
        ValueError: The spec is not a built-in name and does not resolve to an importable callable.
    """
    if spec in _BUILTIN:
        return _BUILTIN[spec]
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    try:
        if not (module_name and sep and attr):
            raise ImportError("not a dotted path")
        fn = getattr(importlib.import_module(module_name), attr)
        if not callable(fn):
            raise TypeError(f"{attr} is a {type(fn).__name__}, not callable")
    except Exception as e:
        raise ValueError(
            f"cannot resolve reward {spec!r} ({type(e).__name__}: {e}); set rollout.reward to math_verify, boxed, "
            "last_number, or an importable dotted path (package.module.function or package.module:function)"
        ) from e
    return fn


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_GradeTimeout` after ``seconds`` of wall time; a no-op outside the main thread."""
    global _DEADLINE_ACTIVE
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _GradeTimeout

    old_handler = signal.signal(signal.SIGALRM, handler)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start, _DEADLINE_ACTIVE = time.monotonic(), True
    try:
        yield
    finally:
        try:
            armed[0] = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            _DEADLINE_ACTIVE = False
            if outer > 0:  # re-arm a caller's pending timer
                signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


def _grade_one(fn: RewardFn, prompt: str, completion: str, answer: str, timeout_s: float) -> tuple[float, str | None]:
    """Call ``fn`` on one item under a deadline; return ``(reward, error)`` with reward 0.0 on any error."""
    try:
        with _deadline(timeout_s):
            out = fn(prompts=[prompt], completions=[completion], answer=[answer])
    except _GradeTimeout:
        return 0.0, f"timeout after {timeout_s}s"
    except Exception as e:
        return 0.0, f"{type(e).__name__}: {e}"[:300]
    if not isinstance(out, (list, tuple)) or len(out) != 1:
        return 0.0, f"reward returned non-number {type(out).__name__} (expected a one-element list)"
    value = out[0]
    if value is None:
        return 0.0, "reward returned None"
    if isinstance(value, str) or not (isinstance(value, numbers.Real) or hasattr(type(value), "__float__")):
        return 0.0, f"reward returned non-number {type(value).__name__}: {value!r}"[:300]
    try:
        value = float(value)
    except Exception as e:
        return 0.0, f"reward returned non-number {type(value).__name__} ({e})"[:300]
    return (value, None) if math.isfinite(value) else (0.0, f"reward returned non-finite {value}")


_WORKER_FNS: dict[str, RewardFn] = {}


def _worker_init(spec: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _WORKER_FNS[spec] = resolve_reward(spec)
        if spec == "math_verify":
            math_verify_reward(["$\\frac{1}{2}$"], ["0.5"])  # pay the first-parse cost before deadlines run
    except Exception:
        logger.exception("reward worker could not resolve %r", spec)


def _worker_ping() -> int:
    time.sleep(0.02)
    return os.getpid()


def _worker_grade(spec: str, timeout_s: float, items: list[tuple[str, str, str]]) -> list[tuple[float, str | None]]:
    try:
        fn = _WORKER_FNS.get(spec) or _WORKER_FNS.setdefault(spec, resolve_reward(spec))
    except ValueError as e:
        return [(0.0, f"ValueError: {e}"[:300])] * len(items)
    return [_grade_one(fn, p, c, a, timeout_s) for p, c, a in items]


_LIVE_SCORERS: weakref.WeakSet[RewardScorer] = weakref.WeakSet()
atexit.register(lambda: [s.close() for s in list(_LIVE_SCORERS)])


@dataclass
class ScoreResult:
    """Rewards of one batch; ``errors[i]`` is None when item ``i`` was graded, else why it scored 0.0."""

    rewards: list[float]
    errors: list[str | None]

    @property
    def num_errors(self) -> int:
        """Number of items that timed out or whose grader failed."""
        return sum(e is not None for e in self.errors)


class RewardScorer:
    """Grade (prompt, completion, answer) items one by one with a hard per-item deadline.

    With ``num_workers >= 1`` items go, in chunks, to a persistent pool of spawned worker processes (created on
    first use). Each item runs under a SIGALRM deadline inside the worker; the parent also enforces a wall-clock
    deadline per chunk and, when one is missed (an item ignored the alarm or killed its worker), terminates and
    recreates the pool, re-grades that chunk's items one by one and re-submits the other unfinished chunks.
    With ``num_workers == 0`` items are graded in the calling process, under SIGALRM in the main thread only.
    Timeouts and grader errors score 0.0 and are reported in :attr:`ScoreResult.errors`; the first error of each
    kind is also logged. As with any "spawn" pool, workers re-import the parent's ``__main__`` module, so keep a
    launch script's work under ``if __name__ == "__main__":``.

    Args:
        reward: A spec for :func:`resolve_reward`.
        timeout_s: Per-item wall-clock limit in seconds.
        num_workers: Worker processes; 0 grades in-process.
    """

    def __init__(self, reward: str = "math_verify", timeout_s: float = 5.0, num_workers: int = 2) -> None:
        if timeout_s <= 0 or num_workers < 0:
            raise ValueError(f"need timeout_s > 0 and num_workers >= 0, got {timeout_s} and {num_workers}")
        self.reward, self.timeout_s, self.num_workers = reward, float(timeout_s), int(num_workers)
        self._fn = resolve_reward(reward)  # fail fast on a bad spec
        self._pool: Any = None
        self._logged: set[str] = set()
        self._ids = itertools.count()
        _LIVE_SCORERS.add(self)

    def score(self, prompts: list[str], completions: list[str], answers: list[str]) -> ScoreResult:
        """Grade each item independently.

        Args:
            prompts: Prompt texts.
            completions: Completion texts, one per prompt.
            answers: Gold answers, one per prompt.

        Returns:
            Finite rewards and per-item errors (None when graded).
        """
        if not len(prompts) == len(completions) == len(answers):
            raise ValueError(
                f"length mismatch: {len(prompts)} prompts, {len(completions)} completions, {len(answers)} answers"
            )
        items = list(zip(prompts, completions, answers))
        if self.num_workers == 0:
            if threading.current_thread() is not threading.main_thread() and "no deadline" not in self._logged:
                self._logged.add("no deadline")
                logger.warning("RewardScorer(num_workers=0) outside the main thread grades without a timeout")
            graded = [_grade_one(self._fn, p, c, a, self.timeout_s) for p, c, a in items]
        else:
            graded = self._score_in_pool(items)
        for _, err in graded:
            kind = err.split(":")[0].split(" after")[0] if err else None
            if kind and kind not in self._logged:
                self._logged.add(kind)
                logger.warning("reward %r: %s (scored 0.0; later %r errors are only counted)", self.reward, err, kind)
        return ScoreResult([r for r, _ in graded], [e for _, e in graded])

    def _score_in_pool(self, items: list[tuple[str, str, str]]) -> list[tuple[float, str | None]]:
        results: list[tuple[float, str | None] | None] = [None] * len(items)
        size = max(1, min(_MAX_CHUNK, math.ceil(len(items) / self.num_workers)))
        todo = deque(list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size))
        while todo:
            pool, done = self._get_pool(), queue.SimpleQueue()
            inflight: dict[int, tuple[list[int], float]] = {}
            while todo or inflight:
                while todo and len(inflight) < self.num_workers:
                    idxs, cid = todo.popleft(), next(self._ids)
                    pool.apply_async(
                        _worker_grade,
                        (self.reward, self.timeout_s, [items[i] for i in idxs]),
                        callback=lambda r, cid=cid, put=done.put: put((cid, r)),
                        error_callback=lambda e, cid=cid, put=done.put: put((cid, e)),
                    )
                    inflight[cid] = (idxs, time.monotonic() + 1.1 * len(idxs) * self.timeout_s + 1.0)
                try:
                    cid, res = done.get(timeout=max(0.0, min(d for _, d in inflight.values()) - time.monotonic()))
                except queue.Empty:
                    now = time.monotonic()
                    for idxs, dl in inflight.values():
                        if dl > now:
                            todo.appendleft(idxs)  # innocent bystander: re-submit whole
                        elif len(idxs) == 1:
                            results[idxs[0]] = (0.0, f"timeout after {self.timeout_s}s (no result from worker)")
                        else:
                            todo.extendleft([i] for i in reversed(idxs))  # find the culprit one by one
                    self._terminate_pool()
                    break
                idxs, _ = inflight.pop(cid)
                for k, i in enumerate(idxs):
                    results[i] = (
                        (0.0, f"{type(res).__name__}: {res}"[:300]) if isinstance(res, BaseException) else res[k]
                    )
        return [r if r is not None else (0.0, "not graded") for r in results]

    def _get_pool(self) -> Any:
        if self._pool is None:
            pool = mp.get_context("spawn").Pool(self.num_workers, initializer=_worker_init, initargs=(self.reward,))
            seen: set[int] = set()
            limit = time.monotonic() + 120.0
            try:  # wait until every worker has started (imports, first parse) so deadlines measure grading only
                while len(seen) < self.num_workers:
                    pings = [pool.apply_async(_worker_ping) for _ in range(self.num_workers)]
                    seen.update(p.get(timeout=max(1.0, limit - time.monotonic())) for p in pings)
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool
        return self._pool

    def _terminate_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
            pool.join()

    def close(self) -> None:
        """Stop the worker processes (the scorer restarts them if used again)."""
        self._terminate_pool()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with suppress(Exception):
            self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"reward": self.reward, "timeout_s": self.timeout_s, "num_workers": self.num_workers}  # no pool

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
