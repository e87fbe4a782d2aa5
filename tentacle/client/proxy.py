"""
Reaching an agent through an HTTP CONNECT proxy, as Halibut does: plain
C{CONNECT host:port HTTP/1.0}, optional basic authentication, then TLS to the
agent inside the tunnel (the proxy sees only ciphertext).
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tentacle.client.connection import ConnectionFailed

#: The proxy's answer ends at a blank line; nothing honest is longer.
MAX_PROXY_RESPONSE = 16384


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
    Wrap it with C{wrapClientTLS} for TLS to the agent inside the tunnel.
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
        endpoint = HostnameEndpoint(self.reactor, self.proxy.host, self.proxy.port, timeout=self.timeout)
        connecting = endpoint.connect(Factory.forProtocol(lambda: _Tunnel(request, target, inner, opened)))

        def unreachable(failure: Failure) -> None:
            if not opened.called:
                opened.errback(
                    ConnectionFailed(
                        f"cannot reach the proxy {self.proxy.host}:{self.proxy.port}: {failure.getErrorMessage()}"
                    )
                )

        connecting.addErrback(unreachable)
        return opened
