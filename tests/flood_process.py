"""
A connection flood in a child process, as an attacker on another machine
would be: its sockets and its reconnecting cost the test process nothing,
so the trusted server's calls in the test measure the agent alone.

Child side: C{python -m tests.flood_process PORT SOCKETS SOURCE[,SOURCE...]
[--hello]} connects C{SOCKETS} times to 127.0.0.1:PORT, spread over the
source addresses, sends nothing (or a whole TLS ClientHello with
C{--hello}) and reopens every connection as soon as it is closed.  A line
C{stop} on stdin stops the reopening; what is open stays open until the
agent closes it, and the process then prints C{OPENED <n>} and exits.
Parent side: L{spawn_flood}.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConnector
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.agent_process import CHECKOUT


class _Socket(Protocol):
    def __init__(self, opening: bytes) -> None:
        self.opening = opening

    def connectionMade(self) -> None:
        if self.opening:
            assert self.transport is not None
            self.transport.write(self.opening)


class _Factory(ClientFactory):
    def __init__(self, flood: _Flood, source: str) -> None:
        self.flood = flood
        self.source = source

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Socket(self.flood.opening)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        self.flood.ended(connector, self.source)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.flood.ended(connector, self.source)


class _Flood:
    def __init__(self, port: int, opening: bytes) -> None:
        self.port = port
        self.opening = opening
        self.reopening = True
        self.opened = 0
        self.connectors: set[IConnector] = set()

    def open(self, source: str) -> None:
        self.opened += 1
        self.connectors.add(
            reactor.connectTCP("127.0.0.1", self.port, _Factory(self, source), timeout=60, bindAddress=(source, 0))
        )

    def ended(self, connector: IConnector, source: str) -> None:
        self.connectors.discard(connector)
        if self.reopening:
            self.open(source)
        elif not self.connectors:
            self.finish()

    def stop(self) -> None:
        self.reopening = False
        if not self.connectors:
            self.finish()

    def finish(self) -> None:
        print(f"OPENED {self.opened}", flush=True)
        reactor.stop()


def main(argv: list[str]) -> None:
    from twisted.internet.stdio import StandardIO

    port, sockets, sources = int(argv[0]), int(argv[1]), argv[2].split(",")
    # An attacker elsewhere spends its own CPU, not the agent's: on a small
    # test machine the flood yields the CPU to the agent and the trusted
    # client, so that what the test times is the agent's defence, not the
    # two processes sharing two cores.  (The kernel's work for every flood
    # connection is still on this machine, as it would be.)
    os.nice(19)
    opening = b""
    if "--hello" in argv:
        from tests.e2e.test_hostile_input import client_hello

        opening = client_hello()
    flood = _Flood(port, opening)

    class Control(Protocol):
        def dataReceived(self, data: bytes) -> None:
            if b"stop" in data:
                flood.stop()

    StandardIO(Control())
    for n in range(sockets):
        flood.open(sources[n % len(sources)])
    print("FLOODING", flush=True)
    reactor.run()


class ChildFlood(ProcessProtocol):
    """
    The parent's view: whether it has started, how many it opened, the end.
    """

    def __init__(self) -> None:
        self.output = b""
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[Any] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if not self.started.called and b"FLOODING" in self.output:
            self.started.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.started.called:
            self.started.errback(Exception(f"the flood exited: {self.output.decode(errors='replace')}"))
        self.ended.callback(reason.value)

    @property
    def opened(self) -> int:
        for line in self.output.splitlines():
            if line.startswith(b"OPENED "):
                return int(line.split()[1])
        raise AssertionError(f"the flood did not say how many it opened: {self.output[-500:]!r}")

    def stop(self) -> None:
        """
        Reopen nothing more; the process ends once the agent has closed the rest.
        """
        assert self.transport is not None
        self.transport.write(b"stop\n")

    def kill(self) -> Deferred[Any]:
        if not self.ended.called:
            self.transport.signalProcess("KILL")  # type: ignore[union-attr]
        return self.ended


async def spawn_flood(
    case: TestCase, port: int, sockets: int, sources: tuple[str, ...], hello: bool = False
) -> ChildFlood:
    """
    Start a flood against C{port}; killed when the test ends, if still running.
    """
    args = [sys.executable, "-m", "tests.flood_process", str(port), str(sockets), ",".join(sources)]
    if hello:
        args.append("--hello")
    env = dict(os.environ)
    env["PYTHONPATH"] = CHECKOUT + os.pathsep + env.get("PYTHONPATH", "")
    child = ChildFlood()
    reactor.spawnProcess(child, sys.executable, args, env=env, path=CHECKOUT)
    case.addCleanup(child.kill)
    await child.started
    return child


if __name__ == "__main__":
    main(sys.argv[1:])
