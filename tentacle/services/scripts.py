"""
IScriptService and IScriptServiceV2: start a script, follow its log, cancel
it, collect its result.

Both contracts share one L{ScriptRunner}.  It keeps running scripts in memory
and everything else on disk (L{tentacle.workspace}), so a status survives an
agent restart.  Scripts run in their own process groups through the reactor
(L{tentacle.workers.process}), so the listener never waits on them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import sys
from collections import OrderedDict, deque
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Mapping, TypeVar, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from tentacle.contracts import (
    CancelScriptCommand,
    CancelScriptCommandV2,
    CompleteScriptCommand,
    CompleteScriptCommandV2,
    ProcessOutput,
    ProcessOutputSource,
    ProcessState,
    ScriptExitCodes,
    ScriptFile,
    ScriptIsolationLevel,
    ScriptStatusRequest,
    ScriptStatusRequestV2,
    ScriptStatusResponse,
    ScriptStatusResponseV2,
    ScriptTicket,
    ScriptType,
    StartScriptCommand,
    StartScriptCommandV2,
)
from tentacle import events
from tentacle.dispatch import CallContext
from tentacle.fsutil import atomic_write
from tentacle.halibut.dotnet import TimeSpan
from tentacle.services.script_environment import script_variables
from tentacle.workers.isolation import IsolationMutexes, IsolationTimeout, Lease
from tentacle.workspace import (
    BOOTSTRAP,
    LogPage,
    ScriptLog,
    ScriptState,
    ScriptWorkspace,
    WorkspaceStore,
    safe_file_name,
)

if TYPE_CHECKING:
    from tentacle.workers.process import ProcessResult, ScriptProcess

#: Tentacle's name for the isolation mutex when a command names none.
DEFAULT_MUTEX_NAME = "RunningScript"
#: One status answer carries at most this much log, so it stays well inside
#: message limits; the client asks again from NextLogSequence.
MAX_LOG_ENTRIES = 5000
MAX_LOG_BYTES = 1024 * 1024
#: A page whose read may touch more of the log than this is read in a
#: thread; smaller ones (a client following a running script) are read at
#: once on the reactor thread.
SMALL_READ = 64 * 1024
#: Once a script has logged something, V2 StartScript waits at most this
#: much longer for it to end (never past DurationToWaitForScriptToFinish):
#: a script that prints and ends at once is still done in one call, and the
#: first lines of a long one reach the server within this time, not after
#: the whole wait.
OUTPUT_GRACE = 0.5
#: Logs of scripts this agent did not start (they ran before a restart)
#: whose indexes are kept, so each GetStatus does not scan the file again.
DISK_LOGS_KEPT = 16

_T = TypeVar("_T")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _seconds(span: TimeSpan | None) -> float | None:
    if span is None:
        return None
    return span.to_timedelta().total_seconds()


@attrs.frozen
class ScriptLaunch:
    """
    What both contract versions ask for, in one shape.
    """

    ticket: ScriptTicket
    task_id: str | None
    script_body: str
    scripts: Mapping[ScriptType, str]
    files: tuple[ScriptFile, ...]
    arguments: tuple[str, ...]
    isolation: ScriptIsolationLevel
    mutex_name: str | None
    mutex_timeout: TimeSpan


@attrs.define(eq=False)
class RunningScript:
    """
    A script this agent process started: its workspace and where it is.
    """

    launch: ScriptLaunch
    workspace: ScriptWorkspace
    state: ScriptState
    process: ScriptProcess | None = None
    waiting: Deferred[Any] | None = None
    cancelled: bool = False
    delete_when_done: bool = False
    #: Whether anything was logged yet.
    logged: bool = False
    #: The workspace's writes (the state file, the bootstrap), one after
    #: the other, in the thread pool.
    saved: Deferred[None] = attrs.field(factory=lambda: succeed(None))
    #: Fires once the first state and the bootstrap are written, or
    #: failed to be (L{unprepared} says why).
    prepared: Deferred[None] = attrs.field(factory=lambda: succeed(None))
    unprepared: BaseException | None = None
    #: What runs: the program (C{None}: PowerShell, not installed), its
    #: arguments, and whether it changes to the workspace itself.
    command: tuple[str | None, list[str], bool] = (None, [], False)
    _finished: list[Deferred[None]] = attrs.field(factory=list)
    _logging: list[Deferred[None]] = attrs.field(factory=list)

    @property
    def complete(self) -> bool:
        return self.state.state is ProcessState.Complete

    def when_finished(self) -> Deferred[None]:
        if self.complete:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._finished.append(d)
        return d

    def notify_finished(self) -> None:
        waiting, self._finished = self._finished, []
        for d in waiting:
            d.callback(None)

    def when_logged(self) -> Deferred[None]:
        """
        Fires once the script has logged anything (at once if it has).
        """
        if self.logged:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._logging.append(d)
        return d

    def notify_logged(self) -> None:
        self.logged = True
        waiting, self._logging = self._logging, []
        for d in waiting:
            d.callback(None)


@attrs.frozen
class Status:
    """
    A script's status, before it is dressed as a V1 or V2 response.
    """

    state: ProcessState
    exit_code: int
    logs: tuple[ProcessOutput, ...]
    next_log_sequence: int


class Slots:
    """
    At most C{limit} scripts run at once (C{None}: no limit), first come
    first served; the limit can change while scripts hold and wait for
    slots (a lower one lets running scripts finish, a higher one admits
    waiting scripts at once).
    """

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._held = 0
        self._waiting: deque[Deferred[None]] = deque()

    @property
    def limit(self) -> int | None:
        return self._limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        self._limit = value
        self._admit()

    def acquire(self) -> Deferred[None]:
        """
        Fires when a slot is ours; cancelling it gives up the place in line.
        """
        d: Deferred[None] = Deferred(lambda d: self._waiting.remove(d))
        self._waiting.append(d)
        self._admit()
        return d

    def release(self) -> None:
        self._held -= 1
        self._admit()

    def _admit(self) -> None:
        while self._waiting and (self._limit is None or self._held < self._limit):
            self._held += 1
            self._waiting.popleft().callback(None)


class ScriptRunner:
    """
    Runs scripts for both contract versions.

    @param max_concurrent: at most this many scripts run at once; the rest
        stay Pending (C{None}: no limit, as Tentacle).
    @param script_timeout: an agent-wide limit on a script's run time, in
        seconds (C{None}: none, as Tentacle); expiry ends it with -44.
    @param output_limit: the script-output-limit: a script's log stops
        growing at this many bytes, keeping only its last lines (C{None}:
        no limit).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        home: Path,
        applications: Path,
        *,
        max_concurrent: int | None = None,
        script_timeout: float | None = None,
        kill_grace: float = 5.0,
        environment: Mapping[str, str] | None = None,
        variables: Mapping[str, str] | None = None,
        pwsh: str | None = None,
        log: Logger | None = None,
        output_limit: int | None = None,
    ) -> None:
        """
        @param environment: what scripts inherit (the agent's own by default).
        @param variables: Tentacle's variables for every script, over the
            environment (L{script_variables}; by default from the folders).
        @param pwsh: the PowerShell executable; found on PATH when C{None},
            and C{""} means there is none.
        @param log: where its events go (the agent's publisher).
        """
        if log is not None:
            self.log = log
        self._reactor = reactor
        # Scripts run in their workspaces: every path they see must be absolute.
        self._home = home = home.absolute()
        self._applications = applications.absolute()
        self._store = WorkspaceStore(home, output_limit)
        self._mutexes = IsolationMutexes(reactor)
        self._slots = Slots(max_concurrent)
        self._script_timeout = script_timeout
        self._kill_grace = kill_grace
        self._base_environment = dict(os.environ if environment is None else environment)
        if variables is None:
            variables = script_variables(home=self._home, applications=self._applications)
        self._base_environment.update(variables)
        self._pwsh = pwsh if pwsh is not None else shutil.which("pwsh")
        self._scripts: dict[str, RunningScript] = {}
        #: Workspaces being removed (in the thread pool), by ticket, with
        #: whoever waits for that.
        self._deleting: dict[str, list[Deferred[None]]] = {}
        #: Tickets whose files are being copied in (L{begin}), with whoever
        #: waits for that.
        self._copying: dict[str, list[Deferred[None]]] = {}
        self._flush_call: IDelayedCall | None = None
        self._unflushed: set[RunningScript] = set()
        self._disk_workspaces: OrderedDict[str, ScriptWorkspace] = OrderedDict()

    @property
    def store(self) -> WorkspaceStore:
        return self._store

    def set_limits(self, max_concurrent: int | None, script_timeout: float | None) -> None:
        """
        Apply new limits to a running agent: the concurrency limit at once
        (waiting scripts start if it rose), the timeout to scripts that
        start from now on.
        """
        self._slots.limit = max_concurrent
        self._script_timeout = script_timeout

    def counts(self) -> dict[ProcessState, int]:
        """
        How many known scripts are in each state, for metrics.
        """
        counts = {state: 0 for state in ProcessState}
        for script in self._scripts.values():
            counts[script.state.state] += 1
        return counts

    def is_active(self, folder_name: str) -> bool:
        """
        Whether a workspace folder belongs to a script still known in memory,
        which the cleaner must leave alone.
        """
        return folder_name in self._scripts

    # --- starting ---------------------------------------------------------------

    async def begin(self, launch: ScriptLaunch, context: CallContext) -> RunningScript:
        """
        L{start}, after copying the script's files into its workspace in
        the thread pool: they may be large (and are encrypted as they are
        copied), so never on the reactor thread.  A file that cannot be
        written fails the call, as Tentacle's StartScript does, and leaves
        no workspace behind; the same ticket sent again meanwhile waits
        for this one.
        """
        key = launch.ticket.task_id.lower()
        while key in self._copying:
            waiter: Deferred[None] = Deferred()
            self._copying[key].append(waiter)
            await waiter
        if key in self._scripts or not launch.files:
            return self.start(launch, context)
        workspace, copy = self._new_workspace(launch, context)
        self._copying[key] = []
        try:
            try:
                await self._in_thread(copy)
            except BaseException:
                await self._in_thread(workspace.delete)
                raise
            return self.start(launch, context, workspace)
        finally:
            for waiter in self._copying.pop(key):
                waiter.callback(None)

    def _new_workspace(self, launch: ScriptLaunch, context: CallContext) -> tuple[ScriptWorkspace, Callable[[], None]]:
        """
        The script's workspace, made, and the (blocking) copying of its
        files into it.  A file name that would leave the workspace, or whose
        data stream did not come, is refused before anything is made; the
        request's streams stay open until StartScript answers.
        """
        workspace = self._store.workspace(launch.ticket.task_id)
        for script_file in launch.files:
            safe_file_name(workspace.root, script_file.name)
        payloads = [(script_file, context.payload(script_file.contents)) for script_file in launch.files]
        workspace.create()

        def copy() -> None:
            for script_file, payload in payloads:
                workspace.add_file(script_file.name, _contents(script_file, payload))

        return workspace, copy

    def start(
        self, launch: ScriptLaunch, context: CallContext, workspace: ScriptWorkspace | None = None
    ) -> RunningScript:
        """
        Create the workspace and set the script going; an already known
        ticket is returned as it is, never started twice.

        @param workspace: made by L{begin}, with the script's files copied
            in; otherwise it is made, and they are copied, here.
        """
        key = launch.ticket.task_id.lower()
        existing = self._scripts.get(key)
        if existing is not None:
            return existing
        if workspace is None:
            workspace, copy = self._new_workspace(launch, context)
            try:
                copy()
            except BaseException:
                workspace.delete()
                raise
        state = ScriptState(created=_now())
        script = RunningScript(launch, workspace, state)
        script.command, bootstrap = self._command(script)
        first = attrs.evolve(state)

        def prepare() -> None:
            workspace.save_state(first)
            if bootstrap is not None:
                bootstrap()

        # Off the reactor thread; StartScript answers, and the script
        # starts, only once they are written.
        def failed(f: Failure) -> None:
            script.unprepared = f.value

        script.prepared = self._in_chain(script, prepare).addErrback(failed)
        self._scripts[key] = script
        Deferred.fromCoroutine(self._run(script)).addErrback(
            lambda f: self.log.failure("Script {ticket} failed to run", f, ticket=key)
        )
        return script

    async def _run(self, script: RunningScript) -> None:
        lease: Lease | None = None
        slot_taken = False
        try:
            try:
                lease = await self._acquire_mutex(script)
                script.waiting = self._slots.acquire()
                await script.waiting
                slot_taken = True
                script.waiting = None
            except CancelledError:
                self._append(script, ProcessOutputSource.StdErr, "Script execution canceled.")
                await self._finish(script, ScriptExitCodes.CANCELED)
                return
            except IsolationTimeout:
                self._append(script, ProcessOutputSource.StdErr, "Script execution timed out.")
                await self._finish(script, ScriptExitCodes.TIMEOUT)
                return
            if script.cancelled:
                self._append(script, ProcessOutputSource.StdErr, "Script execution canceled.")
                await self._finish(script, ScriptExitCodes.CANCELED)
                return
            await script.prepared
            if script.unprepared is not None:
                self._append(
                    script, ProcessOutputSource.StdErr, f"The script could not be written: {script.unprepared}"
                )
                await self._finish(script, ScriptExitCodes.FATAL)
                return
            executable, arguments, enters_folder = script.command
            if executable is None:
                self._append(
                    script,
                    ProcessOutputSource.StdErr,
                    "This script is PowerShell, and PowerShell (pwsh) is not installed on "
                    "this agent. Install PowerShell, or send a Bash script.",
                )
                await self._finish(script, ScriptExitCodes.POWERSHELL_INVOCATION_ERROR)
                return
            # The process worker is loaded with the first script, not into
            # the memory of every idle agent.
            from tentacle.workers.process import ScriptProcess

            script.state.state = ProcessState.Running
            script.state.started = _now()
            process = ScriptProcess(
                self._reactor,
                executable,
                arguments,
                self._environment(),
                str(script.workspace.root),
                lambda source, text, occurred: self._append(script, source, text, occurred),
                on_lines=lambda source, lines, occurred: self._append_lines(script, source, lines, occurred),
                kill_grace=self._kill_grace,
                max_time=self._script_timeout,
                enters_folder=enters_folder,
            )
            script.process = process
            self.log.info(
                "Script {ticket} started", ticket=script.launch.ticket.task_id, event="script_started",
            )
            # No Running state is written: on disk the state stays Pending
            # until the final one, which also records when the script
            # started.  A restart reports -46 for either, and each file
            # written costs a file creation (0.4-0.9 ms of kernel CPU on
            # ext4) and a trip through the thread pool per script.
            started = process.start()
            try:
                result = await started
            except Exception as e:
                self._append(script, ProcessOutputSource.StdErr, f"The script could not be started: {e}")
                await self._finish(script, ScriptExitCodes.FATAL)
                return
            await self._finish(script, self._exit_code(script, result))
        finally:
            if slot_taken:
                self._slots.release()
            if lease is not None:
                lease.release()

    async def accepted(self, script: RunningScript) -> None:
        """
        Once the script's first state is on disk (or failed to be): a
        StartScript is answered only then, as when it was written on the
        reactor thread.
        """
        await script.prepared

    async def _acquire_mutex(self, script: RunningScript) -> Lease:
        launch = script.launch
        owner = launch.task_id or launch.ticket.task_id
        timeout = _seconds(launch.mutex_timeout)

        def waiting(holders: str) -> None:
            self._append(
                script,
                ProcessOutputSource.Debug,
                f"Waiting for the script in task {holders} to finish as that script requires "
                "that no other scripts are executing on this target at the same time.",
            )

        script.waiting = self._mutexes.acquire(
            launch.mutex_name or DEFAULT_MUTEX_NAME,
            exclusive=launch.isolation is ScriptIsolationLevel.FullIsolation,
            owner=owner,
            timeout=timeout if timeout else None,
            on_wait=waiting,
        )
        lease: Lease = await script.waiting
        return lease

    def _command(
        self, script: RunningScript
    ) -> tuple[tuple[str | None, list[str], bool], Callable[[], object] | None]:
        """
        What to run: Bash unless the command carries only a PowerShell
        body; and whether the script changes to its workspace itself (a
        Bash script does, first thing, where nothing can tell: one exec
        less than C{env -C}).  With it, the (blocking) writing of its
        bootstrap file.
        """
        launch = script.launch
        workspace = script.workspace
        if ScriptType.Bash in launch.scripts or ScriptType.PowerShell not in launch.scripts:
            # Loaded with the first script (see _run).
            from tentacle.workers.process import bash_enters_folder

            body = launch.scripts.get(ScriptType.Bash, launch.script_body)
            prelude = bash_enters_folder(str(workspace.root), self._base_environment)
            bootstrap = workspace.root / BOOTSTRAP
            return (
                ("/bin/bash", [str(bootstrap), *launch.arguments], prelude is not None),
                lambda: workspace.write_bootstrap(body, prelude or ""),
            )
        path = workspace.root / "Bootstrap.ps1"
        text = launch.scripts[ScriptType.PowerShell].replace("\r\n", "\n")

        def write() -> None:
            atomic_write(path, text.encode("utf-8-sig"), mode=0o600, durable=False)

        if not self._pwsh:
            return (None, [], False), write
        quoted = " ".join("'" + a.replace("'", "''") + "'" for a in launch.arguments)
        command = (
            "$ErrorActionPreference = 'Stop'; . {. '" + str(path).replace("'", "''") + "' "
            + quoted + "; if ((test-path variable:global:lastexitcode)) { exit $LastExitCode }}"
        )
        return (
            self._pwsh,
            [
                "-NonInteractive", "-NoProfile", "-NoLogo", "-ExecutionPolicy", "Unrestricted",
                "-Command", command,
            ],
            False,
        ), write

    def _environment(self) -> dict[str, str]:
        """
        The agent's environment plus the variables Tentacle gives scripts,
        which the scripts Octopus Server sends rely on.
        """
        return dict(self._base_environment)

    @staticmethod
    def _exit_code(script: RunningScript, result: ProcessResult) -> int:
        if result.cancelled or script.cancelled:
            return ScriptExitCodes.CANCELED
        if result.timed_out:
            return ScriptExitCodes.TIMEOUT
        if result.exit_code is not None:
            return result.exit_code
        if result.signal is not None:
            return 128 + result.signal  # as a shell reports a signalled child
        return ScriptExitCodes.FATAL

    # --- the log ------------------------------------------------------------------

    def _append(
        self,
        script: RunningScript,
        source: ProcessOutputSource,
        text: str,
        occurred: datetime | None = None,
    ) -> None:
        self._append_lines(script, source, [text], occurred or _now())

    def _append_lines(
        self, script: RunningScript, source: ProcessOutputSource, lines: list[str], occurred: datetime
    ) -> None:
        script.workspace.log.append_lines(source, lines, occurred)
        self._unflushed.add(script)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        if not script.logged:
            script.notify_logged()

    def _flush(self) -> None:
        """
        Once per reactor turn, hand new log lines to the OS: cheap, and they
        survive the agent being killed.
        """
        self._flush_call = None
        scripts, self._unflushed = self._unflushed, set()
        for script in scripts:
            script.workspace.log.flush()

    def _in_chain(self, script: RunningScript, work: Callable[[], object]) -> Deferred[None]:
        """
        Run blocking work on the script's workspace in the thread pool,
        after its earlier such work (a later state never lands before an
        earlier one); fires (or fails) when it is done.
        """
        done: Deferred[None] = Deferred()

        def run(_: object) -> Deferred[object]:
            d = self._in_thread(work)
            d.addCallbacks(lambda _: done.callback(None), done.errback)
            return d.addErrback(lambda _: None)  # the chain goes on

        script.saved.addCallback(run)
        return done

    def _save(self, script: RunningScript, state: ScriptState) -> Deferred[None]:
        """
        Write a state file in the thread pool, after the script's earlier
        writes; the final state is fsynced (L{ScriptWorkspace.save_state}).
        A workspace removed meanwhile is not written again.  A failure is
        logged.
        """
        workspace = script.workspace

        def save() -> None:
            if workspace.exists():
                workspace.save_state(state)

        def failed(f: Any) -> None:
            self.log.failure(
                "Could not save the state of script {ticket}", f, ticket=script.launch.ticket.task_id
            )

        return self._in_chain(script, save).addErrback(failed)

    async def _finish(self, script: RunningScript, exit_code: int) -> None:
        """
        The script is over: store its last log lines, then its final state,
        durably and off the reactor thread; only then is it reported
        Complete, so a status that said Complete survives a power cut.
        """
        final = attrs.evolve(
            script.state,
            state=ProcessState.Complete,
            exit_code=exit_code,
            completed=_now(),
            ran_to_completion=True,
        )
        script.workspace.log.finish(_now())
        script.workspace.log.flush()
        await self._save(script, final)
        script.state = final
        self.log.info(
            "Script {ticket} finished with exit code {exit_code}",
            ticket=script.launch.ticket.task_id,
            exit_code=exit_code,
            event=events.SCRIPT_FINISHED,
        )
        script.notify_finished()
        if script.delete_when_done:
            self._forget(script)

    # --- asking -------------------------------------------------------------------

    def find(self, ticket: ScriptTicket) -> RunningScript | None:
        return self._scripts.get(ticket.task_id.lower())

    async def status(self, ticket: ScriptTicket, after: int, unknown_exit_code: int) -> Status:
        """
        The status of a script, from memory or, after a restart, from disk.

        A page that may need more than L{SMALL_READ} bytes of the log, and
        the scan that indexes a log this agent did not write, run in a
        thread: a log of millions of lines never stalls the reactor.

        @param unknown_exit_code: what a ticket with no workspace at all
            reports (-45 for V2; V1 reports 0, as Tentacle does).
        """
        script = self.find(ticket)
        if script is not None:
            log = script.workspace.log
            page = await self.read_log(log, after)
            state = script.state.state
            if state is ProcessState.Complete and page.next_sequence < len(log):
                # More log to come: a client stops asking once it sees Complete.
                state = ProcessState.Running
            exit_code = script.state.exit_code if script.complete else 0
            return Status(state, exit_code or 0, tuple(page.entries), page.next_sequence)
        workspace = self._disk_workspace(ticket)
        if workspace is None:
            return Status(ProcessState.Complete, unknown_exit_code, (), after)
        log = workspace.log
        if not log.indexed:
            await self._in_thread(log.index_existing)
        page = await self.read_log(log, after)
        saved = workspace.load_state()
        if saved is not None and saved.state is ProcessState.Complete and saved.exit_code is not None:
            exit_code = saved.exit_code
        elif unknown_exit_code == ScriptExitCodes.UNKNOWN_SCRIPT:
            exit_code = ScriptExitCodes.UNKNOWN_RESULT  # it was running when the agent stopped
        else:
            exit_code = 0
        state = ProcessState.Complete
        if page.next_sequence < len(log):
            state = ProcessState.Running
        return Status(state, exit_code, tuple(page.entries), page.next_sequence)

    def _disk_workspace(self, ticket: ScriptTicket) -> ScriptWorkspace | None:
        """
        The workspace of a script this agent did not start, if it is on
        disk; the last few are kept with their logs' indexes.
        """
        key = ticket.task_id.lower()
        if key in self._deleting:
            return None  # CompleteScript removes it
        if key in self._copying:
            return None  # not started yet: its files are being copied in
        workspace = self._disk_workspaces.pop(key, None)
        if workspace is None:
            workspace = self._store.workspace(ticket.task_id)
        if not workspace.exists():
            return None
        self._disk_workspaces[key] = workspace
        while len(self._disk_workspaces) > DISK_LOGS_KEPT:
            self._disk_workspaces.popitem(last=False)
        return workspace

    async def read_log(self, log: ScriptLog, after: int) -> LogPage:
        """
        One status answer's page of an indexed log from C{after}: on this
        thread when it reads at most L{SMALL_READ} bytes, else in a thread.
        """
        if log.span(after) <= SMALL_READ:
            return log.read_page(after, MAX_LOG_ENTRIES, MAX_LOG_BYTES)
        log.flush()  # here, on the thread that writes it
        try:
            return await self._in_thread(
                lambda: log.read_page(after, MAX_LOG_ENTRIES, MAX_LOG_BYTES, flush=False)
            )
        except FileNotFoundError:  # completed (and deleted) meanwhile
            return LogPage([], after, 0)

    def _in_thread(self, work: Callable[[], _T]) -> Deferred[_T]:
        """
        Run blocking file work in the reactor's thread pool (at once when
        the reactor has none, as fakes in tests).
        """
        if IReactorThreads.providedBy(self._reactor):
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work)
        return maybeDeferred(work)

    def cancel(self, ticket: ScriptTicket) -> None:
        """
        Stop a script: a waiting one ends at once with -43, a running one
        has its whole process group killed.
        """
        script = self.find(ticket)
        if script is None or script.complete:
            return
        script.cancelled = True
        if script.waiting is not None:
            script.waiting.cancel()
        elif script.process is not None:
            script.process.cancel()

    def complete(self, ticket: ScriptTicket) -> Deferred[None]:
        """
        Forget a script and delete its workspace (after stopping it, if it
        still runs).  Fires once the workspace is gone (or, for a script
        still running, once it has been told to stop).
        """
        key = ticket.task_id.lower()
        script = self.find(ticket)
        if script is None:
            if key in self._deleting:
                return self._when_deleted(key)
            workspace = self._disk_workspaces.pop(key, None)
            return self._delete(key, workspace or self._store.workspace(ticket.task_id))
        if script.complete:
            return self._forget(script)
        script.delete_when_done = True
        self.cancel(ticket)
        return succeed(None)

    def _forget(self, script: RunningScript) -> Deferred[None]:
        key = script.launch.ticket.task_id.lower()
        self._scripts.pop(key, None)
        self._unflushed.discard(script)
        return self._delete(key, script.workspace)

    def _delete(self, key: str, workspace: ScriptWorkspace) -> Deferred[None]:
        """
        Remove a workspace in the thread pool (a script may leave many
        files); until it is gone, its ticket reads as unknown and cannot
        start again.
        """
        workspace.close()  # here, on the thread that writes the log
        if key not in self._deleting:
            self._deleting[key] = []

            def deleted(result: object) -> None:
                if isinstance(result, Failure):
                    self.log.failure("Could not remove the workspace {folder}", result, folder=str(workspace.root))
                for d in self._deleting.pop(key, []):
                    d.callback(None)

            self._in_thread(workspace.delete).addBoth(deleted)
        return self._when_deleted(key)

    def _when_deleted(self, key: str) -> Deferred[None]:
        waiting = self._deleting.get(key)
        if waiting is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        waiting.append(d)
        return d

    def on_disk(self, ticket: ScriptTicket) -> bool:
        """
        Whether a ticket this agent process does not know has a workspace
        (it ran before a restart), or one being removed.
        """
        key = ticket.task_id.lower()
        if key in self._copying:
            return False  # being started (L{begin}): not from before a restart
        return key in self._deleting or self._store.workspace(ticket.task_id).exists()

    def wait(
        self, script: RunningScript, seconds: float, after_output: float | None = None
    ) -> Deferred[None]:
        """
        Fires the moment the script finishes, or when C{seconds} pass, or
        (with C{after_output}) that long after it first logs anything,
        whichever comes first.
        """
        if script.complete or seconds <= 0:
            return succeed(None)
        done: Deferred[None] = Deferred()
        timers: list[IDelayedCall] = []

        def fire(_: object = None) -> None:
            for timer in timers:
                if timer.active():
                    timer.cancel()
            if not done.called:
                done.callback(None)

        def logged(_: object) -> None:
            if not done.called and after_output is not None and after_output < seconds:
                timers.append(self._reactor.callLater(after_output, fire))

        timers.append(self._reactor.callLater(seconds, fire))
        script.when_finished().addCallback(fire)
        if after_output is not None:
            script.when_logged().addCallback(logged)
        return done


