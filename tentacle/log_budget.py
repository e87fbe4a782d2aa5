"""
Keep a flood of unauthenticated connections from flooding the log too.

Each connection that never proves itself ends with a line: cut off silent,
timed out in its handshake, failed TLS, sent an empty or over-long first
request, evicted to make room, refused for want of places, or refused for
its certificate.  (A trusted server's handshake timeout is not among them.)  At a flood's rate (thousands a
second in C{tests/e2e/test_hostile_floods.py}) those lines would rotate the
whole log away within minutes, and the lines that matter with it.

So each kind of line has a budget per window (C{connection-log-lines}, 20,
per 10 s): the first lines of a window are written as always; the rest are
still emitted, at debug level, so the metrics count every one (and the audit
log still records every refusal), and when the window ends one line says how
many of each kind were held back.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel

#: Lines of one kind written per window (C{connection-log-lines}).
DEFAULT_LINES = 20
#: The window, in seconds.
WINDOW = 10.0
#: Source addresses a summary names, the busiest first.
SOURCES_NAMED = 3
#: Distinct source addresses counted per kind and window; beyond them the
#: lines are counted under "others", so a flood from a million addresses
#: costs no more memory than one from a thousand.
SOURCES_COUNTED = 1000


class LineBudget:
    """
    How many lines of each kind the log takes per window.

    @param log: where the summaries go (the agent's own publisher).
    @param lines: lines of one kind written per window; C{0} writes only
        the summaries.
    """

    def __init__(
        self, clock: IReactorTime, log: Logger, lines: int = DEFAULT_LINES, window: float = WINDOW
    ) -> None:
        self.clock = clock
        self.log = log
        self.lines = lines
        self.window = window
        self._window_end: float | None = None
        self._written: Counter[str] = Counter()
        self._held: Counter[str] = Counter()
        self._sources: dict[str, Counter[str]] = {}
        self._summary: IDelayedCall | None = None

    def level(self, kind: str, level: LogLevel, source: str | None = None) -> LogLevel:
        """
        The level to emit one line of C{kind} at: C{level} while the
        window's budget lasts, C{debug} after it.

        @param source: the peer's address, tallied for the summary.
        """
        now = self.clock.seconds()
        if self._window_end is None or now >= self._window_end:
            self._close_window()
            self._window_end = now + self.window
        if self._written[kind] < self.lines:
            self._written[kind] += 1
            return level
        self._held[kind] += 1
        if source is not None:
            sources = self._sources.setdefault(kind, Counter())
            if source in sources or len(sources) < SOURCES_COUNTED:
                sources[source] += 1
        if self._summary is None:
            self._summary = self.clock.callLater(max(self._window_end - now, 0.0), self._window_over)
        return LogLevel.debug

    def emit(self, kind: str, level: LogLevel, format: str, source: str | None = None, **fields: Any) -> None:
        """
        C{log.emit(level, format, **fields)}, within the budget of C{kind}.

        @param source: the peer's address (not its port), so the summary can
            say where a flood came from.
        """
        self.log.emit(self.level(kind, level, source), format, **fields)

    def stop(self) -> None:
        """
        Say what is held back now, and schedule nothing more.
        """
        self._close_window()
        self._window_end = None

    def _window_over(self) -> None:
        self._summary = None
        self._close_window()
        self._window_end = None

    def _close_window(self) -> None:
        if self._summary is not None:
            if self._summary.active():
                self._summary.cancel()
            self._summary = None
        for kind, count in sorted(self._held.items()):
            sources = self._sources.get(kind, Counter())
            busiest = sources.most_common(SOURCES_NAMED)
            named = ", ".join(f"{address} ({n})" for address, n in busiest)
            others = count - sum(n for _, n in busiest)
            if named and others:
                named += f", others ({others})"
            self.log.warn(
                "Held back {count} more log line(s) of {kind} in the last {window:g} s "
                "(after {lines}){from_}; the metrics count every one",
                count=count,
                kind=kind,
                window=self.window,
                lines=self.lines,
                held_back=count,
                from_=f", from {named}" if named else "",
                sources=dict(busiest),
            )
        self._held.clear()
        self._written.clear()
        self._sources.clear()
