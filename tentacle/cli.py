"""
C{tentacle}: administer an agent instance (identity, trust, settings) and run it.

Thin by design: parse, call library code, print.  Errors are one line on
stderr with a non-zero exit status: 2 for bad usage, 1 when the request was
understood but could not be carried out.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Mapping, NoReturn, Sequence

import attrs

from tentacle import __version__, logs
from tentacle.config import (
    ConfigError,
    ConfigFile,
    TentacleConfig,
    check_listen_address,
    check_output_limit,
    check_port,
    check_timeout,
    resolve_home,
)
from tentacle.service import HEARTBEAT_FILE, METRICS_FILE
from tentacle.systemd import DEFAULT_UNIT_DIRECTORY, ServiceError, Systemd, Unit, check_instance
from tentacle.identity import Identity, IdentityError, IdentityStore, normalize_thumbprint


class CommandError(Exception):
    """
    The command was understood but cannot be done; exit status 1.
    """


class UsageError(Exception):
    """
    The command line is wrong; exit status 2.
    """


class _Parser(argparse.ArgumentParser):
    """
    An argparse parser whose errors are one line, raised rather than printed,
    so main() decides how they look and tests can check them.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            (_help_output.get() or file or sys.stdout).write(message)


#: Where --help and --version go: main()'s C{out}, so they can be tested in-process.
_help_output: contextvars.ContextVar[IO[str] | None] = contextvars.ContextVar(
    "_help_output", default=None
)


def _thumbprint_argument(value: str) -> str:
    try:
        return normalize_thumbprint(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port_argument(value: str) -> int:
    try:
        return check_port(int(value))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a port number from 1 to 65535, not {value!r}"
        ) from None


def _address_argument(value: str) -> str:
    try:
        return check_listen_address(value) or "any"
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_argument(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1024:
        raise argparse.ArgumentTypeError(f"expected a number of bytes of at least 1024, not {value!r}")
    return size


def _output_limit_argument(value: str) -> int | None:
    if value == "none":
        return None
    try:
        return check_output_limit(int(value))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e} (or 'none')") from None


