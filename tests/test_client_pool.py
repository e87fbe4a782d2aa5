"""
The client's pool of idle connections, as Halibut keeps it, on a fake
clock: at most five idle per agent, each retired (END) after nine idle
minutes, and checked with NEXT, which must be answered PROCEED within the
60 s heartbeat, before it is used again.
"""

from __future__ import annotations

from typing import Any

from OpenSSL.crypto import X509
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import ClientConnection
from tests.support import LogCapture, identity

MX_CLIENT = b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n"


class TLSStringTransport(StringTransport):
    """
    A StringTransport that says TLS is up with the agent's certificate.
    """

    def getPeerCertificate(self) -> X509:
        return X509.from_cryptography(identity("agent").certificate)

    def getHandle(self) -> Any:
        return None


def identified(clock: Clock) -> tuple[ClientConnection, TLSStringTransport]:
    """
    A client connection through TLS and the identity exchange, idle.
    """
    connection = ClientConnection(None, clock)
    transport = TLSStringTransport()
    connection.protocol.makeConnection(transport)
    connection.protocol.handshakeCompleted()
    assert transport.value() == MX_CLIENT
    transport.clear()
    connection.protocol.dataReceived(b"MX-SERVER 1.0\r\n\r\n")
    assert connection.ready.called and connection.idle
    return connection, transport


def ended(transport: StringTransport) -> bool:
    return transport.value() == b"END\r\n" and bool(transport.disconnecting)


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.clock = Clock()
        self.client = TentacleClient(Target("agent.example", 10933), identity("server"), self.clock)
        self.connections = [identified(self.clock) for _ in range(6)]
        for connection, _ in self.connections:
            self.client._release(connection)

    def test_at_most_five_idle(self) -> None:
        transports = [t for _, t in self.connections]
        self.assertEqual(len(self.client._idle), 5)
        self.assertEqual([ended(t) for t in transports], [False] * 5 + [True], "the sixth is retired at once")

    def test_retired_after_nine_idle_minutes(self) -> None:
        transports = [t for _, t in self.connections[:5]]
        self.clock.advance(9 * 60 - 1)
        self.assertEqual([t.value() for t in transports], [b""] * 5)
        self.clock.advance(1)
        self.assertTrue(all(ended(t) for t in transports))
        self.assertEqual(self.client._idle, [])

    def test_checked_with_next_before_reuse(self) -> None:
        connection, transport = self.connections[4]
        d = Deferred.fromCoroutine(self.client.connect())
        self.assertEqual(transport.value(), b"NEXT\r\n")
        self.clock.advance(59)
        connection.protocol.dataReceived(b"PROCEED\r\n")
        self.assertIs(self.successResultOf(d), connection)
        self.assertEqual(len(self.client._idle), 4)
        self.clock.advance(9 * 60)
        self.assertEqual(transport.value(), b"NEXT\r\n", "a connection in use is not retired")

    def test_a_silent_pooled_connection_is_skipped_after_the_heartbeat(self) -> None:
        (first, first_transport), (second, second_transport) = self.connections[4], self.connections[3]
        d = Deferred.fromCoroutine(self.client.connect())
        self.clock.advance(60)
        self.assertTrue(first_transport.disconnecting, "no PROCEED within 60 s: dropped")
        self.assertEqual(second_transport.value(), b"NEXT\r\n", "the next idle one is tried")
        second.protocol.dataReceived(b"PROCEED\r\n")
        self.assertIs(self.successResultOf(d), second)
