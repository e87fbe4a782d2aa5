"""
An agent with Tentacle's services in a child process, for tests that must
measure or limit the agent apart from the test runner (its memory, its
file-size limit).

Child side: C{python -m tests.agent_process --home H --trust T
[--allowed-root R]... [--file-size-limit BYTES] [--port N] [--scripts]
[--handshake-timeout S] [--heartbeat-timeout S] [--max-connections N]
[--max-unauthenticated-connections N] [--max-unauthenticated-per-address N]
[--first-byte-timeout S] [--connection-log-lines N]
[--crash-writing-state STATE]} listens on a loopback port (a free one
unless given), prints C{AGENT-PORT <n>}, then logs to stdout until SIGTERM.
Parent side: L{spawn_agent}.

C{--crash-writing-state Complete} (or C{Pending}) makes the
agent SIGKILL itself in the middle of saving a script's state file: the
temp file is written, the rename over C{scriptstate.json} never happens,
exactly as if the machine died there.
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import tentacle
from tentacle.identity import Identity, IdentityStore

CHECKOUT = str(Path(tentacle.__file__).resolve().parent.parent)
PORT_LINE = b"AGENT-PORT "


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", required=True)
    parser.add_argument("--trust", action="append", default=[])
    parser.add_argument("--allowed-root", action="append", default=[])
    parser.add_argument("--file-size-limit", type=int)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--scripts", action="store_true", help="offer scripts too, as the agent does")
    parser.add_argument("--handshake-timeout", type=float, default=30.0)
    parser.add_argument("--heartbeat-timeout", type=float, default=60.0)
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--max-unauthenticated-connections", type=int, default=250)
    parser.add_argument("--max-unauthenticated-per-address", type=int, default=50)
    parser.add_argument("--first-byte-timeout", type=float, default=5.0)
    parser.add_argument("--connection-log-lines", type=int, default=20)
    parser.add_argument("--crash-writing-state")
    args = parser.parse_args(argv)
    if args.crash_writing_state:
        _crash_when_saving(args.crash_writing_state)

    # Over the limit, write() must fail with EFBIG, not kill the agent.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if args.file_size_limit is not None:
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.file_size_limit, hard))

    from twisted.internet import reactor as the_reactor
    from twisted.logger import globalLogBeginner

    from tentacle.logs import make_observer

    from tentacle.config import TentacleConfig
    from tentacle.dispatch import Dispatcher
    from tentacle.halibut.connection import ExchangeSettings
    from tentacle.service import TentacleService
    from tentacle.services import register_tentacle_services

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    # As `tentacle run` logs: text, info and above.
    globalLogBeginner.beginLoggingTo([make_observer("text", None, 0)])
    config = TentacleConfig(
        home=Path(args.home),
        port=args.port,
        listen_address="127.0.0.1",
        trusted_thumbprints=tuple(args.trust),
        allowed_roots=tuple(Path(r) for r in args.allowed_root),
        handshake_timeout=args.handshake_timeout,
        max_connections=args.max_connections,
        max_unauthenticated_connections=args.max_unauthenticated_connections,
        max_unauthenticated_per_address=args.max_unauthenticated_per_address,
        first_byte_timeout=args.first_byte_timeout,
        connection_log_lines=args.connection_log_lines,
    )
    dispatcher: Dispatcher | None = None
    if not args.scripts:
        dispatcher = Dispatcher()
        register_tentacle_services(dispatcher, config, the_reactor)  # type: ignore[arg-type]
    service = TentacleService(
        config, the_reactor, dispatcher=dispatcher,
        exchange_settings=ExchangeSettings(heartbeat_timeout=args.heartbeat_timeout),
    )
    service.startService()
    assert service.port is not None
    port = service.port.getHost().port  # type: ignore[attr-defined]
    # Once running, so a SIGTERM from then on meets the reactor's handler.
    the_reactor.callWhenRunning(print, f"{PORT_LINE.decode()}{port}", flush=True)
    the_reactor.run()


def _crash_when_saving(state: str) -> None:
    """
    Fault injection, in the child only: SIGKILL at the rename that would
    make a script state file with this C{State} visible.
    """
    import json

    import tentacle.fsutil

    real = os

    class _Os:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def replace(source: str, target: Any) -> None:
            if str(target).endswith("scriptstate.json"):
                with open(source, "rb") as f:
                    if json.loads(f.read()).get("State") == state:
                        print(f"CRASHING while saving {target}", flush=True)
                        real.kill(real.getpid(), signal.SIGKILL)
            real.replace(source, target)

    tentacle.fsutil.os = _Os()  # type: ignore[assignment]


class ChildAgent(ProcessProtocol):
    """
    The parent's view: the port once listening, the output, the end.
    """

    def __init__(self) -> None:
        # A bytearray, so a flood's thousands of log lines append in O(1).
        self.output = bytearray()
        self.port: Deferred[int] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    @property
    def pid(self) -> int:
        assert self.transport is not None
        return int(self.transport.pid)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.port.called and PORT_LINE in self.output:
            line = self.output.split(PORT_LINE, 1)[1].split(b"\n", 1)
            if len(line) == 2:
                self.port.callback(int(line[0]))

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.port.called:
            self.port.errback(Exception(f"the agent exited: {self.output.decode(errors='replace')}"))
        self.ended.callback(reason.value)

    def status(self, field: str) -> int:
        """
        A C{/proc/<pid>/status} figure in bytes, e.g. C{VmRSS} or C{VmHWM}.
        """
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                value, unit = line.split()[1:3]
                assert unit == "kB", line
                return int(value) * 1024
        raise KeyError(field)

    def open_files(self) -> int:
        """
        How many file descriptors the agent holds open.
        """
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    async def kill(self) -> None:
        """
        SIGKILL: no cleanup, no flush, as a power cut or the OOM killer.
        """
        try:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
        await self.ended

    async def stop(self) -> None:
        if self.ended.called:
            return
        try:
            self.transport.signalProcess("TERM")  # type: ignore[union-attr]
        except ProcessExitedAlready:
            pass
        reason = await self.ended
        if not isinstance(reason, ProcessDone):
            raise AssertionError(f"the agent ended with {reason}: {self.output.decode(errors='replace')}")


async def spawn_agent(
    case: TestCase,
    agent: Identity,
    trusted: tuple[str, ...],
    allowed_roots: tuple[Path, ...] = (),
    file_size_limit: int | None = None,
    home: Path | None = None,
    options: tuple[str, ...] = (),
) -> tuple[ChildAgent, Path, int]:
    """
    Start a child agent with C{agent}'s identity; stopped when the test ends.

    @param home: an existing home to start in again (after a crash, say).
    @param options: more command-line options (see the module docstring).
    @return: the process, its home and its port.
    """
    if home is None:
        home = Path(case.mktemp()).absolute()
        IdentityStore(home).save(agent)
    args = [sys.executable, "-m", "tests.agent_process", "--home", str(home), *options]
    for thumbprint in trusted:
        args += ["--trust", thumbprint]
    for root in allowed_roots:
        args += ["--allowed-root", str(root)]
    if file_size_limit is not None:
        args += ["--file-size-limit", str(file_size_limit)]
    env = dict(os.environ)
    env["PYTHONPATH"] = CHECKOUT + os.pathsep + env.get("PYTHONPATH", "")
    child = ChildAgent()
    reactor.spawnProcess(child, sys.executable, args, env=env, path=CHECKOUT)
    case.addCleanup(lambda: Deferred.fromCoroutine(child.stop()))
    port = await child.port
    return child, home, port


if __name__ == "__main__":
    main(sys.argv[1:])
