"""
TCP keepalive on every Halibut socket, as Halibut sets it (idle 15 s,
interval 5 s, 10 probes): read back with getsockopt from the real sockets
of both ends, listening and polling.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.halibut.connection import ExchangeSettings, KeepAlive
from tentacle.sockets import socket_of
from tests.support import (
    LogCapture,
    agent_port,
    identity,
    start_agent,
    start_polling_agent,
    start_polling_server,
)
from tests.waiting import until

if not hasattr(socket, "TCP_KEEPIDLE"):  # pragma: no cover
    skip = "TCP_KEEPIDLE is Linux's"


def keepalive_of(transport: Any) -> tuple[int, int, int, int]:
    """
    (on?, idle, interval, count) as the kernel holds them for this socket.
    """
    sock = socket_of(transport)
    assert sock is not None, transport
    return (
        int(bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
    )


HALIBUT = (1, 15, 5, 10)


class ListeningKeepAliveTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    async def connect(self, agent_keepalive: Any = "default", **client_options: Any) -> tuple[Any, Any]:
        changes = {} if agent_keepalive == "default" else {"tcp_keepalive": agent_keepalive}
        agent = start_agent(self, trusted=(identity("server").thumbprint,), **changes)
        target = Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor, **client_options)
        self.addCleanup(client.close)
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        [(dialled, _)] = client._idle
        [accepted] = agent.listener_factory.authenticated_connections
        return accepted.transport, dialled.protocol.transport

    async def test_halibut_values_on_both_ends(self) -> None:
        accepted, dialled = await self.connect()
        self.assertEqual(keepalive_of(accepted), HALIBUT)
        self.assertEqual(keepalive_of(dialled), HALIBUT)

    async def test_every_accepted_connection(self) -> None:
        """
        Not only the first: later connections get the options through the
        listening socket.
        """
        agent = start_agent(self, trusted=(identity("server").thumbprint,), tcp_keepalive=KeepAlive(30, 7, 3))
        target = Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint))
        for _ in range(4):
            client = TentacleClient(target, identity("server"), reactor)
            self.addCleanup(client.close)
            await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        accepted = agent.listener_factory.authenticated_connections
        self.assertEqual(len(accepted), 4)
        self.assertEqual({keepalive_of(c.transport) for c in accepted}, {(1, 30, 7, 3)})
        # and each is sent at once (DirectTLS), the listener's TLS layer too
        no_delay = set()
        for c in accepted:
            sock = socket_of(c.transport)
            assert sock is not None
            no_delay.add(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.assertEqual(no_delay, {1})

    async def test_settable(self) -> None:
        accepted, dialled = await self.connect(KeepAlive(30, 7, 3), keepalive=KeepAlive(20, 4, 6))
        self.assertEqual(keepalive_of(accepted), (1, 30, 7, 3))
        self.assertEqual(keepalive_of(dialled), (1, 20, 4, 6))

    async def test_off(self) -> None:
        accepted, dialled = await self.connect(None, keepalive=None)
        self.assertEqual(keepalive_of(accepted)[0], 0)
        self.assertEqual(keepalive_of(dialled)[0], 0)


class PollingKeepAliveTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    async def test_polling_connections(self) -> None:
        server = start_polling_server(self, settings=ExchangeSettings(keepalive=KeepAlive(40, 8, 4)))
        agent = start_polling_agent(self, server, home=Path(self.mktemp()).absolute(), tcp_keepalive=KeepAlive(25, 6, 5))
        await self.logs.wait_for(event="polling_connected")
        [[connection]] = agent.polling.servers.values()
        dialled = connection._connection
        assert dialled is not None
        self.assertEqual(keepalive_of(dialled.transport), (1, 25, 6, 5))
        await until(lambda: bool(server.factory.authenticated_connections), "the server's side")
        [accepted] = server.factory.authenticated_connections
        self.assertEqual(keepalive_of(accepted.transport), (1, 40, 8, 4))
