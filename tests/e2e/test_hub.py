"""
The hub over real sockets: polling agents dial it, CLI users reach them
through it, Halibut all the way (the user's request is forwarded by its
endpoint, data streams spooled through, both ways).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from tentacle.client.api import RemoteError, RetryPolicy, Target, TentacleClient
from tentacle.client.connection import AgentRefused, Pin
from tentacle.hub.config import HubConfig, HubConfigFile
from tentacle.hub.service import HubService
from tentacle.identity import IdentityStore
from tests.e2e.test_client_cli import client_cli
from tests.support import (
    remove_big_files,
    SUBSCRIPTION,
    LogCapture,
    identity,
    polled,
    start_polling_agent,
)


def start_hub(case: TestCase, **changes: Any) -> HubService:
    home = Path(case.mktemp()).absolute()
    home.mkdir()
    config = HubConfig(
        home=home,
        port=0,
        listen_address="127.0.0.1",
        agents=(identity("agent").thumbprint,),
        users=(identity("server").thumbprint,),
        **changes,
    )
    hub = HubService(config, reactor, identity=identity("hub"))
    hub.startService()
    case.addCleanup(lambda: hub.stopService() if hub.running else None)
    return hub


async def agent_on(case: TestCase, logs: LogCapture, hub: HubService, **changes: Any) -> Any:
    """
    An agent polling C{hub}, once one of its connections is up.
    """
    agent = start_polling_agent(case, hub.server, **changes)
    while not any(up for _, up, _ in agent.polling.status()):
        await logs.wait_for(event="polling_connected")
        logs.events = [e for e in logs.events if e.get("event") != "polling_connected"]
    return agent


class HubTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)

    async def agent_on(self, hub: HubService, **changes: Any) -> Any:
        return await agent_on(self, self.logs, hub, **changes)

    def client(self, hub: HubService, who: str = "server", agent_pin: str | None = None, **kwargs: Any) -> TentacleClient:
        target = Target(
            "127.0.0.1", hub.server.listening_port, Pin(identity("hub").thumbprint),
            subscription=SUBSCRIPTION, agent_pin=Pin(agent_pin) if agent_pin else None,
        )
        client = TentacleClient(target, identity(who), reactor, **kwargs)
        self.addCleanup(client.close)
        return client

    async def test_a_script_through_the_hub(self) -> None:
        hub = start_hub(self)
        await self.agent_on(hub)
        lines: list[str] = []
        client = self.client(hub, agent_pin=identity("agent").thumbprint)
        code = await client.run_script("echo through the hub; exit 7", on_log=lambda l: lines.append(l.text))
        self.assertEqual((code, lines), (7, ["through the hub"]))
        self.assertIn("IScriptServiceV2", await client.capabilities())
        forwarded = self.logs.matching(event="request_served", thumbprint=identity("server").thumbprint)
        self.assertTrue(forwarded, "the hub logs each user's request")
        self.assertIn('tentacle_hub_subscriptions_connected 1', hub.metrics.render())

    async def test_files_both_ways_through_the_hub(self) -> None:
        hub = start_hub(self)
        agent = await self.agent_on(hub)
        source = Path(self.mktemp())
        source.write_bytes(os.urandom(5 * 1024 * 1024 + 3))
        client = self.client(hub)
        result = await client.upload(source, "Packages/hub.bin")
        self.assertEqual(result.hash, hashlib.sha1(source.read_bytes()).hexdigest())
        self.assertEqual((agent.config.home / "Packages" / "hub.bin").read_bytes(), source.read_bytes())
        target = Path(self.mktemp())
        length, sha1 = await client.download("Packages/hub.bin", target)
        self.assertEqual((length, sha1), (result.length, result.hash))
        self.assertEqual(target.read_bytes(), source.read_bytes())

    async def test_no_such_agent_is_not_collected(self) -> None:
        hub = start_hub(self, collect_timeout=0.2)
        client = self.client(hub, retry=RetryPolicy(attempts=1))
        with self.assertRaises(RemoteError) as caught:
            await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        self.assertIn("did not collect the request within the allowed time", str(caught.exception))
        rendered = hub.metrics.render()
        self.assertNotIn("tentacle_hub_queue_depth{", rendered, "an empty queue nobody waits on is dropped")
        self.assertIn('tentacle_hub_requests_forwarded_total{outcome="error"} 1', rendered)

    async def test_the_agent_pin_is_checked_by_the_hub(self) -> None:
        hub = start_hub(self)
        await self.agent_on(hub)
        with self.assertRaises(RemoteError) as caught:
            await self.client(hub, agent_pin=identity("someone else").thumbprint).capabilities()
        self.assertIn(identity("agent").thumbprint, str(caught.exception))

    async def test_an_untrusted_user_is_refused(self) -> None:
        hub = start_hub(self)
        client = self.client(hub, who="intruder", retry=RetryPolicy(attempts=2, interval=0.01))
        with self.assertRaises(AgentRefused):
            await client.capabilities()
        [denied] = self.logs.matching(event="client_denied")
        self.assertEqual(denied["thumbprint"], identity("intruder").thumbprint)

    async def test_an_agent_may_not_drive_the_others(self) -> None:
        """
        Agents and users are trusted apart: a trusted agent's key cannot
        send requests through the hub to the other agents.
        """
        hub = start_hub(self)
        await self.agent_on(hub)
        client = self.client(hub, who="agent", rpc_retry=None)
        with self.assertRaises(AgentRefused):
            await client.capabilities()
        [refused] = self.logs.matching(event="polling_claim_refused", what="a user")
        self.assertEqual(refused["thumbprint"], identity("agent").thumbprint)

    async def test_a_user_may_not_poll(self) -> None:
        from tentacle.config import TentacleConfig
        from tentacle.service import TentacleService

        hub = start_hub(self)
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        # An agent that polls with a user's key.
        agent = TentacleService(
            TentacleConfig(home=home, port=0, listen=False, polling_servers=(polled(hub.server),)),
            reactor, identity=identity("server"),
        )
        agent.startService()
        self.addCleanup(agent.stopService)
        refused = await self.logs.wait_for(event="polling_claim_refused", what="an agent")
        self.assertEqual(refused["thumbprint"], identity("server").thumbprint)
        self.assertEqual(hub.server.connections(), 0)

    async def test_a_request_without_a_polling_endpoint_is_refused(self) -> None:
        hub = start_hub(self)
        plain = Target("127.0.0.1", hub.server.listening_port, Pin(identity("hub").thumbprint))
        client = TentacleClient(plain, identity("server"), reactor)
        self.addCleanup(client.close)
        with self.assertRaises(RemoteError) as caught:
            await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        self.assertIn("poll://ID/", str(caught.exception))

    async def test_trust_and_bindings_reload(self) -> None:
        hub = start_hub(self)
        config_file = HubConfigFile(hub.config.home)
        # (port 0, a free port, is for tests only: a file must name a real one)
        config_file.save(attrs.evolve(hub.config, port=10943).bind(SUBSCRIPTION, identity("someone else").thumbprint))
        hub._config_file = config_file
        hub.reload()
        start_polling_agent(self, hub.server, polling_servers=(polled(hub.server),))
        refused = await self.logs.wait_for(event="polling_claim_refused")
        self.assertEqual(refused["subscription"], SUBSCRIPTION)


    def test_connection_budgets_reload(self) -> None:
        """
        The polling port's budgets: defaults as the agent's but no cap per
        address (agents behind one NAT), and a reload applies new ones.
        """
        hub = start_hub(self)
        limits = hub.server.factory.limits
        self.assertEqual(
            (limits.max_connections, limits.max_unauthenticated, limits.max_unauthenticated_per_address,
             limits.connection_log_lines),
            (1000, 250, 250, 20),
        )
        config_file = HubConfigFile(hub.config.home)
        config_file.save(attrs.evolve(
            hub.config, port=10943, max_connections=5000, max_unauthenticated_connections=900, connection_log_lines=0,
        ))
        hub._config_file = config_file
        hub.reload()
        limits = hub.server.factory.limits
        self.assertEqual(
            (limits.max_connections, limits.max_unauthenticated, limits.max_unauthenticated_per_address,
             limits.connection_log_lines),
            (5000, 900, 900, 0),
        )
        self.assertEqual(hub.server.factory.lines.lines, 0)
        [applied] = self.logs.matching(event="setting_applied")
        self.assertIn("5000 connections, 900 unauthenticated", formatEvent(applied))
        for key, value in [("max-connections", 0), ("max-unauthenticated-connections", None),
                           ("connection-log-lines", -1), ("connection-log-lines", 1.5)]:
            config_file.path.write_text(json.dumps({**attrs.evolve(hub.config, port=10943).to_json(), key: value}))
            hub.reload()
            [error] = self.logs.matching(log_format="Configuration not reloaded: {error}")
            self.assertIn(key, error["error"])
            self.logs.events.remove(error)
            self.assertEqual(hub.server.factory.limits.max_unauthenticated, 900)


class HubCLITests(TestCase):
    """
    C{tentacle-client --hub} as a user runs it (a child process), and
    C{tentacle-hub}'s own commands.
    """

    timeout = 60

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.home = Path(self.mktemp()).absolute()
        IdentityStore(self.home).save(identity("server"))

    async def test_a_user_runs_a_script_and_downloads_through_the_hub(self) -> None:
        hub = start_hub(self)
        agent = await agent_on(self, self.logs, hub)
        (agent.config.home / "note.txt").write_text("polled\n")
        common = [
            "--home", str(self.home), "--hub", f"127.0.0.1:{hub.server.listening_port}",
            "--hub-thumbprint", identity("hub").thumbprint,
        ]
        target = f"{SUBSCRIPTION}={identity('agent').thumbprint}"
        code, out, err = await client_cli("run", *common, target, "-c", "echo from the polling agent")
        self.assertEqual(code, 0, err)
        self.assertIn("from the polling agent", out)
        local = Path(self.mktemp())
        code, out, err = await client_cli("download", *common, target, "note.txt", str(local))
        self.assertEqual(code, 0, err)
        self.assertEqual(local.read_text(), "polled\n")

    async def test_a_polling_target_needs_a_hub(self) -> None:
        code, out, err = await client_cli("run", "--home", str(self.home), SUBSCRIPTION, "-c", "true")
        self.assertEqual(code, 2)
        self.assertIn("reached through a hub: give --hub HOST[:PORT] and --hub-thumbprint", err)

    def test_hub_commands(self) -> None:
        from tentacle.hub.cli import main

        home = Path(self.mktemp()).absolute()

        def run(*argv: str) -> tuple[int, str, str]:
            out, err = io.StringIO(), io.StringIO()
            code = main(["--home", str(home), *argv], out, err)
            return code, out.getvalue(), err.getvalue()

        code, out, _ = run("new-certificate")
        self.assertEqual(code, 0)
        thumbprint = IdentityStore(home).load().thumbprint
        self.assertIn(thumbprint, run("show-thumbprint")[1])
        code, out, err = run("configure", "--trust", "ab" * 20, "--bind", f"POLL://X={'cd' * 20}", "--port", "11000")
        self.assertEqual(code, 0, err)
        config = HubConfigFile(home).load()
        self.assertEqual(config.agents, ("AB" * 20,))
        self.assertEqual(config.bindings, (("poll://x/", ("CD" * 20,)),))
        self.assertEqual(config.port, 11000)
        shown = run("show-configuration")[1]
        self.assertIn(f"poll://x/ -> {'CD' * 20}", shown)
        self.assertEqual(run("configure")[0], 2)
        code, _, err = run("configure", "--bind", "poll://x/")
        self.assertEqual(code, 2)
        self.assertIn("expected poll://ID/=THUMBPRINT", err)
        code, _, err = run("configure", "--remove-trust", "EF" * 20)
        self.assertEqual(code, 1)
        self.assertIn("is not a trusted agent", err)
        code, out, err = run("configure", "--trust-user", "ef" * 20)
        self.assertEqual((code, HubConfigFile(home).load().users), (0, ("EF" * 20,)), err)
        code, out, err = run(
            "configure", "--max-connections", "none", "--max-unauthenticated-connections", "600",
            "--connection-log-lines", "5",
        )
        self.assertEqual(code, 0, err)
        config = HubConfigFile(home).load()
        self.assertEqual((config.max_connections, config.max_unauthenticated_connections, config.connection_log_lines),
                         (None, 600, 5))
        self.assertIn("Max connections set to no limit", out)
        shown = run("show-configuration")[1]
        self.assertIn("Max connections:  no limit, 600 unauthenticated", shown)
        self.assertIn("Connection log lines: 5 per kind per 10 s", shown)
        code, out, err = run("configure", "--max-connections", "2000")
        self.assertEqual((code, HubConfigFile(home).load().max_connections), (0, 2000), err)
        code, _, err = run("configure", "--max-unauthenticated-connections", "0")
        self.assertEqual(code, 2)
        self.assertIn("expected a whole number of at least 1", err)


class HubProcessTests(TestCase):
    """
    C{tentacle hub} as an operator runs it: a child process that serves its
    polling port until stopped.
    """

    timeout = 60

    async def test_runs_and_serves_the_page(self) -> None:
        import signal
        import socket
        import sys

        from tentacle.page import FRIENDLY_PAGE
        from tests.e2e.test_client_cli import CLIProcess
        from tests.e2e.test_daemon import CHECKOUT
        from tests.support import client_context, converse, in_thread

        home = Path(self.mktemp()).absolute()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        HubConfigFile(home).save(HubConfig(home=home, port=port, listen_address="127.0.0.1"))
        protocol = CLIProcess(wait_for=b"Polling port")
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol, sys.executable, [sys.executable, "-m", "tentacle", "hub", "--hub-home", str(home)],
            env=dict(os.environ, PYTHONPATH=CHECKOUT),
        )
        try:
            await protocol.seen
            result = await in_thread(converse, port, client_context(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(result.received, FRIENDLY_PAGE)
            self.assertTrue(IdentityStore(home).exists(), "the hub made its identity on first start")
        finally:
            process.signalProcess(signal.SIGTERM)
            await protocol.ended
