"""
L{tentacle.dialer.tcp_endpoint}: addresses are dialled straight, names
through a lookup each time.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tentacle.dialer import tcp_endpoint


class TCPEndpointTests(TestCase):
    def test_addresses_are_dialled_without_a_lookup(self) -> None:
        """
        Twisted's HostnameEndpoint looks even an address up, in a thread,
        after an IDNA pass: for an address that is all waste.
        """
        self.assertIsInstance(tcp_endpoint(reactor, "127.0.0.1", 1, 5), TCP4ClientEndpoint)
        self.assertIsInstance(tcp_endpoint(reactor, "10.1.2.3", 1, 5), TCP4ClientEndpoint)
        self.assertIsInstance(tcp_endpoint(reactor, "::1", 1, 5), TCP6ClientEndpoint)
        self.assertIsInstance(tcp_endpoint(reactor, "2001:db8::7", 1, 5), TCP6ClientEndpoint)

    def test_names_and_zoned_addresses_are_looked_up(self) -> None:
        for host in ("localhost", "tentacle.example.com", "fe80::1%lo", "1.2.3"):
            self.assertIsInstance(tcp_endpoint(reactor, host, 1, 5), HostnameEndpoint, host)

    async def test_both_kinds_connect(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        for host in ("127.0.0.1", "localhost"):
            protocol = await tcp_endpoint(reactor, host, number, 5).connect(Factory.forProtocol(Protocol))
            self.assertEqual(protocol.transport.getPeer().port, number)
            protocol.transport.loseConnection()
