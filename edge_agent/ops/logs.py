"""Log rate limiting: a bad camera or a broken disk must not write a line per frame.

A filter on the log handler lets through at most `burst` records of one kind (the same
logger, level and message template, whatever the arguments) per `window_s`; the rest are
counted, and the first record of that kind after the window says how many were suppressed.
The journal then keeps the first occurrences and a count instead of gigabytes of repeats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

BURST = 10
WINDOW_S = 60.0
MAX_KINDS = 1024  # distinct templates tracked; a bound, not a design limit


@dataclass
class _Kind:
    window_start: float
    passed: int = 0
    suppressed: int = 0


class RateLimit(logging.Filter):
    def __init__(
        self,
        burst: int = BURST,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst, self.window_s, self.clock = burst, window_s, clock
        self._kinds: dict[tuple[str, int, str], _Kind] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        kind = self._kinds.get(key)
        if kind is None or now - kind.window_start >= self.window_s:
            suppressed = kind.suppressed if kind else 0
            if kind is None and len(self._kinds) >= MAX_KINDS:
                self._kinds.clear()
            kind = self._kinds[key] = _Kind(now)
            if suppressed:
                record.msg = f"{record.msg} [{suppressed} similar message(s) suppressed]"
        if kind.passed < self.burst:
            kind.passed += 1
            return True
        kind.suppressed += 1
        return False


def setup(level: int) -> None:
    """The process's logging: one line per record on stderr, rate-limited. Leaves logging
    alone where the host already set it up (a test runner, an embedding program), as
    logging.basicConfig does."""
    root = logging.getLogger()
    root.setLevel(level)
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RateLimit())
    handler.addFilter(_quiet_libraries)
    root.addHandler(handler)


def _quiet_libraries(record: logging.LogRecord) -> bool:
    """Other libraries' INFO lines (faiss's loader: eight lines on every start) only with -v."""
    return (
        record.levelno >= logging.WARNING
        or record.name.startswith("edge_agent")
        or logging.getLogger().isEnabledFor(logging.DEBUG)
    )
