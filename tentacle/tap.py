"""
The twistd plugin's options and service: C{twistd -n tentacle [--home H] [--port N]}.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from tentacle.config import (
    ConfigError,
    ConfigFile,
    check_listen_address,
    check_port,
    resolve_home,
)
from tentacle.identity import Identity, IdentityStore
from tentacle.service import TentacleService

log = Logger()


def _port(value: str) -> int:
    try:
        return check_port(int(value))
    except ValueError:
        raise usage.UsageError(f"--port: expected a number from 1 to 65535, not {value!r}")


def _address(value: str) -> str | None:
    try:
        return check_listen_address(value)
    except ValueError as e:
        raise usage.UsageError(f"--listen-address: {e}")


class Options(usage.Options):
    """
    Command-line options for C{twistd tentacle}; they override the
    instance's configuration file for this run only.
    """

    optParameters = [
        ["home", "h", None, "The instance home (default: $TENTACLE_HOME or ~/.tentacle)."],
        ["port", "p", None, "Listen on this TCP port instead of the configured one.", _port],
        ["listen-address", None, None, "Listen on this IP address only ('any' for all).", _address],
    ]

    def postOptions(self) -> None:
        self["listen-address-given"] = self["listen-address"] is not None


def ensure_identity(store: IdentityStore) -> Identity:
    """
    The instance's identity, created on first start so the agent can run
    with no set-up at all; the log says what to do next.
    """
    if store.exists():
        return store.load()
    identity = Identity.generate()
    store.save(identity)
    _give_to_home_owner(store)
    log.info(
        "Created a new certificate for this agent in {home}; its thumbprint is "
        "{thumbprint}. Trust it on your server, and trust your server here "
        "with 'tentacle configure --trust <server thumbprint>'.",
        home=str(store.home),
        thumbprint=identity.thumbprint,
    )
    return identity


def _give_to_home_owner(store: IdentityStore) -> None:
    """
    Started as root to run as another user (C{tentacle run --user}), the
    agent makes its identity before it drops privileges: the files go to
    the home's owner, who can then start the agent directly.
    """
    if os.geteuid() != 0:
        return
    owner = store.home.stat()
    if owner.st_uid == 0:
        return
    for path in (store.private_key_path, store.certificate_path):
        os.chown(path, owner.st_uid, owner.st_gid)


def makeService(options: Options, reactor: Any = None) -> IService:
    # Every file and folder the agent and its scripts create is private
    # unless made otherwise (the agent's own are so whatever the umask).
    os.umask(0o077)
    home = resolve_home(options["home"])
    config_file = ConfigFile(home)
    try:
        config = config_file.load()
    except ConfigError as e:
        raise usage.UsageError(str(e))
    if options["port"] is not None:
        config = attrs.evolve(config, port=options["port"])
    if options.get("listen-address-given"):
        config = attrs.evolve(config, listen_address=options["listen-address"])
    identity = ensure_identity(IdentityStore(home))
    return TentacleService(
        config,
        reactor,
        identity=identity,
        config_file=config_file,
        handle_sighup=True,
    )
