"""
Halibut's four roles, each a short loop over a L{HalibutConnection}.

They differ only in who dialled, which identity was sent, which side asks
and which side says C{NEXT}::

    role                            identity it sends   then                            says NEXT
    listening service               MX-SERVER           answers requests                the client
    listening client                MX-CLIENT           sends requests                  itself
    polling subscriber              MX-SUBSCRIBER id    answers requests (NULL: none)   itself
    polling server (of subscriber)  MX-SERVER           sends queued requests or NULL   the subscriber

The two that answer hand each request to an L{IRequestHandler} (the
agent's dispatcher); the server of a subscriber takes its requests from an
L{IRequestSource} (a hub's queues); the listening client is driven by
calls.  An accepting side reads the preamble and identity itself (its
security checks sit between them) and starts the role after C{MX-SERVER}.
"""

from __future__ import annotations

import uuid
from typing import IO, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from tentacle.halibut.connection import (
    ConnectionClosed,
    DiscardingSink,
    Envelope,
    HalibutConnection,
    SinkChooser,
    TimedOut,
    UndecodableMessage,
)
from tentacle.halibut.errors import ProtocolError
from tentacle.halibut.failures import invocation_failure
from tentacle.halibut.handshake import PREAMBLE, IdentityKind, RemoteIdentity, identity_line
from tentacle.halibut.rpc import CallContext, IRequestHandler, IRequestSource, PendingRequest
from tentacle.halibut.serializer import (
    Message,
    RequestMessage,
    ResponseMessage,
    encode_message,
)
from tentacle.halibut.streams import ExpectedStream, MemoryBudget, ReceivedStream, SpoolingSink, StreamSink

log = Logger()

_SERVER = frozenset({IdentityKind.SERVER})


# --- answering (listening service, polling subscriber) ---------------------------------


class _Answerer:
    """
    Serves one request after another for a role that answers: picks each
    data stream's sink, runs the handler, sends the response.
    """

    def __init__(self, handler: IRequestHandler) -> None:
        self._handler = handler
        self._refusal: BaseException | None = None
        self._spool_memory = 1 << 20
        self._memory = MemoryBudget()

    def sinks(self, message: Message, stream: ExpectedStream) -> StreamSink:
        """
        The handler's sink for a stream, or the spool; a sink the handler
        refuses to give is remembered as the request's answer, and its
        payload read past.
        """
        assert isinstance(message, RequestMessage)
        if self._refusal is None:
            try:
                sink = self._handler.sink_for(message, stream)
            except Exception as e:
                self._refusal = e
            else:
                return sink if sink is not None else SpoolingSink(self._spool_memory, budget=self._memory)
        return DiscardingSink()

    async def read(self, connection: HalibutConnection, *, first: float) -> Envelope:
        self._refusal = None
        limits = connection.settings.limits
        self._spool_memory = limits.max_stream_memory_bytes
        # One budget per request: its spooled streams together hold at most this.
        self._memory = MemoryBudget(limits.max_streams_memory_bytes)
        return await connection.read_envelope(RequestMessage, first=first, what="a request", sinks=self.sinks)

    async def answer(self, connection: HalibutConnection, request: RequestMessage, streams: list[ReceivedStream]) -> None:
        context = CallContext(connection.peer, request, {s.id: s for s in streams})
        context.refusal, self._refusal = self._refusal, None
        try:
            response = await self._handler.handle(request, context)
            if not connection.connected:
                return
            try:
                data, outgoing = encode_message(response)
            except (TypeError, ValueError) as e:
                log.error("Could not encode the response to {id}: {error}", id=response.id, error=str(e))
                data, outgoing = encode_message(
                    ResponseMessage(response.id, invocation_failure(
                        "System.InvalidOperationException", f"The agent could not encode its response: {e}"
                    ))
                )
            await connection.send_encoded(data, outgoing, context.outgoing)
        finally:
            for stream in streams:
                stream.sink.discard()
            for then in context.answered:
                try:
                    then()
                except Exception:
                    log.failure("After answering {id}", id=request.id)

    async def refuse(self, connection: HalibutConnection, error: UndecodableMessage) -> None:
        """
        A well-framed request we cannot accept (say, a C{$type} we do not
        allow): answer the error when we can tell whom to, then close, since
        any data streams it declared cannot be told apart from what follows.
        """
        log.warn("Refused a request from {peer}: {error}", peer=connection.label, error=str(error))
        if error.request_id is not None:
            # Sending it again would fail again: shaped so the Server does not.
            await connection.send_envelope(
                ResponseMessage(error.request_id, invocation_failure(
                    "System.ArgumentException", f"The request could not be read: {error}"
                ))
            )
        connection.close()


