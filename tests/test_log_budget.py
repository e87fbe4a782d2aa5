"""
L{tentacle.log_budget}: a flood of connections that never authenticate
writes a bounded number of log lines, and every one is still counted.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogEvent, LogLevel, LogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tentacle.log_budget import SOURCES_COUNTED, LineBudget


class Budget:
    """
    A budget logging to its own publisher, on a fake clock.
    """

    def __init__(self, lines: int = 3, window: float = 10.0) -> None:
        self.clock = Clock()
        self.events: list[LogEvent] = []
        publisher = LogPublisher(self.events.append)
        self.budget = LineBudget(self.clock, Logger(observer=publisher), lines=lines, window=window)

    def line(self, kind: str = "connections evicted", source: str | None = "192.0.2.1", **fields: Any) -> None:
        self.budget.emit(kind, LogLevel.warn, "evicted {peer}", source=source, peer=f"{source}:1", event="e", **fields)

    def at(self, level: LogLevel) -> list[LogEvent]:
        return [e for e in self.events if e["log_level"] is level and "peer" in e]

    def summaries(self) -> list[LogEvent]:
        return [e for e in self.events if "held_back" in e]


class LineBudgetTests(SynchronousTestCase):
    def test_the_first_lines_of_a_window_are_written_the_rest_at_debug(self) -> None:
        b = Budget(lines=3)
        for _ in range(10):
            b.line()
        self.assertEqual(len(b.at(LogLevel.warn)), 3)
        self.assertEqual(len(b.at(LogLevel.debug)), 7)
        # Every event still carries its fields, for the metrics and audit.
        self.assertEqual({e["event"] for e in b.at(LogLevel.debug)}, {"e"})
        self.assertEqual(b.summaries(), [])

    def test_one_summary_when_the_window_ends(self) -> None:
        b = Budget(lines=3)
        for _ in range(10):
            b.line()
        b.clock.advance(9.9)
        self.assertEqual(b.summaries(), [])
        b.clock.advance(0.1)
        [summary] = b.summaries()
        self.assertEqual((summary["held_back"], summary["kind"], summary["log_level"]),
                         (7, "connections evicted", LogLevel.warn))
        self.assertEqual(b.clock.getDelayedCalls(), [])

    def test_a_new_window_has_its_whole_budget_again(self) -> None:
        b = Budget(lines=2)
        for _ in range(5):
            b.line()
        b.clock.advance(10)
        for _ in range(5):
            b.line()
        self.assertEqual(len(b.at(LogLevel.warn)), 4)
        self.assertEqual(len(b.at(LogLevel.debug)), 6)
        b.clock.advance(10)
        self.assertEqual([s["held_back"] for s in b.summaries()], [3, 3])

    def test_kinds_have_budgets_of_their_own(self) -> None:
        b = Budget(lines=1)
        for _ in range(3):
            b.line("connections evicted")
            b.line("clients refused")
        self.assertEqual(len(b.at(LogLevel.warn)), 2)
        b.clock.advance(10)
        self.assertEqual(sorted((s["kind"], s["held_back"]) for s in b.summaries()),
                         [("clients refused", 2), ("connections evicted", 2)])

    def test_zero_lines_writes_only_the_summary(self) -> None:
        b = Budget(lines=0)
        for _ in range(4):
            b.line()
        self.assertEqual(len(b.at(LogLevel.warn)), 0)
        b.clock.advance(10)
        self.assertEqual([s["held_back"] for s in b.summaries()], [4])

    def test_stop_says_what_is_held_and_leaves_no_timer(self) -> None:
        b = Budget(lines=1)
        for _ in range(3):
            b.line()
        b.budget.stop()
        self.assertEqual([s["held_back"] for s in b.summaries()], [2])
        self.assertEqual(b.clock.getDelayedCalls(), [])
        b.budget.stop()
        self.assertEqual(len(b.summaries()), 1)

    def test_the_summary_names_the_busiest_sources(self) -> None:
        b = Budget(lines=1)
        for source, n in [("198.51.100.1", 5), ("203.0.113.9", 9), ("192.0.2.4", 2), ("192.0.2.5", 1), (None, 1)]:
            for _ in range(n):
                b.line(source=source)
        b.clock.advance(10)
        [summary] = b.summaries()
        self.assertEqual(summary["held_back"], 17)
        self.assertEqual(summary["sources"], {"203.0.113.9": 9, "198.51.100.1": 4, "192.0.2.4": 2})  # the first line was written
        self.assertIn("from 203.0.113.9 (9), 198.51.100.1 (4), 192.0.2.4 (2), others (2)", formatEvent(summary))

    def test_sources_counted_are_bounded(self) -> None:
        b = Budget(lines=0)
        for n in range(SOURCES_COUNTED + 500):
            b.line(source=f"10.0.{n // 256}.{n % 256}")
        b.line(source="10.0.0.0")  # counted already: still tallied
        self.assertEqual(len(b.budget._sources["connections evicted"]), SOURCES_COUNTED)
        b.clock.advance(10)
        [summary] = b.summaries()
        self.assertEqual(summary["held_back"], SOURCES_COUNTED + 501)
        self.assertEqual(summary["sources"]["10.0.0.0"], 2)
        self.assertEqual(b.budget._sources, {})

    def test_a_quiet_window_writes_nothing_more(self) -> None:
        b = Budget(lines=3)
        b.line()
        b.clock.advance(30)
        self.assertEqual(b.summaries(), [])
        self.assertEqual(b.clock.getDelayedCalls(), [])
