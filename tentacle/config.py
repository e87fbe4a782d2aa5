"""
An instance's configuration: where its home is, and the human-readable file in it.

Only L{tentacle.tap} and L{tentacle.cli} read configuration files; everything
deeper is handed a L{TentacleConfig}.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Mapping

import attrs

from tentacle.fsutil import atomic_write
from tentacle.identity import normalize_thumbprint

DEFAULT_PORT = 10933
DEFAULT_HANDSHAKE_TIMEOUT = 30.0
DEFAULT_WORKSPACE_MAX_AGE = 86400.0
DEFAULT_MAX_CONNECTIONS = 1000
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


@attrs.frozen
class TentacleConfig:
    """
    Everything an agent needs to run, apart from its identity.

    @ivar listen_address: an IP literal, or None to listen on every
        interface (IPv6 and IPv4 through one dual-stack socket).
    @ivar trusted_thumbprints: canonical upper-case SHA-1 or SHA-256 digests
        of the servers' certificates; several at once allow rotation.
    @ivar handshake_timeout: seconds a new connection has to finish TLS and
        send its first request before it is cut off.
    @ivar allowed_roots: when not empty, file transfers are confined to
        these folders; empty means any path, as Tentacle allows.
    @ivar max_concurrent_scripts: scripts beyond this many wait as Pending
        (None: no limit, as Tentacle).
    @ivar script_timeout: seconds after which a running script is killed
        and ends with -44 (None: never, as Tentacle).
    @ivar workspace_max_age: finished script workspaces older than this
        many seconds are removed.
    @ivar max_connections: connections beyond this many open at once are
        refused before TLS (None: no limit).
    @ivar audit_log: keep C{<home>/Logs/audit.log}.
    @ivar metrics_port: serve Prometheus metrics on this loopback port.
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
    audit_log: bool = True
    metrics_port: int | None = None

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
            "audit-log": self.audit_log,
            "metrics-port": self.metrics_port,
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


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, not {value!r}")
    return value


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
    "audit-log": ("audit_log", lambda v: _boolean(v)),
    "metrics-port": ("metrics_port", lambda v: _optional(v, check_port)),
}
_KNOWN_KEYS = frozenset(_SETTINGS)

#: Settings a running agent applies when its file changes; the others are
#: read once, at start (the agent logs that a restart is needed).
LIVE_SETTINGS = frozenset({
    "trusted-thumbprints", "allowed-roots", "max-concurrent-scripts", "script-timeout",
    "handshake-timeout", "max-connections", "workspace-max-age",
})


def changed_settings(old: TentacleConfig, new: TentacleConfig) -> list[tuple[str, Any, Any]]:
    """
    The settings that differ, as C{(key, old value, new value)} in the
    file's spelling, in the order of the settings table.
    """
    before, after = old.to_json(), new.to_json()
    return [(key, before[key], after[key]) for key in _SETTINGS if before[key] != after[key]]


@attrs.frozen
class ConfigFile:
    """
    The instance's C{tentacle.json}: JSON, indented for humans, replaced atomically.
    """

    home: Path

    @property
    def path(self) -> Path:
        return self.home / CONFIG_FILE

    def load(self) -> TentacleConfig:
        """
        The stored configuration, or the defaults when there is no file yet.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return TentacleConfig(home=self.home)
        except OSError as e:
            raise ConfigError(f"cannot read {self.path}: {e.strerror}") from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{self.path} is not valid JSON: {e}") from None
        try:
            return TentacleConfig.from_json(self.home, data)
        except ConfigError as e:
            raise ConfigError(f"{self.path}: {e}") from None

    def save(self, config: TentacleConfig) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config.to_json(), indent=2) + "\n"
        atomic_write(self.path, text.encode("utf-8"), mode=0o644)

    def signature(self) -> tuple[int, int, int] | None:
        """
        What changes whenever the file is replaced or edited, cheap to poll.
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)
