"""
What every Halibut role shares about a call, above the bytes: the context a
request is served in, and the two seams the roles plug into.

  - a L{IRequestHandler} answers requests (the agent's dispatcher, or a
    hub forwarding to polling agents); the listening-service and
    polling-subscriber roles drive one.
  - a L{IRequestSource} hands out queued requests and takes their answers
    (a hub's per-subscription queues); the polling-server role drives one.

Nothing here knows of scripts, files or certificates: the caller's identity
is whatever the transport layer above says it is.
"""

from __future__ import annotations

import uuid
from typing import IO, Any, Callable, Mapping

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Interface

from tentacle.halibut.serializer import DataStream, RequestMessage, ResponseMessage
from tentacle.halibut.streams import ExpectedStream, ReceivedStream, StreamSink

#: Opens an outgoing stream's payload when it is time to send it.
PayloadOpener = Callable[[], IO[bytes]]


@attrs.define
class CallContext:
    """
    What a service method may know of its call besides its arguments.

    @ivar peer: the authenticated caller, as the layer that authenticated
        it describes it (the agent's L{tentacle.trust.PeerIdentity}).
    @ivar received: the data streams that came with the request, by id.
    @ivar outgoing: payloads for the data streams the answer carries.
    @ivar refusal: why the handler refused one of the request's data
        streams (its L{IRequestHandler.sink_for} raised); the payload was
        read past, and this is the request's answer.
    @ivar answered: called, in order, once the answer has been handed to
        the connection (or could not be): what a handler does about a call
        that need not hold up its answer, such as logging it.
    """

    peer: Any
    request: RequestMessage
    received: Mapping[uuid.UUID, ReceivedStream] = attrs.field(factory=dict)
    outgoing: dict[uuid.UUID, PayloadOpener] = attrs.field(factory=dict)
    refusal: BaseException | None = None
    answered: list[Callable[[], object]] = attrs.field(factory=list)

    def payload(self, stream: DataStream) -> IO[bytes]:
        """
        The received bytes of a data stream argument, rewound; owned by the
        connection, which discards them after the response.
        """
        received = self.received.get(stream.id)
        if received is None:
            raise KeyError(f"no data stream {stream.id} arrived with this request")
        fileobj: IO[bytes] = received.sink.fileobj()  # type: ignore[attr-defined]
        return fileobj

    def send(self, length: int, opener: PayloadOpener) -> DataStream:
        """
        A data stream to return (or put in the result): its bytes are read
        from C{opener()} after the response message, in chunks.
        """
        stream = DataStream.fresh(length)
        self.outgoing[stream.id] = opener
        return stream


class IRequestHandler(Interface):
    """
    Answers requests: what the service roles hand each request to.
    """

    def sink_for(request: RequestMessage, stream: ExpectedStream) -> StreamSink | None:
        """
        Where this request wants one of its data streams written, as soon as
        the message is decoded and before the payload arrives; C{None} for
        the default spool.

        @raise Exception: the request refuses the stream; the payload is
            read past and the error becomes the answer.
        """

    def handle(request: RequestMessage, context: CallContext) -> Deferred[ResponseMessage]:
        """
        Serve one request.  Never fails: every error is a response with
        C{error} set, so the connection goes on.
        """


class IRequestSource(Interface):
    """
    Where a polling server's connections take their work: the requests
    queued for one subscription.
    """

    def next_request(subscription: str, wait: float) -> Deferred[PendingRequest | None]:
        """
        The oldest request queued for C{subscription}, taken off the queue;
        or C{None} after C{wait} seconds with none (the keep-alive).
        """


@attrs.define(eq=False)
class PendingRequest:
    """
    A request taken off a queue by a polling connection.

    The connection sends the request and its payloads, then fires
    L{outcome} with the response and the streams that came with it (the
    caller discards their sinks), or fails it with why the exchange broke.
    """

    request: RequestMessage
    payloads: Mapping[uuid.UUID, PayloadOpener] = attrs.field(factory=dict)
    outcome: Deferred[tuple[ResponseMessage, list[ReceivedStream]]] = attrs.field(factory=Deferred)
    #: Whether a connection's peer may take it (a pin); C{None}: any.
    accepts: Callable[[Any], bool] | None = None
    #: The connection that took it (a cancel drops that connection).
    connection: Any = None


__all__ = [
    "CallContext",
    "IRequestHandler",
    "IRequestSource",
    "PayloadOpener",
    "PendingRequest",
]
