"""
Many polling agents against one polling server, as Halibut's
ManyPollingTentacleTests: every agent runs a script and returns its output;
then the server restarts and every agent is back soon after it listens
again (the reconnect pacing's first wait after a healthy session is 5 s).

The agents are agent services in this process (one process each would be
too many here), each with its own home and subscription.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.hub.polling_server import PollingServer
from tests.figures import record
from tests.support import LogCapture, identity, polled, start_polling_agent

AGENTS = 100


def subscription(n: int) -> str:
    return f"poll://agent{n:03d}/"


class ManyPollingAgentsTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def server(self) -> PollingServer:
        server = PollingServer(
            identity("hub"), [identity("agent").thumbprint], reactor, port=self.port, interface="127.0.0.1"
        )
        server.startService()
        self.addCleanup(lambda: server.stopService() if server.running else None)
        return server

    async def all_connected(self, server: PollingServer) -> None:
        while server.connections() < AGENTS:
            await self.logs.wait_for(event="polling_subscribed")
            self.logs.events = [e for e in self.logs.events if e.get("event") != "polling_subscribed"]

    async def test_a_hundred_agents_then_a_server_restart(self) -> None:
        server = self.server()
        for n in range(AGENTS):
            home = Path(self.mktemp()).absolute()
            home.mkdir()
            start_polling_agent(self, server, home=home, polling_servers=(polled(server, subscription=subscription(n)),))
        await self.all_connected(server)

        outputs = await self.run_everywhere(server)
        self.assertEqual(outputs, [[f"agent {n}"] for n in range(AGENTS)])

        await server.stopService()
        server = self.server()
        listening = time.monotonic()
        await self.all_connected(server)
        back = time.monotonic() - listening
        self.assertLess(back, 10.0, "every agent is back within 10 s after the server listens again")
        self.assertEqual(await self.run_everywhere(server), [[f"agent {n}"] for n in range(AGENTS)])
        record(self, "polling", f"{AGENTS} polling agents, then the server restarted",
               f"all back {back:.1f} s after it listened again; every agent ran a script before and after",
               agents=AGENTS, back_s=round(back, 2))

    async def run_everywhere(self, server: PollingServer) -> list[list[str]]:
        async def run(n: int) -> list[str]:
            client = TentacleClient(Target.polling(subscription(n)), identity("server"), reactor, hub=server)
            lines: list[str] = []
            code = await client.run_script(f"echo agent {n}", on_log=lambda line: lines.append(line.text))
            self.assertEqual(code, 0)
            return lines

        results: Any = await gatherResults([Deferred.fromCoroutine(run(n)) for n in range(AGENTS)])
        return list(results)
