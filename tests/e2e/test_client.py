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

from tentacle.client.api import RemoteError, RetryPolicy, Target, TentacleClient
from tentacle.client.connection import AgentRefused, ConnectionFailed, Pin, UnexpectedCertificate
from tentacle.contracts import SCRIPT_SERVICE, ProcessOutputSource
from tentacle.dispatch import Dispatcher
from tentacle.services.scripts import ScriptRunner, ScriptService
from tests.e2e.test_scripts import _processes_with
from tests.support import LogCapture, agent_port, identity, remove_big_files, start_agent


class ClientTests(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.agent = start_agent(self, home=self.home, trusted=(identity("server").thumbprint,))
        self.addCleanup(self._stop_scripts)

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
        self.agent = start_agent(
            self, home=self.home, trusted=(identity("server").thumbprint,),
            service_options={"dispatcher": dispatcher},
        )
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
        with self.assertRaises(ConnectionFailed) as caught:
            await client.capabilities()
        self.assertIn("after 3 tries", str(caught.exception))
        retries = [e for e in self.logs.events if "trying again" in e.get("log_format", "")]
        self.assertEqual(len(retries), 2)
