"""
One accepted TLS connection, from its first byte to the Halibut role that
serves it: the agent's listener, and a hub's polling port, alike.

The order of checks follows Halibut's listener, and is the security model:

  0. Admission (L{tentacle.admission}): a new connection is counted in the
     budget of unauthenticated connections, closing the oldest of the most
     crowded address when that budget (or its address's share) is full; it
     is refused before TLS only when every place is held by an
     authenticated connection.  From here, its first TLS byte must come
     within C{first-byte-timeout}, and its identity line within
     C{handshake-timeout}.
  1. TLS handshake (any client certificate, or none, completes it).
  2. Read the initial request up to a blank line (at most 20,000 characters).
  3. Not C{MX}: a browser or curl; send the friendly page and close.
  4. C{MX}: the peer's certificate must be in the trust list, else it is
     logged with its address and thumbprint and the connection is reset
     without a byte written.
  5. Read the identity line (C{MX-CLIENT 1.0}, or C{MX-SUBSCRIBER 1.0
     poll://id/}); the session factory builds the role that serves it, or
     refuses it; answer C{MX-SERVER 1.0} and hand the connection over.

Nothing but the friendly page happens before step 4.
"""

from __future__ import annotations

import socket
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocol,
    IReactorTime,
    ITransport,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, LogLevel
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from OpenSSL import SSL
from zope.interface import implementer

from tentacle import events
from tentacle.addresses import describe_address
from tentacle.admission import (
    FIRST_BYTE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    Admission,
    AdmissionLimits,
    source_of,
)
from tentacle.halibut.handshake import (
    MAX_INITIAL_REQUEST,
    SERVER_IDENTITY,
    IdentityError,
    IdentityKind,
    IdentityReader,
    InitialRequestTooLong,
    PreambleReader,
    RemoteIdentity,
)
from tentacle.halibut.connection import ExchangeSettings, HalibutConnection, KeepAlive
from tentacle.halibut.roles import ListeningService, ServerOfSubscriber
from tentacle.halibut.rpc import IRequestHandler, IRequestSource
from tentacle.halibut.serializer import TypeRegistry
from tentacle.page import FRIENDLY_PAGE
from tentacle.sockets import ListeningKeepAlive
from tentacle.halibut.deadline import Deadline
from tentacle.log_budget import LineBudget
from tentacle.tls import DirectTLS
from tentacle.trust import PeerIdentity, TrustList

@attrs.frozen
class Accepted:
    """
    A connection that passed the checks: who it is, what it said it is
    (a listening client, or a polling subscriber), and where it came from.
    """

    peer: PeerIdentity
    identity: RemoteIdentity
    address: str


def _source(peer: Any, address: str) -> str:
    """
    L{source_of} the peer; an IPv4 peer's host, as the kernel gives it, is
    already the dotted quad it would return, without parsing it again.
    """
    if type(peer) is IPv4Address:
        return peer.host
    return source_of(getattr(peer, "host", address))


#: Builds the session (a Halibut role on a connection) for an accepted
#: connection, or refuses it with C{None}.
SessionFactory = Callable[[Accepted], "IProtocol | None"]
_ACCEPTED = frozenset({IdentityKind.CLIENT, IdentityKind.SUBSCRIBER})


def reset_connection(transport: ITransport) -> None:
    """
    Drop a connection with a TCP reset, as Halibut does to untrusted
    peers, so they learn nothing, not even a TLS close.
    """
    tcp = getattr(transport, "transport", transport)
    handle = getattr(tcp, "getHandle", lambda: None)()
    if isinstance(handle, socket.socket):
        try:
            handle.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        except OSError:
            pass
    transport.abortConnection()  # type: ignore[attr-defined]


def drop_at_once(transport: ITransport) -> None:
    """
    Reset a connection and release its socket now, not on the reactor's
    next turn: an accept that evicts must not hold two descriptors for a
    whole batch of accepts (Twisted's batch grows by 20 at each full one,
    without bound, under a flood).

    The TCP transport's own C{connectionLost}, run now, closes the socket;
    the one C{abortConnection} scheduled finds it gone and does nothing.
    """
    tcp: Any = getattr(transport, "transport", transport)
    transport.abortConnection()  # type: ignore[attr-defined]
    if getattr(tcp, "socket", None) is not None and getattr(tcp, "_aborting", False):
        tcp.connectionLost(Failure(ConnectionAborted()))


