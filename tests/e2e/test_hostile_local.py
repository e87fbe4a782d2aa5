"""
Hostile local users and hostile scripts: another user of the machine
reading a deployment's secrets, scripts whose processes leave the process
group to survive a cancel, and unit-file injection through the service
command.  Also how the agent starts: umask 077, the identity made for the
user it runs as, and a warning when root runs it unconfined.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.contracts import ProcessOutputSource
from tentacle.identity import IdentityStore
from tentacle.systemd import ServiceError, Unit
from tentacle.workers.process import ProcessResult, ScriptProcess
from tests.agent_process import spawn_agent
from tests.e2e.test_daemon import AgentProcess, child_environment, configure_home, free_port
from tests.e2e.test_scripts import _processes_with
from tests.figures import record
from tests.support import LogCapture, identity, in_thread, start_agent
from tests.waiting import until, within

AGENT = identity("agent")
SERVER = identity("server")

#: Run as another user (in sh: Python itself may lie in a folder only root
#: may enter): lists each folder or reads a byte of each file, and says
#: what became of it, one line per path.
PROBE = """
for p in "$@"; do
  if [ "${p%/}" != "$p" ]; then error=$(ls "$p" 2>&1 >/dev/null); else error=$(head -c 1 "$p" 2>&1 >/dev/null); fi
  case "$error" in
    "") echo read ;;
    *"Permission denied"*) echo denied ;;
    *) echo "other: $error" ;;
  esac
