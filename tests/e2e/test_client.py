"""
The client library against a real agent on loopback.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tentacle.client.api import RemoteError, RetryPolicy, RpcRetryPolicy, Target, TentacleClient, TransferError
from tentacle.client.connection import AgentRefused, Pin, UnexpectedCertificate
from tentacle.dialer import ConnectionRefused
from tentacle.contracts import SCRIPT_SERVICE, ProcessOutputSource
from tentacle.dispatch import Dispatcher
from tentacle.hub.queues import NotCollected, WrongAgent
from tentacle.services.scripts import ScriptRunner, ScriptService
from tests.e2e.test_scripts import _processes_with
from tests.support import (
    SUBSCRIPTION,
    LogCapture,
    agent_port,
    identity,
    remove_big_files,
    start_agent,
    start_polling_agent,
    start_polling_server,
)


class ClientTests(TestCase):
    """
    The client against a listening agent; L{PollingClientTests} runs the
    same tests against a polling one.
    """

    async def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.agent = await self.start(self.home)
        self.addCleanup(self._stop_scripts)

    async def start(self, home: Path, **service_options: Any) -> Any:
        return start_agent(
            self, home=home, trusted=(identity("server").thumbprint,), service_options=service_options
        )

    def _stop_scripts(self) -> Any:
        from twisted.internet.defer import gatherResults

        runner = self.agent.scripts
        waits = []
        if runner is not None:
            for script in list(runner._scripts.values()):
                if not script.complete:
                    runner.cancel(script.launch.ticket)
                    waits.append(script.when_finished())
        return gatherResults(waits)

    def client(self, pin: str | None = None, who: str = "server", **kwargs: Any) -> TentacleClient:
        target = Target("127.0.0.1", agent_port(self.agent), Pin(pin or identity("agent").thumbprint))
        client = TentacleClient(target, identity(who), reactor, **kwargs)
        self.addCleanup(client.close)
        return client

    async def test_capabilities(self) -> None:
        self.assertEqual(
            await self.client().capabilities(),
            ["IScriptService", "IFileTransferService", "IScriptServiceV2"],
        )

    async def test_pin_by_sha256_any_case(self) -> None:
        client = self.client(pin=identity("agent").sha256.lower())
        self.assertIn("IScriptServiceV2", await client.capabilities())

    async def test_run_script_streams_logs(self) -> None:
        lines: list[Any] = []
        code = await self.client().run_script(
            "echo one; echo two >&2; exit 4", on_log=lambda line: lines.append((line.source, line.text))
        )
        self.assertEqual(code, 4)
        self.assertEqual(lines, [(ProcessOutputSource.StdOut, "one"), (ProcessOutputSource.StdErr, "two")])
        self.assertEqual(list((self.home / "Work").iterdir()), [], "CompleteScript removed the workspace")

    async def test_a_quick_script_takes_one_call(self) -> None:
        """
        StartScript waits for a quick script (DurationToWaitForScriptToFinish),
        so its log comes back with the answer: no GetStatus at all.
        """
        lines: list[str] = []
        self.assertEqual(await self.client().run_script("echo hello", on_log=lambda l: lines.append(l.text)), 0)
        self.assertEqual(lines, ["hello"])
        served = [e["method"] for e in self.logs.matching(event="request_served") if e["service"] == "IScriptServiceV2"]
        self.assertEqual(served, ["StartScript", "CompleteScript"])

    async def test_output_streams_while_the_script_runs(self) -> None:
        """
        The first line reaches the caller while the script still runs: the
        script waits for a file that only the caller's handler of that line
        creates, so a client that held lines back would never finish.
        """
        go = Path(self.mktemp()).absolute()
        lines: list[str] = []

        def on_log(line: Any) -> None:
            lines.append(line.text)
            if line.text == "first":
                go.write_text("")

        code = await self.client().run_script(
            f"echo first; while [ ! -e {go} ]; do sleep 0.05; done; echo last", on_log=on_log
        )
        self.assertEqual((code, lines), (0, ["first", "last"]))

    async def test_run_script_with_files_and_arguments(self) -> None:
        data = Path(self.mktemp())
        data.write_text("from a file\n")
        lines: list[str] = []
        code = await self.client().run_script(
            'cat input.txt; echo "$1"', arguments=("arg one",), files={"input.txt": data},
            on_log=lambda line: lines.append(line.text),
        )
        self.assertEqual((code, lines), (0, ["from a file", "arg one"]))

    async def test_v1_when_v2_is_not_offered(self) -> None:
        dispatcher = Dispatcher()
        runner = ScriptRunner(reactor, self.home, self.home / "Applications")
        dispatcher.register(SCRIPT_SERVICE, ScriptService(runner))
        from tentacle.contracts import CAPABILITIES_SERVICE_V2
        from tentacle.services.capabilities import CapabilitiesService

        dispatcher.register(CAPABILITIES_SERVICE_V2, CapabilitiesService(dispatcher))
        self.agent = await self.start(self.home, dispatcher=dispatcher)
        client = self.client()
        self.assertEqual(await client.capabilities(), ["IScriptService"])
        lines: list[str] = []
        self.assertEqual(await client.run_script("echo v1", on_log=lambda l: lines.append(l.text)), 0)
        self.assertEqual(lines, ["v1"])

    async def test_cancel_stops_the_remote_script(self) -> None:
        tag = f"600.{os.getpid()}7"
        client = self.client()
        started: list[str] = []
        running = client.run_script(f"echo started; sleep {tag}", on_log=lambda l: started.append(l.text))
        d = Deferred.fromCoroutine(running)
        while not started:
            await deferLater(reactor, 0.05, lambda: None)
        d.cancel()
        try:
            await d
        except CancelledError as e:
            self.assertIn("-43", str(e))
        else:
            self.fail("not cancelled")
        self.assertEqual(_processes_with(tag), [])

    async def test_upload_and_download(self) -> None:
        source = Path(self.mktemp())
        source.write_bytes(os.urandom(3 * 1024 * 1024 + 7))
        progress: list[tuple[int, int]] = []
        client = self.client()
        result = await client.upload(source, "Packages/blob.bin", progress=lambda d, t: progress.append((d, t)))
        self.assertEqual(result.length, source.stat().st_size)
        self.assertEqual(result.hash, hashlib.sha1(source.read_bytes()).hexdigest())
        self.assertEqual(progress[-1], (result.length, result.length))
        target = Path(self.mktemp())
        length, sha1 = await client.download("Packages/blob.bin", target)
        self.assertEqual((length, sha1), (result.length, result.hash))
        self.assertEqual(target.read_bytes(), source.read_bytes())

    async def test_download_into_a_missing_folder(self) -> None:
        with self.assertRaises(TransferError) as caught:
            await self.client().download("anything", Path(self.mktemp()) / "no" / "file")
        self.assertIn("is not a folder", str(caught.exception))
        self.assertEqual(self.logs.matching(event="request_served", method="DownloadFile"), [], "nothing asked")

    async def test_download_missing(self) -> None:
        with self.assertRaises(RemoteError) as caught:
            await self.client().download("no/such/file", Path(self.mktemp()))
        self.assertIn("does not exist", str(caught.exception))

    async def test_connections_are_reused(self) -> None:
        client = self.client()
        for _ in range(5):
            await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        self.assertEqual(len(self.logs.matching(event="client_authenticated")), 1)

    async def test_wrong_pin(self) -> None:
        wrong = "AB" * 20
        client = self.client(pin=wrong, retry=RetryPolicy(attempts=5, interval=0.01))
        with self.assertRaises(UnexpectedCertificate) as caught:
            await client.capabilities()
        message = str(caught.exception)
        self.assertIn(wrong, message)
        self.assertIn(identity("agent").thumbprint, message)
        self.assertIn("CN=agent", message)
        self.assertEqual(self.logs.matching(event="client_denied"), [], "nothing was sent")

    async def test_untrusted_client(self) -> None:
        client = self.client(who="intruder", retry=RetryPolicy(attempts=5, interval=0.01))
        with self.assertRaises(AgentRefused) as caught:
            await client.capabilities()
        self.assertIn("may not trust this certificate", str(caught.exception))
        self.assertEqual(len(self.logs.matching(event="client_denied")), 1, "not retried")

    async def test_agent_down_is_retried_then_reported(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = TentacleClient(
            Target("127.0.0.1", port, Pin(identity("agent").thumbprint)), identity("server"), reactor,
            retry=RetryPolicy(attempts=3, interval=0.05),
        )
        with self.assertRaises(ConnectionRefused) as caught:
            await client.capabilities()
        self.assertIn("after 3 tries", str(caught.exception))
        retries = [e for e in self.logs.events if "trying again" in e.get("log_format", "")]
        self.assertEqual(len(retries), 2)
        self.assertEqual(self.logs.matching(event="call_retried"), [], "nothing listens: not sent again")


class PollingClientTests(ClientTests):
    """
    The same client calls, to an agent that polls a polling server in this
    process: the client reaches it through the server's queue.
    """

    async def start(self, home: Path, **service_options: Any) -> Any:
        if not hasattr(self, "polling_server"):
            self.polling_server = start_polling_server(self)
        previous = getattr(self, "agent", None)
        if previous is not None:
            await previous.stopService()  # one agent per subscription
        agent = start_polling_agent(self, self.polling_server, home=home, service_options=service_options)
        while not any(up for _, up, _ in agent.polling.status()):
            await self.logs.wait_for(event="polling_connected")
            self.logs.events = [e for e in self.logs.events if e.get("event") != "polling_connected"]
        return agent

    def client(self, pin: str | None = None, who: str = "server", **kwargs: Any) -> TentacleClient:
        target = Target.polling(SUBSCRIPTION, Pin(pin or identity("agent").thumbprint))
        client = TentacleClient(target, identity(who), reactor, hub=self.polling_server, **kwargs)
        self.addCleanup(client.close)
        return client

    async def test_connections_are_reused(self) -> None:
        """
        Polling: the agent's one connection carries every call.
        """
        client = self.client()
        for _ in range(5):
            await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        self.assertEqual(len(self.logs.matching(event="polling_subscribed")), 1)
        self.assertEqual(len(self.logs.matching(event="request_served")), 5)

    async def test_wrong_pin(self) -> None:
        """
        Polling: the request is not handed to an agent with another certificate.
        """
        client = self.client(pin="AB" * 20, retry=RetryPolicy(attempts=5, interval=0.01))
        with self.assertRaises(WrongAgent) as caught:
            await client.capabilities()
        self.assertIn(identity("agent").thumbprint, str(caught.exception))
        self.assertEqual(self.logs.matching(event="request_served"), [], "nothing was sent")

    async def test_untrusted_client(self) -> None:
        """
        Polling: the agent, not the client, must be trusted by the server;
        an untrusted agent never takes work.
        """
        server = start_polling_server(self, trusted=())
        start_polling_agent(self, server, home=Path(self.mktemp()).absolute())
        await self.logs.wait_for(event="client_denied", thumbprint=identity("agent").thumbprint)
        self.assertEqual(server.connections(), 0)

    async def test_agent_down_is_retried_then_reported(self) -> None:
        """
        Polling: with no agent connected, a request is not collected in time.
        """
        server = start_polling_server(self, collect_timeout=0.05)
        client = TentacleClient(
            Target.polling(SUBSCRIPTION), identity("server"), reactor, hub=server,
            retry=RetryPolicy(attempts=3, interval=0.05),
            rpc_retry=RpcRetryPolicy(window=0.5, backoff=lambda n: 0.05, min_remaining=0.0),
        )
        with self.assertRaises(NotCollected) as caught:
            await client.capabilities()
        self.assertIn("did not collect the request", str(caught.exception))
        self.assertGreaterEqual(len(self.logs.matching(event="call_retried")), 2, "as Octopus Server retries it")


class BurstTests(TestCase):
    """
    Many calls at once from one client: new connections are set up a few
    at a time, within the agent's budget of connections per address that
    have not yet shown a trusted certificate, so none is evicted.
    """

    async def test_a_burst_stays_within_the_agents_budget(self) -> None:
        from twisted.internet.defer import gatherResults

        logs = LogCapture.install(self)
        agent = start_agent(self, trusted=(identity("server").thumbprint,), max_unauthenticated_per_address=4)
        target = Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor, max_connecting=4)
        self.addCleanup(client.close)
        calls = [
            Deferred.fromCoroutine(client.call("ICapabilitiesServiceV2", "GetCapabilities")) for _ in range(30)
        ]
        results = await gatherResults(calls, consumeErrors=True)
        self.assertEqual(len(results), 30)
        self.assertEqual(logs.matching(event="connection_evicted"), [])

    async def test_a_long_line_of_callers_waiting_for_a_place(self) -> None:
        """
        Hundreds of calls wait for one place to connect; as pooled
        connections come back, each waiter takes one: none is lost, however
        long the line (woken one by one on a single stack, they would run
        out of stack and leave the place taken for ever).
        """
        from twisted.internet.defer import gatherResults

        agent = start_agent(self, trusted=(identity("server").thumbprint,))
        target = Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor, max_connecting=1)
        self.addCleanup(client.close)
        calls = [
            Deferred.fromCoroutine(client.call("ICapabilitiesServiceV2", "GetCapabilities")) for _ in range(1500)
        ]
        results = await gatherResults(calls, consumeErrors=True)
        self.assertEqual(len(results), 1500)

    test_a_long_line_of_callers_waiting_for_a_place.timeout = 60  # type: ignore[attr-defined]
