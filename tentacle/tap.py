"""
The twistd plugin's options and service: C{twistd -n tentacle [--home H] [--port N]},
and L{run_twistd}, how C{tentacle run} starts the same service through twistd
without looking for plugins.
"""

from __future__ import annotations

import errno
import gc
import linecache
import os
import sys
from typing import Any, Sequence

import attrs
from twisted.application.service import IService, ServiceMaker
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from tentacle import __version__
from tentacle.errors import describe_os_error

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

    def opt_version(self) -> None:
        """
        Show tentacle's version (and Twisted's) and exit.
        """
        from twisted import copyright

        print(f"tentacle {__version__} (Twisted {copyright.version})")
        sys.exit(0)


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
        freeze_startup_objects=True,
    )


#: The plugin, found by twistd through C{twisted/plugins/tentacle_plugin.py}.
service_maker = ServiceMaker(
    "Tentacle", "tentacle.tap",
    "A listening deployment agent, wire-compatible with Octopus Tentacle.", "tentacle",
)


class CannotStart(Exception):
    """
    The agent could not start (its port is taken, say); the message says
    why and what to do, in one line.
    """


def _server_options(maker: ServiceMaker) -> usage.Options:
    from twisted.scripts.twistd import ServerOptions

    class TentacleServerOptions(ServerOptions):
        """
        twistd's options, offering this one plugin only: no plugin
        discovery, which cannot see the dropin of an editable install.
        """

        @staticmethod
        def _getPlugins(interface: Any, package: Any = None) -> Any:
            return [maker]

    return TentacleServerOptions()


def run_twistd(arguments: Sequence[str], maker: ServiceMaker = service_maker) -> None:
    """
    Run twistd with C{arguments} (its own options, then the plugin's name,
    C{tentacle} by default, and its options), as C{twistd} would, until the
    reactor stops.

    @raise usage.UsageError: the arguments are wrong.
    @raise CannotStart: the agent could not listen, or its home is unusable.
    """
    _release_startup_garbage()
    from twisted.scripts.twistd import runApp

    config = _server_options(maker)
    config.parseOptions(list(arguments))
    try:
        runApp(config)
    except CannotListenError as e:
        raise CannotStart(describe_listen_error(e)) from None
    except usage.UsageError as e:  # makeService: a broken configuration file
        raise CannotStart(str(e)) from None


#: How attrs names the source of the methods it writes, in L{linecache}.
ATTRS_GENERATED = "<attrs generated"


def _release_startup_garbage() -> None:
    """
    Free, before twistd's modules load into the same memory, what starting
    left behind: the command-line parser and the classes attrs replaced by
    slotted ones (garbage in cycles), and the source text attrs keeps in
    L{linecache} of every method it writes, only for debuggers to show
    (some 400 KiB: a traceback through such a method still names its file,
    line and function, without the line's text).  Kept, they stay in the
    idle agent's RSS for good.
    """
    for name in [name for name in linecache.cache if name.startswith(ATTRS_GENERATED)]:
        del linecache.cache[name]
    gc.collect()


def describe_listen_error(error: CannotListenError) -> str:
    """
    One line for a port the agent cannot listen on, with the likely cause.
    """
    interface = error.interface or "any address"
    where = f"port {error.port} on {interface}"
    cause = getattr(error.socketError, "errno", None)
    if cause == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: the port is already in use, most likely by another "
            "tentacle instance (see 'tentacle list-instances') or another program; stop it, "
            "or give this agent another port with 'tentacle configure --port N'"
        )
    if cause in (errno.EACCES, errno.EPERM):
        return f"cannot listen on {where}: only root may listen on ports below 1024; choose a higher port"
    if cause == errno.EADDRNOTAVAIL:
        return (
            f"cannot listen on {where}: {interface} is not an address of this machine; "
            "fix it with 'tentacle configure --listen-ip ADDRESS' (or 'any')"
        )
    if isinstance(error.socketError, OSError):
        return f"cannot listen on {where}: {describe_os_error(error.socketError, where)}"
    return f"cannot listen on {where}: {error.socketError}"
