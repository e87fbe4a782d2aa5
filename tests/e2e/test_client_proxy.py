"""
The client through an HTTP CONNECT proxy.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import RetryPolicy, Target, TentacleClient
from tentacle.client.connection import ConnectionFailed, Pin
from tentacle.dialer import Proxy, ProxyRefused
from tests.connect_proxy import ConnectProxy
from tests.support import agent_port, identity, start_agent


class ProxyTests(TestCase):
    def setUp(self) -> None:
        self.agent = start_agent(self, trusted=(identity("server").thumbprint,))

    def proxy(self, **kwargs: object) -> tuple[ConnectProxy, int]:
        factory = ConnectProxy(**kwargs)  # type: ignore[arg-type]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.all_closed)  # runs after the client's close
        return factory, port.getHost().port

    def client(self, proxy: Proxy) -> TentacleClient:
        target = Target("127.0.0.1", agent_port(self.agent), Pin(identity("agent").thumbprint), proxy)
        client = TentacleClient(target, identity("server"), reactor, retry=RetryPolicy(attempts=3, interval=0.05))
        self.addCleanup(client.close)
        return client

    async def test_through_the_proxy(self) -> None:
        factory, port = self.proxy()
        code = await self.client(Proxy("127.0.0.1", port)).run_script("exit 6")
        self.assertEqual(code, 6)
        self.assertGreaterEqual(factory.tunnels, 1)
        first = factory.requests[0]
        self.assertEqual(first[0], f"CONNECT 127.0.0.1:{agent_port(self.agent)} HTTP/1.0")
        self.assertNotIn("Proxy-Authorization", "".join(first))

    async def test_with_credentials(self) -> None:
        factory, port = self.proxy(credentials="deploy:s3cret")
        proxy = Proxy.from_url(f"http://deploy:s3cret@127.0.0.1:{port}")
        self.assertIn("IScriptServiceV2", await self.client(proxy).capabilities())
        self.assertEqual(factory.tunnels, 1)

    async def test_without_credentials(self) -> None:
        factory, port = self.proxy(credentials="deploy:s3cret")
        with self.assertRaises(ProxyRefused) as caught:
            await self.client(Proxy("127.0.0.1", port)).capabilities()
        self.assertIn("407", str(caught.exception))
        self.assertIn("wants credentials", str(caught.exception))
        self.assertEqual(len(factory.requests), 1, "a refusal is not retried")

    async def test_proxy_cannot_reach_the_agent(self) -> None:
        factory, port = self.proxy(refuse_with=b"502 Bad Gateway")
        with self.assertRaises(ProxyRefused) as caught:
            await self.client(Proxy("127.0.0.1", port)).capabilities()
        self.assertIn("could not reach the agent", str(caught.exception))

    async def test_proxy_down(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.assertRaises(ConnectionFailed) as caught:
            await self.client(Proxy("127.0.0.1", port)).capabilities()
        self.assertIn("cannot reach the proxy", str(caught.exception))

    def test_proxy_urls(self) -> None:
        self.assertEqual(Proxy.from_url("http://u:p%40ss@proxy:3128"), Proxy("proxy", 3128, "u", "p@ss"))
        self.assertEqual(Proxy.from_url("proxy.local"), Proxy("proxy.local", 8080))
        self.assertRaises(ValueError, Proxy.from_url, "socks5://proxy:1080")
