"""
Who may hold a connection to a listener before proving who they are.

A peer that has not yet shown a trusted certificate costs the agent a file
descriptor, a TLS state and a timer, and needs nothing to get them but a
TCP handshake.  So those connections have a budget of their own, apart from
the authenticated ones, and a full budget never turns a newcomer away: it
makes room by closing the oldest connection of the address that holds the
most.  A flood from a few addresses then only ever evicts its own
connections, and a trusted server's new connection (from an address that
holds one or two) gets through every time.  Only when every place is held by
an authenticated connection is a newcomer refused.

L{Admission} is the bookkeeping alone, with no sockets or clocks, so it can
be tested exhaustively; L{tentacle.listener} acts on its decisions.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Generic, Hashable, TypeVar

import attrs

#: All connections open at once (C{max-connections}).
DEFAULT_MAX_CONNECTIONS = 1000
#: Connections that have not shown a trusted certificate yet
#: (C{max-unauthenticated-connections}).
DEFAULT_MAX_UNAUTHENTICATED = 250
#: Of those, from one source address (C{max-unauthenticated-per-address}).
DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS = 50
#: Seconds from the accept to the first byte of TLS (C{first-byte-timeout}).
DEFAULT_FIRST_BYTE_TIMEOUT = 5.0
#: Seconds from the accept to a trusted identity line (C{handshake-timeout}).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Log lines per kind and per 10 s for connections that never authenticate
#: (C{connection-log-lines}; L{tentacle.log_budget}).
DEFAULT_CONNECTION_LOG_LINES = 20

#: Connections the kernel may queue before a listener (the agent's, a
#: hub's) accepts them (capped by net.core.somaxconn, 4096 by default since
#: Linux 5.4).  Twisted's 50 made a burst of connections wait out SYN
#: retransmits of a second or more, a trusted server's among them; and a
#: flood of more sockets than the unauthenticated budget plus this queue
#: keeps the queue full, so new connections (a trusted server's too) wait
#: out SYN retransmits.
LISTEN_BACKLOG = 4096

# The reasons logged (and counted) for each way a connection is closed
# here: the name of the setting that closed it.
MAX_CONNECTIONS = "max-connections"
MAX_UNAUTHENTICATED = "max-unauthenticated-connections"
MAX_UNAUTHENTICATED_PER_ADDRESS = "max-unauthenticated-per-address"
FIRST_BYTE_TIMEOUT = "first-byte-timeout"
HANDSHAKE_TIMEOUT = "handshake-timeout"


def _at_least_one(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, not {value!r}")


def _not_negative(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be 0 or more, not {value!r}")


def _positive(_instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be a positive number of seconds, not {value!r}")


@attrs.frozen
class AdmissionLimits:
    """
    What connections may hold before and after they authenticate.

    @ivar max_connections: connections open at once, authenticated or not
        (C{None}: no limit).  It bounds the listener's file descriptors.
    @ivar max_unauthenticated: of those, how many may be still without a
        trusted certificate; so at least C{max_connections -
        max_unauthenticated} places are always kept for trusted servers.
    @ivar max_unauthenticated_per_address: of those, how many from one
        source address (an IPv6 peer's whole /64 counts as one address).
    @ivar first_byte_timeout: seconds from the accept to the first byte
        of TLS.
    @ivar handshake_timeout: seconds from the accept to the end of the
        identity line: TLS, the first request, the trust check, the identity.
    @ivar connection_log_lines: log lines of each kind (evicted, timed out,
        refused) written per 10 s for connections that never authenticate;
        the rest go on at debug level, summed up in one line.
    """

    max_connections: int | None = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_at_least_one)
    max_unauthenticated: int = attrs.field(default=DEFAULT_MAX_UNAUTHENTICATED, validator=_at_least_one)
    max_unauthenticated_per_address: int = attrs.field(
        default=DEFAULT_MAX_UNAUTHENTICATED_PER_ADDRESS, validator=_at_least_one
    )
    first_byte_timeout: float = attrs.field(default=DEFAULT_FIRST_BYTE_TIMEOUT, validator=_positive)
    handshake_timeout: float = attrs.field(default=DEFAULT_HANDSHAKE_TIMEOUT, validator=_positive)
    connection_log_lines: int = attrs.field(default=DEFAULT_CONNECTION_LOG_LINES, validator=_not_negative)


def source_of(host: str) -> str:
    """
    The address a peer is counted under: its IP, an IPv4 peer on a
    dual-stack socket as IPv4, and an IPv6 peer as its /64, since one
    machine (or one attacker) usually holds a whole /64.
    """
    text = host.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


C = TypeVar("C", bound=Hashable)


@attrs.frozen
class Eviction(Generic[C]):
    """
    A connection to close now to make room, and the limit that required it.
    """

    connection: C
    source: str
    reason: str
    limit: int


@attrs.frozen
class Decision(Generic[C]):
    """
    What to do with a new connection: whether it is admitted, and which
    unauthenticated connections to close first.
    """

    admitted: bool
    evict: tuple[Eviction[C], ...] = ()


class Admission(Generic[C]):
    """
    The connections open on one listener, by state and by source address.

    Every operation is O(1): the oldest connection overall and of each
    address come first in insertion-ordered dicts, and addresses are kept
    in buckets by how many connections they hold, so the most crowded one
    is found without a scan.
    """

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self._open: set[C] = set()
        self._authenticated: set[C] = set()
        # Unauthenticated connections, oldest first, with their source.
        self._waiting: dict[C, str] = {}
        self._by_source: dict[str, dict[C, None]] = {}
        # How many waiting connections -> the sources holding that many, in
        # the order they reached it.
        self._by_count: dict[int, dict[str, None]] = {}
        self._most = 0

    # --- the counts ------------------------------------------------------------------

    @property
    def open(self) -> int:
        return len(self._open)

    @property
    def unauthenticated(self) -> int:
        return len(self._waiting)

    def unauthenticated_from(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    @property
    def authenticated(self) -> frozenset[C]:
        return frozenset(self._authenticated)

    # --- changes ---------------------------------------------------------------------

    def admit(self, connection: C, source: str) -> Decision[C]:
        """
        Count a new (unauthenticated) connection in, closing others to make
        room; refuse it only when every place is held by an authenticated
        connection.  Evicted connections are forgotten at once.
        """
        limits = self.limits
        evicted: list[Eviction[C]] = []
        if self.unauthenticated_from(source) >= limits.max_unauthenticated_per_address:
            oldest = next(iter(self._by_source[source]))
            evicted.append(self._evict(oldest, MAX_UNAUTHENTICATED_PER_ADDRESS, limits.max_unauthenticated_per_address))
        while self._waiting and len(self._waiting) >= limits.max_unauthenticated:
            evicted.append(self._evict(self._most_crowded(), MAX_UNAUTHENTICATED, limits.max_unauthenticated))
        if limits.max_connections is not None:
            while self._waiting and len(self._open) >= limits.max_connections:
                evicted.append(self._evict(self._most_crowded(), MAX_CONNECTIONS, limits.max_connections))
            if len(self._open) >= limits.max_connections:
                return Decision(False, tuple(evicted))
        self._open.add(connection)
        self._wait(connection, source)
        return Decision(True, tuple(evicted))

    def authenticate(self, connection: C) -> None:
        """
        The connection showed a trusted certificate: it leaves the
        unauthenticated budget for good.
        """
        if connection in self._open:
            self._unwait(connection)
            self._authenticated.add(connection)

    def forget(self, connection: C) -> None:
        """
        The connection is gone (closed, lost, evicted); safe to repeat.
        """
        self._open.discard(connection)
        self._authenticated.discard(connection)
        self._unwait(connection)

    # --- the bookkeeping ---------------------------------------------------------------

    def _most_crowded(self) -> C:
        """
        The oldest connection of the source holding the most; when no source
        holds more than one, the oldest of all.
        """
        if self._most <= 1:
            return next(iter(self._waiting))
        source = next(iter(self._by_count[self._most]))
        return next(iter(self._by_source[source]))

    def _evict(self, connection: C, reason: str, limit: int) -> Eviction[C]:
        source = self._waiting[connection]
        self.forget(connection)
        return Eviction(connection, source, reason, limit)

    def _wait(self, connection: C, source: str) -> None:
        self._waiting[connection] = source
        held = self._by_source.setdefault(source, {})
        count = len(held)
        held[connection] = None
        self._move(source, count, count + 1)

    def _unwait(self, connection: C) -> None:
        source = self._waiting.pop(connection, None)
        if source is None:
            return
        held = self._by_source[source]
        count = len(held)
        del held[connection]
        if not held:
            del self._by_source[source]
        self._move(source, count, count - 1)

    def _move(self, source: str, before: int, after: int) -> None:
        if before:
            bucket = self._by_count[before]
            del bucket[source]
            if not bucket:
                del self._by_count[before]
        if after:
            self._by_count.setdefault(after, {})[source] = None
        if after > self._most:
            self._most = after
        while self._most and self._most not in self._by_count:
            self._most -= 1
