"""
Tests for L{tentacle.workers.process}.

The timing of a stop (TERM, KILL after the grace, the backstop) and the line
splitting are checked on a fake reactor and clock, in the manner of Twisted's
own procmon tests; what only the kernel can show (sessions, process groups,
grandchildren holding pipes, signals) is checked with real child processes.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tentacle.contracts import ProcessOutputSource
from tentacle.workers.process import (
    COOKIE_VARIABLE,
    MAX_LINE,
    ProcessResult,
    ScriptProcess,
    SpawnError,
    env_with_chdir,
    resolve_executable,
    session_command,
    setsid_program,
)
from tentacle.workers import session_spawn

OUT = ProcessOutputSource.StdOut
ERR = ProcessOutputSource.StdErr
ENV = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}


@attrs.define
class Output:
    """
    Records what a script printed.
    """

    lines: list[tuple[ProcessOutputSource, str, datetime]] = attrs.Factory(list)
    _waiting: list[tuple[Callable[[str], bool], Deferred[None]]] = attrs.Factory(list)

    def __call__(self, source: ProcessOutputSource, text: str, occurred: datetime) -> None:
        self.lines.append((source, text, occurred))
        for waiting in list(self._waiting):
            if waiting[0](text):
                self._waiting.remove(waiting)
                waiting[1].callback(None)

    def text(self, source: ProcessOutputSource) -> list[str]:
        return [text for s, text, _ in self.lines if s == source]

    def wait_for(self, text: str) -> Deferred[None]:
        """
        Fires when a line with exactly this text has been printed.
        """
        return self.wait_until(lambda line: line == text)

    def wait_until(self, predicate: Callable[[str], bool]) -> Deferred[None]:
        """
        Fires when a line matching C{predicate} has been printed.
        """
        d: Deferred[None] = Deferred()
        if any(predicate(t) for _, t, _ in self.lines):
            d.callback(None)
        else:
            self._waiting.append((predicate, d))
        return d


# --- fake reactor --------------------------------------------------------------


@implementer(IProcessTransport)
@attrs.define(eq=False)
class FakeProcess:
    """
    The transport side of a child that does nothing unless told to.
    """

    pid: int | None
    protocol: ProcessProtocol
    signals: list[int] = attrs.Factory(list)
    stdin_closed: bool = False
    lost_connection: bool = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signalID: int | str) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        assert isinstance(signalID, int)
        self.signals.append(signalID)

    def loseConnection(self) -> None:
        self.lost_connection = True

    # The rest of IProcessTransport; a script process uses none of it.

    def closeStdout(self) -> None:
        raise NotImplementedError()

    def closeStderr(self) -> None:
        raise NotImplementedError()

    def closeChildFD(self, descriptor: int) -> None:
        raise NotImplementedError()

    def writeToChild(self, childFD: int, data: bytes) -> None:
        raise NotImplementedError()

    def write(self, data: bytes) -> None:
        raise NotImplementedError()

    def writeSequence(self, data: Any) -> None:
        raise NotImplementedError()

    def getHost(self) -> Any:
        raise NotImplementedError()

    def getPeer(self) -> Any:
        raise NotImplementedError()

    def output(self, fd: int, data: bytes) -> None:
        self.protocol.childDataReceived(fd, data)

    def exit(self, code: int | None = 0, sig: int | None = None, end: bool = True) -> None:
        """
        The child is reaped with this status; C{end} also closes its pipes.
        """
        reason = Failure(ProcessDone(0) if not code and not sig else ProcessTerminated(code, sig))
        self.pid = None
        self.protocol.processExited(reason)
        if end:
            self.end(reason)

    def end(self, reason: Failure | None = None) -> None:
        for fd in (1, 2):
            self.protocol.childConnectionLost(fd)
        self.protocol.processEnded(reason or Failure(ProcessDone(0)))


@attrs.define
class Spawn:
    executable: str
    args: list[str]
    env: dict[str, str]
    path: str | None
    usePTY: bool


class FakeProcessReactor(Clock):
    """
    Spawns L{FakeProcess}es and keeps time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawns: list[Spawn] = []
        self.processes: list[FakeProcess] = []
        self.fail_with: OSError | None = None

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcess:
        if self.fail_with is not None:
            raise self.fail_with
        self.spawns.append(Spawn(executable, list(args), dict(env or {}), path, usePTY))
        process = FakeProcess(4242 + len(self.processes), processProtocol)
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