@implementer(IHandshakeListener)
class AgentConnection(Protocol):
    """
    One connection, from the TLS handshake to the hand-over to the exchange.
    """

    log = Logger()

    factory: ListenerFactory

    def __init__(self) -> None:
        self._preamble: PreambleReader | None = PreambleReader()
        self._identity: IdentityReader | None = IdentityReader(_ACCEPTED)
        self._peer: PeerIdentity | None = None
        self._session: IProtocol | None = None
        #: One timer for both deadlines before authentication: first for
        #: the first TLS byte, then (moved lazily, L{Deadline}) for the
        #: identity line.
        self._timeout: Deadline | None = None
        self._accepted_at = 0.0
        self._heard = False
        self._address = "?"
        #: The peer's address as budgets count it (L{source_of}).
        self._source = "?"
        self._finished = False
        self._refused = False

    @property
    def _link(self) -> Any:
        """
        The TLS transport; typed loosely since it provides several
        interfaces (ITransport, ISSLTransport, abortConnection).
        """
        assert self.transport is not None
        return self.transport

    @property
    def peer(self) -> PeerIdentity | None:
        """
        The authenticated peer, once its certificate has been found trusted.
        """
        return self._peer

    def connectionMade(self) -> None:
        self.log = self.factory.log
        peer = self._link.getPeer()
        self._address = describe_address(peer)
        self._source = _source(peer, self._address)
        if not self.factory.admit(self, self._source):
            self._refuse()
            return
        limits = self.factory.limits
        clock = self.factory.clock
        self._accepted_at = clock.seconds()
        self._timeout = Deadline(clock, self._expired)
        self._timeout.arm(min(limits.first_byte_timeout, limits.handshake_timeout))
        self.factory.listening_keepalive.apply(self.transport, self.factory.keepalive)

    def _budgeted(self, kind: str, level: LogLevel, format: str, **fields: Any) -> None:
        """
        A line about a connection that did not authenticate, within the
        budget of its kind (L{LineBudget}), tallied under its source.
        """
        self.factory.lines.emit(kind, level, format, source=self._source, **fields)

    def tls_bytes_received(self) -> None:
        """
        The first bytes of TLS arrived (told by L{ListeningTLS}): the peer
        is no longer silent, and has the rest of C{handshake-timeout}.
        """
        if self._heard:
            return
        self._heard = True
        if self._timeout is not None:
            elapsed = self.factory.clock.seconds() - self._accepted_at
            self._timeout.arm(max(self.factory.limits.handshake_timeout - elapsed, 0.0))

    def handshakeCompleted(self) -> None:
        self.tls_bytes_received()

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        if self._session is not None:
            self._session.dataReceived(data)
            return
        if self._preamble is not None:
            try:
                done = self._preamble.feed(data)
            except InitialRequestTooLong:
                self._budgeted(
                    "initial requests too long",
                    LogLevel.warn,
                    "Disconnected {peer}: its initial request passed {limit} characters",
                    peer=self._address,
                    limit=MAX_INITIAL_REQUEST,
                )
                self._abort()
                return
            if done is None:
                return
            self._preamble = None
            request, data = done
            if not self._dispatch_initial_request(request):
                return
        self._read_identity(data)

    def _dispatch_initial_request(self, request: str) -> bool:
        """
        @return: whether the connection goes on to the identity line.
        """
        if not request.strip():
            self._budgeted(
                "empty requests", LogLevel.info, "Ignoring an empty request from {peer}", peer=self._address
            )
            self._close()
            return False
        if not request.startswith("MX"):
            self.log.debug(
                "{peer} appears to be a web browser; sending the friendly page",
                peer=self._address,
            )
            self._link.write(FRIENDLY_PAGE)
            self._close()
            return False
        peer = self._peer_identity()
        if peer is None:
            self._budgeted(
                "clients refused (no client certificate)",
                LogLevel.warn,
                "Refused a client at {peer}: it attempted a message exchange "
                "without a client certificate",
                peer=self._address,
                event=events.CLIENT_DENIED,
            )
            self._reset()
            return False
        if not self.factory.trust.trusts(peer):
            self._budgeted(
                "clients refused (untrusted certificate)",
                LogLevel.warn,
                "Refused a client at {peer}: its certificate {thumbprint} "
                "(SHA-256 {sha256}, subject {subject}) is not in the trust list",
                peer=self._address,
                thumbprint=peer.thumbprint,
                sha256=peer.sha256,
                subject=peer.subject,
                event=events.CLIENT_DENIED,
            )
            self._reset()
            return False
        events.debug(
            self.log,
            "Client at {peer} authenticated as {thumbprint} over {tls_version}",
            peer=self._address,
            thumbprint=peer.thumbprint,
            tls_version=self._tls_version(),
            event=events.CLIENT_AUTHENTICATED,
        )
        self._peer = peer
        self.factory.authenticated(self)
        return True

    def _read_identity(self, data: bytes) -> None:
        if self._identity is None:
            return
        try:
            done = self._identity.feed(data)
        except IdentityError as e:
            self._protocol_error(str(e))
            return
        if done is None:
            return
        self._identity = None
        self._cancel_timeout()
        identity, leftover = done
        self._start_session(identity, leftover)

    def _start_session(self, identity: RemoteIdentity, leftover: bytes) -> None:
        assert self._peer is not None
        if self.factory.session_factory is None:
            self._link.write(SERVER_IDENTITY)
            self._close()
            return
        session = self.factory.session_factory(Accepted(self._peer, identity, self._address))
        if session is None:
            self.log.warn(
                "Closed the connection from {peer} ({thumbprint}): {identity} is not served here",
                peer=self._address,
                thumbprint=self._peer.thumbprint,
                identity=" ".join(filter(None, (identity.kind.value, identity.subscription))),
            )
            self._close()
            return
        self._link.write(SERVER_IDENTITY)
        self._session = session
        session.makeConnection(self._link)
        if leftover:
            session.dataReceived(leftover)

    def _protocol_error(self, why: str) -> None:
        self.log.warn(
            "Closed the connection from {peer}: protocol error: {why}",
            peer=self._address,
            why=why,
        )
        self._abort()

    def _expired(self) -> None:
        # Silent (no TLS byte yet) and first-byte-timeout is the sooner
        # limit: that one; otherwise the handshake's.
        limits = self.factory.limits
        if not self._heard and limits.first_byte_timeout <= limits.handshake_timeout:
            self._no_first_byte()
        else:
            self._timed_out()

    def _no_first_byte(self) -> None:
        self._budgeted(
            f"connections timed out ({FIRST_BYTE_TIMEOUT})",
            LogLevel.info,
            "Disconnected {peer}: no TLS within {timeout} seconds ({reason})",
            peer=self._address,
            timeout=self.factory.limits.first_byte_timeout,
            reason=FIRST_BYTE_TIMEOUT,
            event=events.HANDSHAKE_TIMED_OUT,
        )
        self._abort()

    def _timed_out(self) -> None:
        fields = dict(
            peer=self._address,
            timeout=self.factory.limits.handshake_timeout,
            reason=HANDSHAKE_TIMEOUT,
            event=events.HANDSHAKE_TIMED_OUT,
        )
        if self._peer is not None:
            # A trusted server's certificate passed but its identity line
            # never came: its trouble, not a flood's; never held back.
            self.log.info(
                "Disconnected {peer} ({thumbprint}): no complete request within {timeout} seconds ({reason})",
                thumbprint=self._peer.thumbprint,
                **fields,
            )
        else:
            self._budgeted(
                f"connections timed out ({HANDSHAKE_TIMEOUT})",
                LogLevel.info,
                "Disconnected {peer}: no complete request within {timeout} seconds ({reason})",
                **fields,
            )
        self._abort()

    def evict(self, reason: str, limit: int) -> None:
        """
        Closed, unauthenticated, to make room for a newer connection: with a
        TCP reset, so neither side keeps the socket in TIME_WAIT.
        """
        if self._finished:
            return
        self._budgeted(
            f"connections evicted ({reason})",
            LogLevel.warn,
            "Closed the unauthenticated connection from {peer} to make room for a new one "
            "({reason}: {limit})",
            peer=self._address,
            reason=reason,
            limit=limit,
            event=events.CONNECTION_EVICTED,
        )
        self._finished = True
        self._cancel_timeout()
        drop_at_once(self._link)

    def revoke(self) -> None:
        """
        The peer's thumbprint left the trust list: cut it off at once.
        """
        self.log.warn(
            "Disconnected {peer}: {thumbprint} is no longer trusted",
            peer=self._address,
            thumbprint=self._peer.thumbprint if self._peer else None,
        )
        self._reset()

    def _refuse(self) -> None:
        """
        Every place is held by an authenticated connection: close the TCP
        connection under TLS before a byte of TLS is exchanged, so the
        excess costs no handshake.
        """
        self._finished = True
        self._refused = True
        self._budgeted(
            f"connections refused ({MAX_CONNECTIONS})",
            LogLevel.warn,
            "Refused a connection from {peer}: all {limit} places are held by authenticated "
            "connections ({reason})",
            peer=self._address,
            reason=MAX_CONNECTIONS,
            limit=self.factory.limits.max_connections,
            event=events.CONNECTION_REFUSED,
        )
        tcp = getattr(self._link, "transport", self._link)
        tcp.abortConnection()

    def _peer_identity(self) -> PeerIdentity | None:
        certificate: Any = self._link.getPeerCertificate()
        if certificate is None:
            return None
        return PeerIdentity.from_openssl(certificate)

    def _tls_version(self) -> str:
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if isinstance(handle, SSL.Connection):
            return handle.get_protocol_version_name()
        return "unknown TLS"

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None  # nor held for the connection's life

    def _close(self) -> None:
        self._finished = True
        self._cancel_timeout()
        self._link.loseConnection()

    def _abort(self) -> None:
        self._finished = True
        self._cancel_timeout()
        self._link.abortConnection()

    def _reset(self) -> None:
        self._finished = True
        self._cancel_timeout()
        reset_connection(self._link)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finished = True
        self._cancel_timeout()
        self.factory.disconnected(self)
        if self._refused:
            return
        if reason.check(SSL.Error) and self._preamble is not None:
            self._budgeted(
                "connections that failed TLS",
                LogLevel.info,
                "TLS with {peer} failed: {error}",
                peer=self._address,
                error=reason.getErrorMessage(),
            )
        if self._session is not None:
            self._session.connectionLost(reason)


