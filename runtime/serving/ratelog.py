"""Rate-limited logging of things clients can trigger (undecodable or oversize requests, refused
credentials) and of internal errors: a flood of bad requests must not become a flood of log.

    RATE = RateLimitedLog(logging.getLogger("uwrt.server"))
    RATE.log("undecodable", logging.INFO, "undecodable request from %s", peer)

Per `kind`, at most `burst` lines per `interval_s`; the lines dropped meanwhile are counted and
reported by one line ("suppressed K similar 'kind' messages in the last S s") when the interval
ends: a timer on the running event loop (set by the first line dropped in an interval), else
when the kind next logs after its interval, and at `flush()` (the server calls it at shutdown).
So a flood is always reported within `interval_s`, even if it stops and nothing follows. Client errors are
logged without a traceback; internal errors keep theirs (`exc_info`), rate-limited the same way.
`counts()` gives the totals per kind, suppressed included (for GetModelInfo).

Thread safety: call from the event loop's thread (one instance per server).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RateLimitedLog"]


@dataclass(slots=True)
class _Window:
    start: float
    lines: int = 0
    suppressed: int = 0
    total: int = 0


class RateLimitedLog:
    """At most `burst` lines per `interval_s` per kind; the rest are counted and summarised."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, kind: str, level: int, msg: str, *args: object, exc_info: BaseException | None = None) -> bool:
        """Log `msg % args` unless `kind` used up its lines this interval. True if logged."""
        now = self.clock()
        w = self._windows.get(kind)
        if w is None:
            w = self._windows[kind] = _Window(now)
        elif now - w.start >= self.interval_s:
            self._summary(kind, w, now)
            w.start, w.lines = now, 0
        w.total += 1
        if w.lines >= self.burst:
            w.suppressed += 1
            if w.suppressed == 1:
                self._schedule(kind, max(0.0, w.start + self.interval_s - now))
            return False
        w.lines += 1
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def _schedule(self, kind: str, delay_s: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:        # no loop (tools, tests): the next line of this kind or flush() reports
            return
        loop.call_later(delay_s, self._due, kind)

    def _due(self, kind: str) -> None:
        """The interval in which `kind` dropped lines has ended: report them, start a new one."""
        w = self._windows.get(kind)
        if w is None or not w.suppressed:       # already reported (a later line or flush())
            return
        now = self.clock()
        self._summary(kind, w, now)
        w.start, w.lines = now, 0

    def _summary(self, kind: str, w: _Window, now: float) -> None:
        if w.suppressed:
            self.logger.warning("suppressed %d similar %r messages in the last %.0f s", w.suppressed, kind,
                                now - w.start)
            w.suppressed = 0

    def flush(self) -> None:
        """Report every kind's suppressed lines now."""
        now = self.clock()
        for kind, w in self._windows.items():
            self._summary(kind, w, now)

    def counts(self) -> dict[str, int]:
        """Events per kind since start (logged or suppressed)."""
        return {k: w.total for k, w in self._windows.items()}
