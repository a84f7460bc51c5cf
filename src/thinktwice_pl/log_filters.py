"""Filters for the log lines of other libraries that have no cause of ours to fix, matched by how they start.

Used where each library is set up: the command (`thinktwice_pl.cli`) and the in-process vLLM engine
(`thinktwice_pl.rollout.vllm_startup`).
"""

from __future__ import annotations

import logging


class DropMessages(logging.Filter):
    """Drops the records whose message starts with one of `starts`."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


class DemoteMessages(logging.Filter):
    """Lowers to INFO a warning or error whose message starts with one of `starts`: the handler's level then decides
    whether it is shown."""

    def __init__(self, *starts: str) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO and record.getMessage().startswith(self.starts):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
