"""
L{HalibutConnection}'s writes against Halibut's one-minute write timeout,
in memory on a fake clock: a peer that stops taking a large message or a
data stream is dropped within the heartbeat, one that keeps taking it never.
"""

from __future__ import annotations

import io
import os
import uuid

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import tentacle_registry
from tentacle.halibut.connection import CHUNK_SIZE, ExchangeSettings, HalibutConnection, TimedOut
from tentacle.halibut.deflate import compress
from tentacle.halibut.roles import ListeningClient
from tentacle.halibut.serializer import DataStream, RequestMessage, encode_message
from tests.support import LogCapture
from tests.wire_client import request


class Peer:
    """
    A connection over a transport whose peer takes what we write only when
    told to (L{take}), as a real transport asks its producer for more only
    once the last chunk has drained.
    """

    def __init__(self) -> None:
        self.clock = Clock()
        self.connection = HalibutConnection(
            self.clock, tentacle_registry(), ExchangeSettings(heartbeat_timeout=60, response_timeout=300)
        )
        self.transport = StringTransport()
        self.connection.makeConnection(self.transport)

    def take(self) -> None:
        producer = self.transport.producer
        if producer is not None:
            producer.resumeProducing()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def big_request() -> tuple[RequestMessage, int]:
    """
    A request whose compressed message is several chunks long.
    """
    message = request("IThingService", "Echo", os.urandom(300_000).hex())
    data, _ = encode_message(message)
    size = len(compress(data))
    assert size > 3 * CHUNK_SIZE, size
    return message, size


class WriteDeadlineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    def test_a_large_request_nobody_takes(self) -> None:
        peer = Peer()
        message, _ = big_request()
        d = Deferred.fromCoroutine(ListeningClient(peer.connection).call(message))
        peer.clock.advance(0)  # it is compressed a slice at a time, a turn of the reactor each
        peer.clock.advance(59)
        self.assertFalse(peer.closed)
        peer.clock.advance(1)
        self.assertTrue(peer.closed)
        failure = self.failureResultOf(d, TimedOut)
        self.assertIn("it took nothing while sending a message", str(failure.value))

    def test_a_large_request_taken_slowly(self) -> None:
        """
        Each chunk taken restarts the minute; then the response gets its
        five minutes.
        """
        peer = Peer()
        message, size = big_request()
        d = Deferred.fromCoroutine(ListeningClient(peer.connection).call(message))
        while len(peer.transport.value()) < size:
            peer.clock.advance(50)
            peer.take()
        peer.take()  # drained: the message is sent
        self.assertEqual(len(peer.transport.value()), size)
        peer.clock.advance(299)
        self.assertFalse(peer.closed)
        self.assertNoResult(d)
        peer.clock.advance(1)
        self.failureResultOf(d, TimedOut)

    def test_a_stream_nobody_takes(self) -> None:
        peer = Peer()
        ref = DataStream(uuid.uuid4(), 10 * CHUNK_SIZE)
        message = request("IThingService", "Length", ref)
        d = Deferred.fromCoroutine(
            ListeningClient(peer.connection).call(message, {ref.id: lambda: io.BytesIO(b"z" * ref.length)})
        )
        peer.take()
        peer.take()
        peer.clock.advance(60)
        self.assertTrue(peer.closed)
        failure = self.failureResultOf(d, TimedOut)
        self.assertIn("it took nothing while sending data streams", str(failure.value))

    def test_a_small_request_is_written_at_once(self) -> None:
        peer = Peer()
        message = request("IThingService", "Echo", "hello")
        Deferred.fromCoroutine(ListeningClient(peer.connection).call(message))
        data, _ = encode_message(message)
        self.assertEqual(peer.transport.value(), compress(data))
        self.assertIsNone(peer.transport.producer)
