"""
Run one script as a child process tree, stream its output as lines, and stop
the whole tree on request.

Each script starts in a session (and so a process group) of its own: made
by C{posix_spawn} itself where the C library can (L{session_spawn}), else
through util-linux C{setsid} or, failing that, a tiny Python shim.  Forking and
calling C{os.setsid} in Twisted's C{_setupChild} would not do: since Twisted
23.8 a child may be started with C{posix_spawnp}, which skips that hook.
Because the group id equals the script's pid, a cancel can signal everything
the script started, not only the script.

Stopping (on L{ScriptProcess.cancel} or when C{max_time} elapses) is, in
order:

  1. C{SIGTERM} to the group, so scripts can clean up;
  2. after C{kill_grace} seconds, C{SIGKILL} to the group, then our ends of
     the pipes are closed: a grandchild that escaped the group while holding
     stdout would otherwise keep the result from ever arriving
     (Tentacle issue #1225);
  3. after C{backstop} more seconds, the result fires even if the process
     was never reaped (a process stuck in the kernel cannot be killed).

If the script ends before the grace period is over, whatever it left in its
group is killed at once.

A process group does not hold everything a script starts: a process that
calls C{setsid} (or daemonises with a double fork and C{setsid}) leaves it.
So every script also gets a random cookie in its environment,
C{TENTACLE_SCRIPT_COOKIE}, which its children inherit (as Jenkins'
ProcessTreeKiller marks builds), and each signal of a stop also goes to
every process whose environment carries it, found in C{/proc}.  Only a
process that rebuilds its environment from nothing (C{env -i}) escapes
both.
"""

from __future__ import annotations

import codecs
import functools
import os
import secrets
import shutil
import subprocess
import signal as signals
import sys
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Mapping, Sequence

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from tentacle.contracts import ProcessOutputSource

#: A line longer than this many characters is reported in pieces of this
#: size, so a script printing without newlines cannot exhaust memory.
MAX_LINE = 1 << 20

#: Used when there is no C{setsid} binary: become a session leader, then
#: become the script.  C{-I -S} keep the script's environment (PYTHONPATH and
#: friends) from changing how this interpreter starts.
_SESSION_SHIM = """\
import os, signal, sys
os.setsid()
# This interpreter ignores these again; the script must not inherit that.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
try:
    os.chdir(sys.argv[1])
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write(f"cannot execute {sys.argv[2]}: {e}\\n")
    sys.stderr.flush()
    os._exit(127)
"""

OutputCallback = Callable[[ProcessOutputSource, str, datetime], None]
#: Called with all the lines that one read of a stream completed.
LinesCallback = Callable[[ProcessOutputSource, list[str], datetime], None]

_SOURCES = {1: ProcessOutputSource.StdOut, 2: ProcessOutputSource.StdErr}


#: The environment variable that marks every process of one script.
COOKIE_VARIABLE = "TENTACLE_SCRIPT_COOKIE"


def signal_marked(variable: str, value: str, signal: int) -> int:
    """
    Send C{signal} to every process (but this one) whose environment holds
    C{variable=value}; how many were signalled.  Each is opened as a pidfd
    before its environment is read and signalled through it, so a pid
    reused in between is never hit.  Processes we may not inspect (other
    users', when not root) are skipped.
    """
    marker = b"\0" + f"{variable}={value}".encode() + b"\0"
    me = os.getpid()
    sent = 0
    try:
        entries = [e.name for e in os.scandir("/proc") if e.name.isdigit()]
    except OSError:
        return 0
    for name in entries:
        pid = int(name)
        if pid == me:
            continue
        pidfd = None
        try:
            if hasattr(os, "pidfd_open"):
                pidfd = os.pidfd_open(pid)
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            if marker not in b"\0" + environ + b"\0":
                continue
            if pidfd is not None:
                signals.pidfd_send_signal(pidfd, signal)
            else:
                os.kill(pid, signal)
            sent += 1
        except OSError:
            continue
        finally:
            if pidfd is not None:
                os.close(pidfd)
    return sent


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class SpawnError(Exception):
    """
    The script could not be started at all: its executable or working
    directory is missing, or the operating system refused to create the
    process.  Raised (as the failure of L{ScriptProcess.start}) before any
    process exists, so there is nothing to cancel or wait for.
    """


