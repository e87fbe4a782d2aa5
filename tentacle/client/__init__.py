"""
The server's side of Halibut: drive any tentacle (ours or Octopus's) from
Python.  See L{tentacle.client.api.TentacleClient}; polling agents are
reached through a L{PollingServer} (L{tentacle.hub.polling_server}).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazily, so importing the client does not load the polling port.
    if name == "PollingServer":
        from tentacle.hub.polling_server import PollingServer

        return PollingServer
    raise AttributeError(name)


__all__ = ["PollingServer"]
