"""
Defects found in review of polling and dialling, over real sockets: each
test here failed on the code as it was.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tentacle.contracts import tentacle_registry
from tentacle.dialer import ConnectionFailed, Pin, PinnedConnection, Proxy, ProxyEndpoint, dial
from tentacle.dispatch import Dispatcher
from tentacle.halibut.connection import ExchangeSettings
from tentacle.polling import PollingConnection, _client_tls
from tests.support import LogCapture, identity, polled, start_polling_server


class _Silent(Protocol):
    """
    Takes a TCP connection and never says a word.
    """

    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.lost.append(self)  # type: ignore[attr-defined]


def silent_port(case: TestCase) -> tuple[int, Factory]:
    factory = Factory.forProtocol(_Silent)
    factory.accepted = []  # type: ignore[attr-defined]
    factory.lost = []  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    case.addCleanup(port.stopListening)
    case.addCleanup(lambda: [p.transport.abortConnection() for p in factory.accepted if p not in factory.lost])
    return port.getHost().port, factory


async def first_of(**deferreds: Deferred[Any]) -> str:
    """
    The name of whichever Deferred fires first.
    """
    names = list(deferreds)
    result = await DeferredList(
        [d.addCallback(lambda _, n=n: n) for n, d in deferreds.items()], fireOnOneCallback=True, consumeErrors=True
    )
    assert isinstance(result, tuple), result
    return names[result[1]]


class StopWhileDiallingTests(TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    async def test_stopping_while_dialling_does_not_poll(self) -> None:
        """
        An agent stopped (or a server removed) while its connection is
        still being dialled must not go on to poll that server, and its
        stop must not wait for that session to end.
        """
        server = start_polling_server(self)
        subscribed = self.logs.wait_for(event="polling_subscribed")
        connection = PollingConnection(
            polled(server), 1, identity("agent"), lambda s, a: Dispatcher(), reactor,
            tentacle_registry(), ExchangeSettings(), Logger(),
        )
        connection.startService()
        stopped = connection.stopService()  # the TCP connect is still under way
        self.assertEqual(await first_of(stopped=stopped, subscribed=subscribed), "stopped")
        self.assertEqual(server.connections(), 0)
        self.assertEqual(self.logs.matching(event="polling_refused"), [], "no false alarm")


class SilentPeerTests(TestCase):
    """
    A peer that takes the TCP connection and never answers: the dialler
    gives up within its deadlines instead of waiting for ever.
    """

    timeout = 20

    async def test_silent_tls_handshake(self) -> None:
        port, factory = silent_port(self)
        connection = PinnedConnection(
            Pin(identity("hub").thumbprint), lambda c: Deferred(), reactor, tentacle_registry(),
            ExchangeSettings(heartbeat_timeout=0.5),
        )
        with self.assertRaises(ConnectionFailed):
            await dial(reactor, "127.0.0.1", port, _client_tls(identity("agent")), connection, timeout=0.5)

    async def test_silent_proxy(self) -> None:
        port, factory = silent_port(self)
        endpoint = ProxyEndpoint(reactor, Proxy("127.0.0.1", port), "127.0.0.1", 1, timeout=0.5)
        with self.assertRaises(ConnectionFailed):
            await endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(len(factory.accepted), 1)


class StopWhileAnsweringTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        from tests.support import remove_big_files

        remove_big_files(self)
        self.logs = LogCapture.install(self)

    async def test_stopping_while_sending_an_answer(self) -> None:
        """
        An agent stopped while it sends a large answer to a server that has
        stopped reading: its stop must not wait for that answer to drain
        (it waited for ever: C{END} was written into the middle of the
        data stream, then a polite close waited for the whole stream to be
        taken, with the heartbeat deadline disarmed).
        """
        import os
        from pathlib import Path

        from twisted.internet.task import deferLater

        from tentacle import events
        from tentacle.client.api import Target, TentacleClient
        from tests.e2e.test_network_faults import on_event
        from tests.support import SUBSCRIPTION, start_polling_agent

        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.logs.wait_for(event="polling_connected")
        (agent.config.home / "big.bin").write_bytes(os.urandom(32 * 1024 * 1024))

        def stall(event: Any) -> None:
            for connection in server.factory.authenticated_connections:
                connection.transport.pauseProducing()  # the server stops reading

        # As the agent starts on the download, before its answer is written.
        on_event(self, stall, event=events.DOWNLOAD_STARTED)
        client = TentacleClient(
            Target.polling(SUBSCRIPTION, Pin(identity("agent").thumbprint)), identity("server"), reactor,
            hub=server, rpc_retry=None,
        )
        download = Deferred.fromCoroutine(client.download("big.bin", Path(self.mktemp()).absolute()))
        download.addErrback(lambda f: None)
        await self.logs.wait_for(event=events.DOWNLOAD_STARTED)
        (connection,) = [c._connection for cs in agent.polling.servers.values() for c in cs]
        assert connection is not None
        while connection.activity != "sending data streams":
            # The answer's 32 MiB cannot all fit in the socket buffers.
            await deferLater(reactor, 0.01, lambda: None)
        await agent.polling.stopService()
        self.assertEqual([c.connected for cs in agent.polling.servers.values() for c in cs], [False])


class PolledDownloadTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    async def test_a_download_through_a_polling_server_is_private_as_a_direct_one(self) -> None:
        """
        A download from a listening agent is written 0600 (its temp file is
        made so); through a polling server in this process the temp file
        was made with the umask's mode (0644), so the same download ended
        up readable by every user.
        """
        import stat
        from pathlib import Path

        from tentacle.client.api import Target, TentacleClient
        from tests.support import SUBSCRIPTION, start_polling_agent

        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.logs.wait_for(event="polling_connected")
        (agent.config.home / "secret.txt").write_bytes(b"secret")
        client = TentacleClient(
            Target.polling(SUBSCRIPTION, Pin(identity("agent").thumbprint)), identity("server"), reactor, hub=server
        )
        self.addCleanup(client.close)
        target = Path(self.mktemp()).absolute()
        await client.download("secret.txt", target)
        self.assertEqual(target.read_bytes(), b"secret")
        self.assertEqual(oct(stat.S_IMODE(target.stat().st_mode)), oct(0o600))
