"""
The agent as users start it: a real child process running C{tentacle run}
(which is C{twistd -n tentacle}), checked over a real socket.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import tentacle
from tentacle.identity import IdentityStore
from tentacle.page import FRIENDLY_PAGE
from tests.support import client_context, converse, in_thread

CHECKOUT = str(Path(tentacle.__file__).resolve().parent.parent)


def child_environment(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TENTACLE_HOME"] = str(home)
    env["PYTHONPATH"] = CHECKOUT + os.pathsep + env.get("PYTHONPATH", "")
    return env


async def configure_home(case: TestCase, env: dict[str, str], port: int, *trusted: str) -> None:
    """
    Set a child agent's port, loopback address and trusted servers, the way
    a user would: with the C{tentacle configure} command.
    """
    arguments = ["-m", "tentacle", "configure", "--port", str(port), "--listen-ip", "127.0.0.1"]
    for thumbprint in trusted:
        arguments += ["--trust", thumbprint]
    out, err, code = await getProcessOutputAndValue(sys.executable, arguments, env=env)
    case.assertEqual(code, 0, err)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProcess(ProcessProtocol):
    """
    Watches the agent's log for the line saying it listens.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[None] = Deferred()
        self.ended: Deferred[Any] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def wait_for(self, text: bytes) -> Deferred[None]:
        """
        Fires when C{text} appears in the output from now on.
        """
        d: Deferred[None] = Deferred()
        self._waiting.append((text, d))
        return d

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"Tentacle listening on port" in self.output and not self.listening.called:
            self.listening.callback(None)
        for text, d in list(self._waiting):
            if text in data or text in self.output[-len(data) - len(text):]:
                self._waiting.remove((text, d))
                d.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.listening.called:
            self.listening.errback(Exception(f"agent exited: {self.output!r}"))
        for text, d in self._waiting:
            d.errback(Exception(f"agent exited before saying {text!r}: {self.output!r}"))
        self._waiting = []
        self.ended.callback(reason.value)


class DaemonTests(TestCase):
    async def test_twistd_lists_the_plugin(self) -> None:
        home = Path(self.mktemp()).absolute()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-c", "from twisted.scripts.twistd import run; run()", "--help"],
            env=child_environment(home),
        )
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"\n\s+tentacle\s+A listening deployment agent")

    async def test_run_on_a_fresh_home(self) -> None:
        home = Path(self.mktemp()).absolute()
        port = free_port()
        env = child_environment(home)
        await configure_home(self, env, port)
        agent = AgentProcess()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            agent, sys.executable, [sys.executable, "-m", "tentacle.cli", "run"], env=env
        )
        try:
            await agent.listening
            thumbprint = IdentityStore(home).load().thumbprint
            self.assertIn(f"its thumbprint is {thumbprint}".encode(), agent.output)
            result = await in_thread(
                converse, port, client_context(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            self.assertEqual(result.received, FRIENDLY_PAGE)
        finally:
            if process.pid is not None:
                process.signalProcess(signal.SIGTERM)
            reason = await agent.ended
        # twistd shuts down cleanly, then re-raises SIGTERM so its parent
        # sees how it ended.
        self.assertIn(getattr(reason, "signal", None), (None, signal.SIGTERM))
        self.assertIn(b"Server Shut Down", agent.output)


class RestartTests(TestCase):
    """
    An agent killed with SIGKILL while a script runs, then started again.
    """

    async def start_agent(self, env: dict[str, str]) -> tuple[AgentProcess, Any]:
        agent = AgentProcess()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            agent, sys.executable, [sys.executable, "-m", "tentacle", "run"], env=env
        )
        await agent.listening
        return agent, process

    async def test_sigkill_during_a_script(self) -> None:
        from tests.e2e.test_scripts import ScriptClient, _processes_with, v2_command
        from tests.support import identity

        home = Path(self.mktemp()).absolute()
        port = free_port()
        env = child_environment(home)
        await configure_home(self, env, port, identity("server").thumbprint)
        context = client_context(identity("server"), home.parent)
        tag = f"600.{os.getpid()}9"
        command = v2_command(f"echo before; sleep {tag}")
        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in _processes_with(tag)])

        agent, process = await self.start_agent(env)

        def start_and_see_output() -> None:
            client = ScriptClient(port, context)
            client.start(command)
            while not client.status(command.script_ticket).logs:
                time.sleep(0.02)  # the client's poll interval
            client.close()

        await in_thread(start_and_see_output)
        process.signalProcess(signal.SIGKILL)
        await agent.ended

        agent, process = await self.start_agent(env)
        try:
            def ask() -> tuple[Any, Any]:
                client = ScriptClient(port, context)
                try:
                    return (
                        client.status(command.script_ticket),
                        client.status(v2_command("x").script_ticket),
                    )
                finally:
                    client.close()

            status, unknown = await in_thread(ask)
        finally:
            process.signalProcess(signal.SIGTERM)
            await agent.ended
        from tentacle.contracts import ProcessState

        self.assertEqual((status.state, status.exit_code), (ProcessState.Complete, -46))
        self.assertEqual([e.text for e in status.logs], ["before"])
        self.assertEqual((unknown.state, unknown.exit_code), (ProcessState.Complete, -45))


class UnprivilegedTests(TestCase):
    """
    The agent started as root, running as an unprivileged user who owns its home.
    """

    async def test_runs_as_nobody(self) -> None:
        import pwd

        from tentacle.client.api import Target, TentacleClient
        from tentacle.client.connection import Pin
        from tests.support import identity

        if os.geteuid() != 0:
            self.skipTest("only root can start an agent that switches user")  # type: ignore[attr-defined]
        nobody = pwd.getpwnam("nobody")
        home = Path(self.mktemp()).absolute()
        port = free_port()
        env = child_environment(home)
        await configure_home(self, env, port, identity("server").thumbprint)
        IdentityStore(home).save(identity("agent"))
        for path in [home, *home.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        # trial makes its temp folders 0700; open the ones it made for this
        # test (below its working folder) so the user can reach the home.
        for parent in home.parents:
            if parent == Path.cwd():
                break
            os.chmod(parent, 0o755)

        agent = AgentProcess()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            agent, sys.executable, [sys.executable, "-m", "tentacle", "run", "--user", "nobody"], env=env
        )
        try:
            await agent.listening
            client = TentacleClient(Target("127.0.0.1", port, Pin(identity("agent").thumbprint)), identity("server"), reactor)
            lines: list[str] = []
            code = await client.run_script("id -u; touch made-here", on_log=lambda line: lines.append(line.text))
            local = Path(self.mktemp())
            local.write_bytes(b"payload")
            result = await client.upload(local, "Packages/p.bin")
            await client.close()
        finally:
            if process.pid is not None:
                process.signalProcess(signal.SIGTERM)
            await agent.ended
        self.assertEqual((code, lines), (0, [str(nobody.pw_uid)]), agent.output)
        self.assertEqual(os.stat(result.full_path).st_uid, nobody.pw_uid)
        self.assertIn(b"set uid/gid", agent.output)

    async def test_refuses_a_home_owned_by_someone_else(self) -> None:
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tentacle", "--home", str(home), "run", "--user", "nobody"],
            env=child_environment(home),
        )
        self.assertEqual(code, 1)
        if os.geteuid() == 0:
            self.assertIn(b"run 'chown -R nobody:", err)
        else:
            self.assertIn(b"only root can run the agent as", err)
