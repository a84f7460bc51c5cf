"""Custom TRL-style reward functions for tests/test_rewards.py, importable by dotted path in spawned workers.

pytest puts ``tests/`` on ``sys.path`` and spawned workers inherit the parent's ``sys.path``, so
``reward_helpers.marker_reward`` resolves in both.
"""

from __future__ import annotations

import os
import signal
import time


def marker_reward(prompts: list[str], completions: list[str], answer: list[str], **kwargs: object) -> list[object]:
    """Misbehave according to a marker in the completion, else 1.0 iff completion == f"{prompt}={answer}"."""
    (prompt,), (completion,), (gold,) = prompts, completions, answer
    if "SLEEP" in completion:  # interruptible hang: the in-worker / in-process alarm stops it
        time.sleep(3600)
    if "STUBBORN" in completion:  # ignores SIGALRM: only the parent's deadline (pool restart) stops it
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        time.sleep(3600)
    if "CRASH" in completion:  # kills the worker process
        os._exit(3)
    if "RAISE" in completion:
        raise ValueError("bad completion")
    if "NONE" in completion:
        return [None]
    if "NAN" in completion:
        return [float("nan")]
    if "STR" in completion:
        return ["1.0"]
    if "BOOL" in completion:
        return [True]
    return [1.0 if completion == f"{prompt}={gold}" else 0.0]
