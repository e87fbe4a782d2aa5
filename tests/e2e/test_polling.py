"""
Polling mode over real sockets: an agent that dials a polling server, and
a client that reaches the agent through the server's queue.

Mirrors Halibut's polling fixtures: scripts and transfers both ways, the
wrong certificate on each side, the page on the polling port, a proxy,
trust removal, subscription binding and the collect timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tentacle.client.api import RemoteError, Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.config import ConfigFile
from tentacle.contracts import ProcessOutputSource
from tentacle.hub.queues import NotCollected, WrongAgent
from tentacle.page import FRIENDLY_PAGE
from tests.connect_proxy import ConnectProxy
from tests.e2e.test_scripts import _processes_with
from tests.support import (
    remove_big_files,
    SUBSCRIPTION,
    LogCapture,
    agent_port,
    client_context,
    converse,
    identity,
    in_thread,
    polled,
    start_polling_agent,
    start_polling_server,
)


class PollingTests(TestCase):
    timeout = 20
    def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)

    async def connected(self, agent: Any, count: int = 1) -> None:
        """
        Wait (on events, not on time) until C{count} of the agent's polling
        connections are identified with their server.
        """
        while sum(up for _, up, _ in agent.polling.status()) < count:
            await self.logs.wait_for(event="polling_connected")
            self.logs.events = [e for e in self.logs.events if e.get("event") != "polling_connected"]

    def client(self, server: Any, pin: str | None = None) -> TentacleClient:
        target = Target.polling(SUBSCRIPTION, Pin(pin or identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor, hub=server)
        self.addCleanup(client.close)
        return client

    async def test_runs_a_script_through_the_queue(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        self.assertIsNone(agent.port, "a polling-only agent opens no port")
        await self.connected(agent)
        lines: list[Any] = []
        code = await self.client(server).run_script(
            "echo hello; echo oops >&2; exit 3", on_log=lambda line: lines.append((line.source, line.text))
        )
        self.assertEqual(code, 3)
        self.assertEqual(lines, [(ProcessOutputSource.StdOut, "hello"), (ProcessOutputSource.StdErr, "oops")])
        [served] = self.logs.matching(event="request_served", method="StartScript")
        self.assertEqual(served["thumbprint"], identity("hub").thumbprint)

    async def test_capabilities_upload_and_download(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.connected(agent)
        client = self.client(server)
        self.assertIn("IScriptServiceV2", await client.capabilities())
        source = Path(self.mktemp())
        source.write_bytes(os.urandom(3 * 1024 * 1024 + 11))
        result = await client.upload(source, "Packages/polled.bin")
        self.assertEqual(result.hash, hashlib.sha1(source.read_bytes()).hexdigest())
        self.assertEqual((agent.config.home / "Packages" / "polled.bin").read_bytes(), source.read_bytes())
        target = Path(self.mktemp())
        length, sha1 = await client.download("Packages/polled.bin", target)
        self.assertEqual((length, sha1), (result.length, result.hash))
        self.assertEqual(target.read_bytes(), source.read_bytes())

    async def test_several_connections_share_the_queue(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server, polling_servers=(polled(server, connections=3),))
        await self.connected(agent, 3)
        client = self.client(server)
        codes = await _gather([client.run_script(f"sleep 0.2; exit {n}") for n in range(6)])
        self.assertEqual(sorted(codes), list(range(6)))

    async def test_wrong_server_certificate_is_never_trusted(self) -> None:
        server = start_polling_server(self)
        expected = identity("someone else").thumbprint
        start_polling_agent(self, server, polling_servers=(polled(server, thumbprint=expected),))
        refused = await self.logs.wait_for(event="polling_refused")
        self.assertEqual((refused["expected"], refused["presented"]), (expected, identity("hub").thumbprint))
        self.assertIn(expected, refused["error"])
        self.assertEqual(server.connections(), 0)
        self.assertEqual(self.logs.matching(event="client_denied"), [], "nothing was sent to it")

    async def test_agent_the_server_does_not_trust(self) -> None:
        server = start_polling_server(self, trusted=())
        start_polling_agent(self, server)
        denied = await self.logs.wait_for(event="client_denied")
        self.assertEqual(denied["thumbprint"], identity("agent").thumbprint)
        refused = await self.logs.wait_for(event="polling_refused")
        self.assertIn("may not trust", refused["log_format"])

    async def test_requests_for_an_absent_agent_are_not_collected(self) -> None:
        server = start_polling_server(self, collect_timeout=0.2)
        with self.assertRaises(NotCollected) as caught:
            await self.client(server).call("ICapabilitiesServiceV2", "GetCapabilities")
        self.assertIn("did not collect the request within the allowed time", str(caught.exception))

    async def test_a_pinned_target_refuses_another_agent(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.connected(agent)
        with self.assertRaises(WrongAgent):
            await self.client(server, pin=identity("someone else").thumbprint).capabilities()

    async def test_binding_keeps_other_agents_off_a_subscription(self) -> None:
        server = start_polling_server(self, bindings={SUBSCRIPTION: [identity("someone else").thumbprint]})
        start_polling_agent(self, server)
        refused = await self.logs.wait_for(event="polling_claim_refused")
        self.assertEqual(refused["thumbprint"], identity("agent").thumbprint)
        await self.logs.wait_for(event="polling_refused")
        self.assertEqual(server.connections(), 0)

    async def test_page_on_the_polling_port(self) -> None:
        server = start_polling_server(self)
        result = await in_thread(
            converse, server.listening_port, client_context(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(result.received, FRIENDLY_PAGE)

    async def test_through_a_proxy(self) -> None:
        proxy = ConnectProxy()
        port = reactor.listenTCP(0, proxy, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        server = start_polling_server(self)
        url = f"http://127.0.0.1:{port.getHost().port}"
        agent = start_polling_agent(self, server, polling_servers=(polled(server, proxy=url),))
        await self.connected(agent)
        self.assertEqual(await self.client(server).run_script("exit 5"), 5)
        self.assertEqual(proxy.tunnels, 1)
        self.assertEqual(proxy.requests[0][0], f"CONNECT 127.0.0.1:{server.listening_port} HTTP/1.0")

    async def test_listening_and_polling_at_once(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(
            self, server, listen=True, trusted_thumbprints=(identity("server").thumbprint,)
        )
        await self.connected(agent)
        direct = TentacleClient(
            Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint)), identity("server"), reactor
        )
        self.addCleanup(direct.close)
        self.assertEqual(await direct.run_script("exit 1"), 1)
        self.assertEqual(await self.client(server).run_script("exit 2"), 2)
        self.assertIn(identity("hub").thumbprint, agent.trust.thumbprints, "the polled server is trusted too")

    async def test_removing_the_server_cuts_its_connections(self) -> None:
        server = start_polling_server(self)
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        agent = start_polling_agent(self, server, home=home)
        config_file = ConfigFile(home)
        config_file.save(attrs.evolve(agent.config, port=10933))
        agent._config_file = config_file
        await self.connected(agent)
        self.assertIn(identity("hub").thumbprint, agent.trust.thumbprints)
        config_file.save(attrs.evolve(agent.config, port=10933, polling_servers=()))
        gone = self.logs.wait_for(event="polling_unsubscribed")
        agent.reload()
        await gone
        self.assertEqual(server.connections(), 0)
        self.assertNotIn(identity("hub").thumbprint, agent.trust.thumbprints)

    async def test_the_server_removing_trust_cuts_the_agent(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.connected(agent)
        gone = self.logs.wait_for(event="polling_unsubscribed")
        server.trust.replace(())
        await gone
        await self.logs.wait_for(event="polling_disconnected")

    async def test_cancel_reaches_the_script(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.connected(agent)
        tag = f"600.{os.getpid()}3"
        started: list[str] = []
        d = Deferred.fromCoroutine(
            self.client(server).run_script(f"echo started; sleep {tag}", on_log=lambda l: started.append(l.text))
        )
        while not started:
            await deferLater(reactor, 0.05, lambda: None)
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertEqual(_processes_with(tag), [])

    async def test_audit_and_metrics_count_polling_connections(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.connected(agent)
        self.assertEqual(await self.client(server).run_script("exit 0"), 0)
        agent.flush_audit()
        entries = [json.loads(line) for line in (agent.config.home / "Logs" / "audit.log").read_text().splitlines()]
        kinds = [e["kind"] for e in entries]
        self.assertIn("polling-connected", kinds)
        [connected] = [e for e in entries if e["kind"] == "polling-connected"]
        self.assertEqual(
            (connected["server"], connected["subscription"]), (f"127.0.0.1:{server.listening_port}", SUBSCRIPTION)
        )
        requests = [e for e in entries if e["kind"] == "request"]
        self.assertTrue(requests)
        self.assertTrue(all(e["thumbprint"] == identity("hub").thumbprint for e in requests))
        labels = f'{{server="127.0.0.1:{server.listening_port}",subscription="{SUBSCRIPTION}"}}'
        rendered = agent.metrics.render()
        self.assertIn(f"tentacle_polling_connections{labels} 1\n", rendered)
        self.assertIn(f"tentacle_polling_connections_configured{labels} 1\n", rendered)
        self.assertIn(f'tentacle_polling_sessions_total{{server="127.0.0.1:{server.listening_port}"}} 1\n', rendered)
        heartbeat = agent._heartbeat().splitlines()
        self.assertEqual(heartbeat[1], f"polling 127.0.0.1:{server.listening_port} {SUBSCRIPTION} 1/1")

    async def test_the_agent_redials_when_the_keep_alives_stop(self) -> None:
        """
        A server that stops sending anything (no request, no NULL) is taken
        for dead once the agent's wait for the next envelope runs out; the
        agent drops the connection and dials again (Halibut's
        PollingQueueTimeouts, scaled down: the server waits 100 s before a
        NULL, the agent 1 s for an envelope).
        """
        from tentacle.halibut.connection import ExchangeSettings

        server = start_polling_server(self, settings=ExchangeSettings(polling_queue_wait=100))
        start_polling_agent(self, server, service_options={
            "exchange_settings": ExchangeSettings(polling_request_timeout=1),
        })
        first = await self.logs.wait_for(event="polling_connected")
        timed_out = await self.logs.wait_for(event="connection_timed_out", state="reading a request")
        self.logs.events = [e for e in self.logs.events if e.get("event") != "polling_connected"]
        again = await self.logs.wait_for(event="polling_connected")
        self.assertLess(first["log_time"], timed_out["log_time"])
        self.assertLess(timed_out["log_time"], again["log_time"])

    async def test_agent_errors_come_back(self) -> None:
        server = start_polling_server(self)
        agent = start_polling_agent(self, server)
        await self.connected(agent)
        with self.assertRaises(RemoteError) as caught:
            await self.client(server).download("/no/such/file", Path(self.mktemp()))
        self.assertIn("does not exist", str(caught.exception))


async def _gather(coroutines: list[Any]) -> list[Any]:
    from twisted.internet.defer import gatherResults

    return list(await gatherResults([Deferred.fromCoroutine(c) for c in coroutines]))
