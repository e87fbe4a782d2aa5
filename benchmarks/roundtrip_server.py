"""
The server half of C{bench_roundtrip.py}, run by it as a child process so
client and agent do not share a GIL.

In one reactor, on loopback:

  - a real agent (L{TentacleService}) with Tentacle's services (so
    C{ICapabilitiesServiceV2.GetCapabilities}, the call timed), trusting
    one server thumbprint;
  - a bare Twisted TLS echo server with the same TLS policy and certificate
    (L{AgentTLSOptions} of the same identity).

Prints C{"ports <agent> <echo>"} on one line once both listen, and stops
when its standard input closes. The parent pins it to a CPU.

    python benchmarks/roundtrip_server.py IDENTITY.pem TRUSTED_THUMBPRINT
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet import reactor

from common import echo_protocol, listen_bare_tls, quiet_logging, say, start_agent, stop_on_eof


def main(identity_path: str, trusted: str) -> None:
    quiet_logging()
    # Inside the folder the parent made (and removes) for the identity.
    home = Path(identity_path).parent / "home"
    home.mkdir(exist_ok=True)
    agent, agent_port = start_agent(identity_path, trusted, home, None)
    listening = listen_bare_tls(agent.identity, echo_protocol())
    listening.addCallback(lambda port: say(f"ports {agent_port} {port.getHost().port}"))
    stop_on_eof()
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:3])
