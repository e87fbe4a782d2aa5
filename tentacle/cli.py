"""
C{tentacle}: administer an agent instance (identity, trust, settings) and run it.

Thin by design: parse, call library code, print.  Errors are one line on
stderr with a non-zero exit status: 2 for bad usage, 1 when the request was
understood but could not be carried out.  The global options (C{--home},
C{--instance}) may come before or after the command.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Mapping, NoReturn, Sequence

import attrs

from tentacle import __version__, logs
from tentacle.config import (
    DEFAULT_POLLING_PORT,
    LIVE_SETTINGS,
    MAX_POLLING_CONNECTIONS,
    MIN_SCRIPT_OUTPUT_LIMIT,
    ConfigError,
    ConfigFile,
    ProxySetting,
    TentacleConfig,
    check_keepalive,
    check_listen_address,
    check_log_lines,
    check_output_limit,
    check_polling_connections,
    check_port,
    check_subscription_id,
    check_timeout,
    resolve_home,
    split_host_port,
)
from tentacle.errors import failure_sentence
from tentacle.identity import Identity, IdentityError, IdentityStore, normalize_thumbprint
from tentacle.instances import (
    Instance,
    InstanceError,
    InstanceRegistry,
    default_instance_home,
    default_registry,
)
from tentacle.service import HEARTBEAT_FILE, METRICS_FILE
from tentacle.systemd import DEFAULT_UNIT_DIRECTORY, ServiceError, Systemd, Unit, check_instance, unit_name


#: Set (to anything), C{tentacle run} runs the agent in its own process
#: instead of a fresh interpreter: under a profiler or coverage, say.
IN_PROCESS_VARIABLE = "TENTACLE_RUN_IN_PROCESS"


def _fresh_interpreter() -> list[str] | None:
    """
    The interpreter and flags to run the agent in afresh, if started so it
    finds this very C{tentacle} (the same file); C{None} when it would not:
    a launcher that set up C{sys.path} at run time (a zipapp, a wrapper
    script) is not repeated by a fresh interpreter, and the agent then runs
    in this one.
    """
    import subprocess

    if not sys.executable:
        return None
    command = [sys.executable, *subprocess._args_from_interpreter_flags()]  # type: ignore[attr-defined]
    try:
        found = subprocess.run(
            [*command, "-c", "import tentacle.daemon, sys; sys.stdout.write(tentacle.daemon.__file__)"],
            capture_output=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    import tentacle.daemon

    mine = os.path.realpath(tentacle.daemon.__file__)
    if found.returncode != 0 or os.path.realpath(os.fsdecode(found.stdout)) != mine:
        return None
    return command


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


def _argument(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    An argparse type from a checker that raises C{ValueError} with a sentence.
    """

    def convert(value: str) -> Any:
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = check.__name__
    return convert


def _port(value: str) -> int:
    try:
        return check_port(int(value))
    except ValueError:
        raise ValueError(f"expected a port number from 1 to 65535, not {value!r}") from None


def _seconds(value: str) -> float:
    try:
        return check_timeout(float(value))
    except ValueError:
        raise ValueError(f"expected a positive number of seconds, not {value!r}") from None


def _log_lines(value: str) -> int:
    try:
        return check_log_lines(int(value))
    except ValueError:
        raise ValueError(f"expected a whole number of 0 or more, not {value!r}") from None


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expected a whole number of at least 1, not {value!r}")
    return number


