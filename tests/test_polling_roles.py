"""
The roles that dial or poll, in memory: the subscriber's, the polling
server's and the listening client's exact control sequences, their
timeouts, the pending-request queue, and the reconnect pacing; bytes in,
bytes out, fake clock.  (The listening service is in C{test_roles.py}.)

Mirrors Halibut's ProtocolFixture (ShouldExchangeAsClient,
ShouldExchangeAsSubscriber, ShouldExchangeAsServerOfSubscriberAsync),
PollingQueueTimeouts, PendingRequestQueueFixture and RetryPolicy tests.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import tentacle_registry
from tentacle.dialer import ReconnectDelay
from tentacle.dispatch import Dispatcher
from tentacle.halibut import bson
from tentacle.halibut.connection import ExchangeSettings, HalibutConnection, TimedOut
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.roles import ServerOfSubscriber, PollingSubscriber
from tentacle.halibut.rpc import PendingRequest
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, decode_message, encode_message
from tentacle.hub.queues import NotCollected, PollingQueues, WrongAgent
from tests.support import LogCapture
from tests.test_roles import SERVICE, Things
from tests.wire_client import request

SUBSCRIPTION = "poll://abcdefghjkmnpqrstuvw/"
NULL_ENVELOPE_BSON = bytes.fromhex("0e0000000a4d6573736167650000")


def envelope(message: Any) -> bytes:
    data, _ = encode_message(message)
    return compress(data)


def messages(data: bytes, kind: type) -> tuple[list[Any], bytes]:
    """
    The envelopes at the start of C{data}, and what follows them.
    """
    found = []
    while data and not data.startswith((b"NEXT", b"PROCEED", b"END", b"MX")):
        inflater = Inflater()
        payload = inflater.feed(data)
        assert payload is not None, "incomplete envelope"
        message, _ = decode_message(payload, tentacle_registry(), expected=kind)
        found.append(message)
        data = inflater.unused
    return found, data


class Wire:
    """
    One connection over a StringTransport, driven by hand.
    """

    def __init__(self, role: Any, clock: Clock, settings: ExchangeSettings = ExchangeSettings()) -> None:
        self.connection = HalibutConnection(clock, tentacle_registry(), settings, role=role, label="test")
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.connection.dataReceived(data)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def answering() -> Dispatcher:
    dispatcher = Dispatcher()
    dispatcher.register(SERVICE, Things())
    return dispatcher


class SubscriberTests(SynchronousTestCase):
    """
    The agent's side: it dialled, it announces its subscription, it answers.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.clock = Clock()
        self.role = PollingSubscriber(answering(), SUBSCRIPTION)
        self.wire = Wire(self.role, self.clock)

    def identify(self) -> None:
        self.assertEqual(self.wire.take(), b"MX\r\n\r\nMX-SUBSCRIBER 1.0 " + SUBSCRIPTION.encode() + b"\r\n\r\n")
        self.wire.send(b"MX-SERVER 1.0\r\n\r\n")
        self.assertTrue(self.role.identified.called)

    def test_exchange_as_subscriber(self) -> None:
        self.identify()
        # The server's keep-alive: no response, just NEXT.
        self.wire.send(envelope(None))
        self.assertEqual(self.wire.take(), b"NEXT\r\n")
        self.wire.send(b"PROCEED\r\n")
        asked = request("IThingService", "Echo", "polled")
        self.wire.send(envelope(asked))
        [response], rest = messages(self.wire.take(), ResponseMessage)
        self.assertEqual((response.id, response.result, rest), (asked.id, "polled", b"NEXT\r\n"))
        self.wire.send(b"PROCEED\r\n")
        self.assertEqual(self.role.requests_served, 1)
        self.assertFalse(self.wire.closed)

    def test_null_envelope_is_exactly_halibuts(self) -> None:
        data, _ = encode_message(None)
        self.assertEqual(data, NULL_ENVELOPE_BSON)
        self.assertEqual(bson.decode_document(NULL_ENVELOPE_BSON), {"Message": None})

    def test_identity_is_one_write(self) -> None:
        """
        Old Halibut servers break when the identity line and the empty line
        after it arrive apart.
        """
        self.assertEqual(len(self.wire.transport.io.getvalue().split(b"\r\n\r\n")), 3)

    def test_not_a_server_answer_closes(self) -> None:
        self.wire.take()
        self.wire.send(b"MX-CLIENT 1.0\r\n\r\n")
        self.assertTrue(self.wire.closed)
        self.assertFalse(self.role.identified.called)

    def test_waits_60_seconds_for_the_next_envelope(self) -> None:
        """
        The server sends a NULL at least every 30 s; silence for 60 s means
        the connection is dead, and the agent drops it (to dial again).
        """
        self.identify()
        self.clock.advance(59)
        self.assertFalse(self.wire.closed)
        self.clock.advance(1)
        self.assertTrue(self.wire.closed)
        self.assertTrue(self.logs.matching(event="connection_timed_out", state="reading a request"))

    def test_keep_alives_keep_it_open(self) -> None:
        self.identify()
        for _ in range(10):
            self.clock.advance(30)
            self.wire.send(envelope(None))
            self.assertEqual(self.wire.take(), b"NEXT\r\n")
            self.clock.advance(1)
            self.wire.send(b"PROCEED\r\n")
        self.assertFalse(self.wire.closed)

    def test_proceed_within_60_seconds(self) -> None:
        self.identify()
        self.wire.send(envelope(None))
        self.clock.advance(60)
        self.assertTrue(self.wire.closed)
        self.assertTrue(self.logs.matching(event="connection_timed_out", state="waiting for PROCEED"))

    def test_anything_but_proceed_closes(self) -> None:
        self.identify()
        self.wire.send(envelope(None) + b"END\r\n")
        self.assertTrue(self.wire.closed)
        self.assertTrue(self.logs.matching(why="expected PROCEED, got 'END'"))


