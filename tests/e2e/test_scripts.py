"""
Scripts end to end: a wire client drives IScriptServiceV2 and IScriptService
on a real agent over TLS, and real bash processes run the scripts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.threadable import isInIOThread
from twisted.trial.unittest import TestCase

from tentacle.contracts import (
    SCRIPT_SERVICE,
    SCRIPT_SERVICE_V2,
    CancelScriptCommandV2,
    CompleteScriptCommand,
    CompleteScriptCommandV2,
    ProcessOutputSource,
    ProcessState,
    ScriptFile,
    ScriptIsolationLevel,
    ScriptStatusRequest,
    ScriptStatusRequestV2,
    ScriptStatusResponseV2,
    ScriptTicket,
    StartScriptCommand,
    StartScriptCommandV2,
)
from tentacle.dispatch import Dispatcher
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.serializer import DataStream
from tentacle.services.scripts import ScriptRunner, ScriptService, ScriptServiceV2, _launch
from tests.e2e.test_exchange_sockets import TEST_SERVICE, TestService
from tests.support import agent_port, client_context, identity, in_thread, remove_big_files, start_agent
from tests.wire_client import WireClient, request

CHECKOUT = str(Path(__file__).resolve().parent.parent.parent)


def v2_command(body: str, ticket: str | None = None, **changes: Any) -> StartScriptCommandV2:
    values: dict[str, Any] = dict(
        script_ticket=ScriptTicket(ticket or uuid.uuid4().hex),
        script_body=body,
        task_id="ServerTasks-1",
        duration_to_wait_for_script_to_finish=None,
        isolation=ScriptIsolationLevel.NoIsolation,
        script_isolation_mutex_timeout=TimeSpan(0),
        isolation_mutex_name=None,
        scripts={},
        files=(),
        arguments=(),
    )
    values.update(changes)
    return StartScriptCommandV2(**values)


class ScriptClient:
    """
    The calls Octopus Server makes, over one pooled connection.
    """

    def __init__(self, port: int, context: Any) -> None:
        self.wire = WireClient(port, context)
        self.first = True

    def call(self, service: str, method: str, *params: Any, payloads: Any = None) -> Any:
        if not self.first:
            self.wire.next()
        self.first = False
        response, _ = self.wire.call(request(service, method, *params), payloads)
        if response.error is not None:
            raise AssertionError(f"{method} failed: {response.error.message}")
        return response.result

    def start(self, command: StartScriptCommandV2, payloads: Any = None) -> ScriptStatusResponseV2:
        return self.call("IScriptServiceV2", "StartScript", command, payloads=payloads)  # type: ignore[no-any-return]

    def status(self, ticket: ScriptTicket, after: int = 0) -> ScriptStatusResponseV2:
        return self.call("IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(ticket, after))  # type: ignore[no-any-return]

    def cancel(self, ticket: ScriptTicket, after: int = 0) -> ScriptStatusResponseV2:
        return self.call("IScriptServiceV2", "CancelScript", CancelScriptCommandV2(ticket, after))  # type: ignore[no-any-return]

    def complete(self, ticket: ScriptTicket) -> None:
        self.call("IScriptServiceV2", "CompleteScript", CompleteScriptCommandV2(ticket))

    def run_to_end(self, ticket: ScriptTicket, after: int = 0) -> tuple[list[Any], ScriptStatusResponseV2]:
        """
        Poll GetStatus until Complete, as Octopus Server does; every log line.
        """
        logs: list[Any] = []
        deadline = time.monotonic() + 60
        while True:
            status = self.status(ticket, after)
            logs.extend(status.logs)
            after = status.next_log_sequence
            if status.state is ProcessState.Complete:
                return logs, status
            if time.monotonic() > deadline:
                raise AssertionError("the script did not finish in 60 s")
            time.sleep(0.02)  # the client's own poll interval, not a test wait

    def close(self) -> None:
        self.wire.end()


class ScriptTests(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        runner = ScriptRunner(reactor, self.home, self.home / "Applications", kill_grace=1.0)
        dispatcher = Dispatcher()
        dispatcher.register(SCRIPT_SERVICE_V2, ScriptServiceV2(runner))
        dispatcher.register(SCRIPT_SERVICE, ScriptService(runner))
        dispatcher.register(TEST_SERVICE, TestService())
        self.runner = runner
        self.service = start_agent(
            self, home=self.home, trusted=(identity("server").thumbprint,),
            service_options={"dispatcher": dispatcher},
        )
        self.context = client_context(identity("server"), Path(self.mktemp()).parent)
        self.addCleanup(self._cancel_all)

    def _cancel_all(self) -> Deferred[Any]:
        waits = []
        for script in list(self.runner._scripts.values()):
            if not script.complete:
                self.runner.cancel(script.launch.ticket)
                waits.append(script.when_finished())
        from twisted.internet.defer import gatherResults

        return gatherResults(waits)

    def client(self) -> ScriptClient:
        return ScriptClient(agent_port(self.service), self.context)

    def in_client(self, f: Any) -> Deferred[Any]:
        def run() -> Any:
            client = self.client()
            try:
                return f(client)
            finally:
                client.close()

        return in_thread(run)

    async def test_output_sources_order_and_exit_code(self) -> None:
        def run(client: ScriptClient) -> Any:
            command = v2_command(
                "echo hello; echo oops >&2; exit 3",
                duration_to_wait_for_script_to_finish=TimeSpan.from_timedelta(timedelta(seconds=10)),
            )
            first = client.start(command)
            logs, final = client.run_to_end(command.script_ticket, first.next_log_sequence)
            return first, list(first.logs) + logs, final

        first, logs, final = await self.in_client(run)
        self.assertEqual(first.state, ProcessState.Complete, "finished within the start call")
        self.assertEqual(
            [(e.source, e.text) for e in logs],
            [(ProcessOutputSource.StdOut, "hello"), (ProcessOutputSource.StdErr, "oops")],
        )
        self.assertEqual(final.exit_code, 3)

    async def test_hundred_thousand_lines_while_serving_others(self) -> None:
        command = v2_command("seq 1 100000")

        def run(client: ScriptClient) -> tuple[list[str], int]:
            client.start(command)
            logs, final = client.run_to_end(command.script_ticket)
            return [e.text for e in logs], final.exit_code

        def other(client: ScriptClient) -> float:
            started = time.monotonic()
            assert client.call("ITestService", "Echo", "ping") == "ping"
            return time.monotonic() - started

        reading = self.in_client(run)
        latency = await self.in_client(other)
        lines, exit_code = await reading
        self.assertEqual(exit_code, 0)
        self.assertEqual(len(lines), 100000)
        self.assertEqual(lines, [str(i) for i in range(1, 100001)])
        self.assertLess(latency, 1.0)

    async def test_same_ticket_runs_once(self) -> None:
        marker = self.home / "runs"
        command = v2_command(f"echo run >> {marker}")

        def run(client: ScriptClient) -> int:
            client.start(command)
            client.start(command)
            _, final = client.run_to_end(command.script_ticket)
            client.start(command)
            return final.exit_code

        self.assertEqual(await self.in_client(run), 0)
        self.assertEqual(marker.read_text(), "run\n")

    async def test_cancel_kills_the_tree(self) -> None:
        tag = f"600.{os.getpid()}{uuid.uuid4().int % 1000}"
        command = v2_command(f"sleep {tag} & sleep {tag}")

        def run(client: ScriptClient) -> tuple[float, int]:
            client.start(command)
            while not _processes_with(tag):
                time.sleep(0.02)
            started = time.monotonic()
            client.cancel(command.script_ticket)
            _, final = client.run_to_end(command.script_ticket)
            return time.monotonic() - started, final.exit_code

        elapsed, exit_code = await self.in_client(run)
        self.assertLess(elapsed, 10)
        self.assertEqual(exit_code, -43)
        self.assertEqual(_processes_with(tag), [])

    async def test_full_isolation_never_overlaps(self) -> None:
        trace = self.home / "trace"
        body = "echo start-{n} >> {trace}; sleep 0.2; echo end-{n} >> {trace}"
        commands = [
            v2_command(body.format(n=n, trace=trace), isolation=ScriptIsolationLevel.FullIsolation,
                       isolation_mutex_name="deploy")
            for n in range(3)
        ]

        def run(client: ScriptClient) -> list[int]:
            for command in commands:
                client.start(command)
            return [client.run_to_end(c.script_ticket)[1].exit_code for c in commands]

        self.assertEqual(await self.in_client(run), [0, 0, 0])
        lines = trace.read_text().split()
        for i in range(0, 6, 2):
            self.assertEqual(lines[i].replace("start", "end"), lines[i + 1], lines)

    async def overlap(self, first: dict[str, Any], second: dict[str, Any]) -> list[int]:
        """
        Two scripts that each wait for the other to have started: both
        succeed only if they really run at the same time.
        """
        wait = "touch {me}; for i in $(seq 100); do [ -f {other} ] && exit 0; sleep 0.05; done; exit 9"
        a, b = self.home / "a", self.home / "b"
        commands = [
            v2_command(wait.format(me=a, other=b), **first),
            v2_command(wait.format(me=b, other=a), **second),
        ]

        def run(client: ScriptClient) -> list[int]:
            for command in commands:
                client.start(command)
            return [client.run_to_end(c.script_ticket)[1].exit_code for c in commands]

        return await self.in_client(run)  # type: ignore[no-any-return]

    async def test_no_isolation_overlaps(self) -> None:
        none = {"isolation": ScriptIsolationLevel.NoIsolation}
        self.assertEqual(await self.overlap(none, none), [0, 0])

    async def test_different_mutex_names_overlap(self) -> None:
        full = {"isolation": ScriptIsolationLevel.FullIsolation}
        self.assertEqual(
            await self.overlap({**full, "isolation_mutex_name": "a"}, {**full, "isolation_mutex_name": "b"}),
            [0, 0],
        )

    async def test_mutex_timeout_and_cancel_while_waiting(self) -> None:
        release = self.home / "release"
        full = {"isolation": ScriptIsolationLevel.FullIsolation, "isolation_mutex_name": "m"}
        holder = v2_command(f"while [ ! -f {release} ]; do sleep 0.05; done", **full)
        impatient = v2_command(
            "echo never", script_isolation_mutex_timeout=TimeSpan.from_timedelta(timedelta(seconds=0.5)), **full
        )
        patient = v2_command("echo never", **full)

        def run(client: ScriptClient) -> list[Any]:
            client.start(holder)
            client.start(impatient)
            logs, timed_out = client.run_to_end(impatient.script_ticket)
            client.start(patient)
            waiting = client.status(patient.script_ticket)
            client.cancel(patient.script_ticket)
            _, cancelled = client.run_to_end(patient.script_ticket)
            release.touch()
            _, held = client.run_to_end(holder.script_ticket)
            return [timed_out.exit_code, [e.text for e in logs], waiting.state, cancelled.exit_code, held.exit_code]

        timed_out, logs, waiting_state, cancelled, held = await self.in_client(run)
        self.assertEqual(timed_out, -44)
        self.assertTrue(any("Waiting for the script in task ServerTasks-1" in line for line in logs), logs)
        self.assertEqual(waiting_state, ProcessState.Pending)
        self.assertEqual(cancelled, -43)
        self.assertEqual(held, 0)

    async def test_file_escaping_the_workspace_is_refused(self) -> None:
        ref = DataStream.fresh(4)
        command = v2_command("cat x", files=(ScriptFile("../x", ref),))

        def run(client: ScriptClient) -> str:
            client.wire.send_request(request("IScriptServiceV2", "StartScript", command), {ref.id: [b"evil"]})
            response, _ = client.wire.read_response()
            assert response.error is not None
            return response.error.message

        message = await self.in_client(run)
        self.assertIn("is not a file name inside the script's workspace", message)
        self.assertFalse((self.home / "Work" / "x").exists())
        self.assertEqual([p.name for p in (self.home / "Work").glob("*/x")], [])

    async def test_script_files_are_in_the_workspace(self) -> None:
        ref = DataStream.fresh(5)
        command = v2_command("cat data/in.txt", files=(ScriptFile("data/in.txt", ref),))

        def run(client: ScriptClient) -> list[str]:
            client.start(command, {ref.id: [b"hello"]})
            logs, _ = client.run_to_end(command.script_ticket)
            return [e.text for e in logs]

        self.assertEqual(await self.in_client(run), ["hello"])

    async def test_script_files_are_copied_off_the_reactor_thread(self) -> None:
        """
        A script's files may be big (and encrypted as they are copied):
        the copy runs in the thread pool, so the reactor keeps serving
        everyone else meanwhile.
        """
        copied_in: list[bool] = []
        real = shutil.copyfileobj

        def copy(source: Any, target: Any, *args: Any) -> None:
            copied_in.append(isInIOThread())
            real(source, target, *args)

        self.patch(shutil, "copyfileobj", copy)
        data = os.urandom(1 << 20)
        ref = DataStream.fresh(len(data))
        command = v2_command("sha256sum big.bin", files=(ScriptFile("big.bin", ref),))

        def run(client: ScriptClient) -> list[str]:
            client.start(command, {ref.id: [data]})
            logs, _ = client.run_to_end(command.script_ticket)
            return [e.text for e in logs]

        [line] = await self.in_client(run)
        self.assertEqual(line.split()[0], hashlib.sha256(data).hexdigest())
        self.assertEqual(copied_in, [False])

    async def test_a_script_file_that_cannot_be_written_fails_start_script(self) -> None:
        """
        A file that cannot be written (here one named like a folder another
        file needs) fails StartScript with the reason, as Tentacle's does,
        and leaves no workspace; the same ticket sent again with files that
        fit then runs.
        """
        a, b = DataStream.fresh(1), DataStream.fresh(1)
        ticket = uuid.uuid4().hex
        bad = v2_command("echo ran", ticket, files=(ScriptFile("x", a), ScriptFile("x/y", b)))
        good = v2_command("cat x/y", ticket, files=(ScriptFile("x/y", b),))

        def run(client: ScriptClient) -> Any:
            client.wire.send_request(request("IScriptServiceV2", "StartScript", bad), {a.id: [b"a"], b.id: [b"b"]})
            response, _ = client.wire.read_response()
            assert response.error is not None
            left = list((self.home / "Work").iterdir())
            client.first = False  # the next call sends NEXT first
            client.start(good, {b.id: [b"b"]})
            logs, status = client.run_to_end(good.script_ticket)
            return response.error.message, left, [e.text for e in logs], status.exit_code

        message, left, logs, exit_code = await self.in_client(run)
        self.assertIn("Not a directory", message)
        self.assertEqual(left, [])
        self.assertEqual((logs, exit_code), (["b"], 0))
        self.flushLoggedErrors(NotADirectoryError)

    async def test_complete_removes_the_workspace(self) -> None:
        command = v2_command("echo done")

        def run(client: ScriptClient) -> Any:
            client.start(command)
            client.run_to_end(command.script_ticket)
            client.complete(command.script_ticket)
            return client.status(command.script_ticket)

        status = await self.in_client(run)
        self.assertEqual((status.state, status.exit_code), (ProcessState.Complete, -45))
        self.assertEqual(list((self.home / "Work").iterdir()), [])

    async def test_environment(self) -> None:
        command = v2_command('echo "$TentacleHome|$TentacleApplications|$TentacleCertificateSignatureAlgorithm|$PWD"')

        def run(client: ScriptClient) -> str:
            client.start(command)
            logs, _ = client.run_to_end(command.script_ticket)
            return str(logs[0].text)

        home, apps, algorithm, cwd = (await self.in_client(run)).split("|")
        self.assertEqual((home, apps, algorithm), (str(self.home), str(self.home / "Applications"), "sha256RSA"))
        self.assertEqual(Path(cwd).parent, self.home / "Work")

    async def test_v1_round_trip(self) -> None:
        def run(client: ScriptClient) -> Any:
            ticket = client.call(
                "IScriptService", "StartScript",
                StartScriptCommand(script_body="echo one; echo two", isolation=ScriptIsolationLevel.NoIsolation,
                                   task_id="ServerTasks-77"),
            )
            deadline = time.monotonic() + 30
            while True:
                status = client.call("IScriptService", "GetStatus", ScriptStatusRequest(ticket, 0))
                if status.state is ProcessState.Complete or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            final = client.call("IScriptService", "CompleteScript", CompleteScriptCommand(ticket, 0))
            return ticket, final

        ticket, final = await self.in_client(run)
        self.assertIn("-77-", ticket.task_id)
        self.assertEqual([e.text for e in final.logs], ["one", "two"])
        self.assertEqual((final.state, final.exit_code), (ProcessState.Complete, 0))
        self.assertEqual(list((self.home / "Work").iterdir()), [])


def _processes_with(tag: str) -> list[int]:
    """
    Live processes whose command line mentions C{tag}.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if tag.encode() in cmdline and ") Z " not in stat:
            found.append(int(entry))
    return found


