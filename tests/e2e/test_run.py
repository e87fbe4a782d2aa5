"""
C{tentacle run} as operators meet it: started from anywhere (an editable
install has no twistd dropin on the path), on a named instance, on a port
that is taken, and told to reload with SIGHUP.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import sysconfig
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tentacle.cli import IN_PROCESS_VARIABLE
from tests.e2e.test_daemon import CHECKOUT, AgentProcess, child_environment, configure_home, free_port


#: Runs C{python -m tentacle} in a Python where twistd finds no plugins at
#: all, as with an editable install (whose dropin is out of sight of
#: plugin discovery), whatever the way this checkout was installed.
NO_PLUGINS = (
    "import sys, twisted.plugin\n"
    "twisted.plugin.getPlugins = lambda *args, **kwargs: iter(())\n"
    "{then}\n"
)
TENTACLE = "from tentacle.cli import main; sys.exit(main(sys.argv[1:]))"
TWISTD = "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class RunTests(TestCase):
    async def start(self, env: dict[str, str], *argv: str, python: tuple[str, ...] = ("-m", "tentacle"),
                    cwd: str | None = None) -> tuple[AgentProcess, Any]:
        agent = AgentProcess()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            agent, sys.executable, [sys.executable, *python, *argv], env=env, path=cwd
        )
        self.addCleanup(self.stop, agent, process)
        await agent.listening
        return agent, process

    async def stop(self, agent: AgentProcess, process: Any) -> None:
        if not agent.ended.called:
            try:
                process.signalProcess(signal.SIGTERM)
            except ProcessExitedAlready:
                pass  # it ended on its own (it failed to start), not yet told
        await agent.ended

    async def test_runs_without_twistd_plugin_discovery(self) -> None:
        home = Path(self.mktemp()).absolute()
        env = child_environment(home)
        elsewhere = Path(self.mktemp()).absolute()
        elsewhere.mkdir()
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", NO_PLUGINS.format(then=TWISTD), "tentacle"], env=env, path=str(elsewhere)
        )
        self.assertIn(b"Unknown command: tentacle", out + err, "twistd itself cannot find the plugin here")
        await configure_home(self, env, free_port())
        agent, _ = await self.start(env, "run", python=("-c", NO_PLUGINS.format(then=TENTACLE)), cwd=str(elsewhere))
        self.assertIn(b"Tentacle listening on port", agent.output)

    async def test_the_agent_runs_in_a_fresh_interpreter(self) -> None:
        """
        C{tentacle run} becomes C{python -m tentacle.daemon} in the same
        process (same PID, so signals and service managers still reach it),
        and the command line's modules stay out of the agent's memory;
        C{TENTACLE_RUN_IN_PROCESS} keeps the agent in the command's own
        interpreter (for a profiler, or coverage).
        """
        for variable, expected in ((None, b"tentacle.daemon"), ("1", b"run")):
            home = Path(self.mktemp()).absolute()
            env = child_environment(home)
            if variable is not None:
                env[IN_PROCESS_VARIABLE] = variable
            await configure_home(self, env, free_port())
            agent, process = await self.start(env, "run")
            arguments = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
            module = arguments[arguments.index(b"-m") + 1]
            self.assertEqual(module, b"tentacle.daemon" if variable is None else b"tentacle")
            self.assertIn(expected, arguments)
            await self.stop(agent, process)

    async def test_a_named_instance(self) -> None:
        registry = Path(self.mktemp()).absolute()
        web = Path(self.mktemp()).absolute()
        env = dict(child_environment(Path("/nonexistent")), TENTACLE_REGISTRY=str(registry))
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "tentacle", "create-instance", "web", "--home", str(web)], env=env
        )
        self.assertEqual(code, 0, err)
        port = free_port()
        await configure_home(self, dict(env, TENTACLE_HOME=str(web)), port)
        agent, _ = await self.start(env, "agent", "--instance", "web")
        self.assertIn(f"Tentacle listening on port {port}".encode(), agent.output)
        self.assertTrue((web / "certificate.pem").exists())

    async def test_a_taken_port_is_one_line(self) -> None:
        home = Path(self.mktemp()).absolute()
        env = child_environment(home)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            await configure_home(self, env, port)
            out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "tentacle", "run"], env=env)
        self.assertEqual(code, 1, out)
        self.assertEqual(
            err.decode(),
            f"tentacle: error: cannot listen on port {port} on 127.0.0.1: the port is already in use, most "
            "likely by another tentacle instance (see 'tentacle list-instances') or another program; stop it, "
            "or give this agent another port with 'tentacle configure --port N'\n",
        )
        self.assertNotIn(b"Traceback", out)

    async def test_sighup_is_logged(self) -> None:
        home = Path(self.mktemp()).absolute()
        env = child_environment(home)
        await configure_home(self, env, free_port())
        agent, process = await self.start(env, "run", "--log-format", "json")
        reloaded = agent.wait_for(b'"event": "config_reload"')
        process.signalProcess(signal.SIGHUP)
        await reloaded
        self.assertIn(b'"trigger": "SIGHUP"', agent.output)

    async def test_an_unusable_identity_is_one_line(self) -> None:
        """
        A private key file that holds no key stops the agent with one error
        line and status 1, in the fresh interpreter as in process (it used
        to be a traceback once C{tentacle run} exec'd C{tentacle.daemon}).
        """
        for variable in (None, "1"):
            home = Path(self.mktemp()).absolute()
            env = child_environment(home)
            if variable is not None:
                env[IN_PROCESS_VARIABLE] = variable
            await configure_home(self, env, free_port())
            out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "tentacle", "new-certificate"], env=env)
            self.assertEqual(code, 0, err)
            (home / "private-key.pem").write_text("garbage\n")
            out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "tentacle", "run"], env=env)
            self.assertEqual(code, 1, out + err)
            self.assertNotIn(b"Traceback", out + err)
            lines = err.decode().splitlines()
            self.assertEqual(len(lines), 1, err)
            self.assertTrue(lines[0].startswith("tentacle: error: no usable PEM private key found"), err)

    async def test_a_package_found_only_through_the_commands_path(self) -> None:
        """
        A C{tentacle} whose modules the interpreter finds only through the
        path its launcher sets up at run time (a zipapp such as shiv or pex,
        or a wrapper script that extends C{sys.path}; here C{python -S}
        with the path given in the command) still runs.  The fresh
        interpreter C{tentacle run} exec's is started with the same flags
        but not the same path, so it finds no C{tentacle.daemon} and the
        agent never starts ("No module named tentacle.daemon", status 1).
        """
        home = Path(self.mktemp()).absolute()
        env = child_environment(home)
        await configure_home(self, env, free_port())
        del env["PYTHONPATH"]
        elsewhere = Path(self.mktemp()).absolute()
        elsewhere.mkdir()
        path = [CHECKOUT, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
        launcher = f"import sys; sys.path[:0] = {path!r}\n{TENTACLE}\n"
        agent, _ = await self.start(env, "run", python=("-S", "-c", launcher), cwd=str(elsewhere))
        self.assertIn(b"Tentacle listening on port", agent.output)