class ServerOfSubscriberTests(SynchronousTestCase):
    """
    The server's side of a subscriber's connection (after MX-SERVER):
    queued requests, or a NULL every 30 s, then NEXT/PROCEED.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.clock = Clock()
        self.queues = PollingQueues(self.clock)
        self.wire = Wire(ServerOfSubscriber(self.queues, SUBSCRIPTION), self.clock)

    def test_null_after_the_queue_wait(self) -> None:
        self.clock.advance(29.9)
        self.assertEqual(self.wire.take(), b"")
        self.clock.advance(0.1)
        data = self.wire.take()
        inflater = Inflater()
        self.assertEqual(inflater.feed(data), NULL_ENVELOPE_BSON)
        self.assertEqual(inflater.unused, b"")
        self.wire.send(b"NEXT\r\n")
        self.assertEqual(self.wire.take(), b"PROCEED\r\n")

    def test_exchange_as_server_of_subscriber(self) -> None:
        asked = request("IThingService", "Echo", "x")
        pending = self.queues.queue(SUBSCRIPTION).put(asked)
        [sent], rest = messages(self.wire.take(), RequestMessage)
        self.assertEqual((sent.id, rest), (asked.id, b""))
        self.assertNoResult(pending.outcome)
        self.wire.send(envelope(ResponseMessage(asked.id, None, "answer")) + b"NEXT\r\n")
        response, streams = self.successResultOf(pending.outcome)
        self.assertEqual((response.result, streams), ("answer", []))
        self.assertEqual(self.wire.take(), b"PROCEED\r\n")
        second = self.queues.queue(SUBSCRIPTION).put(asked)
        self.wire.take()
        self.wire.send(envelope(ResponseMessage(asked.id, None, "again")) + b"END\r\n")
        self.assertEqual(self.successResultOf(second.outcome)[0].result, "again")
        self.assertTrue(self.wire.closed)

    def test_end_or_eof_instead_of_next(self) -> None:
        """
        The subscriber may close instead of saying NEXT: the connection just
        ends, and the queue keeps its next request for another connection.
        """
        asked = request("IThingService", "Echo", "x")
        first = self.queues.queue(SUBSCRIPTION).put(asked)
        self.wire.take()
        self.wire.send(envelope(ResponseMessage(asked.id, None, "answer")))
        self.successResultOf(first.outcome)
        self.wire.connection.connectionLost()
        queue = self.queues.queue(SUBSCRIPTION)
        self.assertEqual(queue.waiting_connections, 0)
        self.assertEqual(
            [e for e in self.logs.events if "log_failure" in e or e.get("event") == "protocol_error"], []
        )

    def test_next_within_60_seconds(self) -> None:
        self.clock.advance(30)
        self.wire.take()
        self.clock.advance(60)
        self.assertTrue(self.wire.closed)

    def test_the_response_must_answer_the_request(self) -> None:
        asked = request("IThingService", "Echo", "x")
        pending = self.queues.queue(SUBSCRIPTION).put(asked)
        self.wire.send(envelope(ResponseMessage("someone else", None, "answer")))
        self.failureResultOf(pending.outcome)
        self.assertTrue(self.wire.closed)

    def test_a_broken_connection_fails_the_request_it_carried(self) -> None:
        pending = self.queues.queue(SUBSCRIPTION).put(request("IThingService", "Echo", "x"))
        self.wire.connection.connectionLost()
        self.failureResultOf(pending.outcome)

    def test_response_timeout(self) -> None:
        pending = self.queues.queue(SUBSCRIPTION).put(request("IThingService", "Echo", "x"))
        self.clock.advance(299)
        self.assertNoResult(pending.outcome)
        self.clock.advance(1)
        self.failureResultOf(pending.outcome, TimedOut)

    def test_a_dead_connection_takes_nothing_off_the_queue(self) -> None:
        self.wire.connection.connectionLost()
        queue = self.queues.queue(SUBSCRIPTION)
        self.assertEqual(queue.waiting_connections, 0)
        pending = queue.put(request("IThingService", "Echo", "x"))
        self.assertEqual(len(queue), 1)
        self.assertNoResult(pending.outcome)


class QueueTests(SynchronousTestCase):
    """
    One subscription's pending requests (Halibut's PendingRequestQueue).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.queue = PollingQueues(self.clock, collect_timeout=120).queue(SUBSCRIPTION)

    def put(self, name: str) -> PendingRequest:
        return self.queue.put(request("IThingService", "Echo", name))

    def test_not_collected_in_time(self) -> None:
        pending = self.put("late")
        self.clock.advance(119)
        self.assertNoResult(pending.outcome)
        self.clock.advance(1)
        failure = self.failureResultOf(pending.outcome, NotCollected)
        self.assertEqual(
            failure.getErrorMessage(),
            "A request was sent to a polling endpoint, but the polling endpoint did not collect the "
            "request within the allowed time (00:02:00), so the request timed out.",
        )
        self.assertEqual(len(self.queue), 0)

    def test_collected_requests_do_not_time_out(self) -> None:
        pending = self.put("taken")
        self.assertIs(self.successResultOf(self.queue.take(30)), pending)
        self.clock.advance(600)
        self.assertNoResult(pending.outcome)

    def test_fifo_with_concurrent_takers(self) -> None:
        takers = [self.queue.take(30) for _ in range(3)]
        sent = [self.put(str(n)) for n in range(5)]
        self.assertEqual([self.successResultOf(t) for t in takers], sent[:3])
        self.assertEqual(len(self.queue), 2)
        self.assertEqual([self.successResultOf(self.queue.take(30)) for _ in range(2)], sent[3:])

    def test_keep_alive_when_empty(self) -> None:
        taker = self.queue.take(30)
        self.clock.advance(30)
        self.assertIsNone(self.successResultOf(taker))
        self.assertEqual(self.queue.waiting_connections, 0)

    def test_cancel_before_collection(self) -> None:
        first, second = self.put("first"), self.put("second")
        first.outcome.cancel()
        self.failureResultOf(first.outcome, CancelledError)
        self.assertIs(self.successResultOf(self.queue.take(30)), second)
        self.clock.advance(600)  # its collect timer is gone too

    def test_cancel_after_collection_drops_the_connection(self) -> None:
        pending = self.put("running")
        self.successResultOf(self.queue.take(30))
        dropped: list[bool] = []

        class Connection:
            def abort(self) -> None:
                dropped.append(True)

        pending.connection = Connection()
        pending.outcome.cancel()
        self.assertEqual(dropped, [True])
        self.failureResultOf(pending.outcome, CancelledError)

    def test_cancelled_taker_leaves_the_queue_as_it_was(self) -> None:
        taker = self.queue.take(30)
        taker.cancel()
        self.failureResultOf(taker, CancelledError)
        pending = self.put("kept")
        self.assertEqual(len(self.queue), 1)
        self.assertIs(self.successResultOf(self.queue.take(30)), pending)

    def test_a_pinned_request_refuses_another_agent(self) -> None:
        pending = self.queue.put(request("IThingService", "Echo", "x"), accepts=lambda peer: peer == "right")
        other = self.put("anyone")
        taker: Deferred[Any] = self.queue.take(30, peer="wrong")
        self.failureResultOf(pending.outcome, WrongAgent)
        self.assertIs(self.successResultOf(taker), other)


