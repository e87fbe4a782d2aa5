"""
The hub over real sockets: polling agents dial it, CLI users reach them
through it, Halibut all the way (the user's request is forwarded by its
endpoint, data streams spooled through, both ways).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import RemoteError, RetryPolicy, Target, TentacleClient
from tentacle.client.connection import AgentRefused, Pin
from tentacle.hub.config import HubConfig, HubConfigFile
from tentacle.hub.service import HubService
from tests.support import (
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
        trusted_thumbprints=(identity("agent").thumbprint, identity("server").thumbprint),
        **changes,
    )
    hub = HubService(config, reactor, identity=identity("hub"))
    hub.startService()
    case.addCleanup(lambda: hub.stopService() if hub.running else None)
    return hub


class HubTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    async def agent_on(self, hub: HubService, **changes: Any) -> Any:
        agent = start_polling_agent(self, hub.server, **changes)
        while not any(up for _, up, _ in agent.polling.status()):
            await self.logs.wait_for(event="polling_connected")
            self.logs.events = [e for e in self.logs.events if e.get("event") != "polling_connected"]
        return agent

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