@attrs.frozen
class ProcessResult:
    """
    How a script ended.  Exactly one of C{exit_code} and C{signal} is set when
    the process was reaped; both are C{None} when the backstop gave up
    waiting, or when the script was cancelled before it was started.
    """

    #: The exit status, when it exited normally.
    exit_code: int | None
    #: The signal that ended it, when one did.
    signal: int | None
    #: It ended because L{ScriptProcess.cancel} was called.
    cancelled: bool
    #: It ended because C{max_time} elapsed.
    timed_out: bool


def resolve_executable(executable: str, env: Mapping[str, str], path: str) -> str:
    """
    The absolute path of the program to run, found the way C{execvp} would
    find it from the script's working directory and environment, so that a
    missing program is a clear L{SpawnError} here rather than an exit status
    of 127 later.
    """
    if os.sep in executable:
        candidates = [os.path.join(path, executable)]
    else:
        search = env.get("PATH", os.defpath)
        candidates = [os.path.join(path, d or ".", executable) for d in search.split(os.pathsep)]
    for candidate in candidates:
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    if os.sep in executable:
        raise SpawnError(f"Cannot run {executable!r}: no such executable file")
    raise SpawnError(f"Cannot run {executable!r}: not found on the PATH {search!r}")


def session_command(
    executable: str,
    args: Sequence[str],
    setsid: str | None,
    cwd: str,
    env_chdir: str | None,
    enters_folder: bool = False,
    in_session: bool = False,
) -> tuple[str, list[str]]:
    """
    The program and argv that run C{executable} with C{args} in a new
    session, in C{cwd}.  A freshly spawned child is never a group leader, so
    C{setsid} calls C{setsid(2)} and execs in place: the pid Twisted tracks
    is the script's, and it leads its own process group.

    The child changes folder itself (C{env -C}, or the shim, or, with
    C{enters_folder}, the program's own first command), so Twisted can
    start it with C{posix_spawn}: with a working folder of its own, Twisted
    forks the whole agent instead, which is slower and lets a signal land
    between the fork and the exec.
    """
    if in_session:  # started as a session leader already (session_spawn)
        if enters_folder:
            return executable, [executable, *args]
        if env_chdir is None:
            raise ValueError("A program that does not enter its folder needs env -C")
        return env_chdir, [env_chdir, "-C", cwd, "--", executable, *args]
    if setsid is not None and enters_folder:
        return setsid, [setsid, "--", executable, *args]
    if setsid is not None and env_chdir is not None:
        return setsid, [setsid, "--", env_chdir, "-C", cwd, "--", executable, *args]
    python = sys.executable
    return python, [python, "-I", "-S", "-c", _SESSION_SHIM, cwd, executable, *args]


#: Variables that make Bash run code of its own before a script's first
#: line (C{BASH_ENV}) or show that line's commands (C{xtrace} or C{verbose}
#: in C{SHELLOPTS}; C{BASHOPTS}): with any of them set, a script cannot
#: change folder unseen in its first line (L{bash_enters_folder}).
_BASH_STARTUP = ("BASH_ENV", "SHELLOPTS", "BASHOPTS")


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def bash_enters_folder(folder: str, env: Mapping[str, str]) -> str | None:
    """
    Text to put before the first line of a Bash script (on that line, so
    line numbers stay as written) that changes to C{folder} as C{env -C}
    would have before Bash started, one exec less per script: C{PWD} the
    folder's physical path, and C{OLDPWD} as Bash would have made it from
    C{env}.  C{None} when Bash would show the difference (see
    L{_BASH_STARTUP}, or a relative C{OLDPWD}): then the script is started
    through C{env -C}.
    """
    if any(name in env for name in _BASH_STARTUP):
        return None
    old = env.get("OLDPWD")
    if old is not None and not os.path.isabs(old):
        return None
    if old is not None and os.path.isdir(old):
        restore = "OLDPWD=" + _sh_quote(old)
    else:
        restore = "unset OLDPWD; declare -x OLDPWD"  # as Bash starts without one, or with a stale one
    return f"builtin cd -P -- {_sh_quote(folder)} || exit 1; {restore}; "


