"""
An instance's configuration: where its home is, and the human-readable file in it.

Only L{tentacle.tap} and L{tentacle.cli} read configuration files; everything
deeper is handed a L{TentacleConfig}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any, ClassVar, Generic, Mapping, TypeVar
from urllib.parse import quote, unquote, urlsplit

import attrs

from tentacle.admission import (
    DEFAULT_CONNECTION_LOG_LINES,
    DEFAULT_FIRST_BYTE_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UNAUTHENTICATED,
    DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS,
    AdmissionLimits,
)
from tentacle.fsutil import atomic_write, private_folder
from tentacle.halibut.connection import KeepAlive
from tentacle.halibut.handshake import normalize_subscription
from tentacle.identity import normalize_thumbprint
from tentacle.systemd import check_instance

DEFAULT_PORT = 10933
DEFAULT_INSTANCE = "default"
DEFAULT_WORKSPACE_MAX_AGE = 86400.0
DEFAULT_POLLING_PORT = 10943
MAX_POLLING_CONNECTIONS = 512
#: Overrides every polling server's connection count, as in Tentacle.
POLLING_CONNECTIONS_ENVIRONMENT_VARIABLE = "TentaclePollingConnectionCount"
#: Tentacle's alphabet for subscription ids: no 0/O or 1/I to misread.
_SUBSCRIPTION_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
#: The smallest script-output-limit: room for the marker lines and more.
MIN_SCRIPT_OUTPUT_LIMIT = 64 * 1024
CONFIG_FILE = "tentacle.json"
HOME_ENVIRONMENT_VARIABLE = "TENTACLE_HOME"


class ConfigError(Exception):
    """
    The configuration is unreadable or holds a value we cannot use.
    """


def resolve_home(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """
    The instance home: C{--home}, else C{$TENTACLE_HOME}, else C{~/.tentacle}.
    """
    chosen = explicit or environ.get(HOME_ENVIRONMENT_VARIABLE) or "~/.tentacle"
    return Path(chosen).expanduser().absolute()


def check_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"the port must be a whole number from 1 to 65535, not {value!r}")
    return value


def _any_port(value: int) -> None:
    """
    Port 0 (any free port) is fine for embedding and tests, not for users.
    """
    if value != 0:
        check_port(value)


def check_listen_address(value: object) -> str | None:
    """
    An IP literal, or None (or "any") for every interface, IPv4 and IPv6.
    """
    if value is None or value in ("", "any", "*"):
        return None
    if not isinstance(value, str):
        raise ValueError(f"the listen address must be an IP address, not {value!r}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address (use an IPv4 or IPv6 address, or 'any')"
        ) from None


def check_timeout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"a timeout must be a positive number of seconds, not {value!r}")
    return float(value)


@attrs.frozen
class ProxySetting:
    """
    How this machine reaches the outside, as Tentacle's proxy settings say
    it: the system's proxy (the default), none at all, or a given HTTP proxy.
    Scripts are told (C{TentacleUseDefaultProxy}, C{TentacleProxyHost}, ...)
    so Calamari and the like use the same.

    In C{tentacle.json}: C{"proxy": null} (the system's), C{"none"}, or
    C{"http://[user:password@]host[:port]"}.
    """

    use_default: bool = True
    host: str = ""
    port: int = 80
    username: str = ""
    password: str = ""

    @classmethod
    def parse(cls, value: object) -> ProxySetting:
        if value is None:
            return cls()
        if value == "none":
            return cls(use_default=False)
        if not isinstance(value, str):
            raise ValueError(f"expected null, 'none' or http://[user:password@]host[:port], not {value!r}")
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "http" or not parts.hostname or port == -1 or parts.path not in ("", "/"):
            raise ValueError(f"expected null, 'none' or http://[user:password@]host[:port], not {value!r}")
        return cls(
            use_default=False,
            host=parts.hostname,
            port=port or 80,
            username=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
        )

    def to_json(self) -> str | None:
        if self.use_default:
            return None
        if not self.host:
            return "none"
        credentials = ""
        if self.username or self.password:
            credentials = quote(self.username, safe="")
            if self.password:
                credentials += ":" + quote(self.password, safe="")
            credentials += "@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{credentials}{host}:{self.port}"


def _thumbprints(values: object) -> tuple[str, ...]:
    """
    Canonical thumbprints (upper case, no colons), each once, in order:
    the library normalises them exactly as C{tentacle configure --trust}.
    """
    if isinstance(values, str) or not isinstance(values, (list, tuple, set, frozenset)) or not all(
        isinstance(v, str) for v in values
    ):
        raise ValueError("trusted-thumbprints must be a list of strings")
    unique: dict[str, None] = {}
    for v in values:
        unique[normalize_thumbprint(v)] = None
    return tuple(unique)


def new_subscription_id() -> str:
    """
    A fresh polling subscription, as Tentacle makes them: C{poll://} and 20
    random characters, lower case.
    """
    return "poll://" + "".join(secrets.choice(_SUBSCRIPTION_ALPHABET) for _ in range(20)).lower() + "/"


def check_subscription_id(value: object) -> str:
    """
    C{poll://ID/}, normalised to lower case with the trailing slash.
    """
    if not isinstance(value, str) or not value.lower().startswith("poll://"):
        raise ValueError(f"a subscription id is poll://ID/, not {value!r}")
    return normalize_subscription(value)


def check_polling_connections(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_POLLING_CONNECTIONS:
        raise ValueError(
            f"the polling connection count must be a whole number from 1 to {MAX_POLLING_CONNECTIONS}, not {value!r}"
        )
    return value


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """
    C{host}, C{host:port}, C{[v6]:port} or a bare IPv6 address.

    @raise ValueError: for an empty host or a bad port.
    """
    text = value.strip()
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{value!r} has an unclosed [")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{value!r} is not host:port")
            port = _parse_port(rest[1:], value)
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = _parse_port(number, value)
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise ValueError(f"{value!r} is not host[:port]")
    return host, port


def _parse_port(text: str, whole: str) -> int:
    try:
        return check_port(int(text))
    except ValueError:
        raise ValueError(f"{whole!r}: the port must be a whole number from 1 to 65535") from None


@attrs.frozen
class PolledServer:
    """
    A server this agent polls: it dials C{host:port} (through C{proxy}, an
    C{http://[user:password@]host:port} URL, when set), expects the
    certificate C{thumbprint}, and asks for the work queued for
    C{subscription_id}, over C{connections} connections at once.
    """

    host: str
    thumbprint: str = attrs.field(converter=normalize_thumbprint)
    subscription_id: str = attrs.field(converter=check_subscription_id)
    port: int = attrs.field(default=DEFAULT_POLLING_PORT, validator=lambda _i, _a, v: check_port(v))
    connections: int = attrs.field(default=1, validator=lambda _i, _a, v: check_polling_connections(v))
    proxy: str | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "thumbprint": self.thumbprint,
            "subscription-id": self.subscription_id,
            "connections": self.connections,
            "proxy": self.proxy,
        }

    @classmethod
    def from_json(cls, data: object) -> PolledServer:
        if not isinstance(data, dict):
            raise ValueError("each polling server must be a JSON object")
        unknown = set(data) - {"address", "thumbprint", "subscription-id", "connections", "proxy"}
        if unknown:
            raise ValueError(f"unknown polling server setting(s): {', '.join(sorted(unknown))}")
        for key in ("address", "thumbprint", "subscription-id"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"a polling server needs {key!r}")
        host, port = split_host_port(data["address"], DEFAULT_POLLING_PORT)
        proxy = data.get("proxy")
        if proxy is not None and not isinstance(proxy, str):
            raise ValueError("a polling server's proxy is a URL or null")
        return cls(
            host=host, port=port, thumbprint=data["thumbprint"], subscription_id=data["subscription-id"],
            connections=data.get("connections", 1), proxy=proxy,
        )


def _polling_servers(values: object) -> tuple[PolledServer, ...]:
    if not isinstance(values, (list, tuple)):
        raise ValueError("expected a list of polling servers")
    return tuple(PolledServer.from_json(v) for v in values)


@attrs.frozen
class TentacleConfig:
    """
    Everything an agent needs to run, apart from its identity.

    @ivar listen_address: an IP literal, or None to listen on every
        interface (IPv6 and IPv4 through one dual-stack socket).
    @ivar trusted_thumbprints: canonical upper-case SHA-1 or SHA-256 digests
        of the servers' certificates; several at once allow rotation.
    @ivar handshake_timeout: seconds a new connection has to finish TLS,
        send its first request and, if it is a trusted server, its identity
        line, before it is cut off.
    @ivar first_byte_timeout: seconds a new connection has to send its
        first byte of TLS.
    @ivar connection_log_lines: log lines per kind and per 10 s for
        connections that never authenticate (L{tentacle.log_budget}).
    @ivar allowed_roots: when not empty, file transfers are confined to
        these folders; empty means any path, as Tentacle allows.
    @ivar max_concurrent_scripts: scripts beyond this many wait as Pending
        (None: no limit, as Tentacle).
    @ivar script_timeout: seconds after which a running script is killed
        and ends with -44 (None: never, as Tentacle).
    @ivar workspace_max_age: finished script workspaces older than this
        many seconds are removed.
    @ivar max_connections: connections open at once, authenticated or not
        (None: no limit); a newcomer beyond it closes the oldest
        unauthenticated one, and is refused before TLS only when all are
        authenticated.
    @ivar max_unauthenticated_connections: of those, how many may not have
        shown a trusted certificate yet; beyond it the oldest of the most
        crowded address is closed.
    @ivar max_unauthenticated_per_address: of those, how many from one
        address (an IPv6 /64); beyond it that address's oldest is closed.
    @ivar audit_log: keep C{<home>/Logs/audit.log}.
    @ivar metrics_port: serve Prometheus metrics on this loopback port.
    @ivar listen: accept connections on C{port}; off for an agent that
        only polls.
    @ivar polling_servers: the servers this agent dials for work; each one's
        thumbprint is trusted for listening too, as Tentacle trusts it.
    @ivar instance_name: the name scripts see as C{TentacleInstanceName}
        (as C{tentacle service --instance} names the unit).
    @ivar proxy: this machine's proxy, told to scripts.
    @ivar script_output_limit: a script's stored output (its C{Output.log})
        stops growing at this many bytes; its last lines are kept (None:
        no limit).
    @ivar tcp_keepalive: TCP keepalive on every connection, accepted or
        dialled (None: off); Halibut's 15 s idle, 5 s interval, 10 probes
        by default.
    """

    home: Path
    port: int = attrs.field(default=DEFAULT_PORT, validator=lambda _i, _a, v: _any_port(v))
    listen_address: str | None = None
    trusted_thumbprints: tuple[str, ...] = attrs.field(default=(), converter=_thumbprints)
    application_directory: Path | None = None
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    allowed_roots: tuple[Path, ...] = ()
    max_concurrent_scripts: int | None = None
    script_timeout: float | None = None
    workspace_max_age: float = DEFAULT_WORKSPACE_MAX_AGE
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    max_unauthenticated_connections: int = DEFAULT_MAX_UNAUTHENTICATED
    max_unauthenticated_per_address: int = DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS
    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    connection_log_lines: int = DEFAULT_CONNECTION_LOG_LINES
    audit_log: bool = True
    metrics_port: int | None = None
    listen: bool = True
    polling_servers: tuple[PolledServer, ...] = ()
    instance_name: str = DEFAULT_INSTANCE
    proxy: ProxySetting = ProxySetting()
    script_output_limit: int | None = None
    tcp_keepalive: KeepAlive | None = KeepAlive()

    @property
    def admission(self) -> AdmissionLimits:
        """
        The listener's connection budgets and deadlines.
        """
        return AdmissionLimits(
            max_connections=self.max_connections,
            max_unauthenticated=self.max_unauthenticated_connections,
            max_unauthenticated_per_address=self.max_unauthenticated_per_address,
            first_byte_timeout=self.first_byte_timeout,
            handshake_timeout=self.handshake_timeout,
            connection_log_lines=self.connection_log_lines,
        )

    @property
    def trusted(self) -> tuple[str, ...]:
        """
        Every thumbprint a connection may present: the trust list and the
        polling servers'.
        """
        unique = dict.fromkeys(self.trusted_thumbprints + tuple(p.thumbprint for p in self.polling_servers))
        return tuple(unique)

    def add_polling_server(
        self,
        host: str,
        port: int,
        thumbprint: str,
        subscription_id: str | None = None,
        connections: int = 1,
        proxy: str | None = None,
    ) -> tuple[TentacleConfig, PolledServer]:
        """
        Poll one more server (or replace the entry for the same address).
        Without a subscription id, the one already used with this
        thumbprint is reused, as Tentacle's C{poll-server} does for another
        node of the same server, else a new one is made.
        """
        t = normalize_thumbprint(thumbprint)
        if subscription_id is None:
            same = [p.subscription_id for p in self.polling_servers if p.thumbprint == t]
            subscription_id = same[0] if same else new_subscription_id()
        entry = PolledServer(host, t, subscription_id, port, connections, proxy)
        others = tuple(p for p in self.polling_servers if (p.host.lower(), p.port) != (host.lower(), port))
        return attrs.evolve(self, polling_servers=others + (entry,)), entry

    def remove_polling_server(self, address: str) -> TentacleConfig:
        """
        @param address: C{host[:port]} as configured, or a thumbprint
            (every server with it).
        @raise ConfigError: nothing matched, so a typo does not pass silently.
        """
        try:
            t: str | None = normalize_thumbprint(address)
        except ValueError:
            t = None
        try:
            host, port = split_host_port(address, DEFAULT_POLLING_PORT)
        except ValueError:
            host, port = "", 0
        kept = tuple(
            p for p in self.polling_servers
            if p.thumbprint != t and (p.host.lower(), p.port) != (host.lower(), port)
        )
        if len(kept) == len(self.polling_servers):
            raise ConfigError(f"no polling server {address!r} is configured")
        return attrs.evolve(self, polling_servers=kept)

    def polling_connections(self, server: PolledServer, environ: Mapping[str, str] = os.environ) -> int:
        """
        How many connections to keep to C{server}: its setting, or
        C{$TentaclePollingConnectionCount} for every server.

        @raise ConfigError: the variable is not a count from 1 to 512.
        """
        override = environ.get(POLLING_CONNECTIONS_ENVIRONMENT_VARIABLE)
        if override is None:
            return server.connections
        try:
            return check_polling_connections(int(override))
        except ValueError as e:
            raise ConfigError(f"${POLLING_CONNECTIONS_ENVIRONMENT_VARIABLE}: {e}") from None

    @property
    def applications(self) -> Path:
        """
        Where deployed applications go; by default inside the home.
        """
        return self.application_directory or self.home / "Applications"

    def trust(self, thumbprint: str) -> TentacleConfig:
        t = normalize_thumbprint(thumbprint)
        if t in self.trusted_thumbprints:
            return self
        return attrs.evolve(self, trusted_thumbprints=self.trusted_thumbprints + (t,))

    def distrust(self, thumbprint: str) -> TentacleConfig:
        """
        @raise ConfigError: when the thumbprint was not trusted, so a typo
            does not pass silently.
        """
        t = normalize_thumbprint(thumbprint)
        if t not in self.trusted_thumbprints:
            raise ConfigError(f"{t} is not in the trust list")
        return attrs.evolve(
            self,
            trusted_thumbprints=tuple(x for x in self.trusted_thumbprints if x != t),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "listen-port": self.port,
            "listen-address": self.listen_address,
            "trusted-thumbprints": list(self.trusted_thumbprints),
            "application-directory": str(self.applications),
            "handshake-timeout": self.handshake_timeout,
            "allowed-roots": [str(p) for p in self.allowed_roots],
            "max-concurrent-scripts": self.max_concurrent_scripts,
            "script-timeout": self.script_timeout,
            "workspace-max-age": self.workspace_max_age,
            "max-connections": self.max_connections,
            "max-unauthenticated-connections": self.max_unauthenticated_connections,
            "max-unauthenticated-per-address": self.max_unauthenticated_per_address,
            "first-byte-timeout": self.first_byte_timeout,
            "connection-log-lines": self.connection_log_lines,
            "audit-log": self.audit_log,
            "metrics-port": self.metrics_port,
            "listen": self.listen,
            "polling-servers": [p.to_json() for p in self.polling_servers],
            "instance-name": self.instance_name,
            "proxy": self.proxy.to_json(),
            "script-output-limit": self.script_output_limit,
            "tcp-keepalive": self.tcp_keepalive.to_json() if self.tcp_keepalive else None,
        }

    @classmethod
    def from_json(cls, home: Path, data: object) -> TentacleConfig:
        """
        @raise ConfigError: naming the offending key.
        """
        if not isinstance(data, dict):
            raise ConfigError("the configuration must be a JSON object")
        unknown = set(data) - _KNOWN_KEYS
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for key, (name, check) in _SETTINGS.items():
            if key in data:
                try:
                    values[name] = check(data[key])
                except ValueError as e:
                    raise ConfigError(f"{key}: {e}") from None
        return cls(home=home, **values)


def _directory(value: object) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a folder path, not {value!r}")
    return Path(value).expanduser().absolute()


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


def check_log_lines(value: object) -> int:
    """
    C{connection-log-lines}: a whole number, 0 or more.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected a whole number of 0 or more, not {value!r}")
    return value


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, not {value!r}")
    return value


def _instance_name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a name, not {value!r}")
    return check_instance(value)
def check_output_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_SCRIPT_OUTPUT_LIMIT:
        raise ValueError(f"expected a number of bytes of at least {MIN_SCRIPT_OUTPUT_LIMIT}, not {value!r}")
    return value


def check_keepalive(value: object) -> KeepAlive | None:
    """
    C{{"idle": s, "interval": s, "count": n}} (any of them; Halibut's
    values for the others), or null for no keepalive.
    """
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f'expected {{"idle": 15, "interval": 5, "count": 10}} or null, not {value!r}')
    unknown = set(value) - {"idle", "interval", "count"}
    if unknown:
        raise ValueError(f"unknown keepalive setting(s): {', '.join(sorted(unknown))}")
    return KeepAlive(**value)


def _optional(value: object, check: Any) -> Any:
    return None if value is None else check(value)


def _directories(values: object) -> tuple[Path, ...]:
    if not isinstance(values, (list, tuple)):
        raise ValueError("expected a list of folder paths")
    folders = []
    for value in values:
        folder = _directory(value)
        if folder is None:
            raise ValueError("expected a list of folder paths, not a null")
        folders.append(folder)
    return tuple(folders)


_SETTINGS: dict[str, tuple[str, Any]] = {
    "listen-port": ("port", check_port),
    "listen-address": ("listen_address", check_listen_address),
    "trusted-thumbprints": ("trusted_thumbprints", _thumbprints),
    "application-directory": ("application_directory", _directory),
    "handshake-timeout": ("handshake_timeout", check_timeout),
    "allowed-roots": ("allowed_roots", lambda v: _directories(v)),
    "max-concurrent-scripts": ("max_concurrent_scripts", lambda v: _optional(v, _count)),
    "script-timeout": ("script_timeout", lambda v: _optional(v, check_timeout)),
    "workspace-max-age": ("workspace_max_age", check_timeout),
    "max-connections": ("max_connections", lambda v: _optional(v, _count)),
    "max-unauthenticated-connections": ("max_unauthenticated_connections", lambda v: _count(v)),
    "max-unauthenticated-per-address": ("max_unauthenticated_per_address", lambda v: _count(v)),
    "first-byte-timeout": ("first_byte_timeout", check_timeout),
    "connection-log-lines": ("connection_log_lines", lambda v: check_log_lines(v)),
    "audit-log": ("audit_log", lambda v: _boolean(v)),
    "metrics-port": ("metrics_port", lambda v: _optional(v, check_port)),
    "listen": ("listen", lambda v: _boolean(v)),
    "polling-servers": ("polling_servers", _polling_servers),
    "instance-name": ("instance_name", lambda v: _instance_name(v)),
    "proxy": ("proxy", ProxySetting.parse),
    "script-output-limit": ("script_output_limit", lambda v: _optional(v, check_output_limit)),
    "tcp-keepalive": ("tcp_keepalive", check_keepalive),
}
_KNOWN_KEYS = frozenset(_SETTINGS)

#: Settings a running agent applies when its file changes; the others are
#: read once, at start (the agent logs that a restart is needed).
LIVE_SETTINGS = frozenset({
    "trusted-thumbprints", "allowed-roots", "max-concurrent-scripts", "script-timeout",
    "handshake-timeout", "max-connections", "workspace-max-age", "polling-servers",
    "max-unauthenticated-connections", "max-unauthenticated-per-address", "first-byte-timeout",
    "connection-log-lines",
})


def changed_settings(old: TentacleConfig, new: TentacleConfig) -> list[tuple[str, Any, Any]]:
    """
    The settings that differ, as C{(key, old value, new value)} in the
    file's spelling, in the order of the settings table.
    """
    before, after = old.to_json(), new.to_json()
    return [(key, before[key], after[key]) for key in _SETTINGS if before[key] != after[key]]


_C = TypeVar("_C")


@attrs.frozen
class SettingsFile(Generic[_C]):
    """
    A settings file in a home: JSON, indented for humans, replaced
    atomically, readable by its owner only.  Subclasses name the file and
    say how its settings are read.
    """

    home: Path
    file_name: ClassVar[str]

    @property
    def path(self) -> Path:
        return self.home / self.file_name

    def parse(self, data: object) -> _C:
        """
        @raise ConfigError: or C{ValueError}, naming the offending key.
        """
        raise NotImplementedError

    def default(self) -> _C:
        raise NotImplementedError

    def load(self) -> _C:
        """
        The stored settings, or the defaults when there is no file yet.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return self.default()
        except OSError as e:
            raise ConfigError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{self.path} is not valid JSON: {e}") from None
        try:
            return self.parse(data)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"{self.path}: {e}") from None

    def save(self, config: Any) -> None:
        private_folder(self.home)
        text = json.dumps(config.to_json(), indent=2) + "\n"
        atomic_write(self.path, text.encode("utf-8"), mode=0o600)

    def signature(self) -> tuple[int, int, int] | None:
        """
        What changes whenever the file is replaced or edited, cheap to poll.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


@attrs.frozen
class ConfigFile(SettingsFile[TentacleConfig]):
    """
    The instance's C{tentacle.json}.
    """

    file_name: ClassVar[str] = CONFIG_FILE

    def parse(self, data: object) -> TentacleConfig:
        return TentacleConfig.from_json(self.home, data)

    def default(self) -> TentacleConfig:
        return TentacleConfig(home=self.home)