@attrs.define
class GroupSignals:
    """
    Stands in for C{os.killpg}, so no real process is ever signalled.
    """

    sent: list[tuple[int, int]] = attrs.Factory(list)
    gone: bool = False

    def __call__(self, pgid: int, sig: int) -> None:
        if self.gone:
            raise ProcessLookupError(pgid)
        self.sent.append((pgid, sig))


@attrs.define
class MarkedSignals:
    """
    Stands in for L{tentacle.workers.process.signal_marked}: records the
    cookie and signal, and signals nothing.
    """

    sent: list[tuple[str, str, int]] = attrs.Factory(list)

    def __call__(self, variable: str, value: str, sig: int) -> int:
        self.sent.append((variable, value, sig))
        return 0


class FakeReactorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.output = Output()
        self.group = GroupSignals()
        self.marked = MarkedSignals()
        self.ticks = 0

    def now(self) -> datetime:
        self.ticks += 1
        return datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=self.ticks)

    def script(self, **kwargs: Any) -> ScriptProcess:
        return ScriptProcess(
            self.reactor,
            "sh",
            ["-c", "true"],
            ENV,
            os.getcwd(),
            self.output,
            now=self.now,
            signal_group=self.group,
            signal_marked=self.marked,
            **kwargs,
        )

    def started(self, **kwargs: Any) -> tuple[ScriptProcess, Deferred[ProcessResult], FakeProcess]:
        process = self.script(**kwargs)
        d = process.start()
        return process, d, self.reactor.processes[-1]

    def test_spawn(self) -> None:
        """
        The script runs through a session maker, with exactly the given
        environment and working directory, without a PTY and without stdin.
        """
        process, d, child = self.started()
        spawn = self.reactor.spawns[0]
        self.assertEqual(spawn.args[-3:], [resolve_executable("sh", ENV, "."), "-c", "true"])
        cookie = spawn.env.pop(COOKIE_VARIABLE)
        self.assertRegex(cookie, "^[0-9a-f]{32}$")
        self.assertEqual(spawn.env, ENV)
        # The child changes folder itself, so Twisted may posix_spawn it.
        self.assertIsNone(spawn.path)
        self.assertIn(os.getcwd(), spawn.args)
        self.assertFalse(spawn.usePTY)
        self.assertTrue(child.stdin_closed)
        self.assertEqual((process.pid, process.pgid), (4242, 4242))
        self.assertNoResult(d)
        child.exit(0)
        self.assertEqual(self.successResultOf(d), ProcessResult(0, None, False, False))

    def test_exit_status(self) -> None:
        _, d, child = self.started()
        child.exit(3)
        self.assertEqual(self.successResultOf(d), ProcessResult(3, None, False, False))

    def test_killed_by_signal(self) -> None:
        _, d, child = self.started()
        child.exit(None, signal.SIGSEGV)
        self.assertEqual(self.successResultOf(d), ProcessResult(None, signal.SIGSEGV, False, False))

    def test_session_command(self) -> None:
        self.assertEqual(
            session_command("/bin/x", ["a", "-b"], "/usr/bin/setsid", "/w", "/usr/bin/env"),
            ("/usr/bin/setsid", ["/usr/bin/setsid", "--", "/usr/bin/env", "-C", "/w", "--", "/bin/x", "a", "-b"]),
        )
        program, argv = session_command("/bin/x", ["a"], None, "/w", "/usr/bin/env")
        self.assertEqual(program, sys.executable)
        self.assertEqual(argv[-3:], ["/w", "/bin/x", "a"])
        program, argv = session_command("/bin/x", ["a"], "/usr/bin/setsid", "/w", None)
        self.assertEqual(program, sys.executable, "no env -C: the shim changes folder")
        self.assertEqual(
            session_command("/bin/x", ["a"], "/usr/bin/setsid", "/w", None, enters_folder=True),
            ("/usr/bin/setsid", ["/usr/bin/setsid", "--", "/bin/x", "a"]),
            "the program changes folder itself",
        )

    def test_lines(self) -> None:
        """
        Each stream is split into lines on its own, CR LF or LF, each line
        stamped with the time its last chunk arrived; what is left without
        a newline is reported when the stream closes.
        """
        _, d, child = self.started()
        child.output(1, b"one\r\ntw")
        child.output(2, b"err\n\n")
        child.output(1, b"o\r")
        child.output(1, b"\nthree")
        child.exit(0)
        self.successResultOf(d)
        self.assertEqual(
            [(s, t, o.second) for s, t, o in self.output.lines],
            [
                (OUT, "one", 1),
                (ERR, "err", 2),
                (ERR, "", 2),
                (OUT, "two", 4),
                (OUT, "three", 5),
            ],
        )
        for _, _, occurred in self.output.lines:
            self.assertEqual(occurred.tzinfo, timezone.utc)

    def test_utf8_split_and_invalid(self) -> None:
        _, d, child = self.started()
        snowman = "\u2603".encode()
        child.output(1, b"a" + snowman[:1])
        child.output(1, snowman[1:2])
        child.output(1, snowman[2:] + b"\n")
        child.output(1, b"bad \xff\xfe end\n")
        child.output(2, b"cut \xe2\x98")
        child.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.output.text(OUT), ["a\u2603", "bad \ufffd\ufffd end"])
        self.assertEqual(self.output.text(ERR), ["cut \ufffd"])

    def test_long_lines_split(self) -> None:
        _, d, child = self.started()
        chunk = b"x" * 65536
        for _ in range(2 * MAX_LINE // len(chunk)):
            child.output(1, chunk)
        child.output(1, b"\nyy" + b"z" * MAX_LINE + b"\nend")
        child.exit(0)
        self.successResultOf(d)
        lengths = [len(t) for t in self.output.text(OUT)]
        # Two full pieces; the newline right after them adds no empty line.
        self.assertEqual(lengths, [MAX_LINE, MAX_LINE, MAX_LINE, 2, 3])

    def test_output_callback_failure_logged(self) -> None:
        def broken(source: ProcessOutputSource, text: str, occurred: datetime) -> None:
            raise ValueError("oops")

        process = ScriptProcess(
            self.reactor, "sh", [], ENV, ".", broken, signal_group=self.group
        )
        d = process.start()
        child = self.reactor.processes[-1]
        child.output(1, b"one\ntwo\n")
        child.exit(0)
        self.assertEqual(self.successResultOf(d).exit_code, 0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)

    def test_cancel_timeline(self) -> None:
        """
        TERM to the group at once; KILL to the group after the grace, with
        the pipes closed; the process ends and the result says cancelled.
        """
        process, d, child = self.started(kill_grace=2, backstop=3)
        process.cancel()
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM)])
        self.reactor.advance(1.9)
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM)])
        self.assertFalse(child.lost_connection)
        self.reactor.advance(0.1)
        self.assertEqual(self.group.sent[-1], (4242, signal.SIGKILL))
        self.assertTrue(child.lost_connection)
        self.assertNoResult(d)
        child.exit(None, signal.SIGKILL)
        self.assertEqual(self.successResultOf(d), ProcessResult(None, signal.SIGKILL, True, False))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        # Each signal also went to whatever carries the script's cookie.
        cookie = self.reactor.spawns[0].env[COOKIE_VARIABLE]
        self.assertEqual(
            self.marked.sent,
            [(COOKIE_VARIABLE, cookie, signal.SIGTERM), (COOKIE_VARIABLE, cookie, signal.SIGKILL),
             (COOKIE_VARIABLE, cookie, signal.SIGKILL)],
        )

    def test_backstop(self) -> None:
        """
        If the process is never reaped after KILL, the result still comes,
        C{backstop} seconds later, with the status seen if any.
        """
        process, d, child = self.started(kill_grace=2, backstop=3)
        child.output(1, b"partial")
        child.exit(None, signal.SIGTERM, end=False)
        process.cancel()
        self.reactor.advance(2)
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(self.successResultOf(d), ProcessResult(None, signal.SIGTERM, True, False))
        self.assertEqual(self.output.text(OUT), ["partial"])
        # A late end changes nothing.
        child.end()
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_backstop_without_status(self) -> None:
        process, d, child = self.started(kill_grace=1, backstop=1)
        process.cancel()
        self.reactor.pump([1, 1])
        self.assertEqual(self.successResultOf(d), ProcessResult(None, None, True, False))

    def test_ends_during_grace(self) -> None:
        """
        A script that ends on TERM ends the stop: no KILL timer is left, and
        whatever it left in its group is killed at once.
        """
        process, d, child = self.started(kill_grace=5)
        process.cancel()
        child.exit(None, signal.SIGTERM)
        self.assertEqual(self.successResultOf(d), ProcessResult(None, signal.SIGTERM, True, False))
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM), (4242, signal.SIGKILL)])
        self.assertFalse(child.lost_connection)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_group_yet(self) -> None:
        """
        Just after the spawn the child may not have made its own group yet;
        then the child itself is signalled.
        """
        process, d, child = self.started(kill_grace=1)
        self.group.gone = True
        process.cancel()
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.reactor.advance(1)
        self.assertEqual(child.signals, [signal.SIGTERM, signal.SIGKILL])
        child.exit(None, signal.SIGKILL)
        self.assertTrue(self.successResultOf(d).cancelled)

    def test_cancel_idempotent(self) -> None:
        process, d, child = self.started(kill_grace=1)
        process.cancel()
        process.cancel()
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM)])
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        child.exit(None, signal.SIGTERM)
        process.cancel()
        self.assertEqual(len(self.group.sent), 2)
        self.assertTrue(self.successResultOf(d).cancelled)

    def test_cancel_after_end(self) -> None:
        process, d, child = self.started()
        child.exit(0)
        process.cancel()
        self.assertEqual(self.group.sent, [])
        self.assertEqual(self.successResultOf(d), ProcessResult(0, None, False, False))

    def test_cancel_before_start(self) -> None:
        process = self.script()
        process.cancel()
        d = process.start()
        self.assertEqual(self.successResultOf(d), ProcessResult(None, None, True, False))
        self.assertEqual(self.reactor.spawns, [])

    def test_deferred_cancel_stops_the_process(self) -> None:
        process, d, child = self.started(kill_grace=1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM)])
        child.exit(None, signal.SIGTERM)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_start_twice(self) -> None:
        process, d, child = self.started()
        self.assertRaises(RuntimeError, process.start)

    def test_max_time(self) -> None:
        process, d, child = self.started(max_time=60, kill_grace=2)
        self.reactor.advance(59)
        self.assertEqual(self.group.sent, [])
        self.reactor.advance(1)
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM)])
        self.reactor.advance(2)
        self.assertEqual(self.group.sent[-1], (4242, signal.SIGKILL))
        child.exit(None, signal.SIGKILL)
        self.assertEqual(self.successResultOf(d), ProcessResult(None, signal.SIGKILL, False, True))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_max_time_disarmed_on_end(self) -> None:
        _, d, child = self.started(max_time=60)
        child.exit(0)
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancel_then_max_time(self) -> None:
        process, d, child = self.started(max_time=60, kill_grace=100)
        process.cancel()
        self.reactor.advance(60)
        self.assertEqual(self.group.sent, [(4242, signal.SIGTERM)])
        child.exit(None, signal.SIGTERM)
        self.assertEqual(self.successResultOf(d), ProcessResult(None, signal.SIGTERM, True, False))

    def test_missing_directory(self) -> None:
        process = ScriptProcess(self.reactor, "sh", [], ENV, "/no/such/dir", self.output)
        failure = self.failureResultOf(process.start(), SpawnError)
        self.assertIn("/no/such/dir", str(failure.value))
        self.assertEqual(self.reactor.spawns, [])
        process.cancel()  # nothing to stop; must not fail

    def test_missing_executable(self) -> None:
        process = ScriptProcess(self.reactor, "no-such-program-x", [], ENV, ".", self.output)
        failure = self.failureResultOf(process.start(), SpawnError)
        self.assertIn("no-such-program-x", str(failure.value))
        self.assertIn("PATH", str(failure.value))

    def test_spawn_refused(self) -> None:
        self.reactor.fail_with = OSError(11, "Resource temporarily unavailable")
        process = ScriptProcess(self.reactor, "sh", [], ENV, ".", self.output)
        failure = self.failureResultOf(process.start(), SpawnError)
        self.assertIn("Resource temporarily unavailable", str(failure.value))

    def test_logs(self) -> None:
        logs = EventLoggingObserver()
        globalLogPublisher.addObserver(logs)
        self.addCleanup(globalLogPublisher.removeObserver, logs)
        process, d, child = self.started(kill_grace=1)
        process.cancel()
        self.reactor.advance(1)
        child.exit(None, signal.SIGKILL)
        events = list(logs)
        started = [e for e in events if e.get("pid") == 4242 and e.get("pgid") == 4242]
        self.assertEqual(len(started), 1)
        self.assertEqual(
            [e["signal"] for e in events if e.get("pgid") == 4242 and "signal" in e],
            ["SIGTERM", "SIGKILL", "SIGKILL"],
        )


