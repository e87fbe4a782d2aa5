"""
C{tentacle-hub}: administer and run a hub, the polling server that polling
agents dial and CLI users reach them through (see C{docs/polling.rst}).

The same style as C{tentacle}: errors are one line, exit status 2 for a
wrong command line and 1 for a command that could not be done.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import IO, Any, Mapping, Sequence

import attrs

from tentacle import __version__
from tentacle.cli import (
    CommandError,
    UsageError,
    _argument,
    _count,
    _help_output,
    _log_lines,
    _or_none,
    _Parser,
    _port,
    _seconds,
)
from tentacle.config import ConfigError, check_listen_address
from tentacle.errors import failure_sentence
from tentacle.halibut.handshake import normalize_subscription
from tentacle.hub.config import HubConfigFile, resolve_hub_home
from tentacle.identity import Identity, IdentityError, IdentityStore, normalize_thumbprint


def _binding(value: str) -> tuple[str, str]:
    subscription, separator, thumbprint = value.rpartition("=")
    if not separator:
        raise ValueError(f"expected poll://ID/=THUMBPRINT, not {value!r}")
    return normalize_subscription(subscription), normalize_thumbprint(thumbprint)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tentacle-hub", description="Administer and run a Tentacle hub (a polling server).")
    parser.add_argument("--version", action="version", version=f"tentacle-hub {__version__}")
    home_help = "the hub's home (default: $TENTACLE_HUB_HOME, else ~/.tentacle-hub)"
    parser.add_argument("--home", metavar="DIR", help=home_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        command = commands.add_parser(name, **kw)
        command.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS, help=home_help)
        command.set_defaults(handler=name.replace("-", "_"))
        return command

    new = add("new-certificate", help="create the hub's certificate (agents pin its thumbprint)",
              description="Create the hub's certificate and private key in its home.")
    new.add_argument("--if-blank", "-b", action="store_true", help="do nothing when it already has one")
    new.add_argument("--force", action="store_true", help="replace an existing certificate")
    show = add("show-thumbprint", help="print the hub's certificate thumbprint",
               description="Print the SHA-1 thumbprint (what agents pin) and SHA-256 fingerprint.")
    show.add_argument("--format", choices=("text", "json"), default="text")

    configure = add(
        "configure", help="change whom the hub trusts, its port and its subscription bindings",
        description="Change the hub's settings. A running hub applies trust, bindings and connection budgets "
        "within seconds.",
    )
    thumbprint = _argument(normalize_thumbprint)
    configure.add_argument("--trust", action="append", default=[], type=thumbprint, metavar="THUMBPRINT",
                           help="let this agent poll; repeatable")
    configure.add_argument("--remove-trust", action="append", default=[], type=thumbprint, metavar="THUMBPRINT",
                           help="stop trusting this agent; repeatable")
    configure.add_argument("--trust-user", action="append", default=[], type=thumbprint, metavar="THUMBPRINT",
                           help="let this CLI user (tentacle-client --hub) send requests to the agents; repeatable")
    configure.add_argument("--remove-user", action="append", default=[], type=thumbprint, metavar="THUMBPRINT",
                           help="stop trusting this user; repeatable")
    configure.add_argument("--bind", action="append", default=[], type=_argument(_binding),
                           metavar="poll://ID/=THUMBPRINT",
                           help="only this certificate (and others bound) may claim the subscription; repeatable")
    configure.add_argument("--unbind", action="append", default=[], type=_argument(normalize_subscription),
                           metavar="poll://ID/", help="let any trusted agent claim the subscription again")
    configure.add_argument("--port", type=_argument(_port), help="the TCP port agents dial (default 10943)")
    configure.add_argument("--listen-address", type=_argument(lambda v: check_listen_address(v) or "any"),
                           metavar="ADDRESS", help="listen on this IP address only, or 'any'")
    configure.add_argument("--collect-timeout", type=_argument(_seconds), metavar="SECONDS",
                           help="fail a request no agent collects within this long (default 120)")
    configure.add_argument("--max-connections", type=_argument(_or_none(_count)), default=argparse.SUPPRESS,
                           metavar="N|none",
                           help="connections open at once, counting each agent's polling connections "
                           "(default 1000)")
    configure.add_argument("--max-unauthenticated-connections", type=_argument(_count), metavar="N",
                           help="of those, how many may not have shown a trusted certificate yet (default 250; "
                           "no cap per address, as agents behind one NAT share it)")
    configure.add_argument("--connection-log-lines", type=_argument(_log_lines), metavar="N",
                           help="log lines of each kind per 10 s for connections that never authenticate "
                           "(default 20; 0: the summaries only)")

    show_config = add("show-configuration", help="print the hub's settings",
                      description="Print the hub's settings and identity.")
    show_config.add_argument("--format", choices=("text", "json"), default="text")

    add("run", help="run the hub in the foreground (the same as 'twistd -n tentacle-hub')",
        description="Run the hub in the foreground until interrupted.")
    return parser


class _Command:
    def __init__(self, home: Path, out: IO[str]) -> None:
        self.home = home
        self.out = out
        self.identities = IdentityStore(home)
        self.config_file = HubConfigFile(home)

    def new_certificate(self, args: argparse.Namespace) -> int:
        if self.identities.exists() and not args.force:
            if args.if_blank:
                self.out.write(f"This hub already has a certificate: {self.identities.load().thumbprint}\n")
                return 0
            raise CommandError(f"{self.home} already has a certificate; use --force to replace it "
                               "(agents that pinned the old one will be refused)")
        identity = Identity.generate(common_name="Octopus Server")
        self.identities.save(identity)
        self.out.write(f"A new certificate has been created: {identity.thumbprint}\n")
        return 0

    def show_thumbprint(self, args: argparse.Namespace) -> int:
        identity = self.identities.load()
        if args.format == "json":
            self.out.write(json.dumps({"Thumbprint": identity.thumbprint, "Sha256": identity.sha256}) + "\n")
        else:
            self.out.write(f"The thumbprint of this hub is: {identity.thumbprint}\n"
                           f"SHA-256 fingerprint: {identity.sha256}\n")
        return 0

    def configure(self, args: argparse.Namespace) -> int:
        if not (args.trust or args.remove_trust or args.trust_user or args.remove_user
                or args.bind or args.unbind or args.port is not None
                or args.listen_address is not None or args.collect_timeout is not None
                or hasattr(args, "max_connections") or args.max_unauthenticated_connections is not None
                or args.connection_log_lines is not None):
            raise UsageError("tentacle-hub configure: nothing to change; give --trust, --bind, --port "
                             "or another setting (see 'tentacle-hub configure --help')")
        config = self.config_file.load()
        for t in args.remove_trust:
            config = config.distrust(t)
            self.out.write(f"No longer trusting {t}\n")
        for t in args.trust:
            config = config.trust(t)
            self.out.write(f"Trusting the agent {t}\n")
        for t in args.remove_user:
            config = config.distrust(t, as_user=True)
            self.out.write(f"No longer trusting the user {t}\n")
        for t in args.trust_user:
            config = config.trust(t, as_user=True)
            self.out.write(f"Trusting the user {t}\n")
        for subscription in args.unbind:
            config = config.unbind(subscription)
            self.out.write(f"Any trusted agent may claim {subscription}\n")
        for subscription, t in args.bind:
            config = config.bind(subscription, t)
            self.out.write(f"Only {', '.join(dict(config.bindings)[subscription])} may claim {subscription}\n")
        if args.port is not None:
            config = attrs.evolve(config, port=args.port)
            self.out.write(f"Listen port set to {args.port} (takes effect on restart)\n")
        if args.listen_address is not None:
            address = None if args.listen_address == "any" else args.listen_address
            config = attrs.evolve(config, listen_address=address)
            self.out.write(f"Listen address set to {args.listen_address} (takes effect on restart)\n")
        if args.collect_timeout is not None:
            config = attrs.evolve(config, collect_timeout=args.collect_timeout)
            self.out.write(f"Collect timeout set to {args.collect_timeout:g} s (takes effect on restart)\n")
        if hasattr(args, "max_connections"):
            config = attrs.evolve(config, max_connections=args.max_connections)
            shown = args.max_connections if args.max_connections is not None else "no limit"
            self.out.write(f"Max connections set to {shown} (a running hub applies it within seconds)\n")
        if args.max_unauthenticated_connections is not None:
            config = attrs.evolve(config, max_unauthenticated_connections=args.max_unauthenticated_connections)
            self.out.write(f"Max unauthenticated connections set to {args.max_unauthenticated_connections} "
                           "(a running hub applies it within seconds)\n")
        if args.connection_log_lines is not None:
            config = attrs.evolve(config, connection_log_lines=args.connection_log_lines)
            self.out.write(f"Connection log lines set to {args.connection_log_lines} "
                           "(a running hub applies it within seconds)\n")
        self.config_file.save(config)
        return 0

    def show_configuration(self, args: argparse.Namespace) -> int:
        config = self.config_file.load()
        identity = self.identities.load() if self.identities.exists() else None
        if args.format == "json":
            data = {"home": str(self.home), **config.to_json(),
                    "thumbprint": identity.thumbprint if identity else None}
            self.out.write(json.dumps(data, indent=2) + "\n")
            return 0
        trusted = "".join(f"\n  {t}" for t in config.agents) or " none"
        users = "".join(f"\n  {t}" for t in config.users) or " none"
        bindings = "".join(f"\n  {s} -> {', '.join(t)}" for s, t in config.bindings) or " none"
        self.out.write(
            f"Home:             {self.home}\n"
            f"Certificate:      {identity.thumbprint if identity else 'none (run tentacle-hub new-certificate)'}\n"
            f"Listen port:      {config.port}\n"
            f"Listen address:   {config.listen_address or 'any (IPv4 and IPv6)'}\n"
            f"Collect timeout:  {config.collect_timeout:g} s\n"
            f"Max connections:  {config.max_connections or 'no limit'}, "
            f"{config.max_unauthenticated_connections} unauthenticated\n"
            f"Connection log lines: {config.connection_log_lines} per kind per 10 s\n"
            f"Agents:{trusted}\n"
            f"Users:{users}\n"
            f"Bindings:{bindings}\n"
        )
        return 0

    def run(self, args: argparse.Namespace) -> int:
        from twisted.python.usage import UsageError as TwistdUsageError

        from tentacle.hub.tap import service_maker
        from tentacle.tap import CannotStart, run_twistd

        arguments = ["--nodaemon", "--pidfile=", "--umask=0077", "tentacle-hub", "--home", str(self.home)]
        sys.argv = ["twistd", *arguments]
        try:
            run_twistd(arguments, service_maker)
        except (TwistdUsageError, CannotStart) as e:
            raise CommandError(str(e)) from None
        return 0


def main(
    argv: Sequence[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    _help_output.set(out)
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            return int(e.code or 0)
        home = resolve_hub_home(args.home, os.environ if environ is None else environ)
        return int(getattr(_Command(home, out), args.handler)(args))
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except (CommandError, ConfigError, IdentityError, OSError) as e:
        err.write(f"tentacle-hub: error: {failure_sentence(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
