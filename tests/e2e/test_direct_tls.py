"""
L{DirectTLS} on real loopback sockets: what a Halibut connection writes
leaves at once, not on the reactor's next turn; closing still closes.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from tentacle.dialer import _ClientTLSFactory
from tentacle.listener import ListeningTLS
from tentacle.tls import AgentTLSOptions, DirectTLS
from tests.support import client_context, identity, in_thread


class _Server(Protocol):
    def __init__(self, heard: Deferred[Any]) -> None:
        self.heard = heard

    def dataReceived(self, data: bytes) -> None:
        if not self.heard.called:
            self.heard.callback(self)


class DirectTLSTests(TestCase):
    async def connected(self) -> tuple[Any, ssl.SSLSocket]:
        """
        A DirectTLS server connection and the blocking client socket at its
        other end, TLS done and one byte received.
        """
        heard: Deferred[Any] = Deferred()
        factory = TLSMemoryBIOFactory(
            AgentTLSOptions(identity("agent")), False, Factory.forProtocol(lambda: _Server(heard))
        )
        factory.protocol = DirectTLS
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)

        def dial() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
            tls = client_context().wrap_socket(raw)
            tls.sendall(b"!")
            return tls

        client: ssl.SSLSocket = await in_thread(dial)
        self.addCleanup(client.close)
        server = await heard
        return server, client

    async def test_a_write_leaves_at_once(self) -> None:
        """
        The bytes are on their way before this turn of the reactor ends:
        the client reads them while the reactor is held here.
        """
        server, client = await self.connected()
        assert server.transport is not None
        server.transport.write(b"PROCEED\r\n")
        # Blocking here, in the reactor's thread: only bytes already sent can arrive.
        self.assertEqual(client.recv(100), b"PROCEED\r\n")

    async def test_closing_still_closes(self) -> None:
        server, client = await self.connected()
        assert server.transport is not None
        server.transport.write(b"END\r\n")
        server.transport.loseConnection()

        def read_to_end() -> bytes:
            received = b""
            while True:
                try:
                    chunk = client.recv(100)
                except ssl.SSLEOFError:
                    return received
                if not chunk:
                    return received
                received += chunk

        self.assertEqual(await in_thread(read_to_end), b"END\r\n")

    async def test_no_nagle(self) -> None:
        """
        Sent at once, a second small write must not wait for the first's
        delayed ACK (a polled request took 88 ms instead of 0.5 ms).
        """
        server, client = await self.connected()
        assert server.transport is not None
        tcp = server.transport.transport.getHandle()
        self.assertEqual(tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)

    def test_used_by_both_ends(self) -> None:
        self.assertTrue(issubclass(ListeningTLS, DirectTLS))
        self.assertTrue(issubclass(_ClientTLSFactory.protocol, DirectTLS))
