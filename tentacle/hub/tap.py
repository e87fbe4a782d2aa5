"""
The hub's twistd plugin: C{twistd -n tentacle-hub [--home H] [--port N]}.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.application.service import IService, ServiceMaker
from twisted.logger import Logger
from twisted.python import usage

from tentacle.config import ConfigError
from tentacle.hub.config import HubConfigFile, resolve_hub_home
from tentacle.hub.service import HubService
from tentacle.identity import Identity, IdentityStore
from tentacle.tap import _address, _port

log = Logger()


class Options(usage.Options):
    """
    Command-line options for C{twistd tentacle-hub}; they override the
    hub's configuration file for this run only.
    """

    optParameters = [
        ["home", "h", None, "The hub's home (default: $TENTACLE_HUB_HOME or ~/.tentacle-hub)."],
        ["port", "p", None, "Listen for polling agents on this port instead of the configured one.", _port],
        ["listen-address", None, None, "Listen on this IP address only ('any' for all).", _address],
    ]

    def postOptions(self) -> None:
        self["listen-address-given"] = self["listen-address"] is not None


def ensure_hub_identity(store: IdentityStore) -> Identity:
    """
    The hub's identity, created on first start; the log says what to do next.
    """
    if store.exists():
        return store.load()
    identity = Identity.generate(common_name="Octopus Server")
    store.save(identity)
    log.info(
        "Created a new certificate for this hub in {home}; its thumbprint is {thumbprint}. "
        "Agents poll it with 'tentacle poll-server --server-thumbprint {thumbprint} ...'; "
        "trust them here with 'tentacle-hub configure --trust <agent thumbprint>'.",
        home=str(store.home),
        thumbprint=identity.thumbprint,
    )
    return identity


def makeService(options: Options, reactor: Any = None) -> IService:
    home = resolve_hub_home(options["home"])
    config_file = HubConfigFile(home)
    try:
        config = config_file.load()
    except ConfigError as e:
        raise usage.UsageError(str(e))
    if options["port"] is not None:
        config = attrs.evolve(config, port=options["port"])
    if options.get("listen-address-given"):
        config = attrs.evolve(config, listen_address=options["listen-address"])
    identity = ensure_hub_identity(IdentityStore(home))
    return HubService(config, reactor, identity=identity, config_file=config_file)


#: The plugin, found by twistd through C{twisted/plugins/tentacle_hub_plugin.py}.
service_maker = ServiceMaker(
    "Tentacle hub", "tentacle.hub.tap",
    "A polling server that polling tentacles dial and CLI users reach them through.", "tentacle-hub",
)
