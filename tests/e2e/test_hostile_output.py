"""
Hostile script output: millions of lines must cost the agent neither memory
nor a stalled reactor, before or after a restart.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.contracts import (
    CompleteScriptCommandV2,
    ProcessOutputSource,
    ProcessState,
    ScriptStatusRequestV2,
    ScriptTicket,
)
from tentacle.services.scripts import SMALL_READ, ScriptRunner
from tentacle.workspace import INDEX_EVERY_BYTES, TAIL_LINES, ScriptState, WorkspaceStore
from tests.agent_process import spawn_agent
from tests.e2e.test_scripts import v2_command
from tests.figures import record
from tests.support import agent_port, identity, start_agent

AGENT = identity("agent")
SERVER = identity("server")
MiB = 1024 * 1024
LINES = 5_000_000
#: Ask from here to get a script's state without its lines.
PAST_THE_END = 2**62


def _write_log(home: Path, ticket: str, lines: int) -> None:
    """
    A finished script's workspace as a dead agent left it.
    """
    workspace = WorkspaceStore(home).workspace(ticket)
    workspace.create()
    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    batch = [f"line {i}" for i in range(10_000)]
    for start in range(0, lines, len(batch)):
        workspace.log.append_lines(ProcessOutputSource.StdOut, batch[: lines - start], when)
    workspace.log.close()
    workspace.save_state(ScriptState(created=when, state=ProcessState.Complete, exit_code=0))


class RestartedLogTests(TestCase):
    """
    The index of a log found on disk is built once, in a thread, and big
    pages are read in a thread: the reactor thread never reads the file.
    """

    async def test_big_log_after_a_restart_is_indexed_once_off_the_reactor_thread(self) -> None:
        home = Path(self.mktemp()).absolute()
        lines = 300_000
        ticket = ScriptTicket("restarted")
        self.addCleanup(shutil.rmtree, home, True)
        _write_log(home, ticket.task_id, lines)
        # As an older agent left it: no saved index, so the whole log is scanned.
        (home / "Work" / "restarted" / "Output.idx").unlink()
        runner = ScriptRunner(reactor, home, home / "Applications")
        main = threading.get_ident()

        status = await runner.status(ticket, lines - 3, -45)
        self.assertEqual([e.text for e in status.logs], [f"line {i % 10_000}" for i in range(lines - 3, lines)])
        self.assertEqual((status.state, status.exit_code, status.next_log_sequence), (ProcessState.Complete, 0, lines))
        log = runner._disk_workspaces["restarted"].log
        self.assertEqual(len(log.scans), 1)
        self.assertNotEqual(log.scans[0], main, "scanned in a thread")
        self.assertLessEqual(log.index_size, log.path.stat().st_size // INDEX_EVERY_BYTES + 2)

        # The first page spans the whole file: read in a thread, bounded.
        self.assertGreater(log.span(0), SMALL_READ)
        page = await runner.read_log(log, 0)
        self.assertNotEqual(page.thread, main)
        self.assertEqual(len(page.entries), 5000)
        # A page near the end reads at most two MiB (one index entry per MiB).
        page = await runner.read_log(log, lines - 3)
        self.assertLessEqual(page.bytes_read, 2 * INDEX_EVERY_BYTES)
        self.assertEqual(page.thread == main, log.span(lines - 3) <= SMALL_READ)

        await runner.status(ticket, 0, -45)
        self.assertEqual(len(log.scans), 1, "the index is kept between calls")


class FloodTests(TestCase):
    """
    A script printing 5 million empty lines, against an agent in its own
    process so its memory can be measured.
    """

    async def test_five_million_lines_in_flat_memory(self) -> None:
        agent, home, port = await spawn_agent(self, AGENT, (SERVER.thumbprint,), options=("--scripts",))
        self.addCleanup(shutil.rmtree, home / "Work", True)
        client = TentacleClient(Target("127.0.0.1", port, Pin(AGENT.thumbprint)), SERVER, reactor)
        self.addCleanup(client.close)

        async def status(ticket: ScriptTicket, after: int) -> Any:
            result, _ = await client.call("IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(ticket, after))
            return result

        async def finished(ticket: ScriptTicket) -> Any:
            while (answer := await status(ticket, PAST_THE_END)).state is not ProcessState.Complete:
                await deferLater(reactor, 0.05, lambda: None)  # the client's poll interval
            return answer

        # Warm up (modules, threads) before the baseline.
        warm = v2_command("echo warm")
        await client.call("IScriptServiceV2", "StartScript", warm)
        await finished(warm.script_ticket)
        before = agent.status("VmRSS")

        flood = v2_command(f"yes '' | head -n {LINES}")
        await client.call("IScriptServiceV2", "StartScript", flood)
        # Meanwhile, a trusted server on a fresh connection is answered.
        other = TentacleClient(Target("127.0.0.1", port, Pin(AGENT.thumbprint)), SERVER, reactor)
        self.addCleanup(other.close)
        while (await status(flood.script_ticket, PAST_THE_END)).next_log_sequence == 0:
            await deferLater(reactor, 0.01, lambda: None)  # until the output flows
        started = time.monotonic()
        await other.call("ICapabilitiesServiceV2", "GetCapabilities")
        answered_in = time.monotonic() - started
        stored_after = (await status(flood.script_ticket, PAST_THE_END)).next_log_sequence
        end = await finished(flood.script_ticket)
        growth = agent.status("VmHWM") - before

        self.assertLess(stored_after, LINES, "the call was answered while the output flowed")
        self.assertEqual((end.exit_code, end.next_log_sequence), (0, LINES))
        self.assertLess(growth, 8 * MiB, f"the agent's peak RSS grew by {growth / MiB:.1f} MiB")
        last = await status(flood.script_ticket, LINES - 3)
        self.assertEqual([e.text for e in last.logs], ["", "", ""])
        size = (home / "Work" / flood.script_ticket.task_id / "Output.log").stat().st_size
        await client.close()
        await other.close()

        # Restarted, the agent indexes the log again, once, in a thread.
        await agent.stop()
        agent, _, port = await spawn_agent(self, AGENT, (SERVER.thumbprint,), home=home, options=("--scripts",))
        client = TentacleClient(Target("127.0.0.1", port, Pin(AGENT.thumbprint)), SERVER, reactor)
        self.addCleanup(client.close)
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")
        before = agent.status("VmRSS")
        timings = []
        for _ in range(3):
            started = time.monotonic()
            last = await status(flood.script_ticket, LINES - 3)
            timings.append(time.monotonic() - started)
        growth_after_restart = agent.status("VmHWM") - before
        self.assertEqual(([e.text for e in last.logs], last.state, last.exit_code), (["", "", ""], ProcessState.Complete, 0))
        self.assertLess(growth_after_restart, 8 * MiB)
        await client.call("IScriptServiceV2", "CompleteScript", CompleteScriptCommandV2(flood.script_ticket))
        self.assertFalse((home / "Work" / flood.script_ticket.task_id).exists())
        record(
            self, "hostile", f"a script printing {LINES:,} empty lines ({size / MiB:.0f} MiB of log)",
            f"agent peak RSS +{growth / MiB:.1f} MiB; a trusted call answered in "
            f"{answered_in * 1000:.0f} ms meanwhile; after a restart the last page took "
            f"{timings[0] * 1000:.0f} ms (the saved index read and the tail scanned, in a thread), "
            f"then {min(timings[1:]) * 1000:.1f} ms",
            rss_growth_mib=round(growth / MiB, 1), trusted_call_ms=round(answered_in * 1000),
            last_page_after_restart_ms=round(timings[0] * 1000),
            last_page_again_ms=round(min(timings[1:]) * 1000, 1),
        )

    test_five_million_lines_in_flat_memory.timeout = 300  # type: ignore[attr-defined]


class OutputLimitTests(TestCase):
    async def test_a_script_flooding_past_the_script_output_limit_keeps_its_last_lines(self) -> None:
        limit = 64 * 1024
        service = start_agent(self, trusted=(SERVER.thumbprint,), script_output_limit=limit)
        client = TentacleClient(Target("127.0.0.1", agent_port(service), Pin(AGENT.thumbprint)), SERVER, reactor)
        self.addCleanup(client.close)
        count = 200_000
        lines: list[str] = []
        code = await client.run_script(f"seq 1 {count}", on_log=lambda line: lines.append(line.text))
        self.assertEqual(code, 0)
        first_marker = next(i for i, text in enumerate(lines) if "passed the script-output-limit" in text)
        self.assertEqual(lines[:first_marker], [str(n) for n in range(1, first_marker + 1)])
        self.assertIn(f"of {limit} bytes", lines[first_marker])
        dropped = count - first_marker - TAIL_LINES
        self.assertIn(f"{dropped} lines of output were not stored", lines[first_marker + 1])
        self.assertEqual(lines[first_marker + 2 :], [str(n) for n in range(count - TAIL_LINES + 1, count + 1)])
        record(self, "hostile", f"a script printing {count:,} lines against script-output-limit={limit}",
               f"{first_marker:,} lines stored, a marker, then the last {TAIL_LINES} at the end; "
               f"{dropped:,} not stored", lines_dropped_by_limit=dropped)
