"""Errors a user can fix, and how the ``thinktwice`` command reports failures.

`UserError` marks a mistake in the input (config values, incompatible flags, data rows, paths, the model, a missing
extra) whose message names the input and the fix. ``thinktwice`` prints such an error as one line on stderr and
exits with code 2; any other exception is a bug and keeps its traceback (exit code 1). ``--debug`` (or
``THINKTWICE_DEBUG=1``) prints the traceback of every error.

Notes added to an exception (`add_note`: the crash checkpoint and the command that resumes from it) are printed
after the error, so the last line a user sees is what to run next.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, TextIO

DEBUG_ENV = "THINKTWICE_DEBUG"


class UserError(ValueError):
    """An error in the user's input that the user can fix; its message names the input and the fix."""


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra (or pip command) that installs it."""


class OutOfMemoryInPhase(UserError):
    """A phase's forward/backward (or generation) ran out of memory; the message names the phase, its sequences
    and the settings that lower the memory it needs."""


def user_error_in(error: BaseException) -> BaseException | None:
    """The user-fixable error behind `error`: itself, or one it was raised from (jsonargparse and Lightning wrap
    the errors of the classes they instantiate). Lightning's ``MisconfigurationException`` counts as one."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError | MissingExtraError | MisconfigurationException):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` (Python 3.11+), or its equivalent on 3.10 (printed by `report`)."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # pragma: no cover - Python 3.10
        error.__notes__ = [*getattr(error, "__notes__", []), note]  # type: ignore[attr-defined]


def notes_of(error: BaseException | None) -> list[str]:
    """The notes of `error` and of the exceptions it was raised from or during (outermost first)."""
    notes: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        notes += [n for n in getattr(error, "__notes__", []) if n not in notes]
        error = error.__cause__ or error.__context__
    return notes


def report(error: BaseException, *, debug: bool, stream: TextIO | None = None) -> int:
    """Print `error` for a user and return the exit code: a user error as ``error: <message>`` (2), anything else
    with its traceback (1); the notes (crash checkpoint, resume command) last."""
    stream = stream if stream is not None else sys.stderr
    found = user_error_in(error)
    notes = notes_of(error)
    if found is not None and not debug:
        print(f"error: {found}", file=stream)
        code = 2
    else:
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        text = "".join(lines)
        print(_without_notes(text, notes), end="", file=stream)
        code = 2 if found is not None else 1
    for note in notes:
        print(note, file=stream)
    stream.flush()
    return code


def _without_notes(text: str, notes: list[str]) -> str:
    """A formatted traceback without the notes (Python 3.11+ prints them inside; `report` prints them last)."""
    for note in notes:
        text = text.replace(note + "\n", "")
    return text


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA out-of-memory error and for a failed CPU allocation (``DefaultCPUAllocator: can't allocate
    memory``, ``not enough memory``)."""
    import torch

    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    message = str(error) if isinstance(error, RuntimeError) else ""
    return any(s in message for s in ("can't allocate memory", "not enough memory", "CUDA out of memory"))


def describe(value: Any) -> str:
    """A config value as a user would type it (``null`` for None, lower-case booleans)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def out_of_memory_message(
    where: str, sizes: list[tuple[int, int]], phase_sequences: int, world_size: int, hparams: dict[str, Any]
) -> str:
    """The message of an out-of-memory error in a forward/backward pass: where (``"phase 3 (refine)"``), the pass's
    ``(prompt, completion)`` token counts, how many sequences the phase has, and the model settings that help."""
    prompt, completion = max(sizes, key=sum)
    padded = len(sizes) * (max(p for p, _ in sizes) + max(c for _, c in sizes))
    share = " (this rank's share)" if world_size > 1 else ""
    fixes = [
        f"{'set' if hparams.get(name) is None else 'lower'} model.{name} (now {describe(hparams.get(name))})"
        for name in ("max_tokens_per_microbatch", "micro_batch_size")
    ]
    if not hparams.get("gradient_checkpointing"):
        fixes.append("set model.gradient_checkpointing=true")
    fixes.append(f"shorten rollout.max_completion_length (now {hparams.get('max_completion_length')})")
    return (
        f"out of memory in {where}, in a forward/backward pass of {len(sizes)} of the phase's {phase_sequences} "
        f"sequences{share} ({padded} padded tokens; the longest {prompt + completion} tokens: {prompt} prompt + "
        f"{completion} completion): {', '.join(fixes[:-1])}, or {fixes[-1]}"
    )
