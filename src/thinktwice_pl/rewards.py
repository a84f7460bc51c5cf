"""Reward callables and a scorer that never hangs or crashes training (METHOD.md section 5).

The graders live in :mod:`thinktwice_pl.paper_grader` and :mod:`thinktwice_pl.graders` and are re-exported
here: :func:`boxed_reward` (``boxed``, the paper's last-box grader, used by the paper recipes),
:func:`math_verify_reward` (``math_verify``, the default, for small models that never box) and
:func:`last_number_reward` (``last_number``, the last number written, for plain numeric answers). Reward callables
follow the TRL contract ``fn(prompts, completions, **columns) -> list[float | None]`` with the gold answers in
``columns["answer"]``;
:func:`resolve_reward` maps a config string to one. :class:`RewardScorer` grades item by item under a per-item
deadline, in spawned worker processes or in the calling process.

This module imports neither torch nor vLLM; math-verify and SymPy are imported lazily.
"""

from __future__ import annotations

import atexit
import importlib
import itertools
import logging
import math
import multiprocessing as mp
import numbers
import os
import queue
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from thinktwice_pl.errors import UserError
from thinktwice_pl.graders import extract_last_boxed, last_number_reward, math_verify_reward
from thinktwice_pl.paper_grader import boxed_reward

__all__ = [
    "RewardScorer",
    "ScoreResult",
    "boxed_reward",
    "boxed_reward_fn",
    "extract_last_boxed",
    "last_number_reward",
    "last_number_reward_fn",
    "math_verify_reward",
    "math_verify_reward_fn",
    "resolve_reward",
]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[Any]]
_MAX_CHUNK = 8  # items per worker task; bounds the wait when an item ignores the in-worker alarm


class _GradeTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so that graders' ``except Exception`` cannot swallow it."""


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
_BUILTIN: dict[str, RewardFn] = {
    "math_verify": math_verify_reward_fn,
    "boxed": boxed_reward_fn,
    "last_number": last_number_reward_fn,
}


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
        raise UserError(
            f"cannot resolve reward {spec!r} ({type(e).__name__}: {e}); set rollout.reward to math_verify, boxed, "
            "last_number, or an importable dotted path (package.module.function or package.module:function)"
        ) from e
    return fn  # type: ignore[no-any-return]  # checked callable above


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_GradeTimeout` after ``seconds`` of wall time; a no-op outside the main thread."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = [True]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            raise _GradeTimeout

    old_handler = signal.signal(signal.SIGALRM, handler)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        try:
            armed[0] = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
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
# One item per built-in grader that reaches its slow first-use path (math-verify's first LaTeX parse; SymPy's
# import, parse and simplify), graded at worker start so that the deadlines measure grading only.
_WARM_UP: dict[str, tuple[Callable[[list[str], list[str]], list[float]], str, str]] = {
    "math_verify": (math_verify_reward, "$\\frac{1}{2}$", "0.5"),
    "boxed": (boxed_reward, "\\boxed{1.5}", "\\frac{3}{2}"),
}


def _worker_init(spec: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _WORKER_FNS[spec] = resolve_reward(spec)
        if spec in _WARM_UP:
            grader, completion, answer = _WARM_UP[spec]
            grader([completion], [answer])
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


@atexit.register
def _close_live_scorers() -> None:
    for scorer in list(_LIVE_SCORERS):
        scorer.close()


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
            raise UserError(f"need timeout_s > 0 and num_workers >= 0, got {timeout_s} and {num_workers}")
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

    def score_named(self, segments: dict[str, tuple[list[str], list[str], list[str]]]) -> dict[str, ScoreResult]:
        """Grade several named lists of ``(prompts, completions, answers)`` in one pass over the worker pool.

        Returns:
            One `ScoreResult` per name.
        """
        prompts, completions, answers = ([item for seg in segments.values() for item in seg[k]] for k in range(3))
        scored = self.score(prompts, completions, answers)
        out, start = {}, 0
        for name, (seg_prompts, _, _) in segments.items():
            end = start + len(seg_prompts)
            out[name] = ScoreResult(scored.rewards[start:end], scored.errors[start:end])
            start = end
        return out

    def _score_in_pool(self, items: list[tuple[str, str, str]]) -> list[tuple[float, str | None]]:
        results: list[tuple[float, str | None] | None] = [None] * len(items)
        size = max(1, min(_MAX_CHUNK, math.ceil(len(items) / self.num_workers)))
        todo = deque(list(range(i, min(i + size, len(items)))) for i in range(0, len(items), size))
        while todo:
            pool = self._get_pool()
            done: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
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