@functools.cache
def setsid_program() -> str | None:
    """
    util-linux C{setsid}, looked up once: every script is started through it.
    """
    return shutil.which("setsid")


@functools.cache
def env_with_chdir() -> str | None:
    """
    C{env}, if it can change folder (GNU coreutils 8.28 and later).
    """
    env = shutil.which("env")
    if env is None:
        return None
    try:
        result = subprocess.run([env, "-C", "/", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return env if result.returncode == 0 else None


@attrs.define
class _Lines:
    """
    One output stream: bytes in, lines out, all the lines of one read in
    one call (a script printing millions of short lines must not cost a
    chain of calls each).  Decoding is incremental, so a character split
    between two reads survives; bytes that are not UTF-8 become U+FFFD.
    """

    source: ProcessOutputSource
    emit: LinesCallback
    _decoder: codecs.IncrementalDecoder = attrs.field(
        init=False, factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _pending: list[str] = attrs.field(init=False, factory=list)
    _pending_size: int = attrs.field(init=False, default=0)
    #: The pending text was just reported because it reached MAX_LINE; a
    #: newline straight after it ends that line rather than an empty one.
    _capped: bool = attrs.field(init=False, default=False)
    _done: bool = attrs.field(init=False, default=False)

    def feed(self, data: bytes, occurred: datetime) -> None:
        if not self._done:
            self._text(self._decoder.decode(data), occurred)

    def finish(self, occurred: datetime) -> None:
        """
        The stream ended: report whatever is held, newline or not.
        """
        if self._done:
            return
        self._text(self._decoder.decode(b"", final=True), occurred)
        self._done = True
        if self._pending:
            line = "".join(self._pending)
            self._pending.clear()
            self._pending_size = 0
            self._emit(_lines_of([line]), occurred)

    def _text(self, text: str, occurred: datetime) -> None:
        if not text:
            return
        *complete, rest = text.split("\n")
        lines: list[str] = []
        if complete:
            if self._pending:
                self._pending.append(complete[0])
                complete[0] = "".join(self._pending)
                self._pending.clear()
                self._pending_size = 0
            if self._capped and complete[0] == "":
                del complete[0]
            self._capped = False
            lines = _lines_of(complete)
        if rest:
            self._capped = False
            self._pending.append(rest)
            self._pending_size += len(rest)
            if self._pending_size >= MAX_LINE:
                held = "".join(self._pending)
                cut = len(held) - len(held) % MAX_LINE
                lines.extend(held[start : start + MAX_LINE] for start in range(0, cut, MAX_LINE))
                self._pending = [held[cut:]] if cut < len(held) else []
                self._pending_size = len(held) - cut
                self._capped = cut == len(held)
        self._emit(lines, occurred)

    def _emit(self, lines: list[str], occurred: datetime) -> None:
        if lines:
            self.emit(self.source, lines, occurred)


def _lines_of(pieces: list[str]) -> list[str]:
    """
    Complete lines as reported: a trailing CR dropped, and a line over
    L{MAX_LINE} characters cut into pieces of that size.
    """
    lines = [p[:-1] if p.endswith("\r") else p for p in pieces]
    if lines and max(map(len, lines)) > MAX_LINE:
        lines = [
            line[start : start + MAX_LINE]
            for line in lines
            for start in range(0, max(len(line), 1), MAX_LINE)
        ]
    return lines


class _ScriptProtocol(ProcessProtocol):
    """
    Forwards the child's events to its L{ScriptProcess}.
    """

    def __init__(self, owner: ScriptProcess) -> None:
        self._owner = owner

    def connectionMade(self) -> None:
        # Scripts get no input; an open stdin would let `read` block forever.
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._owner._output(childFD, data)

    def childConnectionLost(self, childFD: int) -> None:
        self._owner._stream_closed(childFD)

    def processExited(self, reason: Failure) -> None:
        self._owner._exited(reason)

    def processEnded(self, reason: Failure) -> None:
        self._owner._ended(reason)


def _status(reason: Failure) -> tuple[int | None, int | None]:
    value = reason.value
    if isinstance(value, ProcessDone):
        return 0, None
    if isinstance(value, ProcessTerminated):
        return value.exitCode, value.signal
    return None, None


@attrs.define(eq=False)
class ScriptProcess:
    """
    One script run as a child process in its own session.

    @param reactor: provides C{IReactorProcess} and C{IReactorTime}.
    @param executable: the program; a bare name is looked up on C{env}'s PATH.
    @param args: the arguments after the program name.
    @param env: the script's whole environment (nothing is inherited).
    @param path: the working directory.
    @param on_output: called with each line of stdout or stderr, in the order
        received on that stream, stamped with the time it arrived.
    @param on_lines: when given, called instead of C{on_output} with all
        the lines one read completed, in order: much cheaper for scripts
        that print millions of lines.
    @param kill_grace: seconds between C{SIGTERM} and C{SIGKILL} on a stop.
    @param backstop: seconds after C{SIGKILL} before giving up on the reap.
    @param max_time: stop the script, as a timeout, after this many seconds.
    @param now: the clock for output timestamps (aware, UTC).
    @param signal_group: sends a signal to a process group (C{os.killpg});
        tests with a fake reactor replace it so no real process is signalled.
    @param signal_marked: sends a signal to every process carrying the
        script's cookie (L{signal_marked}); replaceable likewise.
    @param use_setsid: start through the C{setsid} program when it exists;
        C{False} forces the Python shim.
    @param enters_folder: the program changes to C{path} itself, first
        thing (a Bash script that starts with L{bash_enters_folder}), so it
        is started without C{env -C}.
    """

    log: ClassVar[Logger] = Logger()

    _reactor: Any
    _executable: str
    _args: Sequence[str]
    _env: Mapping[str, str]
    _path: str
    _on_output: OutputCallback
    _kill_grace: float = attrs.field(default=5.0, kw_only=True)
    _backstop: float = attrs.field(default=5.0, kw_only=True)
    _max_time: float | None = attrs.field(default=None, kw_only=True)
    _now: Callable[[], datetime] = attrs.field(default=utc_now, kw_only=True)
    _signal_group: Callable[[int, int], None] = attrs.field(default=os.killpg, kw_only=True)
    _signal_marked: Callable[[str, str, int], int] = attrs.field(default=signal_marked, kw_only=True)
    _on_lines: LinesCallback | None = attrs.field(default=None, kw_only=True)
    _use_setsid: bool = attrs.field(default=True, kw_only=True)
    _enters_folder: bool = attrs.field(default=False, kw_only=True)

    _started: bool = attrs.field(init=False, default=False)
    _transport: IProcessTransport | None = attrs.field(init=False, default=None)
    _pid: int | None = attrs.field(init=False, default=None)
    _launcher: str | None = attrs.field(init=False, default=None)
    _result: Deferred[ProcessResult] | None = attrs.field(init=False, default=None)
    #: Why we are stopping it: "cancel", "timeout", or None while it runs.
    _stopping: str | None = attrs.field(init=False, default=None)
    _status: tuple[int | None, int | None] | None = attrs.field(init=False, default=None)
    _timers: dict[str, IDelayedCall] = attrs.field(init=False, factory=dict)
    _streams: dict[int, _Lines] = attrs.field(init=False, factory=dict)
    _finished: bool = attrs.field(init=False, default=False)
    #: Marks this script's processes, wherever they go (see the module).
    _cookie: str = attrs.field(init=False, factory=lambda: secrets.token_hex(16))

    @property
    def pid(self) -> int | None:
        """
        The script's pid once started (kept after it has been reaped).
        """
        return self._pid

    @property
    def launcher(self) -> str | None:
        """
        The program started once the script is (C{setsid}, C{env}, the
        shim's interpreter, or the script's own program when the session
        was made by C{posix_spawn}).
        """
        return self._launcher

    @property
    def pgid(self) -> int | None:
        """
        The script's process group: the same number as its pid, because it
        is started as a session leader.
        """
        return self._pid

    def start(self) -> Deferred[ProcessResult]:
        """
        Spawn the script now.

        @return: fires once with the L{ProcessResult} when the script has
            ended and its output has been reported, or when the backstop gave
            up waiting.  It fails only with L{SpawnError}, when no process
            could be created.  Cancelling it is the same as L{cancel}, except
            that the caller gets C{CancelledError} at once instead of the
            result.
        """
        if self._started:
            raise RuntimeError("A ScriptProcess can only be started once")
        self._started = True
        if self._stopping is not None:
            self._finished = True
            return succeed(ProcessResult(None, None, True, False))
        try:
            if not os.path.isdir(self._path):
                raise SpawnError(f"Cannot run in {self._path!r}: no such directory")
            executable = resolve_executable(self._executable, self._env, self._path)
            env_chdir = None if self._enters_folder else env_with_chdir()
            self._streams = {
                fd: _Lines(source, self._report) for fd, source in _SOURCES.items()
            }
            env = dict(self._env)
            env[COOKIE_VARIABLE] = self._cookie
            self._result = Deferred(lambda d: self.cancel())
            program = self._launcher = self._spawn(executable, env, env_chdir)
        except SpawnError as e:
            self._finished = True
            self.log.warn("{error}", error=str(e), executable=self._executable)
            return fail(e)
        except (OSError, ValueError) as e:  # ValueError: a NUL, or a name with "=", in args or env
            self._finished = True
            error = SpawnError(f"Cannot run {self._executable!r}: {e}")
            self.log.warn("{error}", error=str(error), executable=self._executable)
            return fail(error)
        assert self._transport is not None
        self._pid = self._transport.pid
        self.log.debug(
            "Started {executable} as pid {pid} in process group {pgid}",
            executable=executable,
            pid=self._pid,
            pgid=self.pgid,
            launcher=program,
        )
        if self._max_time is not None:
            self._timers["max_time"] = self._reactor.callLater(self._max_time, self._timeout)
        return self._result

    def _spawn(self, executable: str, env: dict[str, str], env_chdir: str | None) -> str:
        """
        Start the process in a session of its own: with one C{posix_spawn}
        that makes the session (L{session_spawn}) when it can, else through
        the C{setsid} program (or the shim); the program started.
        """
        folder = os.path.abspath(self._path)
        if self._use_setsid and (self._enters_folder or env_chdir is not None):
            from tentacle.workers import session_spawn

            if session_spawn.available(self._reactor):
                program, argv = session_command(
                    executable, self._args, None, folder, env_chdir, self._enters_folder, in_session=True
                )
                try:
                    self._transport = session_spawn.spawn_in_session(
                        self._reactor, _ScriptProtocol(self), program, argv, env
                    )
                except session_spawn.SetsidUnsupported:
                    self.log.info("posix_spawn cannot make a session here; scripts start through setsid")
                else:
                    return program
        setsid = setsid_program() if self._use_setsid else None
        program, argv = session_command(executable, self._args, setsid, folder, env_chdir, self._enters_folder)
        self._transport = self._reactor.spawnProcess(
            _ScriptProtocol(self),
            program,
            argv,
            env=env,
            path=None,  # see session_command
            usePTY=False,
        )
        return program

    def cancel(self) -> None:
        """
        Stop the script and everything in its process group: TERM, then KILL
        after C{kill_grace}.  Calling it again, or after the script ended,
        does nothing.  Before L{start}, the script will never be started.
        """
        self._stop("cancel")

    def _timeout(self) -> None:
        self._timers.pop("max_time", None)
        self.log.info(
            "Process {pid} ran longer than {max_time} s; stopping it",
            pid=self._pid,
            max_time=self._max_time,
        )
        self._stop("timeout")

    def _stop(self, why: str) -> None:
        if self._finished or self._stopping is not None:
            return
        self._stopping = why
        if not self._started:
            return
        self._cancel_timer("max_time")
        self._send(signals.SIGTERM)
        self._timers["kill"] = self._reactor.callLater(self._kill_grace, self._kill)

    def _kill(self) -> None:
        self._timers.pop("kill", None)
        self._send(signals.SIGKILL)
        # Whatever still holds our pipes (a grandchild that left the group)
        # must not keep the result from arriving.
        assert self._transport is not None
        self._transport.loseConnection()
        self._timers["backstop"] = self._reactor.callLater(self._backstop, self._give_up)

    def _give_up(self) -> None:
        self._timers.pop("backstop", None)
        self.log.warn(
            "Process {pid} was not reaped {backstop} s after SIGKILL; giving up on it",
            pid=self._pid,
            backstop=self._backstop,
        )
        self._finish()

    def _send(self, signal: int) -> None:
        """
        Signal the script's whole group, and its processes that left it.
        """
        self._send_group(signal)
        self._send_marked(signal)

    def _send_marked(self, signal: int) -> None:
        """
        Signal whatever carries the script's cookie, in its group or not.
        """
        try:
            sent = self._signal_marked(COOKIE_VARIABLE, self._cookie, signal)
        except Exception:
            self.log.failure("Could not look for process {pid}'s escaped processes", pid=self._pid)
            return
        if sent:
            self.log.info(
                "Sent {signal} to {count} process(es) of script {pid} by its cookie",
                signal=signals.Signals(signal).name,
                count=sent,
                pid=self._pid,
            )

    def _send_group(self, signal: int) -> None:
        """
        Just after the spawn the child may not have made its session yet,
        and then there is no such group: the script itself is signalled
        instead.
        """
        assert self._pid is not None and self._transport is not None
        name = signals.Signals(signal).name
        try:
            self._signal_group(self._pid, signal)
        except ProcessLookupError:
            try:
                self._transport.signalProcess(signal)
            except ProcessExitedAlready:
                return
            except OSError as e:
                self.log.warn(
                    "Could not send {signal} to process {pid}: {error}",
                    signal=name,
                    pid=self._pid,
                    error=str(e),
                )
                return
            self.log.info("Sent {signal} to process {pid}", signal=name, pid=self._pid)
        except OSError as e:
            self.log.warn(
                "Could not send {signal} to process group {pgid}: {error}",
                signal=name,
                pgid=self._pid,
                error=str(e),
            )
        else:
            self.log.info("Sent {signal} to process group {pgid}", signal=name, pgid=self._pid)

    def _report(self, source: ProcessOutputSource, lines: list[str], occurred: datetime) -> None:
        if self._on_lines is not None:
            try:
                self._on_lines(source, lines, occurred)
            except Exception:
                self.log.failure("Output callback failed for process {pid}", pid=self._pid)
            return
        for text in lines:
            try:
                self._on_output(source, text, occurred)
            except Exception:
                self.log.failure("Output callback failed for process {pid}", pid=self._pid)

    def _output(self, fd: int, data: bytes) -> None:
        stream = self._streams.get(fd)
        if stream is not None:
            stream.feed(data, self._now())

    def _stream_closed(self, fd: int) -> None:
        stream = self._streams.get(fd)
        if stream is not None:
            stream.finish(self._now())

    def _exited(self, reason: Failure) -> None:
        self._status = _status(reason)
        self.log.debug(
            "Process {pid} exited with {status}; waiting for its output to end",
            pid=self._pid,
            status=self._status,
        )

    def _ended(self, reason: Failure) -> None:
        self._status = _status(reason)
        if self._stopping is not None and not self._finished:
            # The script is gone; nothing it left behind gets a grace period.
            assert self._pid is not None
            try:
                self._signal_group(self._pid, signals.SIGKILL)
            except OSError:
                pass
            else:
                self.log.info(
                    "Sent {signal} to what was left of process group {pgid}",
                    signal="SIGKILL",
                    pgid=self._pid,
                )
            self._send_marked(signals.SIGKILL)
        self._finish()

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for name in list(self._timers):
            self._cancel_timer(name)
        occurred = self._now()
        for stream in self._streams.values():
            stream.finish(occurred)
        exit_code, signal = self._status if self._status is not None else (None, None)
        result = ProcessResult(
            exit_code=exit_code,
            signal=signal,
            cancelled=self._stopping == "cancel",
            timed_out=self._stopping == "timeout",
        )
        self.log.debug(
            "Process {pid} ended: exit code {exit_code}, signal {signal}",
            pid=self._pid,
            exit_code=exit_code,
            signal=signal,
            cancelled=result.cancelled,
            timed_out=result.timed_out,
        )
        assert self._result is not None
        if not self._result.called:  # not when the caller cancelled the Deferred
            self._result.callback(result)
