"""
The server half of C{bench_roundtrip.py}, run by it as a child process so
client and agent do not share a GIL.

In one reactor, on loopback:

  - a real agent (L{TentacleService}) whose dispatcher also serves
    C{IBenchService.Echo(string) -> string}, trusting one server thumbprint;
  - a bare Twisted TLS echo server with the same TLS policy and certificate
    (L{AgentTLSOptions} of the same identity).

Prints C{"ports <agent> <echo>"} on one line once both listen, and stops
when its standard input closes. With a CPU number, it pins itself to that CPU.

    python benchmarks/roundtrip_server.py IDENTITY.pem TRUSTED_THUMBPRINT [CPU]
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from tentacle.config import TentacleConfig
from tentacle.contracts import Operation, Parameter, ServiceContract
from tentacle.dispatch import Dispatcher
from tentacle.identity import Identity
from tentacle.service import TentacleService
from tentacle.tls import AgentTLSOptions

BENCH_SERVICE = ServiceContract(
    "IBenchService",
    "Tentacle.Benchmarks.IBenchService, Tentacle.Benchmarks",
    (Operation("Echo", (Parameter("text", str),), str),),
)


class BenchService:
    def echo(self, text: str) -> str:
        return text


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


def main(identity_path: str, trusted: str, cpu: str | None = None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {int(cpu)})
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    identity = Identity.from_file(Path(identity_path))
    # Inside the folder the parent made (and removes) for the identity.
    home = Path(identity_path).parent / "home"
    home.mkdir(exist_ok=True)
    dispatcher = Dispatcher()
    dispatcher.register(BENCH_SERVICE, BenchService())
    config = TentacleConfig(
        home=home, port=0, listen_address="127.0.0.1", trusted_thumbprints=(trusted,)
    )
    agent = TentacleService(config, reactor, identity=identity, dispatcher=dispatcher)
    agent.startService()
    assert agent.port is not None
    agent_port = agent.port.getHost().port  # type: ignore[attr-defined]

    echo_factory = TLSMemoryBIOFactory(
        AgentTLSOptions(identity), False, Factory.forProtocol(Echo), clock=reactor
    )
    echo_factory.noisy = False

    def listening(port: object) -> None:
        echo_port = port.getHost().port  # type: ignore[attr-defined]
        sys.stdout.write(f"ports {agent_port} {echo_port}\n")
        sys.stdout.flush()

    d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(echo_factory)
    d.addCallback(listening)

    def failed(failure: Failure) -> None:
        failure.printTraceback()
        reactor.stop()

    d.addErrback(failed)

    def wait_for_eof() -> None:
        sys.stdin.read()
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    threading.Thread(target=wait_for_eof, daemon=True).start()
    reactor.addSystemEventTrigger("before", "shutdown", agent.stopService)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:4])