class QueueSetTests(SynchronousTestCase):
    def test_queues_nobody_uses_are_dropped(self) -> None:
        """
        Any name may be asked for (a hub user may name any subscription):
        a queue that holds nothing and has nobody waiting is forgotten.
        """
        clock = Clock()
        queues = PollingQueues(clock, collect_timeout=1)
        for n in range(100):
            queues.queue(f"poll://nobody{n}/").put(request("IThingService", "Echo", "x")).outcome.addErrback(
                lambda f: None
            )
        self.assertEqual(len(queues.queues()), 100)
        clock.advance(1)
        self.assertEqual(queues.queues(), {})
        taker = queues.next_request(SUBSCRIPTION, 30)
        self.assertEqual(list(queues.queues()), [SUBSCRIPTION], "a waiting connection keeps its queue")
        clock.advance(30)
        self.assertIsNone(self.successResultOf(taker))
        self.assertEqual(queues.queues(), {})


class ReconnectDelayTests(SynchronousTestCase):
    """
    Halibut's RetryPolicy: clamp(outage x (1 + r), 5 s, 2 min), r per connection.
    """

    def test_first_reconnect_after_a_healthy_session(self) -> None:
        clock = Clock()
        delay = ReconnectDelay(clock.seconds, r=0.7)
        self.assertEqual(delay.failed(), 5.0)

    def test_grows_with_the_outage_then_caps(self) -> None:
        clock = Clock()
        delay = ReconnectDelay(clock.seconds, r=0.5)
        waits = []
        for _ in range(8):
            wait = delay.failed()
            waits.append(wait)
            clock.advance(wait + 1)  # the wait, then a second of failed tries
        self.assertEqual(waits[:3], [5.0, 9.0, 24.0])
        self.assertEqual(waits[-1], 120.0)
        self.assertEqual(waits, sorted(waits))

    def test_identified_resets_the_outage(self) -> None:
        clock = Clock()
        delay = ReconnectDelay(clock.seconds, r=0.5)
        delay.failed()
        clock.advance(100)
        self.assertEqual(delay.failed(), 120.0)
        delay.succeeded()
        clock.advance(1000)
        self.assertEqual(delay.failed(), 5.0)

    def test_jitter_spreads_agents_apart(self) -> None:
        clock = Clock()
        delays = [ReconnectDelay(clock.seconds) for _ in range(50)]
        for d in delays:
            d.failed()
        clock.advance(30)
        waits = {round(d.failed(), 3) for d in delays}
        self.assertGreater(len(waits), 40, "agents that lost their server together reconnect apart")
        self.assertTrue(all(30.0 <= w < 60.0 for w in waits))


