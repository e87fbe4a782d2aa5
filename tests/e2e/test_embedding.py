"""
The C{.tac} files of docs/embedding.rst, run as a reader would: with
C{twistd -ny} in a child process, on a home that has no certificate yet.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.identity import IdentityStore
from tests.e2e.test_daemon import CHECKOUT, AgentProcess, free_port
from tests.support import identity

EXAMPLES = Path(CHECKOUT) / "docs" / "examples"
TWISTD = "from twisted.scripts.twistd import run; run()"


class TacTests(TestCase):
    async def twistd(self, tac: str, home: Path, **env: str) -> AgentProcess:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        agent = AgentProcess()
        environment = dict(os.environ, PYTHONPATH=CHECKOUT, AGENT_HOME=str(home), **env)
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            agent, sys.executable, [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "-y", str(EXAMPLES / tac)],
            env=environment, path=str(folder),
        )

        async def stop() -> None:
            if not agent.ended.called:
                process.signalProcess(signal.SIGTERM)
            await agent.ended

        self.addCleanup(stop)
        await agent.listening
        return agent

    async def drive(self, home: Path, port: int) -> None:
        agent_identity = IdentityStore(home).load()
        client = TentacleClient(Target("127.0.0.1", port, Pin(agent_identity.thumbprint)), identity("server"), reactor)
        lines: list[str] = []
        code = await client.run_script("echo embedded", on_log=lambda line: lines.append(line.text))
        await client.close()
        self.assertEqual((code, lines), (0, ["embedded"]))

    async def test_agent_tac_on_a_fresh_home(self) -> None:
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        port = free_port()
        (home / "tentacle.json").write_text(json.dumps({
            "listen-port": port, "listen-address": "127.0.0.1",
            "trusted-thumbprints": [identity("server").thumbprint],
        }))
        agent = await self.twistd("agent.tac", home)
        thumbprint = IdentityStore(home).load().thumbprint
        self.assertIn(f"its thumbprint is {thumbprint}".encode(), agent.output)
        await self.drive(home, port)

    async def test_config_built_in_code(self) -> None:
        home = Path(self.mktemp()).absolute()
        port = free_port()
        sha1 = identity("server").thumbprint.lower()
        with_colons = ":".join(sha1[i:i + 2] for i in range(0, 40, 2))
        agent = await self.twistd("configured-in-code.tac", home, AGENT_PORT=str(port), SERVER_THUMBPRINT=with_colons)
        self.assertIn(b"trusting 1 server(s)", agent.output)
        await self.drive(home, port)