class RunnerLimitTests(TestCase):
    """
    The agent's own limits: concurrency, run time, and PowerShell's absence.
    """

    def start(self, **runner_options: Any) -> ScriptRunner:
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        runner = ScriptRunner(reactor, self.home, self.home / "Applications", kill_grace=1.0, **runner_options)
        dispatcher = Dispatcher()
        dispatcher.register(SCRIPT_SERVICE_V2, ScriptServiceV2(runner))
        self.service = start_agent(
            self, home=self.home, trusted=(identity("server").thumbprint,),
            service_options={"dispatcher": dispatcher},
        )
        self.context = client_context(identity("server"), Path(self.mktemp()).parent)
        return runner

    def in_client(self, f: Any) -> Deferred[Any]:
        def run() -> Any:
            client = ScriptClient(agent_port(self.service), self.context)
            try:
                return f(client)
            finally:
                client.close()

        return in_thread(run)

    async def test_concurrency_limit_keeps_the_rest_pending(self) -> None:
        self.start(max_concurrent=1)
        release = self.home / "release"
        first = v2_command(f"while [ ! -f {release} ]; do sleep 0.05; done")
        second = v2_command("echo second")

        def run(client: ScriptClient) -> list[Any]:
            client.start(first)
            while client.status(first.script_ticket).state is not ProcessState.Running:
                time.sleep(0.02)
            client.start(second)
            waiting = client.status(second.script_ticket).state
            release.touch()
            return [waiting, client.run_to_end(first.script_ticket)[1].exit_code,
                    client.run_to_end(second.script_ticket)[1].exit_code]

        self.assertEqual(await self.in_client(run), [ProcessState.Pending, 0, 0])

    async def test_script_timeout(self) -> None:
        self.start(script_timeout=0.5)
        tag = f"600.{os.getpid()}5"
        command = v2_command(f"sleep {tag}")

        def run(client: ScriptClient) -> int:
            client.start(command)
            return client.run_to_end(command.script_ticket)[1].exit_code

        self.assertEqual(await self.in_client(run), -44)
        self.assertEqual(_processes_with(tag), [])

    async def test_powershell_without_pwsh(self) -> None:
        self.start(pwsh="")
        from tentacle.contracts import ScriptType

        command = v2_command("", scripts={ScriptType.PowerShell: "Write-Host hi"})

        def run(client: ScriptClient) -> tuple[int, list[str]]:
            client.start(command)
            logs, final = client.run_to_end(command.script_ticket)
            return final.exit_code, [e.text for e in logs]

        code, logs = await self.in_client(run)
        self.assertEqual(code, -42)
        self.assertIn("PowerShell (pwsh) is not installed", logs[0])