def _contents(script_file: ScriptFile, payload: IO[bytes]) -> IO[bytes]:
    """
    A file as it lands in the workspace: encrypted, as Tentacle writes it,
    when it came with a password (a sensitive-variables file).
    """
    if script_file.encryption_password is None:
        return payload
    # The ciphers are loaded for the first encrypted file, not into every agent.
    from tentacle.encryption import EncryptingReader

    return cast(IO[bytes], EncryptingReader(payload, script_file.encryption_password))


def _launch(command: StartScriptCommand | StartScriptCommandV2, ticket: ScriptTicket) -> ScriptLaunch:
    """
    Both versions' start commands carry the same fields but the ticket.
    """
    return ScriptLaunch(
        ticket=ticket,
        task_id=command.task_id,
        script_body=command.script_body,
        scripts=command.scripts,
        files=command.files,
        arguments=command.arguments,
        isolation=command.isolation,
        mutex_name=command.isolation_mutex_name,
        mutex_timeout=command.script_isolation_mutex_timeout,
    )


class ScriptServiceV2:
    """
    IScriptServiceV2: the client names the ticket, StartScript is
    idempotent, and a state file lets a status outlive a restart.
    """

    def __init__(self, runner: ScriptRunner) -> None:
        self._runner = runner

    async def _response(self, ticket: ScriptTicket, after: int) -> ScriptStatusResponseV2:
        s = await self._runner.status(ticket, after, ScriptExitCodes.UNKNOWN_SCRIPT)
        return ScriptStatusResponseV2(
            ticket=ticket, logs=s.logs, next_log_sequence=s.next_log_sequence,
            state=s.state, exit_code=s.exit_code,
        )

    async def start_script(
        self, command: StartScriptCommandV2, *, context: CallContext
    ) -> ScriptStatusResponseV2:
        ticket = command.script_ticket
        if self._runner.find(ticket) is None and self._runner.on_disk(ticket):
            # Started before a restart: report it, never run it twice.
            return await self._response(ticket, 0)
        script = await self._runner.begin(_launch(command, ticket), context)
        await self._runner.accepted(script)
        wait = _seconds(command.duration_to_wait_for_script_to_finish)
        if wait:
            await self._runner.wait(script, wait, after_output=OUTPUT_GRACE)
        return await self._response(ticket, 0)

    async def get_status(self, request: ScriptStatusRequestV2) -> ScriptStatusResponseV2:
        return await self._response(request.ticket, request.last_log_sequence)

    async def cancel_script(self, command: CancelScriptCommandV2) -> ScriptStatusResponseV2:
        self._runner.cancel(command.ticket)
        return await self._response(command.ticket, command.last_log_sequence)

    async def complete_script(self, command: CompleteScriptCommandV2) -> None:
        await self._runner.complete(command.ticket)