def _or_none(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    C{check}, or C{none} for no limit.
    """

    def convert(value: str) -> Any:
        if value.lower() in ("none", "off", "unlimited"):
            return None
        try:
            return check(value)
        except ValueError as e:
            raise ValueError(f"{e} (or 'none')") from None

    convert.__name__ = check.__name__
    return convert


def _size(value: str) -> int:
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1024:
        raise ValueError(f"expected a number of bytes of at least 1024, not {value!r}")
    return size


def _output_limit(value: str) -> int:
    try:
        return check_output_limit(int(value))
    except ValueError:
        raise ValueError(
            f"expected a number of bytes of at least {MIN_SCRIPT_OUTPUT_LIMIT}, not {value!r}"
        ) from None


def _keepalive(value: str) -> Any:
    parts = value.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"expected IDLE,INTERVAL,COUNT (three whole numbers), not {value!r}")
    idle, interval, count = (int(p) for p in parts)
    return check_keepalive({"idle": idle, "interval": interval, "count": count})


def _proxy_setting(value: str) -> ProxySetting:
    return ProxySetting.parse(None if value == "default" else value)


def _polling_count(value: str) -> int:
    try:
        return check_polling_connections(int(value))
    except ValueError:
        raise ValueError(f"expected a whole number from 1 to {MAX_POLLING_CONNECTIONS}, not {value!r}") from None


def _proxy_url(value: str) -> str:
    from tentacle.dialer import Proxy

    Proxy.from_url(value)
    return value


def _address(value: str) -> str:
    return check_listen_address(value) or "any"


def _switch(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on or off, not {value!r}")


#: The default of options whose value may be None ('none'), so that
#: 'none' and 'not given' can be told apart.
_NOT_GIVEN: Any = object()


def _add_global_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """
    The options every command takes, before or after its name.  After it,
    they default to nothing at all, so they never undo the same option
    given before the command.
    """
    default: Any = argparse.SUPPRESS if after_command else None
    parser.add_argument(
        "--home", default=default, metavar="DIR",
        help="the agent's home (default: the instance's, else $TENTACLE_HOME, else ~/.tentacle)",
    )
    parser.add_argument(
        "--instance", default=default, metavar="NAME", type=_argument(check_instance),
        help="a named instance (see 'tentacle list-instances'); its home is used",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tentacle",
        description="Administer and run a Tentacle listening deployment agent.",
    )
    parser.add_argument("--version", action="version", version=f"tentacle {__version__}")
    _add_global_options(parser, after_command=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def add(name: str, **kw: Any) -> argparse.ArgumentParser:
        command = commands.add_parser(name, **kw)
        _add_global_options(command, after_command=True)
        command.set_defaults(handler=name.replace("-", "_"))
        return command

    create = add(
        "create-instance",
        help="name a home, so '--instance NAME' finds it (and its service unit is its own)",
        description=(
            "Register a named instance and create its home (default: /var/lib/tentacle/NAME "
            "as root, else ~/.local/share/tentacle/NAME; or --home)."
        ),
    )
    create.add_argument("name", metavar="NAME", type=_argument(check_instance))
    listing = add("list-instances", help="list the named instances", description="List the named instances.")
    listing.add_argument("--format", choices=("text", "json"), default="text")
    delete = add(
        "delete-instance",
        help="forget a named instance (its home is kept)",
        description="Remove a named instance from the registry; its home and files are left as they are.",
    )
    delete.add_argument("name", metavar="NAME", type=_argument(check_instance))

    new = add(
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

    imp = add(
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

    show = add(
        "show-thumbprint",
        help="print this agent's certificate thumbprint",
        description="Print the SHA-1 thumbprint (what Octopus pins) and SHA-256 fingerprint.",
    )
    show.add_argument("--format", choices=("text", "json"), default="text")

    configure = add(
        "configure",
        help="change trusted servers, port, limits and every other setting",
        description=(
            "Change the instance's settings. A running agent applies trust, limits and "
            "allowed roots within a few seconds; port, address, application folder, "
            "audit log and metrics port need a restart."
        ),
    )
    thumbprint = _argument(normalize_thumbprint)
    configure.add_argument(
        "--trust", action="append", default=[], type=thumbprint, metavar="THUMBPRINT",
        help="trust a server's certificate (SHA-1 or SHA-256, hex); repeatable",
    )
    configure.add_argument(
        "--remove-trust", action="append", default=[], type=thumbprint,
        metavar="THUMBPRINT", help="stop trusting a server; repeatable",
    )
    configure.add_argument("--reset-trust", action="store_true", help="remove every trusted server first")
    configure.add_argument("--port", type=_argument(_port), help="the TCP port to listen on")
    configure.add_argument(
        "--listen-ip", "--listen-address", type=_argument(_address), metavar="ADDRESS",
        help="listen on this IP address only, or 'any' for every interface",
    )
    configure.add_argument("--app", "--app-dir", metavar="DIR", help="where deployed applications go")
    configure.add_argument(
        "--handshake-timeout", type=_argument(_seconds), metavar="SECONDS",
        help="seconds a new connection has to finish TLS and send its first request",
    )
    configure.add_argument(
        "--allowed-root", action="append", default=[], metavar="DIR",
        help="confine file transfers to this folder (and the others given); repeatable",
    )
    configure.add_argument(
        "--remove-allowed-root", action="append", default=[], metavar="DIR",
        help="no longer allow this folder; repeatable",
    )
    configure.add_argument(
        "--reset-allowed-roots", action="store_true",
        help="remove every allowed root first (no roots: transfers may touch any path)",
    )
    configure.add_argument(
        "--max-concurrent-scripts", type=_argument(_or_none(_count)), default=_NOT_GIVEN, metavar="N",
        help="scripts beyond this many wait as Pending ('none': no limit)",
    )
    configure.add_argument(
        "--script-timeout", type=_argument(_or_none(_seconds)), default=_NOT_GIVEN, metavar="SECONDS",
        help="kill a script after this long, exit code -44 ('none': never)",
    )
    configure.add_argument(
        "--workspace-max-age", type=_argument(_seconds), metavar="SECONDS",
        help="remove finished script workspaces this old",
    )
    configure.add_argument(
        "--max-connections", type=_argument(_or_none(_count)), default=_NOT_GIVEN, metavar="N",
        help="refuse connections beyond this many open at once ('none': no limit)",
    )
    configure.add_argument(
        "--audit-log", type=_argument(_switch), metavar="on|off", help="keep <home>/Logs/audit.log",
    )
    configure.add_argument(
        "--metrics-port", type=_argument(_or_none(_port)), default=_NOT_GIVEN, metavar="PORT",
        help="serve Prometheus metrics on this loopback port ('none': off)",
    )
    configure.add_argument(
        "--script-output-limit", type=_argument(_or_none(_output_limit)), default=_NOT_GIVEN, metavar="BYTES",
        help="store at most this much of each script's output, then only its last lines ('none': no limit)",
    )
    configure.add_argument(
        "--instance-name", type=_argument(check_instance), metavar="NAME",
        help="the name scripts see as TentacleInstanceName",
    )
    configure.add_argument(
        "--proxy", type=_argument(_proxy_setting), metavar="URL|none|default",
        help="the proxy scripts are told of: http://[user:password@]host[:port], 'none', or "
        "'default' (the machine's own)",
    )
    configure.add_argument(
        "--max-unauthenticated-connections", type=_argument(_count), metavar="N",
        help="of the open connections, how many may not have shown a trusted certificate yet",
    )
    configure.add_argument(
        "--max-unauthenticated-per-address", type=_argument(_count), metavar="N",
        help="of those, how many from one address (an IPv6 /64 counts as one)",
    )
    configure.add_argument(
        "--first-byte-timeout", type=_argument(_seconds), metavar="SECONDS",
        help="seconds a new connection has to send its first byte of TLS",
    )
    configure.add_argument(
        "--connection-log-lines", type=_argument(_log_lines), metavar="N",
        help="log lines of each kind (evicted, timed out, refused) per 10 s for connections that "
        "never authenticate; the rest are summed up in one line (default 20; 0: the summaries only)",
    )
    configure.add_argument(
        "--tcp-keepalive", type=_argument(_or_none(_keepalive)), default=_NOT_GIVEN, metavar="IDLE,INTERVAL,COUNT",
        help="TCP keepalive on every connection: seconds idle, seconds between probes, probes "
        "(default 15,5,10, as Halibut; 'none': off)",
    )
    listening = configure.add_mutually_exclusive_group()
    listening.add_argument(
        "--listen", dest="listen", action="store_const", const=True, default=None,
        help="accept connections on the listening port (the default)",
    )
    listening.add_argument(
        "--no-listen", dest="listen", action="store_const", const=False,
        help="open no port: an agent that only polls (see 'tentacle poll-server')",
    )
    configure.add_argument(
        "--remove-poll-server", action="append", default=[], metavar="ADDRESS",
        help="stop polling this server (host[:port], or its thumbprint); repeatable",
    )

    poll = add(
        "poll-server",
        help="poll a server: dial it for work instead of (or as well as) listening",
        description=(
            "Add a server for this agent to poll (Octopus's polling mode, 'TentacleActive'): the agent "
            "dials it and takes its work over those connections. Prints the subscription id the server "
            "must know this agent by. A running agent starts polling within a few seconds."
        ),
    )
    poll.add_argument("--server-address", required=True, metavar="HOST[:PORT]",
                      help="the server's polling address (port 10943 by default)")
    poll.add_argument("--server-thumbprint", required=True, type=thumbprint, metavar="THUMBPRINT",
                      help="the server's certificate thumbprint (SHA-1 or SHA-256); it is trusted for listening too")
    poll.add_argument("--subscription-id", type=_argument(check_subscription_id), metavar="poll://ID/",
                      help="the id to poll as (default: the one already used with this thumbprint, else a new one)")
    poll.add_argument("--connections", type=_argument(_polling_count), default=1, metavar="N",
                      help="connections to keep to the server, 1 to 512 (default 1)")
    poll.add_argument("--proxy", type=_argument(_proxy_url), metavar="URL",
                      help="reach the server through this HTTP proxy: http://[user:password@]host[:port]")

    show_config = add(
        "show-configuration",
        help="print the instance's settings",
        description="Print the instance's settings and identity.",
    )
    show_config.add_argument("--format", choices=("text", "json"), default="text")

    run = add(
        "run",
        aliases=["agent"],
        help="run the agent in the foreground (also 'agent'; the same as 'twistd -n tentacle')",
        description="Run the agent in the foreground until interrupted.",
    )
    run.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="text (default) or one flat JSON object per line")
    run.add_argument("--log-level", choices=logs.LEVELS, default=logs.DEFAULT_LEVEL,
                     help="the least severe level logged (default info; debug adds a line per request)")
    run.add_argument("--log-file", metavar="PATH", help="log to this file instead of stdout")
    run.add_argument("--log-max-size", type=_argument(_size), default=10 * 1024 * 1024, metavar="BYTES",
                     help="rotate the log file at this size (default 10 MiB; ten old files kept)")
    run.add_argument("--user", help="start as root, bind, then run as this user (who must own the home)")

    hub = add(
        "hub",
        help="run a hub: the polling server polling agents dial (the same as 'tentacle-hub run')",
        description="Run a hub in the foreground; administer it with 'tentacle-hub'.",
    )
    hub.add_argument("--hub-home", metavar="DIR",
                     help="the hub's home (default: $TENTACLE_HUB_HOME, else ~/.tentacle-hub)")

    livez = add(
        "livez",
        help="exit 0 when the running agent's heartbeat is fresh (for health checks)",
        description="Check the running agent's heartbeat file; exit 0 when fresh, 1 otherwise.",
    )
    livez.add_argument("--max-age", type=_argument(_seconds), default=60.0, metavar="SECONDS",
                       help="the oldest heartbeat still counted as alive (default 60)")

    add(
        "metrics",
        help="print the running agent's metrics (Prometheus text format)",
        description="Print the metrics the running agent last published (every 10 seconds).",
    )

    service = add(
        "service",
        help="install, remove or control the agent as a systemd service (one unit per instance)",
        description=(
            "Install the agent as a systemd unit, remove it, or start, stop and check it. "
            "Each instance has its own unit: tentacle-NAME.service (tentacle.service without --instance)."
        ),
    )
    action = service.add_mutually_exclusive_group(required=True)
    for name in ("install", "uninstall", "start", "stop", "restart", "status", "print"):
        action.add_argument(f"--{name}", dest="action", action="store_const", const=name,
                            help=f"{name} the service" if name != "print" else "print the unit only")
    service.add_argument("--user", help="the user the agent runs as (default: root)")
    service.add_argument("--unit-dir", default=str(DEFAULT_UNIT_DIRECTORY), help=argparse.SUPPRESS)
    service.add_argument("--systemctl", default=None, help=argparse.SUPPRESS)
    service.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    return parser


#: Commands that only read a home: an unknown one is a mistake to report,
#: not a fresh home to create.
_READERS = frozenset({"show_thumbprint", "show_configuration", "livez", "metrics", "service"})
#: Commands about the registry, not about one home.
_REGISTRY_COMMANDS = frozenset({"create_instance", "list_instances", "delete_instance", "hub"})


#: How the CLI words a setting's empty value.
_NONE_WORDS = {
    "listen-address": "any", "metrics-port": "off", "max-concurrent-scripts": "no limit",
    "max-connections": "no limit", "allowed-roots": "none (any path)",
    "proxy": "the machine's own", "script-output-limit": "no limit", "tcp-keepalive": "off",
}


def _describe(value: Any, unit: str = "", key: str = "") -> str:
    if value is None or value == []:
        return _NONE_WORDS.get(key, "none")
    if key == "proxy" and isinstance(value, str):
        return _redacted(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}{unit}"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return f"{value}{unit}"


class _Command:
    def __init__(
        self, home: Path, out: IO[str], err: IO[str], registry: InstanceRegistry,
        instance: Instance | None, environ: Mapping[str, str],
    ) -> None:
        self.home = home
        self.out = out
        self.err = err
        self.registry = registry
        self.instance = instance
        self.environ = environ
        self.identities = IdentityStore(home)
        self.config_file = ConfigFile(home)

    # --- instances ------------------------------------------------------------------

    def create_instance(self, args: argparse.Namespace) -> int:
        home = Path(args.home).expanduser().absolute() if args.home else default_instance_home(
            args.name, self.environ
        )
        instance = self.registry.create(args.name, home)
        self.out.write(
            f"Created the instance {instance.name} with its home in {instance.home}\n"
            f"Next: 'tentacle --instance {instance.name} configure --port N --trust <server thumbprint>', "
            f"then 'tentacle --instance {instance.name} run' (or 'service --install')\n"
        )
        return 0

    def list_instances(self, args: argparse.Namespace) -> int:
        instances = list(self.registry)
        if args.format == "json":
            json.dump(
                [{"name": i.name, "home": str(i.home), "running": i.running()} for i in instances],
                self.out, indent=2,
            )
            self.out.write("\n")
            return 0
        if not instances:
            self.out.write(f"No instances in {self.registry.directory}; create one with 'tentacle create-instance NAME'\n")
            return 0
        width = max(len(i.name) for i in instances) + 2
        self.out.write(f"{'Name':<{width}}{'State':<10}Home\n")
        for i in instances:
            self.out.write(f"{i.name:<{width}}{'running' if i.running() else 'stopped':<10}{i.home}\n")
        return 0

    def delete_instance(self, args: argparse.Namespace) -> int:
        instance = self.registry.delete(args.name)
        self.out.write(f"Deleted the instance {instance.name}; its home {instance.home} is kept\n")
        unit = DEFAULT_UNIT_DIRECTORY / unit_name(instance.name)
        if unit.exists():
            self.out.write(
                f"Its service {unit} is still installed: remove it with "
                f"'tentacle --home {instance.home} service --uninstall' (as root)\n"
            )
        return 0

    # --- certificates ---------------------------------------------------------------

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

    # --- settings -------------------------------------------------------------------

    def configure(self, args: argparse.Namespace) -> int:
        settings = {
            "port": args.port, "listen_ip": args.listen_ip, "app": args.app,
            "handshake_timeout": args.handshake_timeout, "workspace_max_age": args.workspace_max_age,
            "audit_log": args.audit_log, "instance_name": args.instance_name, "proxy": args.proxy,
            "max_unauthenticated_connections": args.max_unauthenticated_connections,
            "max_unauthenticated_per_address": args.max_unauthenticated_per_address,
            "first_byte_timeout": args.first_byte_timeout,
            "connection_log_lines": args.connection_log_lines,
        }
        optional = (
            "max_concurrent_scripts", "script_timeout", "max_connections", "metrics_port", "script_output_limit",
            "tcp_keepalive",
        )
        given = {name for name in optional if _given(args, name)}
        changes = (
            args.trust or args.remove_trust or args.reset_trust or args.allowed_root
            or args.remove_allowed_root or args.reset_allowed_roots or given
            or args.listen is not None or args.remove_poll_server
            or any(v is not None for v in settings.values())
        )
        if not changes:
            raise UsageError(
                "tentacle configure: nothing to change; give --trust, --port, --script-timeout "
                "or another setting (see 'tentacle configure --help')"
            )
        config = self.config_file.load()
        if args.reset_trust:
            config = _evolve(config, trusted_thumbprints=())
            self.out.write("Removed every trusted server\n")
        for t in args.remove_trust:
            config = config.distrust(t)
            self.out.write(f"No longer trusting {t}\n")
        for t in args.trust:
            config = config.trust(t)
            self.out.write(f"Trusting {t}\n")
        roots = list(config.allowed_roots)
        if args.reset_allowed_roots:
            roots = []
        for folder in args.remove_allowed_root:
            path = Path(folder).expanduser().absolute()
            if path not in roots:
                raise CommandError(f"{path} is not an allowed root (see 'tentacle show-configuration')")
            roots.remove(path)
        for folder in args.allowed_root:
            path = Path(folder).expanduser().absolute()
            if path not in roots:
                roots.append(path)
        changed: dict[str, Any] = {}
        if tuple(roots) != config.allowed_roots:
            changed["allowed_roots"] = tuple(roots)
        if args.port is not None:
            changed["port"] = args.port
        if args.listen_ip is not None:
            changed["listen_address"] = None if args.listen_ip == "any" else args.listen_ip
        if args.app is not None:
            changed["application_directory"] = Path(args.app).expanduser().absolute()
        for name in (
            "handshake_timeout", "workspace_max_age", "audit_log", "instance_name", "proxy",
            "max_unauthenticated_connections", "max_unauthenticated_per_address", "first_byte_timeout",
            "connection_log_lines",
        ):
            if settings[name] is not None:
                changed[name] = settings[name]
        for name in given:
            changed[name] = getattr(args, name)
        if args.listen is not None:
            changed["listen"] = args.listen
        for address in args.remove_poll_server:
            config = config.remove_polling_server(address)
            self.out.write(f"No longer polling {address}\n")
        if args.listen is False and not config.polling_servers:
            raise CommandError(
                "an agent that does not listen must poll a server; add one with 'tentacle poll-server' first"
            )
        updated = _evolve(config, **changed)
        before, after = config.to_json(), updated.to_json()
        for key in after:
            if key in ("trusted-thumbprints", "polling-servers") or before[key] == after[key] and not _named(changed, key):
                continue
            when = "a running agent applies it within seconds" if key in LIVE_SETTINGS else "takes effect on restart"
            self.out.write(f"{_LABELS[key]} set to {_describe(after[key], _UNITS.get(key, ''), key)} ({when})\n")
        self.config_file.save(updated)
        return 0

    def poll_server(self, args: argparse.Namespace) -> int:
        try:
            host, port = split_host_port(args.server_address, DEFAULT_POLLING_PORT)
        except ValueError as e:
            raise UsageError(f"tentacle poll-server: --server-address: {e}") from None
        config = self.config_file.load()
        config, entry = config.add_polling_server(
            host, port, args.server_thumbprint, args.subscription_id, args.connections, args.proxy
        )
        self.config_file.save(config)
        self.out.write(
            f"Polling {entry.address} ({entry.thumbprint}) as {entry.subscription_id} "
            f"over {entry.connections} connection(s){' through ' + _redacted(entry.proxy) if entry.proxy else ''}\n"
            f"Subscription id: {entry.subscription_id}\n"
        )
        return 0

    def show_configuration(self, args: argparse.Namespace) -> int:
        config = self.config_file.load()
        identity = self.identities.load() if self.identities.exists() else None
        if args.format == "json":
            data: dict[str, Any] = {"home": str(self.home), **config.to_json()}
            if isinstance(data.get("proxy"), str):
                data["proxy"] = _redacted(data["proxy"])
            for server in data.get("polling-servers", []):
                if server.get("proxy"):
                    server["proxy"] = _redacted(server["proxy"])
            data["instance"] = self.instance.name if self.instance else None
            data["thumbprint"] = identity.thumbprint if identity else None
            json.dump(data, self.out, indent=2)
            self.out.write("\n")
            return 0
        for label, value in _settings_text(self, config, identity):
            self.out.write(f"{label}:{value}\n" if value.startswith("\n") else f"{label + ':':<23}{value}\n")
        return 0

    # --- running --------------------------------------------------------------------

    def run(self, args: argparse.Namespace) -> int:
        from twisted.python.usage import UsageError as TwistdUsageError

        from tentacle.tap import CannotStart, run_twistd

        os.environ[logs.FORMAT_VARIABLE] = args.log_format
        os.environ[logs.LEVEL_VARIABLE] = args.log_level
        os.environ[logs.MAX_SIZE_VARIABLE] = str(args.log_max_size)
        if args.log_file:
            os.environ[logs.FILE_VARIABLE] = os.path.abspath(args.log_file)
        privileges = self._drop_to(args.user) if args.user else []
        arguments = [
            "--nodaemon", "--pidfile=", "--umask=0077", "--logger", "tentacle.logs.observer", *privileges,
            "tentacle", "--home", str(self.home),
        ]
        fresh = None if self.environ.get(IN_PROCESS_VARIABLE) else _fresh_interpreter()
        if fresh is not None:
            # A fresh interpreter for the agent (see tentacle.daemon): this
            # command's modules would otherwise stay in its memory for good.
            self.out.flush()
            self.err.flush()
            os.execv(fresh[0], [*fresh, "-m", "tentacle.daemon", *arguments])
        sys.argv = ["twistd", *arguments]
        try:
            run_twistd(arguments)
        except TwistdUsageError as e:
            raise CommandError(str(e)) from None
        except CannotStart as e:
            raise CommandError(str(e)) from None
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

    def hub(self, args: argparse.Namespace) -> int:
        from tentacle.hub.cli import main as hub_main

        return hub_main([*(["--home", args.hub_home] if args.hub_home else []), "run"], self.out)

    def livez(self, args: argparse.Namespace) -> int:
        path = self.home / HEARTBEAT_FILE
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            raise CommandError(f"no agent is running for {self.home} (no heartbeat at {path})") from None
        if age > args.max_age:
            raise CommandError(f"the agent's heartbeat is {age:.0f} s old (more than {args.max_age:g} s)")
        self.out.write(f"alive: heartbeat {age:.0f} s ago\n")
        cut_off = []
        for line in path.read_text().splitlines()[1:]:
            words = line.split()
            if len(words) == 4 and words[0] == "polling":
                _, address, subscription, counts = words
                self.out.write(f"polling {address} as {subscription}: {counts} connection(s) up\n")
                if counts.startswith("0/"):
                    cut_off.append(address)
        if cut_off:
            raise CommandError(f"not connected to the polling server(s) {', '.join(cut_off)}")
        return 0

    def metrics(self, args: argparse.Namespace) -> int:
        path = self.home / METRICS_FILE
        if not (self.home / HEARTBEAT_FILE).exists():
            last = f"; the counts it published when it last stopped are in {path}" if path.exists() else ""
            raise CommandError(f"no agent is running for {self.home}{last}")
        try:
            self.out.write(path.read_text())
        except FileNotFoundError:
            raise CommandError(f"no agent is running for {self.home} (no metrics at {path})") from None
        return 0

    def service(self, args: argparse.Namespace) -> int:
        unit = Unit(self.instance.name if self.instance else "default", self.home, args.user, args.python)
        if args.user and args.action in ("install", "print"):
            self._check_reachable(args.user, Path(args.python))
        if args.systemctl is not None:  # given explicitly: trust it is in charge
            systemd = Systemd(Path(args.unit_dir), args.systemctl or None, booted=True)
        else:
            systemd = Systemd(Path(args.unit_dir))
        try:
            if args.action == "print":
                self.out.write(unit.render())
            elif args.action == "install":
                path = systemd.install(unit)
                where = f"--instance {self.instance.name} " if self.instance else ""
                self.out.write(f"Installed and enabled {path}; start it with 'tentacle {where}service --start'\n")
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

    def _check_reachable(self, user: str, python: Path) -> None:
        """
        The unit runs C{python} as C{user}: warn about a unit that cannot
        start, such as one pointing into root's home.  (A warning, since
        ACLs, which are not read, may open what the mode bits close.)
        """
        import tentacle
        from tentacle.access import Account, unreachable

        try:
            account = Account.named(user)
        except KeyError:
            raise CommandError(f"there is no user {user!r}; create it first (see 'tentacle service --help')") from None
        for path, want in (
            (python, os.R_OK | os.X_OK),
            (Path(tentacle.__file__).parent / "__init__.py", os.R_OK),
            (self.home, os.R_OK | os.W_OK | os.X_OK),
        ):
            blocked = unreachable(path, account, want)
            if blocked is not None:
                self.err.write(
                    f"tentacle: warning: {user} cannot reach {path} ({blocked} is closed to it), so the "
                    "service will not start; install tentacle where every user can read it (docs/install.rst, "
                    "'A system-wide install for a service') and give the home to the user\n"
                )
                return


def _given(args: argparse.Namespace, name: str) -> bool:
    """
    Whether an option that takes 'none' was given (its value may be None).
    """
    return getattr(args, name, _NOT_GIVEN) is not _NOT_GIVEN

_LABELS = {
    "listen-port": "Listen port",
    "listen-address": "Listen address",
    "trusted-thumbprints": "Trusted servers",
    "application-directory": "Application directory",
    "handshake-timeout": "Handshake timeout",
    "allowed-roots": "Allowed roots",
    "max-concurrent-scripts": "Max concurrent scripts",
    "script-timeout": "Script timeout",
    "workspace-max-age": "Workspace max age",
    "max-connections": "Max connections",
    "audit-log": "Audit log",
    "metrics-port": "Metrics port",
    "listen": "Listening",
    "polling-servers": "Polling servers",
    "instance-name": "Instance name",
    "proxy": "Proxy",
    "script-output-limit": "Script output limit",
    "tcp-keepalive": "TCP keepalive",
    "max-unauthenticated-connections": "Max unauthenticated connections",
    "max-unauthenticated-per-address": "Max unauthenticated per address",
    "first-byte-timeout": "First byte timeout",
    "connection-log-lines": "Connection log lines",
}
_UNITS = {"handshake-timeout": " s", "script-timeout": " s", "workspace-max-age": " s", "first-byte-timeout": " s"}


def _named(changed: Mapping[str, Any], key: str) -> bool:
    names = {
        "listen-port": "port", "listen-address": "listen_address",
        "application-directory": "application_directory",
    }
    return names.get(key, key.replace("-", "_")) in changed


def _settings_text(command: _Command, config: TentacleConfig, identity: Identity | None) -> list[tuple[str, str]]:
    """
    Every setting, worded for people, in the order of the settings table.
    """
    trusted = "".join(f"\n  {t}" for t in config.trusted_thumbprints) or "none (every exchange is refused)"
    roots = "".join(f"\n  {r}" for r in config.allowed_roots) or "any path"
    metrics = f"http://127.0.0.1:{config.metrics_port}/metrics" if config.metrics_port else "off"
    audit = f"on ({config.home / 'Logs' / 'audit.log'})" if config.audit_log else "off"
    return [
        ("Home", str(command.home)),
        ("Instance", command.instance.name if command.instance else "none (no --instance)"),
        ("Certificate", identity.thumbprint if identity else "none (run tentacle new-certificate)"),
        ("Listen port", str(config.port)),
        ("Listen address", config.listen_address or "any (IPv4 and IPv6)"),
        ("Application directory", str(config.applications)),
        ("Handshake timeout", f"{config.handshake_timeout:g} s"),
        ("Max connections", str(config.max_connections) if config.max_connections else "no limit"),
        ("Max unauthenticated", f"{config.max_unauthenticated_connections}, "
                                f"{config.max_unauthenticated_per_address} per address"),
        ("First byte timeout", f"{config.first_byte_timeout:g} s"),
        ("Connection log lines", f"{config.connection_log_lines} per kind per 10 s"),
        ("Max concurrent scripts", str(config.max_concurrent_scripts) if config.max_concurrent_scripts else "no limit"),
        ("Script timeout", f"{config.script_timeout:g} s" if config.script_timeout else "none (scripts may run forever)"),
        ("Workspace max age", f"{config.workspace_max_age:g} s"),
        ("Allowed roots", roots),
        ("Audit log", audit),
        ("Metrics port", metrics),
        ("Trusted servers", trusted),
        ("Listening", "yes" if config.listen else "no (polling only)"),
        ("Servers", _servers_text(config)),
    ]


def _servers_text(config: TentacleConfig) -> str:
    """
    Each server as Tentacle lists them: its style (1 listening, 2 polling),
    address and subscription id.
    """
    lines = [f"\n  {t}  style 1 (listening)" for t in config.trusted_thumbprints]
    lines += [
        f"\n  {p.thumbprint}  style 2 (polling)  {p.address}  {p.subscription_id}  "
        f"{p.connections} connection(s){'  through ' + _redacted(p.proxy) if p.proxy else ''}"
        for p in config.polling_servers
    ]
    return "".join(lines) or "none"


def _redacted(url: str) -> str:
    """
    A proxy URL without its password, for output.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def _evolve(config: TentacleConfig, **changes: Any) -> TentacleConfig:
    return attrs.evolve(config, **changes)