class ResolveExecutableTests(SynchronousTestCase):
    def test_on_path(self) -> None:
        self.assertEqual(resolve_executable("sh", ENV, "/"), resolve_executable("sh", ENV, "/tmp"))
        self.assertTrue(os.path.isabs(resolve_executable("sh", ENV, "/")))

    def test_relative_to_working_directory(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        script = folder / "run.sh"
        script.write_text("#!/bin/sh\n")
        self.assertRaises(SpawnError, resolve_executable, "./run.sh", ENV, str(folder))
        script.chmod(0o755)
        self.assertEqual(resolve_executable("./run.sh", ENV, str(folder)), str(script.resolve()))

    def test_directory_is_not_executable(self) -> None:
        self.assertRaises(SpawnError, resolve_executable, "/tmp", ENV, "/")


# --- real processes --------------------------------------------------------------


def group_members(pgid: int) -> list[int]:
    """
    Live (not zombie) processes in process group C{pgid}, from /proc.
    """
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


async def group_gone(pgid: int, within: float = 5.0) -> bool:
    """
    Wait for the last member of a process group to die; a killed process
    that is not our child is not ours to reap, so this asks /proc.
    """
    deadline = time.monotonic() + within
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.02)
    return True


class RealProcessTests(TestCase):
    timeout = 15

    def run_script(
        self, command: str, output: Output | None = None, **kwargs: Any
    ) -> tuple[ScriptProcess, Deferred[ProcessResult], Output]:
        output = output or Output()
        process = ScriptProcess(
            reactor, "/bin/sh", ["-c", command], ENV, self.workdir(), output, **kwargs
        )
        return process, process.start(), output

    def python(
        self, code: str, **kwargs: Any
    ) -> tuple[ScriptProcess, Deferred[ProcessResult], Output]:
        output = Output()
        process = ScriptProcess(
            reactor, sys.executable, ["-c", code], ENV, self.workdir(), output, **kwargs
        )
        return process, process.start(), output

    def workdir(self) -> str:
        folder = Path(self.mktemp())
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)

    async def test_stdout_and_stderr(self) -> None:
        _, d, output = self.run_script(
            "echo one; echo uno >&2; echo two; echo dos >&2; printf 'three'"
        )
        result = await d
        self.assertEqual(result, ProcessResult(0, None, False, False))
        self.assertEqual(output.text(OUT), ["one", "two", "three"])
        self.assertEqual(output.text(ERR), ["uno", "dos"])

    async def test_exit_code(self) -> None:
        _, d, _ = self.run_script("exit 3")
        self.assertEqual(await d, ProcessResult(3, None, False, False))

    async def test_working_directory_and_environment(self) -> None:
        output = Output()
        folder = self.workdir()
        process = ScriptProcess(
            reactor,
            "/bin/sh",
            ["-c", 'pwd; echo "$ONLY_THIS"; echo "${HOME:-unset}"'],
            {**ENV, "ONLY_THIS": "yes"},
            folder,
            output,
        )
        self.assertEqual((await process.start()).exit_code, 0)
        self.assertEqual(output.text(OUT), [os.path.realpath(folder), "yes", "unset"])

    async def test_utf8(self) -> None:
        """
        A character split between two writes (and reads) survives; bytes
        that are not UTF-8 become U+FFFD.
        """
        code = (
            "import os, time\n"
            "s = '\\u00e9\\u2603'.encode()\n"
            "os.write(1, b'caf' + s[:1])\n"
            "time.sleep(0.05)\n"
            "os.write(1, s[1:3])\n"
            "time.sleep(0.05)\n"
            "os.write(1, s[3:] + b'\\n')\n"
            "os.write(2, b'bad \\xff!\\n')\n"
        )
        _, d, output = self.python(code)
        self.assertEqual((await d).exit_code, 0)
        self.assertEqual(output.text(OUT), ["caf\u00e9\u2603"])
        self.assertEqual(output.text(ERR), ["bad \ufffd!"])

    async def test_own_process_group(self) -> None:
        await self._check_own_group(use_setsid=True)

    async def test_own_process_group_without_setsid(self) -> None:
        await self._check_own_group(use_setsid=False)

    async def _check_own_group(self, use_setsid: bool) -> None:
        process, d, output = self.python(
            "import os; print(os.getpid(), os.getpgid(0), os.getsid(0))", use_setsid=use_setsid
        )
        result = await d
        self.assertEqual(result.exit_code, 0)
        pid, pgid, sid = (int(x) for x in output.text(OUT)[0].split())
        self.assertEqual(pid, process.pid)
        self.assertEqual(pgid, process.pgid)
        self.assertEqual((pgid, sid), (pid, pid))
        self.assertNotEqual(pgid, os.getpgid(0))

    async def test_own_process_group_made_by_posix_spawn(self) -> None:
        """
        With the real reactor on Linux the session is made by
        C{posix_spawn} itself, one program start per script: this fails if
        a Twisted or C library without the hook makes scripts go through
        the C{setsid} program again.
        """
        self.assertTrue(session_spawn.available(reactor))
        process, d, output = self.python(
            "import os; print(os.getpid(), os.getpgid(0), os.getsid(0), os.getppid())", enters_folder=True
        )
        self.assertEqual(process.launcher, sys.executable)
        self.assertEqual((await d).exit_code, 0)
        pid, pgid, sid, parent = (int(x) for x in output.text(OUT)[0].split())
        self.assertEqual((pid, pgid, sid, parent), (process.pid, pid, pid, os.getpid()))
        # Through env -C when the program does not change folder itself.
        folder, output = self.workdir(), Output()
        process = ScriptProcess(
            reactor, sys.executable, ["-c", "import os; print(os.getpid(), os.getsid(0), os.getcwd())"],
            ENV, folder, output,
        )
        d = process.start()
        self.assertEqual(process.launcher, env_with_chdir())
        self.assertEqual((await d).exit_code, 0)
        pid, sid, cwd = output.text(OUT)[0].split()
        self.assertEqual((int(pid), int(sid), cwd), (process.pid, process.pid, os.path.realpath(folder)))

    async def test_c_library_without_posix_spawn_setsid(self) -> None:
        """
        Where C{posix_spawn} cannot make a session (CPython built against a
        C library without C{POSIX_SPAWN_SETSID} raises C{NotImplementedError}),
        the script starts through the C{setsid} program instead, still a
        session leader, and later scripts go that way at once.
        """
        real = os.posix_spawn

        def without_setsid(*args: Any, **kwargs: Any) -> int:
            if kwargs.get("setsid"):
                raise NotImplementedError("setsid is not supported by this platform")
            return real(*args, **kwargs)

        self.patch(os, "posix_spawn", without_setsid)
        self.addCleanup(session_spawn._refused.clear)
        process, d, output = self.python("import os; print(os.getpid(), os.getsid(0))", enters_folder=True)
        self.assertEqual(process.launcher, setsid_program())
        self.assertFalse(session_spawn.available(reactor))
        self.assertEqual((await d).exit_code, 0)
        pid, sid = (int(x) for x in output.text(OUT)[0].split())
        self.assertEqual((pid, sid), (process.pid, process.pid))

    async def test_argument_or_environment_the_system_cannot_pass(self) -> None:
        """
        An argument or a variable with a NUL byte (a server's JSON may carry
        one), or a variable name with C{=}: C{start} fails with
        L{SpawnError}, as documented, on every spawning path, rather than
        raising C{ValueError} at its caller (which left the script running
        for ever as far as the server could tell).
        """
        for kwargs in ({"enters_folder": True}, {"use_setsid": True}, {"use_setsid": False}):
            for args, env in (
                (["-c", "pass", "a\0b"], ENV),
                (["-c", "pass"], {**ENV, "X": "a\0b"}),
                (["-c", "pass"], {**ENV, "A=B": "c"}),
            ):
                process = ScriptProcess(reactor, sys.executable, args, env, self.workdir(), Output(), **kwargs)
                with self.assertRaises(SpawnError, msg=(kwargs, args, env)):
                    await process.start()

    async def test_descriptors_closed_without_proc(self) -> None:
        """
        Where C{/proc} cannot be read (a chroot, a sandbox), scripts still
        start, and an inheritable descriptor of the agent still does not
        reach them: the listing falls back to Twisted's own, as before
        C{posix_spawn} made the session.
        """
        real = os.listdir

        def no_proc(path: Any = ".") -> list[str]:
            if str(path).startswith("/proc"):
                raise FileNotFoundError(2, "No such file or directory", path)
            return real(path)

        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        os.set_inheritable(write_end, True)
        self.patch(os, "listdir", no_proc)
        process, d, output = self.python(
            "import os\nfor fd in range(3, 1024):\n    try:\n        os.fstat(fd)\n    except OSError:\n"
            "        continue\n    print(fd)",
            enters_folder=True,
        )
        result = await d
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(output.text(OUT), [])

    async def test_signals_the_agent_ignores_are_not_ignored_by_scripts(self) -> None:
        """
        Python ignores C{SIGPIPE} and C{SIGXFSZ}; a script gets their
        defaults back on every path (C{posix_spawn}'s session, the C{setsid}
        program, and the shim, itself a Python that ignores them again), so
        C{yes | head -1} ends as in a terminal.
        """
        ignored = (1 << (signal.SIGPIPE - 1)) | (1 << (signal.SIGXFSZ - 1))
        for kwargs in ({"enters_folder": True}, {"use_setsid": True}, {"use_setsid": False}):
            process, d, output = self.run_script("grep SigIgn /proc/self/status", **kwargs)
            self.assertEqual((await d).exit_code, 0)
            [line] = output.text(OUT)
            self.assertEqual(int(line.split()[1], 16) & ignored, 0, kwargs)

    async def test_descriptors_not_inherited(self) -> None:
        """
        A descriptor the agent holds open without close-on-exec (one some
        other library made inheritable) is closed in the script, on the
        C{posix_spawn} path and the C{setsid} program's alike.
        """
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        os.set_inheritable(write_end, True)
        for kwargs in ({"enters_folder": True}, {"use_setsid": True}, {"use_setsid": False}):
            process, d, output = self.python("import os; print(' '.join(os.listdir('/proc/self/fd')))", **kwargs)
            self.assertEqual((await d).exit_code, 0)
            open_fds = {int(fd) for fd in output.text(OUT)[0].split()}
            self.assertNotIn(write_end, open_fds, kwargs)
            self.assertLessEqual(open_fds, {0, 1, 2, 3}, kwargs)  # 3: the listing's own

    async def test_exec_failure_after_spawn(self) -> None:
        """
        A script that cannot be executed after all (here a bad interpreter
        line) ends with 127 and says why on stderr.
        """
        folder = self.workdir()
        script = Path(folder).resolve() / "bad.sh"
        script.write_text("#!/no/such/interpreter\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
        for use_setsid in (True, False):
            output = Output()
            process = ScriptProcess(
                reactor, str(script), [], ENV, folder, output, use_setsid=use_setsid
            )
            result = await process.start()
            self.assertEqual(result.exit_code, 127)
            self.assertIn("bad.sh", " ".join(output.text(ERR)))

    async def test_cancel_with_grandchild_holding_stdout(self) -> None:
        """
        The script's background job keeps stdout open; the cancel still ends
        the script quickly, and nothing of its group survives.
        """
        process, d, output = self.run_script("sleep 600 & echo started; sleep 600", kill_grace=1)
        await output.wait_for("started")
        started = time.monotonic()
        process.cancel()
        result = await d
        self.assertLess(time.monotonic() - started, 10)
        self.assertTrue(result.cancelled)
        self.assertFalse(result.timed_out)
        assert process.pgid is not None
        self.assertTrue(await group_gone(process.pgid))

    async def test_grandchild_ignoring_term(self) -> None:
        """
        The script dies on TERM but a grandchild that ignores it keeps
        stdout open: it is killed after the grace, and then the script ends.
        """
        process, d, output = self.run_script(
            "(trap '' TERM; echo ignoring; exec sleep 600) & wait", kill_grace=1
        )
        await output.wait_for("ignoring")
        started = time.monotonic()
        process.cancel()
        result = await d
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 10)
        self.assertEqual(result, ProcessResult(None, signal.SIGTERM, True, False))
        assert process.pgid is not None
        self.assertTrue(await group_gone(process.pgid))

    async def test_term_ignored_gets_killed(self) -> None:
        process, d, output = self.run_script(
            "trap '' TERM; echo started; sleep 600", kill_grace=1
        )
        await output.wait_for("started")
        started = time.monotonic()
        process.cancel()
        result = await d
        self.assertGreaterEqual(time.monotonic() - started, 0.9)
        self.assertEqual(result, ProcessResult(None, signal.SIGKILL, True, False))
        assert process.pgid is not None
        self.assertTrue(await group_gone(process.pgid))

    async def test_escaped_grandchild_does_not_stall(self) -> None:
        """
        A grandchild in a session of its own, with an environment rebuilt
        from nothing, is out of reach of the group signals and of the
        cookie; closing the pipes after KILL still lets the result come.
        """
        process, d, output = self.run_script(
            "setsid env -i sh -c 'echo escaped $$; exec sleep 600' & sleep 600", kill_grace=0.5
        )
        await output.wait_until(lambda line: line.startswith("escaped "))
        escaped_pid = int(output.text(OUT)[0].split()[1])
        self.addCleanup(self._kill_quietly, escaped_pid)
        started = time.monotonic()
        process.cancel()
        result = await d
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.4)
        self.assertLess(elapsed, 10)
        self.assertEqual(result, ProcessResult(None, signal.SIGTERM, True, False))
        assert process.pgid is not None
        self.assertTrue(await group_gone(process.pgid))
        # Still alive: out of reach, as said (and killed by the cleanup).
        os.kill(escaped_pid, 0)

    def _kill_quietly(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def test_max_time(self) -> None:
        _, d, output = self.run_script("echo started; sleep 600", max_time=0.3, kill_grace=1)
        result = await d
        self.assertEqual(result, ProcessResult(None, signal.SIGTERM, False, True))
        self.assertEqual(output.text(OUT), ["started"])

    async def test_cancel_idempotent(self) -> None:
        process, d, output = self.run_script("echo started; sleep 600", kill_grace=1)
        await output.wait_for("started")
        process.cancel()
        process.cancel()
        result = await d
        process.cancel()
        self.assertEqual(result, ProcessResult(None, signal.SIGTERM, True, False))

    async def test_cancel_at_once(self) -> None:
        """
        A cancel straight after the start, perhaps before the child has made
        its session, still stops it.
        """
        process, d, _ = self.run_script("sleep 600", kill_grace=1)
        process.cancel()
        result = await d
        self.assertTrue(result.cancelled)
        # Usually the TERM ends the script; when it lands in the forked child
        # before exec, Twisted's child code exits with a status instead.
        self.assertTrue(result.signal is not None or result.exit_code is not None, result)
        assert process.pgid is not None
        self.assertTrue(await group_gone(process.pgid))

    async def test_missing_executable(self) -> None:
        output = Output()
        process = ScriptProcess(
            reactor, "/no/such/bin/bash", [], ENV, self.workdir(), output
        )
        with self.assertRaises(SpawnError) as caught:
            await process.start()
        self.assertIn("/no/such/bin/bash", str(caught.exception))
        self.assertIsNone(process.pid)

    async def test_missing_working_directory(self) -> None:
        process = ScriptProcess(reactor, "/bin/sh", [], ENV, "/no/such/dir", Output())
        with self.assertRaises(SpawnError):
            await process.start()
