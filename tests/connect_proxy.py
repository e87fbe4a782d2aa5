"""
A small HTTP CONNECT proxy for tests, like the one Halibut's tests use:
optional basic authentication, and a count of the tunnels it opened.
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure


class _Upstream(Protocol):
    def __init__(self, downstream: Protocol) -> None:
        self.downstream = downstream
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        assert self.downstream.transport is not None
        self.downstream.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.downstream.transport is not None:
            self.downstream.transport.loseConnection()
        self.closed.callback(None)


class _ProxyProtocol(Protocol):
    factory: ConnectProxy

    def __init__(self) -> None:
        self.buffer = b""
        self.upstream: _Upstream | None = None

    def connectionMade(self) -> None:
        self.factory.open += 1

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is not None:
            assert self.upstream.transport is not None
            self.upstream.transport.write(data)
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, rest = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        self.factory.requests.append(lines)
        assert self.transport is not None
        if self.factory.credentials is not None:
            expected = "Basic " + base64.b64encode(self.factory.credentials.encode()).decode()
            if headers.get("Proxy-Authorization") != expected:
                self.transport.write(b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n")
                self.transport.loseConnection()
                return
        if method != "CONNECT" or self.factory.refuse_with is not None:
            status = self.factory.refuse_with or b"405 Method Not Allowed"
            self.transport.write(b"HTTP/1.0 " + status + b"\r\n\r\n")
            self.transport.loseConnection()
            return
        host, port = target.rsplit(":", 1)
        upstream = _Upstream(self)
        d = TCP4ClientEndpoint(reactor, host, int(port)).connect(Factory.forProtocol(lambda: upstream))

        def opened(_: Any) -> None:
            self.upstream = upstream
            self.factory.tunnels += 1
            assert self.transport is not None
            self.transport.write(b"HTTP/1.0 200 Connection established\r\n\r\n")
            if rest:
                assert upstream.transport is not None
                upstream.transport.write(rest)

        def failed(_: Failure) -> None:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.0 502 Bad Gateway\r\n\r\n")
            self.transport.loseConnection()

        d.addCallbacks(opened, failed)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
            self.upstream.closed.addCallback(lambda _: self.factory.lost())
        else:
            self.factory.lost()


class ConnectProxy(Factory):
    protocol = _ProxyProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(self, credentials: str | None = None, refuse_with: bytes | None = None) -> None:
        self.credentials = credentials
        self.refuse_with = refuse_with
        self.requests: list[list[str]] = []
        self.tunnels = 0
        self.open = 0
        self._idle: list[Deferred[None]] = []

    def lost(self) -> None:
        self.open -= 1
        if self.open == 0:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        """
        Fires once every connection through the proxy has closed both ways.
        """
        if self.open == 0:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