def _resolve(
    args: argparse.Namespace, registry: InstanceRegistry, environ: Mapping[str, str]
) -> tuple[Path, Instance | None]:
    """
    The home a command works on: C{--home}, else the instance's, else
    C{$TENTACLE_HOME}, else C{~/.tentacle}.
    """
    if args.handler in _REGISTRY_COMMANDS:
        return Path(args.home or "."), None
    if args.home and args.instance:
        raise UsageError("tentacle: give --home or --instance, not both (see 'tentacle --help')")
    instance = registry.get(args.instance) if args.instance else None
    home = instance.home if instance else resolve_home(args.home, environ)
    if args.handler in _READERS and not home.is_dir():
        raise CommandError(
            f"{home} is not a tentacle home (it does not exist): check --home, --instance and "
            "$TENTACLE_HOME, or create it with 'tentacle create-instance NAME' or a first 'tentacle run'"
        )
    return home, instance


def main(
    argv: Sequence[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    environ = os.environ if environ is None else environ
    _help_output.set(out)
    try:
        try:
            # No name for the parser: it is garbage once the arguments are
            # read, not kept for as long as the agent runs.
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help and --version
            return int(e.code or 0)
        registry = InstanceRegistry(default_registry(environ))
        home, instance = _resolve(args, registry, environ)
        command = _Command(home, out, err, registry, instance, environ)
        return int(getattr(command, args.handler)(args))
    except UsageError as e:
        err.write(f"{e}\n")
        return 2
    except (CommandError, ConfigError, IdentityError, InstanceError, OSError) as e:
        err.write(f"tentacle: error: {failure_sentence(e)}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
