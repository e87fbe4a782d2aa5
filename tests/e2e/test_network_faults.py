"""
The client driving a real agent through the fault forwarder: connections
killed or paused at exact moments of a script's life and of transfers.

Each test ends the way Halibut's and Tentacle's own network-fault tests
demand: the script ran exactly once and its whole log was read once, a
cancelled script stopped, an interrupted transfer left nothing and the
retry completed, and a dead pooled connection was found by the heartbeat.

Moments are exact because everything shares one reactor: a log observer on
the agent's C{request_served} event runs after the agent has acted but
before its answer has left its socket buffer, and a forwarder watcher sees
bytes before it relays them.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer
from twisted.trial.unittest import TestCase

from tentacle.client.api import RetryPolicy, Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.halibut.connection import ExchangeSettings
from tentacle.services.files import TEMP_MARKER
from tests.e2e.test_crashes import _kill_all
from tests.e2e.test_scripts import _processes_with
from tests.fault_forwarder import Direction, FaultForwarder, Link
from tests.figures import record
from tests.support import LogCapture, agent_port, identity, remove_big_files, start_agent
from tests.waiting import until, within

#: Short enough to keep the suite fast, long enough for a loaded CI box.
HEARTBEAT = 1.0
MiB = 1024 * 1024


def on_event(case: TestCase, action: Callable[[LogEvent], object], **fields: Any) -> None:
    """
    Run C{action} synchronously, once, at the first log event with these
    fields: at that moment the agent has acted, and its answer is still in
    its own socket buffer.
    """
    fired: list[bool] = []

    @implementer(ILogObserver)
    def observer(event: LogEvent) -> None:
        if fired or any(event.get(k) != v for k, v in fields.items()):
            return
        fired.append(True)
        action(event)

    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)


class NetworkFaultTestCase(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True)
        self.agent = start_agent(
            self,
            home=self.home,
            trusted=(identity("server").thumbprint,),
            service_options={
                "exchange_settings": ExchangeSettings(heartbeat_timeout=HEARTBEAT),
            },
        )
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

    def forwarder(self, **conditions: Any) -> FaultForwarder:
        forwarder = FaultForwarder(reactor, agent_port(self.agent), **conditions)
        forwarder.start()
        self.addCleanup(forwarder.stop)
        return forwarder

    def client(self, forwarder: FaultForwarder, **options: Any) -> TentacleClient:
        assert forwarder._port is not None
        target = Target("127.0.0.1", forwarder._port.getHost().port, Pin(identity("agent").thumbprint))
        settings: dict[str, Any] = dict(
            retry=RetryPolicy(attempts=5, interval=0.05, within=30.0),
            response_timeout=10.0,
            heartbeat_timeout=HEARTBEAT,
        )
        settings.update(options)
        client = TentacleClient(target, identity("server"), reactor, **settings)
        self.addCleanup(client.close)
        return client

    def served(self, method: str) -> int:
        return len(self.logs.matching(event="request_served", method=method))

    @property
    def retries(self) -> int:
        return len(self.logs.matching(event="call_retried"))


class ScriptFaultTests(NetworkFaultTestCase):
    """
    A connection killed during each script call.
    """

    async def run_once(self, client: TentacleClient) -> tuple[int, list[str], list[str]]:
        """
        A script that marks each run in a file; its exit code, its log as
        read, and the runs marked.
        """
        marker = self.base / "runs"
        lines: list[str] = []
        code = await client.run_script(
            f"echo run >> {marker}; echo hello; echo AllDone",
            on_log=lambda line: lines.append(line.text),
            wait_for_finish=0,  # the faults are put on GetStatus too
        )
        return code, lines, marker.read_text().splitlines()

    def assert_ran_once(self, code: int, lines: list[str], runs: list[str]) -> None:
        self.assertEqual(code, 0)
        self.assertEqual(lines, ["hello", "AllDone"], "the whole log, each line once")
        self.assertEqual(runs, ["run"], "the script ran exactly once")
        self.assertEqual(list((self.home / "Work").iterdir()), [], "the workspace is gone")

    async def test_start_script_answer_lost(self) -> None:
        forwarder = self.forwarder()
        on_event(self, lambda _: forwarder.kill_existing(), event="request_served", method="StartScript")
        code, lines, runs = await self.run_once(self.client(forwarder))
        self.assert_ran_once(code, lines, runs)
        self.assertEqual(self.served("StartScript"), 2, "sent again, and answered from the same run")
        self.assertGreaterEqual(self.retries, 1)
        record(self, "network", "connection reset after the agent started the script, before its answer",
               "StartScript resent with the same ticket; ran once, whole log read",
               faults=forwarder.connections_killed, retries=self.retries)

    async def test_start_script_request_lost(self) -> None:
        forwarder = self.forwarder()

        def arm(_: LogEvent) -> None:
            existing = list(forwarder.links)

            def kill_the_request(link: Link, direction: Direction, data: bytes) -> None:
                # The pooled connection's next big write is the request (NEXT is a
                # few bytes); it dies before the agent sees a byte of it.
                if link in existing and direction is Direction.UPSTREAM and len(data) > 100:
                    existing.clear()
                    link.kill()

            forwarder.watch(kill_the_request)

        on_event(self, arm, event="request_served", method="GetCapabilities")
        code, lines, runs = await self.run_once(self.client(forwarder))
        self.assert_ran_once(code, lines, runs)
        self.assertEqual(forwarder.connections_killed, 1)
        self.assertEqual(self.served("StartScript"), 1, "only the resent request arrived")
        record(self, "network", "connection reset while StartScript was on its way",
               "resent; ran once, whole log read",
               faults=forwarder.connections_killed, retries=self.retries)

    async def test_get_status_answer_lost(self) -> None:
        forwarder = self.forwarder()
        # Once the script has finished, the next status answer carries the
        # end of its log and Complete: lose exactly that one.
        on_event(
            self,
            lambda _: on_event(
                self, lambda _: forwarder.kill_existing(), event="request_served", method="GetStatus"
            ),
            event="script_finished",
            exit_code=0,
        )
        code, lines, runs = await self.run_once(self.client(forwarder))
        self.assert_ran_once(code, lines, runs)
        self.assertEqual(forwarder.connections_killed, 1)
        record(self, "network", "connection reset after GetStatus was answered",
               "GetStatus resent from the same sequence; no line lost or repeated",
               faults=forwarder.connections_killed, retries=self.retries)

    async def test_get_status_request_lost(self) -> None:
        forwarder = self.forwarder()

        def arm(_: LogEvent) -> None:
            existing = list(forwarder.links)

            def kill_the_request(link: Link, direction: Direction, data: bytes) -> None:
                if link in existing and direction is Direction.UPSTREAM and len(data) > 100:
                    existing.clear()
                    link.kill()

            forwarder.watch(kill_the_request)

        on_event(self, arm, event="request_served", method="StartScript")
        code, lines, runs = await self.run_once(self.client(forwarder))
        self.assert_ran_once(code, lines, runs)
        self.assertEqual(forwarder.connections_killed, 1)
        record(self, "network", "connection reset while GetStatus was on its way",
               "resent; whole log read once", faults=forwarder.connections_killed, retries=self.retries)

    async def test_complete_script_answer_lost(self) -> None:
        forwarder = self.forwarder()
        on_event(self, lambda _: forwarder.kill_existing(), event="request_served", method="CompleteScript")
        code, lines, runs = await self.run_once(self.client(forwarder))
        self.assert_ran_once(code, lines, runs)
        self.assertEqual(self.served("CompleteScript"), 2)
        record(self, "network", "connection reset after CompleteScript removed the workspace",
               "resent; the second is a no-op, the result stands",
               faults=forwarder.connections_killed, retries=self.retries)

    async def test_cancel_script_answer_lost(self) -> None:
        forwarder = self.forwarder()
        on_event(self, lambda _: forwarder.kill_existing(), event="request_served", method="CancelScript")
        client = self.client(forwarder)
        tag = f"600.{os.getpid()}3"
        self.addCleanup(_kill_all, tag)
        lines: list[str] = []
        started: Deferred[None] = Deferred()

        def log(text: str) -> None:
            lines.append(text)
            if text == "started" and not started.called:
                # Not from inside run_script's own loop: cancel it from outside.
                reactor.callLater(0, started.callback, None)

        d = Deferred.fromCoroutine(
            client.run_script(f"echo started; sleep {tag}; echo AllDone", on_log=lambda line: log(line.text))
        )
        await started
        d.cancel()
        with self.assertRaises(CancelledError) as caught:
            await d
        self.assertIn("-43", str(caught.exception))
        self.assertNotIn("AllDone", lines)
        self.assertEqual(_processes_with(tag), [], "the script's processes are gone")
        self.assertEqual(self.served("CancelScript"), 2)
        self.assertEqual(list((self.home / "Work").iterdir()), [])
        record(self, "network", "connection reset after CancelScript was acted on",
               "resent; script stopped (-43), no process left",
               faults=forwarder.connections_killed, retries=self.retries)


class NetworkConditionTests(NetworkFaultTestCase):
    """
    Halibut's network-condition matrix: a script and a transfer both ways
    over a slow link, and over one that delivers the last byte of each write late.
    """

    async def round_trip(self, forwarder: FaultForwarder) -> None:
        client = self.client(forwarder)
        lines: list[str] = []
        code = await client.run_script("echo one; echo two >&2; exit 3", on_log=lambda l: lines.append(l.text))
        self.assertEqual((code, lines), (3, ["one", "two"]))
        source = self.base / "blob"
        source.write_bytes(os.urandom(MiB + 3))
        result = await client.upload(source, "Packages/blob")
        self.assertEqual(result.hash, hashlib.sha1(source.read_bytes()).hexdigest())
        back = self.base / "back"
        length, sha1 = await client.download("Packages/blob", back)
        self.assertEqual((length, sha1), (result.length, result.hash))
        self.assertEqual(self.retries, 0, "slow is not broken")

    async def test_latency(self) -> None:
        forwarder = self.forwarder(latency=0.02)
        await self.round_trip(forwarder)
        record(self, "network", "20 ms added each way on every write",
               "script, upload and download complete, no retries",
               bytes_relayed=forwarder.bytes_up + forwarder.bytes_down)

    async def test_last_byte_late(self) -> None:
        forwarder = self.forwarder(latency=0.02, hold_back=1, hold_delay=0.02)
        await self.round_trip(forwarder)
        record(self, "network", "20 ms latency, last byte of each write 20 ms later",
               "script, upload and download complete, no retries",
               bytes_relayed=forwarder.bytes_up + forwarder.bytes_down)


class ConnectionResetTests(NetworkFaultTestCase):
    async def test_new_connections_reset_for_a_while(self) -> None:
        forwarder = self.forwarder()
        forwarder.kill_new = True
        client = self.client(forwarder)
        call = Deferred.fromCoroutine(client.call("ICapabilitiesServiceV2", "GetCapabilities"))
        await until(lambda: forwarder.connections_killed >= 3, "three connections reset")
        forwarder.kill_new = False
        await call
        attempts = [e for e in self.logs.events if "trying again" in e.get("log_format", "")]
        self.assertGreaterEqual(len(attempts), 3)
        record(self, "network", "every new connection reset on arrival, three times over",
               "the client's connection retries got through once the link came back",
               faults=forwarder.connections_killed)

    async def test_pooled_connection_reset_while_idle(self) -> None:
        """
        Found by the crash tests: a pooled connection the agent had closed
        was handed out again and the call failed with a RuntimeError.
        """
        forwarder = self.forwarder()
        client = self.client(forwarder)
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        [(pooled, _)] = client._idle
        forwarder.kill_existing()
        await pooled.closed  # the client has seen the reset
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        self.assertEqual(forwarder.connections_accepted, 2)
        record(self, "network", "idle pooled connection reset",
               "the dead connection is skipped; the next call opens a new one",
               faults=forwarder.connections_killed)


class TransferFaultTests(NetworkFaultTestCase):
    async def test_upload_slower_than_the_response_timeout(self) -> None:
        """
        The response timeout counts from the end of the request: an upload
        that takes longer to send is not cut off while it flows.
        """
        forwarder = self.forwarder(bandwidth=8 * MiB)
        source = self.source(24 * MiB)
        started = time.monotonic()
        result = await self.client(forwarder, response_timeout=2.0).upload(source, "Packages/slow.bin")
        took = time.monotonic() - started
        self.assertEqual(result.length, 24 * MiB)
        self.assertGreater(took, 2.5, "the link was the bottleneck")
        self.assertEqual(self.retries, 0)
        record(self, "network", "24 MiB upload over an 8 MiB/s link, longer than the 2 s response timeout",
               "stored intact, no retry: the timeout starts after the last byte is sent",
               took_s=round(took, 2))

    def source(self, size: int) -> Path:
        path = self.base / "source.bin"
        block = os.urandom(MiB)
        with path.open("wb") as f:
            for _ in range(size // MiB):
                f.write(block)
        return path

    def leftovers(self, folder: Path) -> list[str]:
        return sorted(p.name for p in folder.iterdir() if TEMP_MARKER in p.name or p.name.endswith(".tmp"))

    async def test_upload_killed_mid_stream(self) -> None:
        forwarder = self.forwarder()
        killed: list[int] = []

        def kill_midway(link: Link, direction: Direction, data: bytes) -> None:
            if not killed and direction is Direction.UPSTREAM and link.bytes_up > 4 * MiB:
                killed.append(link.bytes_up)
                link.kill()

        forwarder.watch(kill_midway)
        source = self.source(16 * MiB)
        abandoned = self.logs.wait_for(event="upload_abandoned")
        result = await self.client(forwarder).upload(source, "Packages/app.bin")
        await within(5, abandoned, "the agent abandoning the interrupted upload")
        stored = self.home / "Packages" / "app.bin"
        self.assertEqual(result.hash, hashlib.sha1(stored.read_bytes()).hexdigest())
        self.assertEqual(stored.read_bytes(), source.read_bytes())
        self.assertEqual(self.leftovers(stored.parent), [], "the interrupted upload left nothing")
        self.assertEqual(len(self.logs.matching(event="upload_stored")), 1)
        record(self, "network", "connection reset mid-upload (after 4 MiB of 16 MiB)",
               "temp file removed; resent upload stored intact",
               faults=len(killed), retries=self.retries, bytes_lost=killed[0])

    async def test_download_killed_mid_stream(self) -> None:
        forwarder = self.forwarder()
        source = self.source(16 * MiB)
        (self.home / "Exports").mkdir()
        os.link(source, self.home / "Exports" / "big.log")
        killed: list[int] = []

        def kill_midway(link: Link, direction: Direction, data: bytes) -> None:
            if not killed and direction is Direction.DOWNSTREAM and link.bytes_down > 4 * MiB:
                killed.append(link.bytes_down)
                link.kill()

        forwarder.watch(kill_midway)
        local = self.base / "out" / "big.log"
        local.parent.mkdir()
        length, sha1 = await self.client(forwarder).download("Exports/big.log", local)
        self.assertEqual(local.read_bytes(), source.read_bytes())
        self.assertEqual(sha1, hashlib.sha1(source.read_bytes()).hexdigest())
        self.assertEqual(self.leftovers(local.parent), [])
        record(self, "network", "connection reset mid-download (after 4 MiB of 16 MiB)",
               "resent download intact; no temp file left",
               faults=len(killed), retries=self.retries)


class PausedConnectionTests(NetworkFaultTestCase):
    """
    Black-holed links: nothing arrives, and no close is seen either.
    """

    async def test_paused_pooled_connection_found_by_the_heartbeat(self) -> None:
        forwarder = self.forwarder()
        client = self.client(forwarder, response_timeout=600.0)
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        forwarder.pause_existing()
        started = time.monotonic()
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        elapsed = time.monotonic() - started
        # NEXT went unanswered for one heartbeat; a fresh connection served it.
        self.assertGreaterEqual(elapsed, HEARTBEAT * 0.9)
        self.assertLess(elapsed, HEARTBEAT + 5)
        self.assertEqual(forwarder.connections_accepted, 2)
        forwarder.resume_existing()
        record(self, "network", "pooled connection paused (black-holed) while idle",
               f"NEXT unanswered, found dead after {elapsed:.1f} s (heartbeat), not 600 s",
               faults=1, detected_after_s=round(elapsed, 2))

    async def test_paused_during_a_request(self) -> None:
        forwarder = self.forwarder()
        on_event(self, lambda _: forwarder.pause_existing(), event="request_served", method="GetStatus")
        client = self.client(forwarder, response_timeout=2.0)
        lines: list[str] = []
        started = time.monotonic()
        code = await client.run_script(
            "echo hello; echo AllDone", on_log=lambda l: lines.append(l.text), wait_for_finish=0
        )
        elapsed = time.monotonic() - started
        self.assertEqual((code, lines), (0, ["hello", "AllDone"]))
        self.assertGreaterEqual(self.retries, 1)
        self.assertLess(elapsed, 10)
        forwarder.resume_existing()
        record(self, "network", "connection paused while a GetStatus answer was on its way",
               "client gave up at its response timeout and resent; whole log read once",
               faults=1, retries=self.retries, took_s=round(elapsed, 2))

    async def test_paused_during_an_upload(self) -> None:
        forwarder = self.forwarder()
        paused: list[Link] = []

        def pause_midway(link: Link, direction: Direction, data: bytes) -> None:
            if not paused and direction is Direction.UPSTREAM and link.bytes_up > 2 * MiB:
                paused.append(link)
                link.pause()

        forwarder.watch(pause_midway)
        abandoned = self.logs.wait_for(event="upload_abandoned")
        source = self.base / "source.bin"
        source.write_bytes(os.urandom(16 * MiB))
        result = await self.client(forwarder, response_timeout=3.0).upload(source, "Packages/app.bin")
        await within(HEARTBEAT * 5, abandoned, "the agent abandoning the stalled upload")
        stored = self.home / "Packages" / "app.bin"
        self.assertEqual(result.hash, hashlib.sha1(source.read_bytes()).hexdigest())
        self.assertEqual(stored.read_bytes(), source.read_bytes())
        [timed_out] = self.logs.matching(event="connection_timed_out", state="reading data streams")
        self.assertEqual(
            sorted(p.name for p in stored.parent.iterdir()), ["app.bin"], "no temp file left"
        )
        record(self, "network", "connection paused mid-upload",
               "agent dropped it after one heartbeat, removed the temp file; resent upload stored",
               faults=1, retries=self.retries)

    async def test_paused_during_a_download(self) -> None:
        """
        A server that stops taking a download must not hold the agent's
        connection and file open for ever.
        """
        forwarder = self.forwarder()
        paused: list[Link] = []

        def pause_midway(link: Link, direction: Direction, data: bytes) -> None:
            if not paused and direction is Direction.DOWNSTREAM and link.bytes_down > MiB:
                paused.append(link)
                link.pause()

        forwarder.watch(pause_midway)
        source = self.base / "big.bin"
        with source.open("wb") as f:
            block = os.urandom(MiB)
            for _ in range(48):
                f.write(block)
        dropped = self.logs.wait_for(event="connection_timed_out", state="sending data streams")
        started = time.monotonic()
        local = self.base / "big.out"
        length, sha1 = await self.client(forwarder).download(str(source), local)
        self.assertEqual(sha1, hashlib.sha1(source.read_bytes()).hexdigest())
        await within(HEARTBEAT * 5, dropped, "the agent dropping the stalled download")
        self.assertLess(time.monotonic() - started, HEARTBEAT * 5)
        record(self, "network", "connection paused mid-download",
               "agent dropped it after one heartbeat instead of holding it for ever; resent download intact",
               faults=1, retries=self.retries)


class CommandLineRetryTests(NetworkFaultTestCase):
    """
    C{tentacle-client} says when it sends a call again (it may retry for
    up to 2.5 minutes, as Octopus Server does), rather than sit silent.
    """

    async def test_a_retry_is_reported(self) -> None:
        from tentacle.identity import IdentityStore
        from tests.e2e.test_client_cli import client_cli

        forwarder = self.forwarder()
        on_event(self, lambda _: forwarder.kill_existing(), event="request_served", method="GetCapabilities")
        home = Path(self.mktemp()).absolute()
        IdentityStore(home).save(identity("server"))
        assert forwarder._port is not None
        code, out, err = await client_cli(
            "run", "--home", str(home), "--thumbprint", identity("agent").thumbprint,
            f"127.0.0.1:{forwarder._port.getHost().port}", "-c", "echo after the retry",
        )
        self.assertEqual(code, 0, err)
        self.assertIn("after the retry", out)
        self.assertIn("ICapabilitiesServiceV2.GetCapabilities on 127.0.0.1", err)
        self.assertIn("retry 1 in", err)