class ListeningClientTests(SynchronousTestCase):
    """
    The dialling side of listening mode, byte for byte (Halibut's
    ShouldExchangeAsClient).
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.clock = Clock()
        self.wire = Wire(None, self.clock)
        from tentacle.halibut.roles import ListeningClient

        self.client = ListeningClient(self.wire.connection)

    def test_exchange_as_client(self) -> None:
        opened = Deferred.fromCoroutine(self.client.open())
        self.assertEqual(self.wire.take(), b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n")
        self.wire.send(b"MX-SERVER 1.0\r\n\r\n")
        self.assertEqual(self.successResultOf(opened).kind.value, "MX-SERVER")
        asked = request("IThingService", "Echo", "x")
        answer = Deferred.fromCoroutine(self.client.call(asked))
        [sent], rest = messages(self.wire.take(), RequestMessage)
        self.assertEqual((sent.id, rest), (asked.id, b""))
        self.wire.send(envelope(ResponseMessage(asked.id, None, "y")))
        self.assertEqual(self.successResultOf(answer)[0].result, "y")
        checked = Deferred.fromCoroutine(self.client.next())
        self.assertEqual(self.wire.take(), b"NEXT\r\n")
        self.wire.send(b"\r\nPROCEED\r\n")
        self.successResultOf(checked)
        self.client.end()
        self.assertEqual(self.wire.take(), b"END\r\n")
        self.assertTrue(self.wire.closed)

    def test_response_timeout_counts_from_the_end_of_the_request(self) -> None:
        Deferred.fromCoroutine(self.client.open())
        self.wire.send(b"MX-SERVER 1.0\r\n\r\n")
        answer = Deferred.fromCoroutine(self.client.call(request("IThingService", "Echo", "x")))
        self.clock.advance(299)
        self.assertNoResult(answer)
        self.clock.advance(1)
        self.failureResultOf(answer, TimedOut)
