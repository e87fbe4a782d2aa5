"""
The fault forwarder itself, in front of an echo server on loopback: each
fault does what the network tests rely on.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.fault_forwarder import Direction, FaultForwarder, Link


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Peer(Protocol):
    """
    A client that records what comes back, when, and how it ended.
    """

    def __init__(self) -> None:
        self.received = b""
        self.arrivals: list[tuple[float, bytes]] = []
        self.made: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.made.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.arrivals.append((reactor.seconds(), data))
        for entry in list(self._waiting):
            if len(self.received) >= entry[0]:
                self._waiting.remove(entry)
                entry[1].callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.lost.callback(None)

    def wait_for(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.received) >= count:
            d.callback(None)
        else:
            self._waiting.append((count, d))
        return d


class _Dial(ClientFactory):
    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.peer


class ForwarderTests(TestCase):
    def setUp(self) -> None:
        factory: ServerFactory[Echo] = ServerFactory()
        factory.protocol = Echo
        server = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(server.stopListening)
        self.echo_port = server.getHost().port  # type: ignore[attr-defined]

    def forwarder(self, **options: Any) -> FaultForwarder:
        forwarder = FaultForwarder(reactor, self.echo_port, **options)
        forwarder.start()
        self.addCleanup(forwarder.stop)
        return forwarder

    async def connect(self, forwarder: FaultForwarder) -> Peer:
        peer = Peer()
        assert forwarder._port is not None
        reactor.connectTCP("127.0.0.1", forwarder._port.getHost().port, _Dial(peer))
        await peer.made
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport else None)  # type: ignore[attr-defined]
        return peer

    async def test_relays_both_ways(self) -> None:
        forwarder = self.forwarder()
        peer = await self.connect(forwarder)
        assert peer.transport is not None
        peer.transport.write(b"hello" * 1000)
        await peer.wait_for(5000)
        self.assertEqual(peer.received, b"hello" * 1000)
        self.assertEqual((forwarder.bytes_up, forwarder.bytes_down), (5000, 5000))

    async def test_latency_and_last_byte_held_back(self) -> None:
        forwarder = self.forwarder(latency=0.05, hold_back=1, hold_delay=0.1)
        peer = await self.connect(forwarder)
        assert peer.transport is not None
        sent = reactor.seconds()
        peer.transport.write(b"abc")
        await peer.wait_for(3)
        self.assertEqual(peer.received, b"abc")
        # Each way: 0.05 s late, the last byte 0.1 s later still.
        self.assertGreaterEqual(peer.arrivals[-1][0] - sent, 2 * 0.05 + 0.1 - 0.01)
        self.assertGreater(len(peer.arrivals), 1, "the last byte came on its own, late")

    async def test_pause_holds_bytes_until_resumed(self) -> None:
        forwarder = self.forwarder()
        peer = await self.connect(forwarder)
        assert peer.transport is not None
        peer.transport.write(b"one")
        await peer.wait_for(3)
        forwarder.pause_existing()
        peer.transport.write(b"two")
        seen: list[int] = []
        forwarder.watch(lambda link, direction, data: seen.append(len(data)))
        # Another connection still works while the first is paused.
        other = await self.connect(forwarder)
        assert other.transport is not None
        other.transport.write(b"x")
        await other.wait_for(1)
        self.assertEqual(peer.received, b"one")
        forwarder.resume_existing()
        await peer.wait_for(6)
        self.assertEqual(peer.received, b"onetwo")

    async def test_kill_existing_resets_both_ends(self) -> None:
        forwarder = self.forwarder()
        peer = await self.connect(forwarder)
        assert peer.transport is not None
        peer.transport.write(b"x")
        await peer.wait_for(1)
        self.assertEqual(forwarder.kill_existing(), 1)
        await peer.lost
        assert peer.reason is not None
        self.assertTrue(peer.reason.check(ConnectionLost), peer.reason)
        self.assertFalse(peer.reason.check(ConnectionDone), "a reset, not a clean close")
        await forwarder.when_idle()
        self.assertEqual(forwarder.connections_killed, 1)

    async def test_kill_new(self) -> None:
        forwarder = self.forwarder()
        forwarder.kill_new = True
        peer = await self.connect(forwarder)
        await peer.lost
        assert peer.reason is not None
        self.assertTrue(peer.reason.check(ConnectionLost), peer.reason)
        self.assertEqual(peer.received, b"")

    async def test_watcher_can_kill_before_relaying(self) -> None:
        forwarder = self.forwarder()
        peer = await self.connect(forwarder)

        def kill_on_upload(link: Link, direction: Direction, data: bytes) -> None:
            if direction is Direction.UPSTREAM and b"secret" in data:
                link.kill()

        forwarder.watch(kill_on_upload)
        assert peer.transport is not None
        peer.transport.write(b"secret")
        await peer.lost
        self.assertEqual(peer.received, b"")
        self.assertEqual(forwarder.bytes_up, 0)