class WorkingFolderTests(TestCase):
    """
    A Bash script changes to its workspace itself, in its first line (one
    exec less than C{env -C}); what it sees must be what C{env -C} gave it:
    the folder, C{PWD}, C{OLDPWD}, its line numbers.  Where Bash would show
    the difference (C{BASH_ENV}, C{SHELLOPTS}), C{env -C} still starts it.
    """

    PROBE = 'echo "$LINENO|$PWD|$(pwd -P)|$(declare -p OLDPWD 2>&1)|$0"\necho "$LINENO"'

    async def run_in(self, environment: dict[str, str], body: str) -> tuple[list[str], Path]:
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        runner = ScriptRunner(reactor, home, home / "Applications", environment=environment)
        command = v2_command(body)
        script = runner.start(_launch(command, command.script_ticket), None)  # type: ignore[arg-type]
        await script.when_finished()
        status = await runner.status(command.script_ticket, 0, -45)
        self.assertEqual(status.exit_code, 0, status.logs)
        return [line.text for line in status.logs], script.workspace.root

    def reference(self, environment: dict[str, str], folder: Path) -> str:
        """
        What C{declare -p OLDPWD} says in Bash started by C{env -C}.
        """
        import subprocess

        done = subprocess.run(
            ["env", "-C", str(folder), "/bin/bash", "-c", "declare -p OLDPWD 2>&1"],
            env=environment, capture_output=True, text=True, check=True,
        )
        return done.stdout.strip()

    async def check(self, environment: dict[str, str]) -> None:
        lines, root = await self.run_in(environment, self.PROBE)
        first, second = lines
        line, pwd, physical, oldpwd, zero = first.split("|")
        self.assertEqual((line, second), ("1", "2"), "line numbers as written")
        self.assertEqual((pwd, physical), (str(root.resolve()), str(root.resolve())))
        self.assertEqual(zero, str(root / "Bootstrap.sh"))
        self.assertEqual(oldpwd, self.reference(environment, Path(self.mktemp()).parent))
        self.assertTrue((root / "Bootstrap.sh").read_text().startswith("builtin cd -P -- "), "no env -C")

    async def test_without_oldpwd(self) -> None:
        environment = {k: v for k, v in os.environ.items() if k != "OLDPWD"}
        await self.check(environment)

    async def test_with_oldpwd(self) -> None:
        await self.check({**os.environ, "OLDPWD": "/"})

    async def test_with_a_stale_oldpwd(self) -> None:
        await self.check({**os.environ, "OLDPWD": "/no/such/folder"})

    async def test_bash_env_still_starts_in_the_workspace(self) -> None:
        startup = Path(self.mktemp()).absolute()
        startup.write_text('echo "startup in $(pwd -P)"\n')
        lines, root = await self.run_in({**os.environ, "BASH_ENV": str(startup)}, "echo body")
        self.assertEqual(lines, [f"startup in {root.resolve()}", "body"])
        self.assertEqual((root / "Bootstrap.sh").read_text(), "echo body", "no prelude: started by env -C")

    async def test_xtrace_from_the_environment_shows_only_the_script(self) -> None:
        lines, _ = await self.run_in({**os.environ, "SHELLOPTS": "xtrace"}, "true")
        self.assertEqual(lines, ["+ true"])
