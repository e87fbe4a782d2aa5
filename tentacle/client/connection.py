"""
One client connection to a listening tentacle: dialled and pinned by
L{tentacle.dialer}, then Halibut's listening-client role
(L{tentacle.halibut.roles.ListeningClient}): requests and responses, one at
a time, with NEXT/PROCEED before each reuse.

This module only turns what goes wrong into the client's errors: before a
request is sent a failure is safe to retry (L{ConnectionFailed}); after, it
is not (L{RequestFailed}), since the agent may have acted on it.
"""

from __future__ import annotations

import uuid
from typing import Any, Coroutine, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime

from tentacle.contracts import tentacle_registry
from tentacle.dialer import (
    ConnectionFailed,
    DialError,
    PeerRefused,
    Pin,
    PinnedConnection,
    UnexpectedCertificate,
)
from tentacle.halibut.connection import (
    DEFAULT_HEARTBEAT_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    ConnectionClosed,
    ExchangeSettings,
    HalibutConnection,
    KeepAlive,
    SinkChooser,
    TimedOut,
)
from tentacle.halibut.errors import CodecError, CodecLimits, ProtocolError
from tentacle.halibut.roles import ListeningClient
from tentacle.halibut.rpc import PayloadOpener
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, TypeRegistry
from tentacle.halibut.streams import ReceivedStream
from tentacle.trust import PeerIdentity

#: Halibut's heartbeat: a pooled connection must answer NEXT this fast.
HEARTBEAT_TIMEOUT = DEFAULT_HEARTBEAT_TIMEOUT
#: How long the first byte of a response may take (Tentacle's recommended
#: TcpClientReceiveResponseTimeout); a script's StartScript may wait a while.
RESPONSE_TIMEOUT = DEFAULT_RESPONSE_TIMEOUT

#: Base of everything the client raises.
ClientError = DialError
#: The agent reset the connection right after our identity: most likely it
#: does not trust our certificate.
AgentRefused = PeerRefused


class RequestFailed(ClientError):
    """
    The connection broke, or the agent broke the protocol, after the request
    was sent; not retried blindly, since the agent may have acted on it.
    """


_BROKEN = (ConnectionClosed, ProtocolError, CodecError)

__all__ = [
    "AgentRefused",
    "ClientConnection",
    "ClientError",
    "ConnectionFailed",
    "HEARTBEAT_TIMEOUT",
    "Pin",
    "RESPONSE_TIMEOUT",
    "RequestFailed",
    "UnexpectedCertificate",
]


_registry: TypeRegistry | None = None


def _tentacle_types() -> TypeRegistry:
    """
    Tentacle's types, built once for every connection of the process (it
    took about as long as a TLS handshake's share of a new connection); no
    connection adds to it.
    """
    global _registry
    if _registry is None:
        _registry = tentacle_registry()
    return _registry


class ClientConnection:
    """
    One connection to an agent; one request at a time.

    @ivar protocol: the Twisted protocol to connect (L{tentacle.dialer.dial}).
    @ivar ready: fires with the agent's L{PeerIdentity} once TLS, the pin
        and the identity exchange are done; fails with a L{ClientError}.
    """

    def __init__(
        self,
        pin: Pin | None,
        clock: IReactorTime,
        registry: TypeRegistry | None = None,
        limits: CodecLimits = CodecLimits(),
        response_timeout: float = RESPONSE_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        keepalive: KeepAlive | None = KeepAlive(),
    ) -> None:
        settings = ExchangeSettings(
            limits=limits, response_timeout=response_timeout, heartbeat_timeout=heartbeat_timeout,
            keepalive=keepalive,
        )
        self.protocol = PinnedConnection(pin, self._identify, clock, registry or _tentacle_types(), settings)
        self._role = ListeningClient(self.protocol)
        self._busy = True
        self.ready: Deferred[PeerIdentity] = Deferred()

    @property
    def peer(self) -> PeerIdentity | None:
        peer: PeerIdentity | None = self.protocol.peer
        return peer

    @property
    def tls_version(self) -> str | None:
        return self.protocol.tls_version

    @property
    def closed(self) -> Deferred[None]:
        return self.protocol.closed

    @property
    def idle(self) -> bool:
        return not (self._busy or self.protocol.reading) and bool(self.protocol.connected)

    async def _identify(self, connection: HalibutConnection) -> None:
        try:
            await self._role.open()
        except TimedOut as e:
            self._fail_ready(ConnectionFailed(f"the agent did not answer our identity: {e}"))
        except ConnectionClosed:
            self._fail_ready(
                AgentRefused(
                    "the agent closed the connection right after our identity: "
                    "the agent may not trust this certificate"
                )
            )
        except ProtocolError as e:
            self._fail_ready(ConnectionFailed(f"not a Halibut agent: {e}"))
        else:
            self._busy = False
            assert self.peer is not None
            self.ready.callback(self.peer)

    def _fail_ready(self, error: ClientError) -> None:
        if not self.ready.called:
            self.ready.errback(error)
        self.protocol.abort()

    # --- calls -------------------------------------------------------------------

    def call(
        self,
        request: RequestMessage,
        payloads: Mapping[uuid.UUID, PayloadOpener] | None = None,
        sinks: SinkChooser | None = None,
    ) -> Coroutine[Any, Any, tuple[ResponseMessage, list[ReceivedStream]]]:
        """
        Send one request and its streams; the coroutine returns the
        response and the streams that followed it (spooled; the caller
        discards them).  Cancelling the call drops the connection.

        A coroutine, not a Deferred: the client's own calls await it
        directly, one layer of Deferred fewer per request
        (C{Deferred.fromCoroutine} makes one).
        """
        self._take("call")
        return self._call(request, payloads, sinks)

    async def _call(
        self,
        request: RequestMessage,
        payloads: Mapping[uuid.UUID, PayloadOpener] | None,
        sinks: SinkChooser | None,
    ) -> tuple[ResponseMessage, list[ReceivedStream]]:
        try:
            result = await self._role.call(request, payloads, sinks)
        except _BROKEN as e:
            self.protocol.abort()
            raise RequestFailed(_describe(e, "the agent's response could not be read")) from None
        except (TypeError, ValueError):
            self._busy = False  # nothing was sent
            raise
        except CancelledError:
            self.protocol.abort()
            raise
        self._busy = False
        return result

    def next(self) -> Coroutine[Any, Any, None]:
        """
        Check a pooled connection is alive before reusing it (NEXT/PROCEED);
        a coroutine, as L{call}.
        """
        self._take("check")
        return self._next()

    async def _next(self) -> None:
        try:
            await self._role.next()
        except _BROKEN as e:
            self.protocol.abort()
            raise ConnectionFailed(f"a pooled connection failed its check: {_describe(e, '')}") from None
        self._busy = False

    def end(self) -> None:
        """
        Retire the connection politely (END).
        """
        self._busy = True
        self._role.end()

    def _take(self, what: str) -> None:
        if not self.idle:
            raise RuntimeError(f"cannot {what}: the connection is busy or closed")
        self._busy = True


def _describe(error: Exception, codec_prefix: str) -> str:
    if isinstance(error, CodecError) and codec_prefix:
        return f"{codec_prefix}: {error}"
    if isinstance(error, TimedOut):
        return f"the agent sent nothing: {error}"
    return str(error)
