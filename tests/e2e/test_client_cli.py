"""
C{tentacle-client} as a user runs it: a real child process against real
agents on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tentacle.identity import IdentityStore
from tests.e2e.test_daemon import CHECKOUT
from tests.e2e.test_scripts import _processes_with
from tests.support import agent_port, identity, remove_big_files, start_agent


class CLIProcess(ProcessProtocol):
    def __init__(self, wait_for: bytes | None = None) -> None:
        self.out = b""
        self.err = b""
        self.ended: Deferred[int] = Deferred()
        self.seen: Deferred[None] = Deferred()
        self._wait_for = wait_for

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self._wait_for and self._wait_for in self.out and not self.seen.called:
            self.seen.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value.exitCode)


def spawn_client(*argv: str, wait_for: bytes | None = None) -> tuple[CLIProcess, Any]:
    """
    C{tentacle-client ARGV} in a child process.
    """
    env = dict(os.environ, PYTHONPATH=CHECKOUT)
    protocol = CLIProcess(wait_for)
    process = reactor.spawnProcess(  # type: ignore[attr-defined]
        protocol, sys.executable, [sys.executable, "-m", "tentacle.client.cli", *argv], env=env
    )
    return protocol, process


async def client_cli(*argv: str) -> tuple[int, str, str]:
    """
    C{tentacle-client ARGV}'s exit status, output and errors.
    """
    protocol, _ = spawn_client(*argv)
    code = await protocol.ended
    return code, protocol.out.decode(), protocol.err.decode()


class ClientCLITests(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.home = Path(self.mktemp()).absolute()
        IdentityStore(self.home).save(identity("server"))

    def agent(self) -> Any:
        agent_home = Path(self.mktemp()).absolute()
        agent_home.mkdir()
        return start_agent(self, home=agent_home, trusted=(identity("server").thumbprint,))

    def spawn(self, *argv: str, wait_for: bytes | None = None) -> tuple[CLIProcess, Any]:
        return spawn_client(*argv, wait_for=wait_for)

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        return await client_cli(*argv)

    def pinned(self, command: str) -> list[str]:
        return [command, "--home", str(self.home), "--thumbprint", identity("agent").thumbprint]

    async def test_check(self) -> None:
        agent = self.agent()
        code, out, err = await self.cli(*self.pinned("check"), f"127.0.0.1:{agent_port(agent)}")
        self.assertEqual(code, 0, err)
        self.assertIn(f"Agent thumbprint: {identity('agent').thumbprint} (verified against the pin)", out)
        self.assertIn("TLS:              TLSv1.3", out)
        self.assertIn("IScriptService, IFileTransferService, IScriptServiceV2", out)
        self.assertRegex(out, r"Round trip: +[0-9.]+ ms")

    async def test_run_streams_and_exits_with_the_scripts_code(self) -> None:
        agent = self.agent()
        code, out, err = await self.cli(
            *self.pinned("run"), f"127.0.0.1:{agent_port(agent)}", "-c", "echo out; echo bad >&2; exit 7"
        )
        self.assertEqual(code, 7, err)
        self.assertEqual(out, "stdout: out\nstderr: bad\n")

    async def test_run_json(self) -> None:
        agent = self.agent()
        code, out, _ = await self.cli(*self.pinned("run"), "--json", f"127.0.0.1:{agent_port(agent)}", "-c", "echo j")
        records = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(code, 0)
        self.assertEqual(records[0]["text"], "j")
        self.assertEqual(records[-1]["exit_code"], 0)

    async def test_upload_and_download(self) -> None:
        agent = self.agent()
        target = f"127.0.0.1:{agent_port(agent)}"
        local = Path(self.mktemp())
        local.write_bytes(os.urandom(100_000))
        code, out, err = await self.cli(*self.pinned("upload"), target, str(local), "in/blob")
        self.assertEqual(code, 0, err)
        self.assertIn("Uploaded 100000 bytes", out)
        back = Path(self.mktemp())
        code, out, err = await self.cli(*self.pinned("download"), target, "in/blob", str(back))
        self.assertEqual(code, 0, err)
        self.assertEqual(back.read_bytes(), local.read_bytes())

    async def test_wrong_pin(self) -> None:
        agent = self.agent()
        code, out, err = await self.cli(
            "run", "--home", str(self.home), "--thumbprint", "CD" * 20, f"127.0.0.1:{agent_port(agent)}", "-c", "echo x"
        )
        self.assertEqual(code, 1)
        self.assertIn("expected " + "CD" * 20, err)
        self.assertIn(identity("agent").thumbprint, err)

    async def test_usage_errors(self) -> None:
        code, _, err = await self.cli("run", "--home", str(self.home), "localhost", "-c", "x")
        self.assertEqual(code, 2)
        self.assertIn("no thumbprint for localhost", err)
        code, _, err = await self.cli("run", "--home", str(self.home), "--thumbprint", "xyz", "h", "-c", "x")
        self.assertEqual(code, 2)
        self.assertIn("'xyz' is not a thumbprint", err)

    async def test_twenty_agents_at_once(self) -> None:
        agents = [self.agent() for _ in range(20)]
        targets = []
        for agent in agents:
            targets += ["--target", f"127.0.0.1:{agent_port(agent)}"]
        code, out, err = await self.cli(*self.pinned("run"), *targets, "-c", "echo from $TentacleHome")
        self.assertEqual(code, 0, err)
        for agent in agents:
            port = agent_port(agent)
            self.assertIn(f"[127.0.0.1:{port}] stdout: from {agent.config.home}", out)
            self.assertRegex(out, rf"127\.0\.0\.1:{port} +ok: exit code 0")
        self.assertIn("20 of 20 succeeded", out)

    async def test_one_failing_target_fails_the_run(self) -> None:
        agents = [self.agent() for _ in range(2)]
        code, out, _ = await self.cli(
            *self.pinned("run"), "--target", f"127.0.0.1:{agent_port(agents[0])}",
            "--target", f"127.0.0.1:{agent_port(agents[1])}",
            "-c", f'[ "$TentacleHome" = "{agents[0].config.home}" ] && exit 3; exit 0',
        )
        self.assertEqual(code, 1)
        self.assertIn("1 of 2 succeeded", out)

    async def test_ctrl_c_cancels_the_remote_script(self) -> None:
        agent = self.agent()
        tag = f"600.{os.getpid()}3"
        protocol, process = self.spawn(
            *self.pinned("run"), f"127.0.0.1:{agent_port(agent)}", "-c", f"echo started; sleep {tag}",
            wait_for=b"started",
        )
        await protocol.seen
        process.signalProcess(signal.SIGINT)
        code = await protocol.ended
        self.assertEqual(code, 130, protocol.err)
        self.assertIn(b"cancelling", protocol.err)
        self.assertEqual(_processes_with(tag), [])
        runner = agent.scripts
        assert runner is not None
        self.assertEqual(runner._scripts, {}, "the script was completed and forgotten")

    async def test_through_a_proxy(self) -> None:
        from tests.connect_proxy import ConnectProxy

        factory = ConnectProxy(credentials="ops:pw")
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.addCleanup(factory.all_closed)
        agent = self.agent()
        code, out, err = await self.cli(
            *self.pinned("run"), "--proxy", f"http://ops:pw@127.0.0.1:{port.getHost().port}",
            f"127.0.0.1:{agent_port(agent)}", "-c", "echo tunnelled",
        )
        self.assertEqual((code, out), (0, "stdout: tunnelled\n"), err)
        self.assertGreaterEqual(factory.tunnels, 1)

    async def test_untrusted_client_certificate(self) -> None:
        agent_home = Path(self.mktemp()).absolute()
        agent_home.mkdir()
        agent = start_agent(self, home=agent_home, trusted=(identity("other").thumbprint,))
        code, _, err = await self.cli(*self.pinned("run"), f"127.0.0.1:{agent_port(agent)}", "-c", "echo x")
        ours = identity("server").thumbprint
        self.assertEqual(code, 1)
        self.assertEqual(
            err,
            f"error: 127.0.0.1:{agent_port(agent)} refused our certificate {ours}: the agent does not trust it; "
            f"to let this client drive it, run on the agent: tentacle configure --trust {ours}\n",
        )

    async def test_agent_down(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        code, _, err = await self.cli(*self.pinned("run"), f"127.0.0.1:{port}", "-c", "echo x")
        self.assertEqual(code, 1)
        self.assertIn("after 5 tries", err)
        self.assertIn("the connection was refused: no agent listens on that port", err)
        self.assertNotIn("111", err)

    async def test_named_target(self) -> None:
        agent = self.agent()
        targets = Path(self.mktemp())
        targets.write_text(json.dumps({"web01": {
            "host": "127.0.0.1", "port": agent_port(agent), "thumbprint": identity("agent").sha256,
        }}))
        code, out, err = await self.cli(
            "run", "--home", str(self.home), "--targets-file", str(targets), "web01", "-c", "echo named"
        )
        self.assertEqual((code, out), (0, "stdout: named\n"), err)

    async def test_deploy_rollback_releases(self) -> None:
        from tests.deploy_support import markers, sample_package

        agents = [self.agent() for _ in range(2)]
        targets: list[str] = []
        for agent in agents:
            targets += ["--target", f"127.0.0.1:{agent_port(agent)}"]
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        for version in ("1.0.0", "1.1.0"):
            package = sample_package(folder, version)
            code, out, err = await self.cli(*self.pinned("deploy"), *targets, str(package), "--var", "Greeting=hi")
            self.assertEqual(code, 0, err + out)
            self.assertIn("2 of 2 succeeded", out)
        self.assertIn("deploying 1.1.0 greeting=hi", out)
        for agent in agents:
            apps = agent.config.applications / "webapp"
            self.assertEqual(os.readlink(apps / "current"), "1.1.0")
            self.assertIn("PostDeploy 1.1.0", " ".join(markers(agent.config.home)))
        target = f"127.0.0.1:{agent_port(agents[0])}"
        code, out, err = await self.cli(*self.pinned("releases"), "--json", target, "webapp")
        self.assertEqual(code, 0, err)
        self.assertIn('"1.1.0"', out)
        code, out, err = await self.cli(*self.pinned("rollback"), target, "webapp")
        self.assertEqual(code, 0, err + out)
        self.assertEqual(os.readlink(agents[0].config.applications / "webapp" / "current"), "1.0.0")
        self.assertEqual(os.readlink(agents[1].config.applications / "webapp" / "current"), "1.1.0")

    async def test_failed_deploy_fails_the_command(self) -> None:
        from tests.deploy_support import sample_package

        agent = self.agent()
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        package = sample_package(folder, "2.0.0")
        code, out, err = await self.cli(
            *self.pinned("deploy"), f"127.0.0.1:{agent_port(agent)}", str(package), "--var", "FAIL_DEPLOY=yes"
        )
        self.assertNotEqual(code, 0)
        self.assertFalse((agent.config.applications / "webapp" / "current").exists())

    async def test_targets_from_a_file(self) -> None:
        agents = [self.agent() for _ in range(3)]
        listing = Path(self.mktemp())
        listing.write_text(
            "# web servers\n" + "".join(f"127.0.0.1:{agent_port(a)}\n\n" for a in agents)
        )
        code, out, err = await self.cli(*self.pinned("run"), "--target", f"@{listing}", "-c", "echo listed")
        self.assertEqual(code, 0, err)
        self.assertIn("3 of 3 succeeded", out)
        code, _, err = await self.cli(*self.pinned("run"), "--target", "@/no/such/list", "-c", "x")
        self.assertEqual(code, 2)
        self.assertIn("cannot read the target list /no/such/list", err)

    async def test_progress_bar_on_a_terminal(self) -> None:
        agent = self.agent()
        local = Path(self.mktemp())
        local.write_bytes(os.urandom(3 * 1024 * 1024))
        env = dict(os.environ, PYTHONPATH=CHECKOUT)
        protocol = CLIProcess()
        reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol, sys.executable,
            [sys.executable, "-m", "tentacle.client.cli", *self.pinned("upload"),
             f"127.0.0.1:{agent_port(agent)}", str(local), "tty/blob"],
            env=env, usePTY=True,
        )
        code = await protocol.ended
        self.assertEqual(code, 0, protocol.out)
        self.assertIn(b"3.0 MiB", protocol.out)
        self.assertIn(b"MiB/s", protocol.out)
        self.assertIn(b"ETA", protocol.out)
        self.assertIn(b"Uploaded 3145728 bytes", protocol.out)

    async def test_download_from_several_targets_keeps_every_copy(self) -> None:
        agents = [self.agent() for _ in range(2)]
        for n, agent in enumerate(agents):
            (agent.config.home / "report.txt").write_text(f"from agent {n}")
        destination = Path(self.mktemp()).absolute()
        targets = [f"127.0.0.1:{agent_port(a)}" for a in agents]
        code, out, err = await self.cli(
            *self.pinned("download"), targets[0], "--target", targets[1], "report.txt", str(destination)
        )
        self.assertEqual(code, 0, err)
        for n, target in enumerate(targets):
            self.assertEqual((destination / target / "report.txt").read_text(), f"from agent {n}")
        self.assertIn("2 of 2 succeeded", out)

    async def test_download_into_a_folder_saves_inside_it(self) -> None:
        agent = self.agent()
        (agent.config.home / "report.txt").write_text("inside")
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        code, out, err = await self.cli(*self.pinned("download"), f"127.0.0.1:{agent_port(agent)}", "report.txt", str(folder))
        self.assertEqual(code, 0, err)
        self.assertEqual((folder / "report.txt").read_text(), "inside")
        self.assertIn(f"to {folder / 'report.txt'}", out)

    async def test_json_has_a_record_for_every_target(self) -> None:
        import socket

        agent = self.agent()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            down = s.getsockname()[1]
        code, out, err = await self.cli(
            *self.pinned("run"), "--json", f"127.0.0.1:{agent_port(agent)}", f"127.0.0.1:{down}", "-c", "exit 4"
        )
        self.assertEqual(code, 1, err)
        records = {r.get("target"): r for r in map(json.loads, out.splitlines()) if "exit_code" in r or "error" in r}
        self.assertEqual(records[f"127.0.0.1:{agent_port(agent)}"]["exit_code"], 4)
        failed = records[f"127.0.0.1:{down}"]
        self.assertFalse(failed["ok"])
        self.assertIn("the connection was refused", failed["error"])
        self.assertEqual(json.loads(out.splitlines()[-1]), {"summary": {"targets": 2, "failed": 2}})

    async def test_ctrl_c_with_several_targets_exits_130(self) -> None:
        agents = [self.agent() for _ in range(2)]
        tag = f"600.{os.getpid()}7"
        protocol, process = self.spawn(
            *self.pinned("run"), *[f"127.0.0.1:{agent_port(a)}" for a in agents],
            "-c", f"echo started; sleep {tag}", wait_for=b"started",
        )
        await protocol.seen
        process.signalProcess(signal.SIGINT)
        code = await protocol.ended
        self.assertEqual(code, 130, protocol.err)
        self.assertEqual(_processes_with(tag), [])

    async def test_deploy_to_three_agents_pinned_one_by_one(self) -> None:
        from tests.deploy_support import sample_package

        agents = [self.agent() for _ in range(3)]
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        package = sample_package(folder, "1.0.0")
        pins = [identity("agent").thumbprint, identity("agent").sha256.lower(), identity("agent").thumbprint]
        targets = [f"127.0.0.1:{agent_port(a)}={pin}" for a, pin in zip(agents, pins)]
        code, out, err = await self.cli("deploy", "--home", str(self.home), *targets, str(package))
        self.assertEqual(code, 0, err + out)
        self.assertIn("3 of 3 succeeded", out)
        for agent in agents:
            self.assertEqual(os.readlink(agent.config.applications / "webapp" / "current"), "1.0.0")
        wrong = f"127.0.0.1:{agent_port(agents[0])}={'EF' * 20}"
        code, out, err = await self.cli("check", "--home", str(self.home), wrong)
        self.assertEqual(code, 1)
        self.assertIn("expected " + "EF" * 20, err)
