"""
The child processes of C{bench_polling.py}, one kind per run:

  - C{agent IDENTITY.pem SERVER_THUMBPRINT HUB_THUMBPRINT HUB_PORT}: an agent
    with Tentacle's services, listening on a free loopback port (trusting
    the bench's server identity) and polling the hub at C{HUB_PORT};
    prints C{ports <listening port>}.
  - C{hub IDENTITY.pem TRUSTED...}: a hub (L{HubService}) on a free loopback
    port, trusting the given thumbprints; prints C{ports <port>}; answers
    C{rss} with its VmRSS in KiB and C{subscriptions} with the number of
    subscriptions connected.
  - C{bare IDENTITY.pem}: a bare Twisted TLS server with the same TLS
    policy; prints C{ports <port>}; answers C{rss}.
  - C{subscribers IDENTITY.pem HUB_THUMBPRINT HUB_PORT N}: N idle polling
    connections, each its own subscription, answering nothing but the
    keep-alives; prints C{ready N} once all are identified.

Each stops when its standard input closes.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor

from common import echo_protocol, listen_bare_tls, proc_status, quiet_logging, say, stop_on_eof


def _home(prefix: str) -> Path:
    """
    A temp folder for a child's home, removed when the child stops.
    """
    home = Path(tempfile.mkdtemp(prefix=prefix))
    reactor.addSystemEventTrigger(  # type: ignore[attr-defined]
        "after", "shutdown", lambda: shutil.rmtree(home, ignore_errors=True)
    )
    return home


def _identity(path: str) -> Any:
    from tentacle.identity import Identity

    return Identity.from_file(Path(path))


def agent(identity_path: str, server: str, hub: str, hub_port: str) -> None:
    from tentacle.config import PolledServer, TentacleConfig
    from tentacle.service import TentacleService

    home = _home("bench-polling-agent-")
    config = TentacleConfig(
        home=home, port=0, listen_address="127.0.0.1", trusted_thumbprints=(server,),
        polling_servers=(PolledServer("127.0.0.1", hub, "poll://benchagent/", int(hub_port)),),
    )
    service = TentacleService(config, reactor, identity=_identity(identity_path))
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    assert service.port is not None
    say(f"ports {service.port.getHost().port}")  # type: ignore[attr-defined]
    stop_on_eof()


def hub(identity_path: str, agent: str, *users: str) -> None:
    from tentacle.hub.config import HubConfig
    from tentacle.hub.service import HubService

    home = _home("bench-hub-")
    config = HubConfig(home=home, port=0, listen_address="127.0.0.1", agents=(agent,), users=users)
    service = HubService(config, reactor, identity=_identity(identity_path))
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    say(f"ports {service.server.listening_port}")

    def command(line: str) -> None:
        if line == "rss":
            say(str(proc_status(os.getpid(), "VmRSS")))
        elif line == "subscriptions":
            say(str(len(service.server.subscriptions())))

    stop_on_eof(command)


def bare(identity_path: str) -> None:
    listening = listen_bare_tls(_identity(identity_path), echo_protocol())
    listening.addCallback(lambda port: say(f"ports {port.getHost().port}"))

    def command(line: str) -> None:
        if line == "rss":
            say(str(proc_status(os.getpid(), "VmRSS")))

    stop_on_eof(command)


def subscribers(identity_path: str, hub: str, hub_port: str, count: str) -> None:
    from twisted.logger import Logger

    from tentacle.config import PolledServer
    from tentacle.contracts import tentacle_registry
    from tentacle.dispatch import Dispatcher
    from tentacle.halibut.connection import ExchangeSettings
    from tentacle.polling import PollingConnection

    identity = _identity(identity_path)
    dispatcher = Dispatcher()
    connections = []
    for n in range(int(count)):
        server = PolledServer("127.0.0.1", hub, f"poll://idle{n:05d}/", int(hub_port))
        connection = PollingConnection(
            server, 1, identity, lambda s, a: dispatcher, reactor, tentacle_registry(), ExchangeSettings(), Logger()
        )
        connection.startService()
        connections.append(connection)

    def check() -> None:
        if all(c.connected for c in connections):
            say(f"ready {len(connections)}")
        else:
            reactor.callLater(0.2, check)  # type: ignore[attr-defined]

    check()
    stop_on_eof()


def main(kind: str, *args: str) -> None:
    quiet_logging()
    {"agent": agent, "hub": hub, "bare": bare, "subscribers": subscribers}[kind](*args)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(*sys.argv[1:])