def _seconds_argument(value: str) -> float:
    try:
        return check_timeout(float(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {value!r}") from None


def _instance_argument(value: str) -> str:
    try:
        return check_instance(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tentacle",
        description="Administer and run a Tentacle listening deployment agent.",
    )
    parser.add_argument("--version", action="version", version=f"tentacle {__version__}")
    parser.add_argument(
        "--home",
        help="the instance home (default: $TENTACLE_HOME, else ~/.tentacle)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    new = commands.add_parser(
        "new-certificate",
        help="create this agent's certificate (self-signed RSA-2048, SHA-256, 100 years)",
        description="Create this agent's certificate and private key in its home.",
    )
    new.add_argument(
        "--if-blank", "-b", action="store_true",
        help="do nothing (and succeed) when the agent already has a certificate",
    )
    new.add_argument(
        "--force", action="store_true",
        help="replace an existing certificate (servers that pinned the old one will be refused)",
    )

    imp = commands.add_parser(
        "import-certificate",
        help="use an existing certificate (PEM or PKCS#12) as this agent's identity",
        description="Import a certificate and its private key from a PEM or PKCS#12 file.",
    )
    imp.add_argument("--from-file", "-f", required=True, metavar="FILE", help="PEM or PKCS#12 (.pfx) file")
    imp.add_argument(
        "--password", "--pfx-password", metavar="PASSWORD",
        help="password of the PKCS#12 file or of the encrypted PEM key",
    )
    imp.add_argument("--force", action="store_true", help="replace an existing certificate")

    show = commands.add_parser(
        "show-thumbprint",
        help="print this agent's certificate thumbprint",
        description="Print the SHA-1 thumbprint (what Octopus pins) and SHA-256 fingerprint.",
    )
    show.add_argument("--format", choices=("text", "json"), default="text")

    configure = commands.add_parser(
        "configure",
        help="change trusted servers, port, listen address or application folder",
        description=(
            "Change the instance's settings. A running agent picks up trust "
            "changes within a few seconds; port and address changes need a restart."
        ),
    )
    configure.add_argument(
        "--trust", action="append", default=[], type=_thumbprint_argument, metavar="THUMBPRINT",
        help="trust a server's certificate (SHA-1 or SHA-256, hex); repeatable",
    )
    configure.add_argument(
        "--remove-trust", action="append", default=[], type=_thumbprint_argument,
        metavar="THUMBPRINT", help="stop trusting a server; repeatable",
    )
    configure.add_argument(
        "--reset-trust", action="store_true", help="remove every trusted server first",
    )
    configure.add_argument("--port", type=_port_argument, help="the TCP port to listen on")
    configure.add_argument(
        "--listen-ip", type=_address_argument, metavar="ADDRESS",
        help="listen on this IP address only, or 'any' for every interface",
    )
    configure.add_argument("--app", metavar="DIR", help="where deployed applications go")
    configure.add_argument(
        "--script-output-limit", type=_output_limit_argument, default=False, metavar="BYTES",
        help="store at most this much of each script's output, then only its last lines ('none': no limit)",
    )

    show_config = commands.add_parser(
        "show-configuration",
        help="print the instance's settings",
        description="Print the instance's settings and identity.",
    )
    show_config.add_argument("--format", choices=("text", "json"), default="text")

    run = commands.add_parser(
        "run",
        help="run the agent in the foreground (the same as 'twistd -n tentacle')",
        description="Run the agent in the foreground until interrupted.",
    )
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text (default) or one JSON object per line")
    run.add_argument("--log-file", metavar="PATH", help="log to this file instead of stdout")
    run.add_argument("--log-max-size", type=_size_argument, default=10 * 1024 * 1024, metavar="BYTES",
                     help="rotate the log file at this size (default 10 MiB; ten old files kept)")
    run.add_argument("--user", help="start as root, bind, then run as this user (who must own the home)")

    livez = commands.add_parser(
        "livez",
        help="exit 0 when the running agent's heartbeat is fresh (for health checks)",
        description="Check the running agent's heartbeat file; exit 0 when fresh, 1 otherwise.",
    )
    livez.add_argument("--max-age", type=_seconds_argument, default=60.0, metavar="SECONDS",
                       help="the oldest heartbeat still counted as alive (default 60)")

    commands.add_parser(
        "metrics",
        help="print the running agent's metrics (Prometheus text format)",
        description="Print the metrics the running agent last published (every 10 seconds).",
    )

    service = commands.add_parser(
        "service",
        help="install, remove or control the agent as a systemd service",
        description="Install the agent as a systemd unit, remove it, or start, stop and check it.",
    )
    action = service.add_mutually_exclusive_group(required=True)
    for name in ("install", "uninstall", "start", "stop", "restart", "status", "print"):
        action.add_argument(f"--{name}", dest="action", action="store_const", const=name,
                            help=f"{name} the service" if name != "print" else "print the unit only")
    service.add_argument("--user", help="the user the agent runs as (default: root)")
    service.add_argument("--instance", default="default", type=_instance_argument,
                         help="the instance name, for several agents on one machine (default: 'default')")
    service.add_argument("--unit-dir", default=str(DEFAULT_UNIT_DIRECTORY), help=argparse.SUPPRESS)
    service.add_argument("--systemctl", default=None, help=argparse.SUPPRESS)
    return parser


class _Command:
    def __init__(self, home: Path, out: IO[str]) -> None:
        self.home = home
        self.out = out
        self.identities = IdentityStore(home)
        self.config_file = ConfigFile(home)

    def new_certificate(self, args: argparse.Namespace) -> int:
        if self.identities.exists():
            if args.if_blank:
                self.out.write(
                    f"This agent already has a certificate: {self.identities.load().thumbprint}\n"
                )
                return 0
            if not args.force:
                raise CommandError(
                    f"{self.home} already has a certificate; use --force to replace it "
                    "(servers that trust the old one will be refused)"
                )
        identity = Identity.generate()
        self.identities.save(identity)
        self.out.write(f"A new certificate has been created: {identity.thumbprint}\n")
        return 0

    def import_certificate(self, args: argparse.Namespace) -> int:
        if self.identities.exists() and not args.force:
            raise CommandError(
                f"{self.home} already has a certificate; use --force to replace it"
            )
        password = args.password.encode("utf-8") if args.password is not None else None
        identity = Identity.from_file(Path(args.from_file), password)
        self.identities.save(identity)
        self.out.write(f"Imported the certificate {identity.thumbprint}\n")
        return 0

    def show_thumbprint(self, args: argparse.Namespace) -> int:
        identity = self.identities.load()
        if args.format == "json":
            json.dump({"Thumbprint": identity.thumbprint, "Sha256": identity.sha256}, self.out)
            self.out.write("\n")
        else:
            self.out.write(
                f"The thumbprint of this Tentacle is: {identity.thumbprint}\n"
                f"SHA-256 fingerprint: {identity.sha256}\n"
            )
        return 0

    def configure(self, args: argparse.Namespace) -> int:
        changes = (
            args.trust or args.remove_trust or args.reset_trust
            or args.port is not None or args.listen_ip is not None or args.app is not None
            or args.script_output_limit is not False
        )
        if not changes:
            raise UsageError(
                "tentacle configure: nothing to change; give --trust, --remove-trust, "
                "--reset-trust, --port, --listen-ip, --app or --script-output-limit "
                "(see 'tentacle configure --help')"
            )
        config = self.config_file.load()
        if args.reset_trust:
            config = _evolve(config, trusted_thumbprints=())
            self.out.write("Removed every trusted server\n")
        for thumbprint in args.remove_trust:
            config = config.distrust(thumbprint)
            self.out.write(f"No longer trusting {thumbprint}\n")
        for thumbprint in args.trust:
            config = config.trust(thumbprint)
            self.out.write(f"Trusting {thumbprint}\n")
        if args.port is not None:
            config = _evolve(config, port=args.port)
            self.out.write(f"Listening port set to {args.port} (takes effect on restart)\n")
        if args.listen_ip is not None:
            address = None if args.listen_ip == "any" else args.listen_ip
            config = _evolve(config, listen_address=address)
            self.out.write(f"Listen address set to {args.listen_ip} (takes effect on restart)\n")
        if args.app is not None:
            config = _evolve(config, application_directory=Path(args.app).expanduser().absolute())
            self.out.write(f"Application directory set to {config.applications}\n")
        if args.script_output_limit is not False:
            config = _evolve(config, script_output_limit=args.script_output_limit)
            limit = args.script_output_limit
            self.out.write(
                f"Script output limit set to {'none' if limit is None else f'{limit} bytes'} "
                "(takes effect on restart)\n"
            )
        self.config_file.save(config)
        return 0

    def show_configuration(self, args: argparse.Namespace) -> int:
        config = self.config_file.load()
        identity = self.identities.load() if self.identities.exists() else None
        if args.format == "json":
            data: dict[str, Any] = {"home": str(self.home), **config.to_json()}
            data["thumbprint"] = identity.thumbprint if identity else None
            json.dump(data, self.out, indent=2)
            self.out.write("\n")
            return 0
        trusted = "".join(f"\n  {t}" for t in config.trusted_thumbprints) or " none"
        self.out.write(
            f"Home:                  {self.home}\n"
            f"Certificate:           "
            f"{identity.thumbprint if identity else 'none (run tentacle new-certificate)'}\n"
            f"Listen port:           {config.port}\n"
            f"Listen address:        {config.listen_address or 'any (IPv4 and IPv6)'}\n"
            f"Application directory: {config.applications}\n"
            f"Handshake timeout:     {config.handshake_timeout:g} s\n"
            f"Trusted servers:{trusted}\n"
        )
        return 0

    def run(self, args: argparse.Namespace) -> int:
        from twisted.scripts import twistd

        os.environ[logs.FORMAT_VARIABLE] = args.log_format
        os.environ[logs.MAX_SIZE_VARIABLE] = str(args.log_max_size)
        if args.log_file:
            os.environ[logs.FILE_VARIABLE] = os.path.abspath(args.log_file)
        privileges = self._drop_to(args.user) if args.user else []
        sys.argv = [
            "twistd", "--nodaemon", "--pidfile=", "--umask=0077", "--logger", "tentacle.logs.observer", *privileges,
            "tentacle", "--home", str(self.home),
        ]
        twistd.run()
        return 0

    def _drop_to(self, user: str) -> list[str]:
        """
        twistd's options to switch to C{user} after binding, checked first:
        an agent that cannot write its home would fail later and worse.
        """
        import pwd

        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise CommandError(f"there is no user {user!r}") from None
        if os.geteuid() != 0:
            raise CommandError(f"only root can run the agent as {user!r}; start it as that user instead")
        try:
            owner = self.home.stat().st_uid
        except FileNotFoundError:
            raise CommandError(f"{self.home} does not exist; create it and give it to {user}") from None
        if owner != entry.pw_uid:
            raise CommandError(
                f"{self.home} belongs to uid {owner}, not to {user}; run 'chown -R {user}: {self.home}'"
            )
        return ["--uid", str(entry.pw_uid), "--gid", str(entry.pw_gid)]

    def livez(self, args: argparse.Namespace) -> int:
        path = self.home / HEARTBEAT_FILE
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            raise CommandError(f"no agent is running for {self.home} (no heartbeat at {path})") from None
        if age > args.max_age:
            raise CommandError(f"the agent's heartbeat is {age:.0f} s old (more than {args.max_age:g} s)")
        self.out.write(f"alive: heartbeat {age:.0f} s ago\n")
        return 0

    def metrics(self, args: argparse.Namespace) -> int:
        path = self.home / METRICS_FILE
        try:
            self.out.write(path.read_text())
        except FileNotFoundError:
            raise CommandError(f"no agent is running for {self.home} (no metrics at {path})") from None
        return 0

    def service(self, args: argparse.Namespace) -> int:
        unit = Unit(args.instance, self.home, args.user)
        if args.systemctl is not None:  # given explicitly: trust it is in charge
            systemd = Systemd(Path(args.unit_dir), args.systemctl or None, booted=True)
        else:
            systemd = Systemd(Path(args.unit_dir))
        try:
            if args.action == "print":
                self.out.write(unit.render())
            elif args.action == "install":
                path = systemd.install(unit)
                self.out.write(f"Installed and enabled {path}; start it with 'tentacle service --start'\n")
            elif args.action == "uninstall":
                path = systemd.uninstall(unit)
                self.out.write(f"Stopped, disabled and removed {path}\n")
            else:
                output = systemd.control(args.action, unit)
                if output:
                    self.out.write(output + "\n")
        except ServiceError as e:
            raise CommandError(str(e)) from None
        return 0


def _evolve(config: TentacleConfig, **changes: Any) -> TentacleConfig:
    return attrs.evolve(config, **changes)


def main(
    argv: Sequence[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    _help_output.set(out)
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version
            return int(e.code or 0)
        home = resolve_home(args.home, os.environ if environ is None else environ)
        command = _Command(home, out)
        handler = getattr(command, args.command.replace("-", "_"))
        return int(handler(args))
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except (CommandError, ConfigError, IdentityError) as e:
        err.write(f"tentacle: error: {e}\n")
        return 1
    except OSError as e:
        err.write(f"tentacle: error: {e.filename or ''}: {e.strerror}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