class ListenerFactory(Factory):
    """
    Builds L{AgentConnection}s, admits them within their budgets
    (L{tentacle.admission}), and keeps track of the authenticated ones, so
    removing a thumbprint from the trust list cuts its servers off.

    @ivar limits: the connection budgets and the deadlines before a
        connection authenticates.
    @ivar session_factory: builds the message exchange for an authenticated
        peer; when C{None}, the connection closes after the identity answer.
    @ivar keepalive: TCP keepalive on every accepted connection (C{None}: off).
    """

    protocol = AgentConnection  # type: ignore[assignment]
    noisy = False
    log = Logger()

    def __init__(
        self,
        trust: TrustList,
        clock: IReactorTime,
        limits: AdmissionLimits = AdmissionLimits(),
        session_factory: SessionFactory | None = None,
        log: Logger | None = None,
        keepalive: KeepAlive | None = KeepAlive(),
    ) -> None:
        if log is not None:
            self.log = log
        self.keepalive = keepalive
        self.listening_keepalive = ListeningKeepAlive()
        self.trust = trust
        self.clock = clock
        self.limits = limits
        self.session_factory = session_factory
        self._admission: Admission[AgentConnection] = Admission(limits)
        self._unsubscribe: Callable[[], None] | None = None
        #: The lines of connections that never authenticate (L{LineBudget}).
        self.lines = LineBudget(clock, self.log, limits.connection_log_lines)

    def set_limits(self, limits: AdmissionLimits) -> None:
        """
        New limits, from the next connection on (a running agent's reload).
        """
        self.limits = limits
        self._admission.limits = limits
        self.lines.lines = limits.connection_log_lines

    def startFactory(self) -> None:
        self._unsubscribe = self.trust.on_removal(self._trust_removed)

    def stopFactory(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self.lines.stop()

    def admit(self, connection: AgentConnection, source: str) -> bool:
        """
        Count a new connection in, closing the unauthenticated connections
        that must make room for it; C{False} when it must be refused.
        """
        decision = self._admission.admit(connection, source)
        for eviction in decision.evict:
            eviction.connection.evict(eviction.reason, eviction.limit)
        return decision.admitted

    @property
    def open_connections(self) -> int:
        return self._admission.open

    @property
    def unauthenticated_connections(self) -> int:
        return self._admission.unauthenticated

    def authenticated(self, connection: AgentConnection) -> None:
        self._admission.authenticate(connection)

    def disconnected(self, connection: AgentConnection) -> None:
        self._admission.forget(connection)

    @property
    def authenticated_connections(self) -> frozenset[AgentConnection]:
        return self._admission.authenticated

    def _trust_removed(self, removed: frozenset[str]) -> None:
        for connection in self._admission.authenticated:
            peer = connection.peer
            if peer is not None and not self.trust.trusts(peer):
                self._admission.forget(connection)
                connection.revoke()


#: Most connections a listening port accepts in one turn of the reactor.
ACCEPTS_PER_TURN = 32


def take_turns(port: Any, most: int = ACCEPTS_PER_TURN) -> None:
    """
    Make a listening port accept at most C{most} connections a turn.

    Twisted's port accepts up to C{numberAccepts} in one go and adds 20 to
    it after each full batch, without bound.  Under a flood the batch grows
    to the whole accept queue, and a turn of the reactor takes seconds, so
    a trusted server's handshake, which needs a turn per round trip, takes
    seconds a step.  Capped, the established connections get a turn after
    every few dozen accepts.  A port without C{numberAccepts} (not
    Twisted's TCP port) is left alone.
    """
    if not hasattr(port, "numberAccepts"):
        return
    accept = port.doRead

    def doRead() -> Any:
        port.numberAccepts = min(port.numberAccepts, most)
        return accept()

    port.doRead = doRead


class ListeningTLS(DirectTLS):
    """
    TLS on an accepted connection that tells its L{AgentConnection} when
    the first bytes arrive, before any of them make a handshake message;
    what it is given goes out at once (L{DirectTLS}).
    """

    _heard = False

    def _checkHandshakeStatus(self) -> None:
        # A server has nothing to say before the ClientHello, and OpenSSL's
        # first handshake step allocates its buffers (some 50 KB): a silent
        # connection costs none of that until its first byte.
        if self._heard:
            super()._checkHandshakeStatus()

    def dataReceived(self, data: bytes) -> None:
        if not self._heard:
            self._heard = True
            told = getattr(self.wrappedProtocol, "tls_bytes_received", None)
            if told is not None:
                told()
        super().dataReceived(data)


class ListeningTLSFactory(TLSMemoryBIOFactory):
    """
    The server side of TLS for a L{ListenerFactory}: see L{ListeningTLS}.
    """

    protocol = ListeningTLS
    noisy = False

    def __init__(self, tls: Any, factory: ListenerFactory, clock: IReactorTime | None = None) -> None:
        super().__init__(tls, False, factory, clock=clock)


def halibut_sessions(
    clock: IReactorTime,
    registry: TypeRegistry,
    settings: ExchangeSettings,
    *,
    handler_for: Callable[[Accepted], IRequestHandler | None] | None = None,
    source_for: Callable[[Accepted], IRequestSource | None] | None = None,
    log: Logger | None = None,
) -> SessionFactory:
    """
    The session factory of a Halibut listener: a listening client gets the
    listening-service role over C{handler_for(accepted)} (which may refuse
    it with C{None}); a polling
    subscriber gets the polling-server role over C{source_for(accepted)},
    which may refuse it with C{None}.  Whatever has no role here is refused.
    """

    def build(accepted: Accepted) -> HalibutConnection | None:
        identity = accepted.identity
        role: Any
        if identity.kind is IdentityKind.CLIENT and handler_for is not None:
            handler = handler_for(accepted)
            if handler is None:
                return None
            role = ListeningService(handler)
        elif identity.kind is IdentityKind.SUBSCRIBER and source_for is not None:
            source = source_for(accepted)
            if source is None or identity.subscription is None:
                return None
            role = ServerOfSubscriber(source, identity.subscription)
        else:
            return None
        return HalibutConnection(
            clock, registry, settings,
            peer=accepted.peer,
            label=f"{accepted.address} ({accepted.peer.thumbprint})",
            role=role,
            log=log,
        )

    return build
