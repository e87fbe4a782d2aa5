"""
Dialling a Halibut peer: what a client calling an agent and a polling agent
calling its server both do before their roles start.

  1. TCP, directly or through an HTTP CONNECT proxy (plain
     C{CONNECT host:port HTTP/1.0}, optional basic authentication; TLS then
     runs end to end inside the tunnel, so the proxy sees only ciphertext);
  2. TLS with our certificate, the peer's pinned by SHA-1 thumbprint (what
     Octopus shows) or SHA-256 fingerprint;
  3. the role (L{tentacle.halibut.roles}) writes its identity and reads
     C{MX-SERVER}.

L{ReconnectDelay} is how a polling agent paces its reconnects.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import os
import random
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from tentacle.halibut.connection import HalibutConnection, Role
from tentacle.identity import normalize_thumbprint
from tentacle.sockets import set_keepalive
from tentacle.tls import DirectTLS
from tentacle.trust import PeerIdentity

#: The proxy's answer ends at a blank line; nothing honest is longer.
MAX_PROXY_RESPONSE = 16384


class DialError(Exception):
    """
    Base of everything that goes wrong reaching a peer (and, in the client,
    of every client error).
    """


class ConnectionFailed(DialError):
    """
    The peer could not be reached, or the connection broke before a request
    was sent: safe to try again.
    """


class ConnectionRefused(ConnectionFailed):
    """
    Nothing listens at the address: trying again in a second will not help.
    """


class HostNotFound(ConnectionFailed):
    """
    The peer's name does not resolve: trying again in a second will not help.
    """


class UnexpectedCertificate(DialError):
    """
    The peer presented a certificate other than the pinned one.  Never
    retried as if it were a network error: it is either a misconfiguration
    or an impostor.
    """


class PeerRefused(DialError):
    """
    The peer closed the connection right after our identity: most likely it
    does not trust our certificate.
    """


@attrs.frozen
class Pin:
    """
    The certificate we expect: a SHA-1 thumbprint (what Octopus shows) or a
    SHA-256 fingerprint, compared ignoring case and colons.
    """

    thumbprint: str = attrs.field(converter=normalize_thumbprint)

    def matches(self, peer: PeerIdentity) -> bool:
        presented = peer.thumbprint if len(self.thumbprint) == 40 else peer.sha256
        return hmac.compare_digest(presented, self.thumbprint)


class ProxyRefused(ConnectionFailed):
    """
    The proxy answered CONNECT with something other than 200.
    """


@attrs.frozen
class Proxy:
    """
    An HTTP proxy that tunnels with CONNECT.
    """

    host: str
    port: int = 8080
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        """
        C{http://[user[:password]@]host[:port]}.

        @raise ValueError: for anything else.
        """
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url!r} is not an HTTP proxy address (http://[user:password@]host[:port])")
        return cls(
            parts.hostname,
            parts.port or 8080,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
        )

    def connect_request(self, host: str, port: int) -> bytes:
        """
        @raise UnicodeError: C{host} is not a name IDNA can write.
        """
        if not host.isascii():
            host = host.encode("idna").decode("ascii")  # as the DNS sees the name
        lines = [f"CONNECT {host}:{port} HTTP/1.0", f"Host: {host}:{port}"]
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class _Tunnel(Protocol):
    """
    Asks the proxy for a tunnel, then steps aside for the real protocol.
    """

    def __init__(self, request: bytes, target: str, inner: IProtocol, opened: Deferred[IProtocol]) -> None:
        self._request = request
        self._target = target
        self._inner = inner
        self._opened = opened
        self._buffer = b""
        self._open = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        if self._open:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_PROXY_RESPONSE:
                self._refuse(ProxyRefused("the proxy's answer to CONNECT is too long"))
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        code = parts[1] if len(parts) > 1 else ""
        if code != "200":
            reason = {
                "407": "it wants credentials (or refused the ones given)",
                "403": "it does not allow tunnels to this address",
                "502": "it could not reach the agent",
            }.get(code, "")
            self._refuse(
                ProxyRefused(f"the proxy refused to connect to {self._target}: {status_line!r}"
                             + (f"; {reason}" if reason else ""))
            )
            return
        self._open = True
        assert self.transport is not None
        self._inner.makeConnection(self.transport)
        self._opened.callback(self._inner)
        if rest:
            self._inner.dataReceived(rest)

    def _refuse(self, error: Exception) -> None:
        if not self._opened.called:
            self._opened.errback(error)
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._open:
            self._inner.connectionLost(reason)
        elif not self._opened.called:
            self._opened.errback(
                ProxyRefused(f"the proxy closed the connection before opening a tunnel to {self._target}")
            )


@implementer(IStreamClientEndpoint)
@attrs.frozen
class ProxyEndpoint:
    """
    A client endpoint whose connections go through C{proxy} to C{host:port}.
    Wrap its factory in TLS (as L{dial} does) for TLS to the agent inside
    the tunnel.
    """

    reactor: Any
    proxy: Proxy
    host: str
    port: int
    timeout: float = 60.0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        inner = protocolFactory.buildProtocol(None)  # type: ignore[arg-type]
        if inner is None:
            raise ConnectionFailed("the protocol factory refused to build a protocol")
        opened: Deferred[IProtocol] = Deferred()
        request = self.proxy.connect_request(self.host, self.port)
        target = f"{self.host}:{self.port}"
        endpoint = tcp_endpoint(self.reactor, self.proxy.host, self.proxy.port, self.timeout)
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Tunnel(request, target, inner, opened)))

        def answer_within(tunnel: Any) -> None:
            # A proxy that takes the connection and never answers CONNECT.
            timer = self.reactor.callLater(
                self.timeout, tunnel._refuse,
                ConnectionFailed(f"the proxy {self.proxy.host}:{self.proxy.port} did not answer CONNECT "
                                 f"within {self.timeout:g} s"),
            )
            opened.addBoth(lambda result: (timer.cancel() if timer.active() else None, result)[1])

        connecting.addCallback(answer_within)

        def unreachable(failure: Failure) -> None:
            if not opened.called:
                kind = ConnectionRefused if failure.check(ConnectionRefusedError) else ConnectionFailed
                opened.errback(
                    kind(f"cannot reach the proxy {self.proxy.host}:{self.proxy.port}: {failure.getErrorMessage()}")
                )

        connecting.addErrback(unreachable)
        return opened


@implementer(IHandshakeListener)
class PinnedConnection(HalibutConnection):
    """
    A dialled Halibut connection: once TLS is up and the peer's certificate
    matches the pin, C{role} runs (and writes the identity).  Its socket
    gets the TCP keepalive of its settings as soon as it is connected.

    @ivar pinned: fires with the peer's L{PeerIdentity} once the pin
        matched; fails with L{UnexpectedCertificate}, or L{ConnectionFailed}
        when the connection ends before TLS is up.
    """

    def __init__(self, pin: Pin | None, role: Role, *args: Any, peer_name: str = "agent", **kwargs: Any) -> None:
        """
        @param peer_name: what the peer is, for error messages.
        """
        super().__init__(*args, **kwargs)
        self._pin = pin
        self._peer_name = peer_name
        self._after_pin = role
        # Whoever gives up waiting drops the connection, which then never
        # completes its handshake (nor fires this again).
        self.pinned: Deferred[PeerIdentity] = Deferred(lambda _: self.abort())
        self.tls_version: str | None = None

    def connectionMade(self) -> None:
        set_keepalive(self.transport, self.settings.keepalive)
        super().connectionMade()
        # Halibut's timeouts apply during the handshake: a peer that takes
        # the TCP connection and says nothing must not hold us for ever.
        self._arm(self.settings.heartbeat_timeout)

    def _timed_out(self) -> None:
        if not self.pinned.called:
            self.pinned.errback(
                ConnectionFailed(f"the TLS handshake did not complete within {self.settings.heartbeat_timeout:g} s")
            )
        super()._timed_out()

    def handshakeCompleted(self) -> None:
        self._disarm()
        if self.pinned.called:
            return  # given up on already (and dropped)
        link: Any = self.transport
        certificate = link.getPeerCertificate()
        if certificate is None:
            self._refuse(UnexpectedCertificate(f"the {self._peer_name} presented no certificate"))
            return
        peer = PeerIdentity.from_openssl(certificate)
        self.peer = peer
        self.label = f"{peer.thumbprint}"
        handle = link.getHandle()
        self.tls_version = handle.get_protocol_version_name() if handle is not None else None
        if self._pin is not None and not self._pin.matches(peer):
            self._refuse(
                UnexpectedCertificate(
                    f"the {self._peer_name} presented an unexpected certificate: expected {self._pin.thumbprint}, "
                    f"but it presented {peer.thumbprint} (SHA-256 {peer.sha256}, subject {peer.subject})"
                )
            )
            return
        self.pinned.callback(peer)
        self.start(self._after_pin)

    def _refuse(self, error: DialError) -> None:
        self.pinned.errback(error)
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.pinned.called:
            self.pinned.errback(ConnectionFailed(f"the connection failed: {reason.getErrorMessage()}"))
        super().connectionLost(reason)


class _ClientTLSFactory(TLSMemoryBIOFactory):
    """
    The client side of TLS, sending what it is given at once (L{DirectTLS}).
    """

    protocol = DirectTLS
    noisy = False

    def __init__(self, tls: Any, factory: IProtocolFactory, clock: Any) -> None:
        super().__init__(tls, True, factory, clock=clock)


def describe_connect_error(error: ConnectError, peer_name: str = "agent") -> str:
    """
    Why a connection could not be made, as a sentence (not C{111: ...}).
    """
    if isinstance(error, ConnectionRefusedError):
        return f"the connection was refused: no {peer_name} listens on that port, or a firewall refuses it"
    if isinstance(error, (TCPTimedOutError, TimeoutError)):
        return "the connection timed out: the host may be down, or a firewall drops the packets"
    if isinstance(error, NoRouteError):
        return "there is no route to the host"
    number = error.osError
    if isinstance(number, int):
        return os.strerror(number)[:1].lower() + os.strerror(number)[1:]
    return (error.args[0] if error.args else "") or str(error)


def tcp_endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    Where to dial C{host:port}: an IP address straight (no name lookup,
    which Twisted's C{HostnameEndpoint} does even for an address, in a
    thread, after an IDNA pass: about a third of a client's CPU for a new
    connection), a name through C{HostnameEndpoint}, resolved afresh for
    every connection so a changed DNS record is followed.
    """
    try:
        address = None if "%" in host else ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is None:  # a name, or an IPv6 address with a zone (left to getaddrinfo)
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if address.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


async def dial(
    reactor: Any,
    host: str,
    port: int,
    tls: IOpenSSLClientConnectionCreator | Any,
    connection: PinnedConnection,
    *,
    proxy: Proxy | None = None,
    timeout: float = 60.0,
) -> PeerIdentity:
    """
    Connect C{connection} to C{host:port} (through C{proxy} when given) with
    TLS, and wait for the pin check.

    @raise ConnectionFailed: the peer (or the proxy) cannot be reached.
    @raise UnexpectedCertificate: the peer's certificate is not the pinned one.
    """
    peer = getattr(connection, "_peer_name", "agent")
    tcp: IStreamClientEndpoint
    if proxy is not None:
        tcp = ProxyEndpoint(reactor, proxy, host, port, timeout)
    else:
        tcp = tcp_endpoint(reactor, host, port, timeout)
    factory = Factory.forProtocol(lambda: connection)
    factory.noisy = False
    try:
        await tcp.connect(_ClientTLSFactory(tls, factory, reactor))
    except ConnectingCancelledError:
        # What a plain TCP endpoint raises when the dial is cancelled;
        # HostnameEndpoint raises CancelledError, as callers expect.
        raise CancelledError() from None
    except DNSLookupError as e:
        raise HostNotFound(f"cannot resolve {host}: {e}") from None
    except ConnectionRefusedError as e:
        raise ConnectionRefused(f"cannot connect to {host}:{port}: {describe_connect_error(e, peer)}") from None
    except ConnectError as e:
        raise ConnectionFailed(f"cannot connect to {host}:{port}: {describe_connect_error(e, peer)}") from None
    return await connection.pinned


@attrs.define
class ReconnectDelay:
    """
    How long a polling connection waits before dialling again, as Halibut's
    polling client does: C{clamp(outage x (1 + r), minimum, maximum)}, where
    the outage is the time since the first failure and C{r} is drawn once
    per connection in [0, 1), so a thousand agents do not reconnect in step.
    The outage clock restarts once a connection identifies, so the first
    reconnect after a healthy session comes after C{minimum}.
    """

    clock: Callable[[], float]
    minimum: float = 5.0
    maximum: float = 120.0
    r: float = attrs.field(factory=random.random)
    _outage_start: float | None = attrs.field(init=False, default=None)

    def succeeded(self) -> None:
        """
        A connection identified: the next outage starts afresh.
        """
        self._outage_start = None

    def failed(self) -> float:
        """
        A connection attempt failed, or a session ended: seconds to wait.
        """
        now = self.clock()
        if self._outage_start is None:
            self._outage_start = now
        outage = now - self._outage_start
        return min(max(outage * (1.0 + self.r), self.minimum), self.maximum)