done
"""


def as_nobody(paths: list[Path]) -> dict[str, str]:
    """
    What the user C{nobody} gets trying each path.
    """
    nobody = pwd.getpwnam("nobody")
    shown = [str(p) + "/" if p.is_dir() else str(p) for p in paths]
    result = subprocess.run(
        ["/bin/sh", "-c", PROBE, "probe", *shown],
        user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True,
        cwd="/", check=True,
    )
    return dict(zip(map(str, paths), result.stdout.splitlines()))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def open_parents(case: SynchronousTestCase, folder: Path) -> None:
    """
    trial makes its temp folders 0700: open the ones above C{folder} (up
    to the working folder), so only the agent's own modes keep others out.
    """
    for parent in folder.parents:
        if parent == Path.cwd():
            break
        os.chmod(parent, 0o755)


class PrivateWorkspaceTests(TestCase):
    async def test_another_local_user_cannot_read_a_deployments_secrets(self) -> None:
        """
        During a deployment-like script (a variables file holding a
        password, its output in the log, a package just uploaded), every
        folder the agent made is 0700 and every file 0600, though the agent
        runs with the test's umask; another user is refused each, even
        where a folder above is opened.
        """
        if os.geteuid() != 0:
            self.skipTest("only root can run a probe as another user")  # type: ignore[attr-defined]
        old = os.umask(0o022)  # what the agent inherits: an ordinary umask
        try:
            agent, home, port = await spawn_agent(self, AGENT, (SERVER.thumbprint,), options=("--scripts",))
        finally:
            os.umask(old)
        client = TentacleClient(Target("127.0.0.1", port, Pin(AGENT.thumbprint)), SERVER, reactor)
        self.addCleanup(client.close)
        local = Path(self.mktemp())
        local.mkdir()
        (local / "variables.json").write_text(json.dumps({"DbPassword": "hunter2"}))
        (local / "app.1.0.tar.gz").write_bytes(b"package bytes")
        await client.upload(local / "app.1.0.tar.gz", "Packages/app.1.0.tar.gz")
        body = 'echo "password is $(cat variables.json)"; while [ ! -e go-on ]; do sleep 0.05; done\n'
        lines: list[str] = []
        running = Deferred.fromCoroutine(
            client.run_script(body, files={"variables.json": local / "variables.json"},
                              on_log=lambda line: lines.append(line.text))
        )
        await until(lambda: bool(lines), "the script's first line")
        [workspace] = (home / "Work").iterdir()
        self.addCleanup(lambda: (workspace / "go-on").touch() if workspace.exists() else None)
        folders = [home / "Work", workspace, home / "Packages", home / "Logs"]
        files = [
            workspace / "Bootstrap.sh", workspace / "variables.json", workspace / "Output.log",
            workspace / "scriptstate.json", home / "Packages" / "app.1.0.tar.gz", home / "Logs" / "audit.log",
            home / "private-key.pem", home / "certificate.pem",
        ]
        await until(lambda: (home / "Logs" / "audit.log").exists(), "the audit log")
        self.assertEqual({str(p): mode(p) for p in folders}, {str(p): 0o700 for p in folders})
        self.assertEqual({str(p): mode(p) for p in files}, {str(p): 0o600 for p in files})

        open_parents(self, home)
        os.chmod(home, 0o755)
        everything = folders + files
        first = await in_thread(as_nobody, everything)
        # As an older agent left it: the folders open, the files still not.
        for folder in folders:
            os.chmod(folder, 0o755)
        second = await in_thread(as_nobody, files)
        for folder in folders:
            os.chmod(folder, 0o700)
        (workspace / "go-on").touch()
        self.assertEqual(await within(30, running, "the script's end"), 0)
        self.assertIn('password is {"DbPassword": "hunter2"}', lines)
        self.assertEqual(first, {str(p): "denied" for p in everything})
        self.assertEqual(second, {str(p): "denied" for p in files})
        record(self, "hostile", "another local user (nobody) reads a running deployment's workspace, "
               "variables file, log, state, package, audit log and key",
               "every one refused: folders 0700, files 0600 though the agent's umask was 022",
               refused=len(everything) + len(files))

    async def test_tentacle_run_gives_scripts_umask_077(self) -> None:
        home = Path(self.mktemp()).absolute()
        port = free_port()
        env = child_environment(home)
        await configure_home(self, env, port, SERVER.thumbprint)
        IdentityStore(home).save(AGENT)
        agent = AgentProcess()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            agent, sys.executable, [sys.executable, "-m", "tentacle", "run"], env=env
        )
        try:
            await agent.listening
            client = TentacleClient(Target("127.0.0.1", port, Pin(AGENT.thumbprint)), SERVER, reactor)
            lines: list[str] = []
            await client.run_script("umask; touch made-by-script; stat -c %a made-by-script",
                                    on_log=lambda line: lines.append(line.text))
            await client.close()
        finally:
            process.signalProcess(signal.SIGTERM)
            await agent.ended
        self.assertEqual(lines, ["0077", "600"])
        self.assertEqual(mode(home / "tentacle.json"), 0o600)
        self.assertEqual(mode(home), 0o700)


class StartupTests(TestCase):
    def test_root_without_allowed_roots_warns_once(self) -> None:
        logs = LogCapture.install(self)
        start_agent(self, trusted=(SERVER.thumbprint,))
        confined = Path(self.mktemp()).absolute()
        confined.mkdir()
        start_agent(self, trusted=(SERVER.thumbprint,), allowed_roots=(confined,))
        warnings = logs.matching(event="running_as_root")
        self.assertEqual(len(warnings), 1 if os.geteuid() == 0 else 0)
        if warnings:
            self.assertIn("allowed-roots", warnings[0]["log_format"])
            self.assertIn("--user", warnings[0]["log_format"])

    def test_an_older_agents_open_folders_are_made_private(self) -> None:
        home = Path(self.mktemp()).absolute()
        for name in ("Work", "Logs", "Packages", "Elsewhere"):
            (home / name).mkdir(parents=True)
            os.chmod(home / name, 0o755)
        start_agent(self, home=home, trusted=(SERVER.thumbprint,))
        modes = {name: mode(home / name) for name in ("Work", "Logs", "Packages", "Elsewhere")}
        self.assertEqual(modes, {"Work": 0o700, "Logs": 0o700, "Packages": 0o700, "Elsewhere": 0o755})

    async def test_run_as_user_creates_the_identity_for_that_user(self) -> None:
        """
        Started as root with C{--user}, the agent makes its certificate for
        that user, who can then start the same home directly.
        """
        if os.geteuid() != 0:
            self.skipTest("only root can start an agent that switches user")  # type: ignore[attr-defined]
        nobody = pwd.getpwnam("nobody")
        home = Path(self.mktemp()).absolute()
        port = free_port()
        env = child_environment(home)
        await configure_home(self, env, port, SERVER.thumbprint)
        for path in [home, *home.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        open_parents(self, home)

        async def run(argv: list[str]) -> None:
            agent = AgentProcess()
            process = reactor.spawnProcess(  # type: ignore[attr-defined]
                agent, sys.executable, [sys.executable, "-m", "tentacle", "run", *argv], env=env
            )
            try:
                await agent.listening
            finally:
                process.signalProcess(signal.SIGTERM)
                await agent.ended

        await run(["--user", "nobody"])
        store = IdentityStore(home)
        for path in (store.private_key_path, store.certificate_path):
            self.assertEqual((path.stat().st_uid, mode(path)), (nobody.pw_uid, 0o600), path)
        # So the user can read it, to start the agent itself later.
        readable = await in_thread(as_nobody, [store.private_key_path, store.certificate_path])
        self.assertEqual(set(readable.values()), {"read"})


class CancelEscapeTests(TestCase):
    """
    Processes that leave the script's process group are still reached by a
    cancel: they carry the script's cookie in their environment.
    """

    async def cancel_and_check(self, body: str, tag: str) -> ProcessResult:
        """
        Run C{body} (which starts one process whose command line holds
        C{$TAG} and leaves the group, then prints "ready"), cancel it, and
        see that process go.
        """
        lines: list[str] = []
        seen: Deferred[None] = Deferred()

        def output(source: ProcessOutputSource, text: str, occurred: Any) -> None:
            lines.append(text)
            if text == "ready" and not seen.called:
                seen.callback(None)

        self.addCleanup(lambda: [os.kill(pid, signal.SIGKILL) for pid in _processes_with(tag)])
        env = dict(os.environ, TAG=tag)
        process = ScriptProcess(reactor, "/bin/sh", ["-c", body], env, ".", output, kill_grace=2)
        result = process.start()
        await within(10, seen, "the script ready")
        escaped = _processes_with(tag)
        self.assertEqual(len(escaped), 1, lines)
        [pid] = escaped
        self.assertNotEqual(os.getpgid(pid), process.pgid, "it left the script's process group")
        process.cancel()
        outcome: ProcessResult = await within(20, result, "the cancel")
        await until(lambda: not _processes_with(tag), "the escaped process killed")
        return outcome

    async def test_cancel_reaches_a_setsid_grandchild(self) -> None:
        tag = f"700.{uuid.uuid4().int % 10**6}"
        outcome = await self.cancel_and_check('setsid sleep "$TAG" & sleep 0.2; echo ready; sleep 600', tag)
        self.assertTrue(outcome.cancelled)

    async def test_cancel_reaches_a_double_forked_daemon(self) -> None:
        tag = f"701.{uuid.uuid4().int % 10**6}"
        daemonise = (
            "import os, sys\n"
            "if os.fork(): os._exit(0)\n"
            "os.setsid()\n"
            "if os.fork(): os._exit(0)\n"
            "fd = os.open(os.devnull, os.O_RDWR)\n"
            "[os.dup2(fd, n) for n in (0, 1, 2)]\n"
            "os.execvp('sleep', ['sleep', os.environ['TAG']])\n"
        )
        body = f"{sys.executable} -c \"$DAEMON\"; sleep 0.2; echo ready; exec sleep 600"
        os.environ["DAEMON"] = daemonise
        self.addCleanup(os.environ.pop, "DAEMON", None)
        outcome = await self.cancel_and_check(body, tag)
        self.assertTrue(outcome.cancelled)
        record(self, "hostile", "scripts whose children leave the process group (setsid; a double-forked daemon)",
               "a cancel kills them too, found by the cookie in their environment", inputs=2)


class UnitInjectionTests(SynchronousTestCase):
    def test_unit_file_injection_through_user_or_home_is_refused_or_escaped(self) -> None:
        for user in ("deploy\nExecStartPre=/bin/sh -c 'id > /tmp/pwned'", "%n", "a b", "-rf", "x" * 40):
            with self.assertRaises(ServiceError, msg=repr(user)):
                Unit("default", Path("/srv/t"), user).render()
        for home in ("/srv/t\nExecStartPre=/bin/touch /tmp/pwned", "/srv/t\r[Service]", "/srv/\x1bt"):
            with self.assertRaises(ServiceError, msg=repr(home)):
                Unit("default", Path(home), "deploy").render()
        text = Unit("default", Path("/srv/100%/$HOME/a b"), "deploy", "/opt/py%/python").render()
        self.assertIn('Environment="TENTACLE_HOME=/srv/100%%/$HOME/a b"\n', text)
        self.assertIn(
            'ExecStart="/opt/py%%/python" -m tentacle --home "/srv/100%%/$$HOME/a b" run\n', text
        )
        self.assertEqual(text.count("\n"), Unit("default", Path("/srv/t"), "deploy").render().count("\n"))

    def test_systemd_reads_the_escaped_unit(self) -> None:
        import shutil

        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed")  # type: ignore[attr-defined]
        folder = Path(self.mktemp())
        folder.mkdir()
        unit = folder / "tentacle-test.service"
        unit.write_text(Unit("test", Path("/srv/100%/$HOME/a \"b\""), None, sys.executable).render())
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