def _next_or_end(connection: HalibutConnection, wait: float) -> Deferred[bool]:
    """
    The asking side's word after an answer: C{NEXT} (answered C{PROCEED} at
    once; C{True}), or C{END} or the end of the connection (it closes;
    C{False}): Halibut's C{ExpectNextOrEnd} takes all three.  A Deferred
    chain, not a coroutine: an idle connection waits here, holding no
    frame.
    """
    return connection.read_control(first=wait, what="NEXT or END").addCallbacks(
        _said, _not_said, callbackArgs=(connection,)
    )


def _said(word: str, connection: HalibutConnection) -> bool:
    if word == "END":
        connection.close()
        return False
    if word != "NEXT":
        raise ProtocolError(f"unexpected control message {word[:40]!r}")
    connection.send_line("PROCEED")
    return True


def _not_said(failure: Failure) -> bool | Failure:
    if failure.check(ConnectionClosed) and not failure.check(TimedOut):
        return False  # the peer closed instead of saying END: as good as END
    return failure


class ListeningService:
    """
    The agent's side of a connection a client dialled (after C{MX-CLIENT}):
    request, response, then C{NEXT} (answered C{PROCEED}) or C{END}.

    Each request is served by a run of this role; between requests, while
    the connection waits for C{NEXT} (a pooled connection, for minutes),
    only that wait is kept, so an idle connection holds no coroutine.
    """

    def __init__(self, handler: IRequestHandler) -> None:
        self._answerer = _Answerer(handler)

    async def __call__(self, connection: HalibutConnection) -> None:
        settings = connection.settings
        try:
            envelope = await self._answerer.read(connection, first=settings.heartbeat_timeout)
        except UndecodableMessage as e:
            await self._answerer.refuse(connection, e)
            return
        if envelope.message is None:
            # A NULL request: Halibut's listening service ends there.
            connection.close()
            return
        assert isinstance(envelope.message, RequestMessage)
        await self._answerer.answer(connection, envelope.message, envelope.streams)
        _next_or_end(connection, settings.idle_timeout).addCallbacks(
            self._proceed, connection.role_ended, callbackArgs=(connection,)
        )

    def _proceed(self, proceed: bool, connection: HalibutConnection) -> None:
        if proceed:
            connection.start(self)


class PollingSubscriber:
    """
    A polling agent's side of the connection it dialled: announce the
    subscription, then answer whatever the server sends (a NULL envelope is
    its keep-alive), saying C{NEXT} after each and expecting C{PROCEED}.
    """

    def __init__(self, handler: IRequestHandler, subscription: str) -> None:
        self._answerer = _Answerer(handler)
        self.subscription = subscription
        self.identified: Deferred[None] = Deferred()
        self.requests_served = 0

    async def __call__(self, connection: HalibutConnection) -> None:
        settings = connection.settings
        connection.write(PREAMBLE + identity_line(IdentityKind.SUBSCRIBER, self.subscription))
        await connection.read_identity(_SERVER, first=settings.heartbeat_timeout)
        self.identified.callback(None)
        while True:
            try:
                envelope = await self._answerer.read(connection, first=settings.polling_request_timeout)
            except UndecodableMessage as e:
                await self._answerer.refuse(connection, e)
                return
            if envelope.message is not None:
                assert isinstance(envelope.message, RequestMessage)
                await self._answerer.answer(connection, envelope.message, envelope.streams)
                self.requests_served += 1
            del envelope  # nothing of the last request is kept while waiting for the next
            connection.send_line("NEXT")
            word = await connection.read_control(first=settings.heartbeat_timeout, what="PROCEED")
            if word != "PROCEED":
                raise ProtocolError(f"expected PROCEED, got {word[:40]!r}")


