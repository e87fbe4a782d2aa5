"""
How a hub serves the CLI users that dial it: each request names a polling
agent in its C{endpoint} (Halibut's C{ServiceEndPoint}: C{BaseUri}
C{poll://ID/}, and optionally the agent's C{RemoteThumbprint}); the hub
queues it for that subscription and answers with the agent's response.

Data streams pass through spooled, never whole in memory: the CLI's
request streams are spooled by the hub's connection (memory up to a small
limit, then an anonymous temporary file) and sent on to the agent; the
agent's response streams are spooled the same way and sent on to the CLI.
"""

from __future__ import annotations

from typing import IO, Any, Callable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import implementer

from tentacle.dialer import DialError
from tentacle.halibut.connection import ConnectionClosed
from tentacle.halibut.errors import CodecError, ProtocolError
from tentacle.halibut.failures import invocation_failure
from tentacle.halibut.handshake import normalize_subscription
from tentacle.halibut.rpc import CallContext, IRequestHandler, PayloadOpener
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, ServerError
from tentacle.halibut.streams import ExpectedStream, ReceivedStream, StreamSink
from tentacle.hub.polling_server import PollingServer
from tentacle.hub.queues import NotCollected
from tentacle.identity import normalize_thumbprint
from tentacle.trust import PeerIdentity


def subscription_of(endpoint: Any) -> tuple[str, str | None]:
    """
    The subscription and the pinned agent thumbprint a request's
    C{endpoint} names.

    @raise ValueError: it names no polling agent.
    """
    if not isinstance(endpoint, dict):
        raise ValueError("the request names no agent: its endpoint must have BaseUri poll://ID/")
    uri = endpoint.get("BaseUri")
    if not isinstance(uri, str) or not uri.lower().startswith("poll://"):
        raise ValueError(f"the hub forwards to polling agents only (BaseUri poll://ID/), not {uri!r}")
    thumbprint = endpoint.get("RemoteThumbprint")
    pinned = normalize_thumbprint(thumbprint) if isinstance(thumbprint, str) and thumbprint else None
    return normalize_subscription(uri), pinned


def _opener(stream: ReceivedStream) -> PayloadOpener:
    def opener() -> IO[bytes]:
        fileobj: IO[bytes] = stream.sink.fileobj()  # type: ignore[attr-defined]
        return fileobj

    return opener


def _pin(thumbprint: str) -> Callable[[Any], bool]:
    def accepts(peer: Any) -> bool:
        return isinstance(peer, PeerIdentity) and thumbprint in (peer.thumbprint, peer.sha256)

    return accepts


@implementer(IRequestHandler)
class ForwardingHandler:
    """
    Answers a CLI user's request with the polling agent's answer.
    """

    log = Logger()

    def __init__(self, server: PollingServer) -> None:
        self._server = server

    def sink_for(self, request: RequestMessage, stream: ExpectedStream) -> StreamSink | None:
        return None  # spooled by the connection, then sent on

    def handle(self, request: RequestMessage, context: CallContext) -> Deferred[ResponseMessage]:
        return ensureDeferred(self._forward(request, context))

    async def _forward(self, request: RequestMessage, context: CallContext) -> ResponseMessage:
        try:
            subscription, pinned = subscription_of(request.endpoint)
        except ValueError as e:
            return ResponseMessage(request.id, invocation_failure("System.ArgumentException", str(e)))
        payloads = {stream_id: _opener(stream) for stream_id, stream in context.received.items()}
        try:
            response, streams = await self._server.send(
                subscription, request, payloads, _pin(pinned) if pinned else None
            )
        except NotCollected as e:
            # Halibut's own words; the agent never saw it, so a retry is safe.
            return ResponseMessage(request.id, ServerError(str(e)))
        except DialError as e:
            return ResponseMessage(request.id, invocation_failure("System.InvalidOperationException", str(e)))
        except (ConnectionClosed, ProtocolError, CodecError) as e:
            self.log.warn(
                "The connection to {subscription} failed while it carried {method}: {error}",
                subscription=subscription, method=request.method, error=str(e),
            )
            return ResponseMessage(
                request.id,
                ServerError(f"The polling agent {subscription} was lost while it handled the request: {e}"),
            )
        for stream in streams:
            context.outgoing[stream.id] = _opener(stream)
        return ResponseMessage(request.id, response.error, response.result)
