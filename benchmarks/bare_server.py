"""
A bare Twisted mutual-TLS echo server alone in its process: the baseline of
C{bench_connections.py} (new connections per second, and the memory of a
process and of each idle connection).

It has the agent's TLS policy and certificate (L{AgentTLSOptions}, which
asks for the client's certificate) and no protocol but an echo. It loads
no more of Tentacle than that (L{tentacle.tls} and L{tentacle.identity}).
Prints C{"port <n>"} once it listens, and stops when its standard input
closes.

    python benchmarks/bare_server.py IDENTITY.pem
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor

from common import echo_protocol, listen_bare_tls, quiet_logging, say, stop_on_eof
from tentacle.identity import Identity


def main(identity_path: str) -> None:
    quiet_logging()
    listening = listen_bare_tls(Identity.from_file(Path(identity_path)), echo_protocol())
    listening.addCallback(lambda port: say(f"port {port.getHost().port}"))
    stop_on_eof()
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1])
