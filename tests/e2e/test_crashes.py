"""
An agent in a child process killed with SIGKILL at the worst moments, then
started again on the same home and port: during a running script, during
an upload, and in the middle of saving a script's state.

What must hold afterwards: nothing that was complete is lost, nothing
partial is visible, and statuses follow the restart rules of
docs/scripts.rst (a run cut short reports -46, an unknown ticket -45).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from tentacle.client.api import RetryPolicy, Target, TentacleClient
from tentacle.client.connection import Pin, RequestFailed
from tentacle.contracts import (
    CompleteScriptCommandV2,
    ProcessState,
    ScriptStatusRequestV2,
    ScriptTicket,
)
from tentacle.halibut.dotnet import TimeSpan
from tentacle.services.files import TEMP_MARKER
from tentacle.workspace import STATE_FILE
from tests.agent_process import ChildAgent, spawn_agent
from tests.e2e.test_daemon import free_port
from tests.e2e.test_scripts import _processes_with, v2_command
from tests.fault_forwarder import Direction, FaultForwarder, Link
from tests.figures import record
from tests.support import identity, remove_big_files
from tests.waiting import until

AGENT = identity("agent")
SERVER = identity("server")
MiB = 1024 * 1024


def _kill_all(tag: str) -> None:
    for pid in _processes_with(tag):
        os.kill(pid, signal.SIGKILL)


class CrashTestCase(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.port = free_port()
        self.home: Path | None = None
        self.agent: ChildAgent | None = None

    async def start(self, *options: str) -> ChildAgent:
        """
        The agent, on the same home and port each time.
        """
        agent, self.home, _ = await spawn_agent(
            self, AGENT, (SERVER.thumbprint,), home=self.home,
            options=("--scripts", "--port", str(self.port), *options),
        )
        self.agent = agent
        return agent

    def client(self, port: int | None = None, **options: Any) -> TentacleClient:
        settings: dict[str, Any] = dict(
            # Long enough to span a restart: the client keeps trying.
            retry=RetryPolicy(attempts=200, interval=0.05, within=60.0),
            response_timeout=10.0,
            heartbeat_timeout=2.0,
        )
        settings.update(options)
        target = Target("127.0.0.1", port or self.port, Pin(AGENT.thumbprint))
        client = TentacleClient(target, SERVER, reactor, **settings)
        self.addCleanup(client.close)
        return client

    async def status(self, client: TentacleClient, ticket: ScriptTicket) -> Any:
        result, _ = await client.call_idempotent(
            "IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(ticket, 0)
        )
        return result


class ScriptCrashTests(CrashTestCase):
    async def test_sigkill_during_a_running_script(self) -> None:
        """
        The client rides through the crash: after the restart it reads the
        run's log to the crash and its -46, and a script that had finished
        before it keeps its real result.
        """
        tag = f"600.{os.getpid()}5"
        self.addCleanup(_kill_all, tag)
        agent = await self.start()
        client = self.client()
        finished = v2_command(
            "echo done-before; exit 7",
            duration_to_wait_for_script_to_finish=TimeSpan.from_timedelta(timedelta(seconds=10)),
        )
        answer, _ = await client.call("IScriptServiceV2", "StartScript", finished)
        self.assertEqual((answer.state, answer.exit_code), (ProcessState.Complete, 7))

        lines: list[str] = []
        before: Deferred[None] = Deferred()

        def log(text: str) -> None:
            lines.append(text)
            if text == "before":
                reactor.callLater(0, before.callback, None)

        running = Deferred.fromCoroutine(
            client.run_script(f"echo before; sleep {tag}; echo after", on_log=lambda l: log(l.text))
        )
        await before
        await agent.kill()
        await self.start()
        code = await running
        self.assertEqual(code, -46, "the result of a run cut short is unknown")
        self.assertEqual(lines, ["before"], "its log up to the crash, each line once")

        kept = await self.status(client, finished.script_ticket)
        self.assertEqual((kept.state, kept.exit_code), (ProcessState.Complete, 7))
        self.assertEqual([l.text for l in kept.logs], ["done-before"])
        unknown = await self.status(client, ScriptTicket(uuid.uuid4().hex))
        self.assertEqual((unknown.state, unknown.exit_code), (ProcessState.Complete, -45))
        record(self, "crash", "SIGKILL while a script runs; agent restarted",
               "client rode through; cut run -46 with its log, finished run kept 7, unknown -45",
               restarts=1, lines_lost=0)


class StateFileCrashTests(CrashTestCase):
    """
    SIGKILL between writing a state file's temp copy and renaming it over
    C{scriptstate.json}.
    """

    def workspace(self, ticket: ScriptTicket) -> Path:
        assert self.home is not None
        return self.home / "Work" / ticket.task_id.lower()

    async def test_crash_saving_the_final_state(self) -> None:
        agent = await self.start("--crash-writing-state", "Complete")
        marker = Path(self.mktemp()).absolute()
        command = v2_command(f"echo run >> {marker}; echo one; echo two; exit 5")
        await self.client().call("IScriptServiceV2", "StartScript", command)
        await agent.ended
        self.assertIn(b"CRASHING while saving", agent.output)

        folder = self.workspace(command.script_ticket)
        saved = json.loads((folder / STATE_FILE).read_text())
        self.assertEqual(saved["State"], "Pending", "the old state, whole: never a partial file")
        [temp] = [p for p in folder.iterdir() if p.name.startswith(f".{STATE_FILE}.")]
        self.assertEqual(json.loads(temp.read_text())["State"], "Complete")

        await self.start()
        client = self.client()
        status = await self.status(client, command.script_ticket)
        self.assertEqual((status.state, status.exit_code), (ProcessState.Complete, -46))
        self.assertEqual([l.text for l in status.logs], ["one", "two"], "the whole log survived")
        again, _ = await client.call("IScriptServiceV2", "StartScript", command)
        self.assertEqual((again.state, again.exit_code), (ProcessState.Complete, -46))
        await client.call("IScriptServiceV2", "CompleteScript", CompleteScriptCommandV2(command.script_ticket))
        self.assertFalse(folder.exists())
        self.assertEqual(marker.read_text(), "run\n", "never run twice")
        record(self, "crash", "SIGKILL mid-save of the Complete state file; restarted",
               "old state file intact; -46 with the whole log; StartScript again does not re-run",
               restarts=1, lines_lost=0)

    async def test_crash_saving_the_first_state(self) -> None:
        await self.start("--crash-writing-state", "Pending")
        marker = Path(self.mktemp()).absolute()
        command = v2_command(f"echo run >> {marker}")
        client = self.client(retry=RetryPolicy(attempts=1))
        with self.assertRaises(RequestFailed):
            await client.call("IScriptServiceV2", "StartScript", command)
        folder = self.workspace(command.script_ticket)
        self.assertFalse((folder / STATE_FILE).exists(), "no state file, rather than a partial one")

        await self.start()
        client = self.client()
        status = await self.status(client, command.script_ticket)
        self.assertEqual((status.state, status.exit_code), (ProcessState.Complete, -46))
        code = await client.run_script("echo fresh")  # a new ticket runs as ever
        self.assertEqual(code, 0)
        again, _ = await client.call("IScriptServiceV2", "StartScript", command)
        self.assertEqual(again.exit_code, -46, "a ticket seen before a crash is never started afterwards")
        self.assertFalse(marker.exists())
        record(self, "crash", "SIGKILL mid-save of a new script's first state file; restarted",
               "no partial state file; the ticket reports -46 and is never run after the crash",
               restarts=1)


class UploadCrashTests(CrashTestCase):
    async def test_sigkill_during_an_upload(self) -> None:
        agent = await self.start()
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        assert self.home is not None
        packages = self.home / "Packages"
        first = base / "first.bin"
        first.write_bytes(os.urandom(MiB))
        await self.client().upload(first, "Packages/first.bin")

        big = base / "big.bin"
        with big.open("wb") as f:
            block = os.urandom(MiB)
            for _ in range(32):
                f.write(block)
        forwarder = FaultForwarder(reactor, self.port)
        forwarded_port = forwarder.start()
        self.addCleanup(forwarder.stop)
        held: list[Link] = []

        def hold_midway(link: Link, direction: Direction, data: bytes) -> None:
            if not held and direction is Direction.UPSTREAM and link.bytes_up > 8 * MiB:
                held.append(link)
                link.pause()

        forwarder.watch(hold_midway)
        client = self.client(port=forwarded_port, retry=RetryPolicy(attempts=1), rpc_retry=None)
        upload = Deferred.fromCoroutine(client.upload(big, "Packages/big.bin"))

        def temp_files() -> list[Path]:
            return [p for p in packages.iterdir() if TEMP_MARKER in p.name] if packages.exists() else []

        await until(lambda: bool(held) and any(p.stat().st_size >= 4 * MiB for p in temp_files()),
                    "the agent storing the first megabytes")
        await agent.kill()
        forwarder.kill_existing()
        with self.assertRaises(RequestFailed):
            await upload

        visible = sorted(p.name for p in packages.iterdir() if not p.name.startswith("."))
        self.assertEqual(visible, ["first.bin"], "no partial file where the upload was going")
        [leftover] = temp_files()
        self.assertTrue(leftover.name.startswith(".big.bin"), leftover.name)

        await self.start()
        client = self.client()
        result = await client.upload(big, "Packages/big.bin")
        self.assertEqual(result.hash, hashlib.sha1(big.read_bytes()).hexdigest())
        self.assertEqual((packages / "first.bin").read_bytes(), first.read_bytes(), "nothing complete lost")
        self.assertEqual((packages / "big.bin").read_bytes(), big.read_bytes())
        # The crash's temp file is swept by the next upload to that name once
        # it is old enough that no live upload can own it (an hour).
        stale = time.time() - 2 * 3600
        os.utime(leftover, (stale, stale))
        await client.upload(big, "Packages/big.bin")
        self.assertEqual(temp_files(), [])
        record(self, "crash", "SIGKILL mid-upload (about 8 of 32 MiB received); restarted",
               "destination never partial; earlier upload intact; retry stored; leftover swept",
               restarts=1, bytes_at_kill=8 * MiB)
