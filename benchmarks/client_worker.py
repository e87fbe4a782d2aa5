"""
A child process that holds idle connections open, for the memory and
idle-connection figures of C{bench_connections.py}:

    python benchmarks/client_worker.py agent PORT THUMBPRINT CERT KEY N
    python benchmarks/client_worker.py bare PORT CERT KEY N

C{agent}: N L{TentacleClient}s of the agent at 127.0.0.1:PORT (pinned to
THUMBPRINT, presenting CERT/KEY), each of which has made one call
(C{GetCapabilities}, the first call Octopus Server makes) and keeps its
connection in its pool: an idle, authenticated connection waiting for
C{NEXT}, as a server's pool holds it.  At most 20 are opened at once.

C{bare}: N bare Twisted mutual-TLS connections (the same client TLS
options) to the bare server at PORT, each of which has echoed one byte.

Prints C{"ready N"} once all are open, then holds them until its standard
input closes; then closes them (C{END} for the agent's) and exits.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import common

BATCH = 20


async def hold(reactor: Any, kind: str, args: list[str], held: list[Any]) -> None:
    """
    Open the connections into C{held}; say C{ready N}.
    """
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

    from tentacle.client.api import Target, TentacleClient
    from tentacle.client.connection import Pin
    from tentacle.identity import Identity

    if kind == "agent":
        port, thumbprint, cert, key, count = args
    else:
        port, cert, key, count = args
    identity = Identity.from_pem(Path(cert).read_bytes() + Path(key).read_bytes())
    tls = common.client_tls(identity)
    limit = DeferredSemaphore(BATCH)

    async def open_agent() -> None:
        client = TentacleClient(Target("127.0.0.1", int(port), Pin(thumbprint)), identity, reactor)
        held.append(client)
        await client.call("ICapabilitiesServiceV2", "GetCapabilities")

    async def open_bare() -> None:
        connection = await common.BareTLSClient.connect(reactor, int(port), tls)
        held.append(connection)
        if await connection.exchange(b"x") != b"x":
            raise AssertionError("the bare server did not echo")

    opener = open_agent if kind == "agent" else open_bare
    await gatherResults(
        [limit.run(lambda: Deferred.fromCoroutine(opener())) for _ in range(int(count))], consumeErrors=True
    )
    common.say(f"ready {len(held)}")


def main() -> None:
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, gatherResults

    common.quiet_logging()
    kind, args = sys.argv[1], sys.argv[2:]
    if kind not in ("agent", "bare"):
        raise SystemExit(__doc__)
    held: list[Any] = []

    def failed(failure: Any) -> None:
        failure.printTraceback()
        common.say("failed")
        reactor.stop()  # type: ignore[attr-defined]

    def closing() -> Any:
        if kind == "agent":
            return gatherResults([Deferred.fromCoroutine(c.close()) for c in held])
        return gatherResults([c.close() for c in held if c.protocol.transport is not None])

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: Deferred.fromCoroutine(hold(reactor, kind, args, held)).addErrback(failed)
    )
    reactor.addSystemEventTrigger("before", "shutdown", closing)  # type: ignore[attr-defined]
    common.stop_on_eof()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