class ScriptService:
    """
    IScriptService (V1): the agent makes the ticket; CompleteScript returns
    the last of the log and removes the workspace.
    """

    def __init__(self, runner: ScriptRunner, now: Callable[[], datetime] = _now) -> None:
        self._runner = runner
        self._now = now
        self._counter = itertools.count(1)

    def _ticket(self, task_id: str | None) -> ScriptTicket:
        task = (task_id or "").replace("ServerTasks-", "")
        task = "".join(c for c in task if c.isalnum() or c in "-_") or "0"
        return ScriptTicket(f"{self._now():%Y%m%d%H%M%S}-{task}-{next(self._counter)}")

    async def _response(self, ticket: ScriptTicket, after: int) -> ScriptStatusResponse:
        s = await self._runner.status(ticket, after, 0)
        return ScriptStatusResponse(
            ticket=ticket, logs=s.logs, next_log_sequence=s.next_log_sequence,
            state=s.state, exit_code=s.exit_code,
        )

    async def start_script(self, command: StartScriptCommand, *, context: CallContext) -> ScriptTicket:
        ticket = self._ticket(command.task_id)
        await self._runner.accepted(await self._runner.begin(_launch(command, ticket), context))
        return ticket

    async def get_status(self, request: ScriptStatusRequest) -> ScriptStatusResponse:
        return await self._response(request.ticket, request.last_log_sequence)

    async def cancel_script(self, command: CancelScriptCommand) -> ScriptStatusResponse:
        self._runner.cancel(command.ticket)
        return await self._response(command.ticket, command.last_log_sequence)

    async def complete_script(self, command: CompleteScriptCommand) -> ScriptStatusResponse:
        response = await self._response(command.ticket, command.last_log_sequence)
        await self._runner.complete(command.ticket)
        return response
