"""
What the agent logs at info while it serves: one line per script start
and end, each refused connection, each trust change; every request only
at debug.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import reactor
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import AgentRefused, Pin
from tests.support import LogCapture, agent_port, identity, start_agent


class LogLevelTests(TestCase):
    async def test_info_lines_of_a_session(self) -> None:
        agent = start_agent(self, trusted=(identity("server").thumbprint,))
        logs = LogCapture.install(self)
        target = Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor)
        local = Path(self.mktemp())
        local.write_bytes(b"payload")
        await client.upload(local, "in/p.bin")
        await client.download("in/p.bin", Path(self.mktemp()))
        self.assertEqual(await client.run_script("echo hi"), 0)
        await client.close()
        stranger = TentacleClient(target, identity("stranger"), reactor)
        with self.assertRaises(AgentRefused):
            await stranger.capabilities()
        await stranger.close()
        agent.apply_trust((identity("server").thumbprint, "AB" * 20))

        def at_least_info(event: dict[str, object]) -> bool:
            level = event.get("log_level")
            return isinstance(level, type(LogLevel.info)) and level >= LogLevel.info

        info = [e.get("event") for e in logs.events if at_least_info(e) and e.get("log_namespace", "").startswith("tentacle")]
        self.assertEqual(
            info,
            ["script_started", "script_finished", "client_denied", "trust_added"],
            [e.get("log_format") for e in logs.events if at_least_info(e)],
        )
        served = logs.matching(event="request_served")
        self.assertGreaterEqual(len(served), 5)
        self.assertEqual({e["log_level"] for e in served}, {LogLevel.debug})
