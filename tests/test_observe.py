"""
The audit log's batched writes, the request event, the latency histogram,
and the lazy deadline every connection re-arms per unit it reads.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, Logger, LogPublisher
from twisted.python import threadable
from twisted.trial.unittest import SynchronousTestCase

from tentacle import events
from tentacle.halibut.deadline import Deadline
from tentacle.halibut.rpc import CallContext
from tentacle.halibut.serializer import RequestMessage, ResponseMessage
from tentacle.metrics import LATENCY_BUCKETS, Metrics
from tentacle.observe import AUDIT_FLUSH_INTERVAL, AgentObserver, AuditLog, ObservedHandler


def served(peer: str = "127.0.0.1:1") -> dict[str, object]:
    return {"event": events.REQUEST_SERVED, "log_time": 1.5, "peer": peer, "service": "S", "method": "M",
            "outcome": "ok", "duration": 0.1234567891}


class AuditLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # As in the reactor thread, where the agent's events come from.
        self.patch(threadable, "ioThread", threading.get_ident())

    def entries(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def test_written_within_the_interval(self) -> None:
        """
        Entries wait in memory, then go to the file together once the
        flush interval has passed since the first of them.
        """
        audit = AuditLog(str(self.path), clock=self.clock)
        self.addCleanup(audit.close)
        audit.record("request", served("a"))
        self.clock.advance(AUDIT_FLUSH_INTERVAL / 2)
        audit.record("request", served("b"))
        self.assertEqual(self.path.read_text(), "")
        self.clock.advance(AUDIT_FLUSH_INTERVAL / 2)
        self.assertEqual([e["peer"] for e in self.entries()], ["a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_the_entry(self) -> None:
        """
        Time (from the event), kind, then the event's audited fields; the
        duration rounded to microseconds.
        """
        audit = AuditLog(str(self.path), clock=self.clock)
        audit.record("request", dict(served(), request_id="not audited", error=None))
        audit.close()
        self.assertEqual(
            self.path.read_text(),
            '{"time": "1970-01-01T00:00:01.500000+00:00", "kind": "request", "peer": "127.0.0.1:1", '
            '"service": "S", "method": "M", "outcome": "ok", "duration": 0.123457}\n',
        )

    def test_close_writes_what_waits(self) -> None:
        """
        A clean stop loses nothing: closing writes every waiting entry and
        leaves no timer behind.
        """
        audit = AuditLog(str(self.path), clock=self.clock)
        for n in range(3):
            audit.record("request", served(str(n)))
        audit.close()
        self.assertEqual([e["peer"] for e in self.entries()], ["0", "1", "2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush(self) -> None:
        audit = AuditLog(str(self.path), clock=self.clock)
        self.addCleanup(audit.close)
        audit.record("request", served())
        audit.flush()
        self.assertEqual(len(self.entries()), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_at_most_max_pending_wait(self) -> None:
        """
        However busy the agent, no more than C{max_pending} entries wait.
        """
        audit = AuditLog(str(self.path), clock=self.clock, max_pending=3)
        self.addCleanup(audit.close)
        for n in range(7):
            audit.record("request", served(str(n)))
        self.assertEqual([e["peer"] for e in self.entries()], ["0", "1", "2", "3", "4", "5"])

    def test_without_clock_or_interval_each_entry_at_once(self) -> None:
        for make in (lambda: AuditLog(str(self.path)), lambda: AuditLog(str(self.path), clock=self.clock, flush_interval=0)):
            audit = make()
            self.addCleanup(audit.close)
            audit.record("request", served())
            self.assertEqual(len(self.entries()), 1)
            self.assertEqual(self.clock.getDelayedCalls(), [])
            audit.close()
            self.path.unlink()

    def test_from_another_thread_at_once(self) -> None:
        """
        An entry from outside the reactor thread cannot set a timer: it is
        written at once, with any that wait.
        """
        audit = AuditLog(str(self.path), clock=self.clock)
        self.addCleanup(audit.close)
        audit.record("request", served("reactor"))
        self.patch(threadable, "ioThread", object())
        audit.record("request", served("thread"))
        self.assertEqual([e["peer"] for e in self.entries()], ["reactor", "thread"])

    def test_a_failed_write_is_logged(self) -> None:
        """
        Entries that cannot be written are counted in an error line.
        """
        audit = AuditLog(str(self.path), clock=self.clock)
        self.addCleanup(audit.close)

        def broken(data: str) -> None:
            raise OSError(28, "No space left on device")

        self.patch(audit._file, "write", broken)
        logged: list[dict[str, object]] = []
        from tentacle import observe

        self.patch(observe, "log", Logger(observer=logged.append))
        audit.record("request", served())
        audit.record("request", served())
        self.clock.advance(AUDIT_FLUSH_INTERVAL)
        [error] = logged
        self.assertEqual((error["log_level"], error["count"]), (LogLevel.error, 2))
        self.assertIn("No space left", str(error["error"]))


class RequestEventTests(SynchronousTestCase):
    def test_the_event(self) -> None:
        """
        One debug event per answer, as C{Logger.debug} would make it, with
        the request's summary; the agent's observer counts and audits it.
        """
        clock = Clock()
        publisher = LogPublisher()
        seen: list[dict[str, object]] = []
        publisher.addObserver(seen.append)
        metrics = Metrics()
        publisher.addObserver(AgentObserver(metrics))

        class Handler:
            def sink_for(self, request: object, stream: object) -> None:
                return None

            def handle(self, request: RequestMessage, context: object) -> Deferred[ResponseMessage]:
                clock.advance(0.25)
                return succeed(ResponseMessage(request.id, result="done"))

        log = Logger(namespace="tentacle.requests", observer=publisher, source=self)
        handler = ObservedHandler(
            Handler(), clock, log, address="a:1", thumbprint="T",
            summarize=lambda request: {"ticket": "t1"},
        )
        request = RequestMessage("id-1", uuid.uuid4(), "IScriptServiceV2", "GetStatus", ("x",))
        context = CallContext(None, request)
        response = self.successResultOf(handler.handle(request, context))
        self.assertEqual(response.result, "done")
        clock.advance(5)  # sending the answer: not part of the duration
        self.assertEqual(seen, [])  # not before the answer is on its way
        for then in context.answered:
            then()
        [event] = seen
        self.assertEqual(
            {k: event[k] for k in ("log_level", "log_namespace", "log_logger", "log_source", "event", "peer",
                                   "thumbprint", "service", "method", "outcome", "error", "duration",
                                   "request_id", "ticket")},
            {"log_level": LogLevel.debug, "log_namespace": "tentacle.requests", "log_logger": log,
             "log_source": self, "event": events.REQUEST_SERVED, "peer": "a:1", "thumbprint": "T",
             "service": "IScriptServiceV2", "method": "GetStatus", "outcome": "ok", "error": None,
             "duration": 0.25, "request_id": "id-1", "ticket": "t1"},
        )
        from twisted.logger import formatEvent

        self.assertEqual(formatEvent(event), "IScriptServiceV2.GetStatus for T at a:1: ok in 0.250 s")
        self.assertEqual(dict(metrics.requests), {("IScriptServiceV2", "GetStatus", "ok"): 1})


class LatencyHistogramTests(SynchronousTestCase):
    def test_cumulative_buckets(self) -> None:
        """
        Each bucket counts the observations at or below its bound.
        """
        metrics = Metrics()
        samples = [0.0, 0.005, 0.0051, 0.3, 300.0, 301.0, float("nan")]
        for seconds in samples:
            metrics.observe_latency(seconds)
        text = metrics.render()
        for bound in LATENCY_BUCKETS:
            expected = sum(1 for s in samples if s <= bound)
            self.assertIn(f'tentacle_request_duration_seconds_bucket{{le="{bound!r}"}} {expected}\n', text)
        self.assertIn('tentacle_request_duration_seconds_bucket{le="+Inf"} 7\n', text)


class DeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.expired: list[float] = []
        self.deadline = Deadline(self.clock, lambda: self.expired.append(self.clock.seconds()))

    def test_expires(self) -> None:
        self.deadline.arm(10)
        self.clock.advance(9.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [10])
        self.assertFalse(self.deadline.armed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rearm_later_takes_no_new_timer(self) -> None:
        """
        Arming for later keeps the timer; when it goes off early it waits
        for the rest.
        """
        self.deadline.arm(10)
        [call] = self.clock.getDelayedCalls()
        self.clock.advance(5)
        self.deadline.arm(10)
        self.assertEqual(self.clock.getDelayedCalls(), [call])
        self.clock.advance(5)
        self.assertEqual(self.expired, [])
        self.clock.advance(4.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.expired, [15])

    def test_rearm_sooner(self) -> None:
        self.deadline.arm(600)
        self.deadline.arm(60)
        self.clock.advance(60)
        self.assertEqual(self.expired, [60])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pause(self) -> None:
        """
        A paused deadline does not expire; its timer, reused by the next
        arming, goes off harmlessly.
        """
        self.deadline.arm(10)
        self.deadline.pause()
        self.assertFalse(self.deadline.armed)
        self.clock.advance(10)
        self.assertEqual(self.expired, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.deadline.arm(10)
        self.deadline.pause()
        self.clock.advance(5)
        self.deadline.arm(10)
        self.clock.advance(10)
        self.assertEqual(self.expired, [25])

    def test_cancel_drops_the_timer(self) -> None:
        self.deadline.arm(10)
        self.deadline.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.expired, [])