# --- asking (listening client, polling server) -----------------------------------------


async def _ask(
    connection: HalibutConnection,
    request: RequestMessage,
    payloads: Mapping[uuid.UUID, Callable[[], IO[bytes]]] | None,
    sinks: SinkChooser | None = None,
) -> tuple[ResponseMessage, list[ReceivedStream]]:
    """
    Send one request and its streams; read the response and its streams.
    The response timeout counts from the end of the request, so a large
    upload over a slow link is not cut off while it is sent.
    """
    await connection.send_envelope(request, payloads)
    envelope = await connection.read_envelope(
        ResponseMessage, first=connection.settings.response_timeout, what="a response", sinks=sinks
    )
    response = envelope.message
    if not isinstance(response, ResponseMessage):
        for stream in envelope.streams:
            stream.sink.discard()
        raise ProtocolError("expected a response, got an empty envelope")
    if response.id != request.id:
        for stream in envelope.streams:
            stream.sink.discard()
        raise ProtocolError(f"the response {response.id[:80]!r} does not answer {request.id[:80]!r}")
    return response, envelope.streams


class ListeningClient:
    """
    The dialling side of listening mode, one call at a time: C{MX-CLIENT},
    then each L{call}; L{next} checks a pooled connection before reuse;
    L{end} retires it.
    """

    def __init__(self, connection: HalibutConnection) -> None:
        self.connection = connection

    async def open(self) -> RemoteIdentity:
        connection = self.connection
        connection.write(PREAMBLE + identity_line(IdentityKind.CLIENT))
        return await connection.read_identity(_SERVER, first=connection.settings.heartbeat_timeout)

    async def call(
        self,
        request: RequestMessage,
        payloads: Mapping[uuid.UUID, Callable[[], IO[bytes]]] | None = None,
        sinks: SinkChooser | None = None,
    ) -> tuple[ResponseMessage, list[ReceivedStream]]:
        """
        @param sinks: where the response's data streams go; spooled by default.
        """
        return await _ask(self.connection, request, payloads, sinks)

    async def next(self) -> None:
        connection = self.connection
        connection.send_line("NEXT")
        word = await connection.read_control(first=connection.settings.heartbeat_timeout, what="PROCEED")
        if word != "PROCEED":
            raise ProtocolError(f"expected PROCEED, got {word[:40]!r}")

    def end(self) -> None:
        connection = self.connection
        if connection.connected and not connection.reading:
            connection.send_line("END")
        connection.close()


class ServerOfSubscriber:
    """
    The server's side of a connection a polling agent dialled (after
    C{MX-SUBSCRIBER}): send the oldest queued request for its subscription
    (or, after the queue wait, the NULL keep-alive), read the answer, then
    expect C{NEXT} (answered C{PROCEED}) or C{END}.
    """

    def __init__(self, source: IRequestSource, subscription: str) -> None:
        self._source = source
        self.subscription = subscription

    async def __call__(self, connection: HalibutConnection) -> None:
        settings = connection.settings
        while True:
            pending: PendingRequest | None = await connection.unless_closed(
                self._source.next_request(self.subscription, settings.polling_queue_wait)
            )
            if pending is None:
                await connection.send_envelope(None)
            else:
                await self._exchange(connection, pending)
            if not await _next_or_end(connection, settings.heartbeat_timeout):
                return

    async def _exchange(self, connection: HalibutConnection, pending: PendingRequest) -> None:
        pending.connection = connection
        try:
            outcome = await _ask(connection, pending.request, pending.payloads)
        except BaseException as e:
            if not pending.outcome.called:
                pending.outcome.errback(e)
            raise
        if pending.outcome.called:
            # The caller gave up (cancelled) while it ran: drop the answer.
            for stream in outcome[1]:
                stream.sink.discard()
        else:
            pending.outcome.callback(outcome)


__all__ = ["ListeningClient", "ListeningService", "ServerOfSubscriber", "PollingSubscriber"]
