"""
A hub's configuration: its home (identity, C{hub.json}, logs), the polling
port, whom it trusts (polling agents, and the CLI users who reach them
through it) and which agent may claim which subscription.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import attrs

from tentacle.admission import (
    DEFAULT_CONNECTION_LOG_LINES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_UNAUTHENTICATED,
    AdmissionLimits,
)
from tentacle.config import (
    ConfigError,
    SettingsFile,
    check_listen_address,
    check_log_lines,
    check_port,
    check_timeout,
)
from tentacle.halibut.handshake import normalize_subscription
from tentacle.identity import normalize_thumbprint

DEFAULT_HUB_PORT = 10943
DEFAULT_COLLECT_TIMEOUT = 120.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
HUB_CONFIG_FILE = "hub.json"
HUB_HOME_ENVIRONMENT_VARIABLE = "TENTACLE_HUB_HOME"


def resolve_hub_home(explicit: str | None, environ: Mapping[str, str] = os.environ) -> Path:
    """
    The hub's home: C{--home}, else C{$TENTACLE_HUB_HOME}, else C{~/.tentacle-hub}.
    """
    chosen = explicit or environ.get(HUB_HOME_ENVIRONMENT_VARIABLE) or "~/.tentacle-hub"
    return Path(chosen).expanduser().absolute()


def _thumbprints(values: object) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of thumbprints")
    return tuple(dict.fromkeys(normalize_thumbprint(v) for v in values))


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, not {value!r}")
    return value


def _count_or_none(value: object) -> int | None:
    return None if value is None else _count(value)


def _bindings(value: object) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise ValueError("expected an object of poll://ID/ -> [thumbprints]")
    return tuple((normalize_subscription(k), _thumbprints(v)) for k, v in value.items())


@attrs.frozen
class HubConfig:
    """
    @ivar agents: the agents that may poll.
    @ivar users: the CLI users who may send requests through the hub.  Two
        lists, so that a trusted agent's key cannot drive the other agents.
    @ivar bindings: subscription -> the only thumbprints that may claim it.
    @ivar collect_timeout: seconds a request waits for its agent to collect
        it before it fails (Halibut's 2 minutes).
    @ivar max_connections: connections open at once, agents', users' and
        unauthenticated (C{None}: no limit); each agent holds one per
        polling connection it is configured with.
    @ivar max_unauthenticated_connections: of those, how many may not have
        shown a trusted certificate yet; there is no cap per address, since
        agents behind one NAT share it.
    @ivar connection_log_lines: log lines per kind and per 10 s for
        connections that never authenticate (L{tentacle.log_budget}).
    """

    home: Path
    port: int = DEFAULT_HUB_PORT
    listen_address: str | None = None
    agents: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    bindings: tuple[tuple[str, tuple[str, ...]], ...] = ()
    collect_timeout: float = DEFAULT_COLLECT_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    max_unauthenticated_connections: int = DEFAULT_MAX_UNAUTHENTICATED
    connection_log_lines: int = DEFAULT_CONNECTION_LOG_LINES

    @property
    def admission(self) -> AdmissionLimits:
        """
        The polling port's connection budgets (no cap per address).
        """
        return AdmissionLimits(
            max_connections=self.max_connections,
            max_unauthenticated=self.max_unauthenticated_connections,
            max_unauthenticated_per_address=self.max_unauthenticated_connections,
            handshake_timeout=self.handshake_timeout,
            connection_log_lines=self.connection_log_lines,
        )

    def trust(self, thumbprint: str, as_user: bool = False) -> HubConfig:
        """
        Trust an agent (or, C{as_user}, a CLI user).
        """
        t = normalize_thumbprint(thumbprint)
        if as_user:
            return self if t in self.users else attrs.evolve(self, users=self.users + (t,))
        return self if t in self.agents else attrs.evolve(self, agents=self.agents + (t,))

    def distrust(self, thumbprint: str, as_user: bool = False) -> HubConfig:
        t = normalize_thumbprint(thumbprint)
        current = self.users if as_user else self.agents
        if t not in current:
            raise ConfigError(f"{t} is not a trusted {'user' if as_user else 'agent'}")
        kept = tuple(x for x in current if x != t)
        return attrs.evolve(self, users=kept) if as_user else attrs.evolve(self, agents=kept)

    def bind(self, subscription: str, thumbprint: str) -> HubConfig:
        """
        Let C{thumbprint} claim C{subscription} (and, once bound, only the
        thumbprints bound to it).
        """
        sub, t = normalize_subscription(subscription), normalize_thumbprint(thumbprint)
        current = dict(self.bindings)
        current[sub] = tuple(dict.fromkeys(current.get(sub, ()) + (t,)))
        return attrs.evolve(self, bindings=tuple(current.items()))

    def unbind(self, subscription: str) -> HubConfig:
        sub = normalize_subscription(subscription)
        current = dict(self.bindings)
        if current.pop(sub, None) is None:
            raise ConfigError(f"{sub} is not bound")
        return attrs.evolve(self, bindings=tuple(current.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "listen-port": self.port,
            "listen-address": self.listen_address,
            "trusted-agents": list(self.agents),
            "trusted-users": list(self.users),
            "bindings": {sub: list(thumbprints) for sub, thumbprints in self.bindings},
            "collect-timeout": self.collect_timeout,
            "handshake-timeout": self.handshake_timeout,
            "max-connections": self.max_connections,
            "max-unauthenticated-connections": self.max_unauthenticated_connections,
            "connection-log-lines": self.connection_log_lines,
        }

    @classmethod
    def from_json(cls, home: Path, data: object) -> HubConfig:
        if not isinstance(data, dict):
            raise ConfigError("the configuration must be a JSON object")
        unknown = set(data) - set(_SETTINGS)
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


_SETTINGS: dict[str, tuple[str, Any]] = {
    "listen-port": ("port", check_port),
    "listen-address": ("listen_address", check_listen_address),
    "trusted-agents": ("agents", _thumbprints),
    "trusted-users": ("users", _thumbprints),
    "bindings": ("bindings", _bindings),
    "collect-timeout": ("collect_timeout", check_timeout),
    "handshake-timeout": ("handshake_timeout", check_timeout),
    "max-connections": ("max_connections", _count_or_none),
    "max-unauthenticated-connections": ("max_unauthenticated_connections", _count),
    "connection-log-lines": ("connection_log_lines", check_log_lines),
}


@attrs.frozen
class HubConfigFile(SettingsFile[HubConfig]):
    """
    The hub's C{hub.json}.
    """

    file_name: ClassVar[str] = HUB_CONFIG_FILE

    def parse(self, data: object) -> HubConfig:
        return HubConfig.from_json(self.home, data)

    def default(self) -> HubConfig:
        return HubConfig(home=self.home)
