"""
The server side of Halibut's message exchange on an authenticated connection.

After C{MX-SERVER}, the connection carries, over and over::

    client: request message (raw DEFLATE of BSON), then its data streams
    server: response message, then its data streams
    client: NEXT            server: PROCEED     (connection reused)
        or  END             server closes       (connection retired)

This protocol turns bytes into requests with the pure codec, hands each to
a dispatcher, and writes the response; it never interprets a request
itself.  A protocol error closes this connection only.
"""

from __future__ import annotations

import enum
from typing import IO, Any, Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tentacle.dispatch import CallContext, Dispatcher
from tentacle.halibut import bson
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.errors import CodecError, CodecLimits
from tentacle.halibut.serializer import (
    DataStream,
    RequestMessage,
    ResponseMessage,
    ServerError,
    TypeRegistry,
    decode_envelope,
    encode_message,
)
from tentacle.halibut.streams import (
    DataStreamReader,
    ExpectedStream,
    ReceivedStream,
    SpoolingSink,
    StreamSink,
    stream_header,
    stream_trailer,
)
from tentacle.timers import Deadline
from tentacle.trust import PeerIdentity
from tentacle.addresses import describe_address

#: Halibut's default wait for the next request on an idle connection.
DEFAULT_IDLE_TIMEOUT = 600.0
#: Halibut's heartbeat timeout: a control line or a message that has begun
#: must keep arriving at least this often.
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
MAX_CONTROL_LINE = 1024
#: Bytes a client may send ahead while its request is being served.
MAX_READ_AHEAD = 65536
CHUNK_SIZE = 65536


@attrs.frozen
class ExchangeSettings:
    limits: CodecLimits = CodecLimits()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT


class _State(enum.Enum):
    MESSAGE = "reading a request"
    STREAMS = "reading data streams"
    BUSY = "serving a request"
    SENDING = "sending data streams"
    CONTROL = "waiting for NEXT or END"
    CLOSED = "closed"


class ProtocolError(Exception):
    """
    The peer broke the protocol; the connection must close.
    """


class DiscardingSink:
    """
    Reads past a payload nobody will use, so the connection stays in step.
    """

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass

    def discard(self) -> None:
        pass


@implementer(IPullProducer)
class PayloadSender:
    """
    Writes one outgoing stream's payload in chunks, as fast as the
    transport takes them, and checks it is exactly as long as declared.
    """

    def __init__(
        self,
        transport: Any,
        source: IO[bytes],
        length: int,
        on_chunk: Callable[[], None] | None = None,
    ) -> None:
        """
        @param on_chunk: called as each chunk is taken; the transport asks
            for one only once the last has drained, so it marks progress.
        """
        self._transport = transport
        self._source = source
        self._remaining = length
        self._on_chunk = on_chunk
        self.done: Deferred[None] = Deferred()

    def start(self) -> Deferred[None]:
        self._transport.registerProducer(self, False)
        return self.done

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        if self._remaining == 0:
            self._finish(None)
            return
        chunk = self._source.read(min(CHUNK_SIZE, self._remaining))
        if not chunk:
            self._finish(ProtocolError(f"a data stream ended {self._remaining} bytes short"))
            return
        self._remaining -= len(chunk)
        if self._on_chunk is not None:
            self._on_chunk()
        self._transport.write(chunk)

    def stopProducing(self) -> None:
        self._finish(ProtocolError("the connection closed while sending a data stream"))

    def _finish(self, error: Exception | None) -> None:
        if self.done.called:
            return
        self._transport.unregisterProducer()
        self._source.close()
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


class MessageExchange(Protocol):
    """
    One authenticated connection's requests and responses.
    """

    log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        registry: TypeRegistry,
        peer: PeerIdentity | None,
        clock: IReactorTime,
        settings: ExchangeSettings = ExchangeSettings(),
    ) -> None:
        self._dispatcher = dispatcher
        self._registry = registry
        self._peer = peer
        self._clock = clock
        self._settings = settings
        self._state = _State.MESSAGE
        self._inflater = Inflater(settings.limits)
        self._request: RequestMessage | None = None
        self._streams: DataStreamReader | None = None
        self._received: list[ReceivedStream] = []
        self._sink_error: Failure | None = None
        self._address = "?"
        self._started = 0.0
        self._pending = b""
        self._control = b""
        self._deadline = Deadline(clock, self._timed_out)
        self.requests_served = 0

    @property
    def _link(self) -> Any:
        assert self.transport is not None
        return self.transport

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    @property
    def _who(self) -> str:
        return self._peer.thumbprint if self._peer else "?"

    def connectionMade(self) -> None:
        self._address = describe_address(self._link.getPeer())
        self._arm(self._settings.heartbeat_timeout)

    # --- reading -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self._consume(data)
        except (ProtocolError, CodecError) as e:
            self._protocol_error(str(e))
        except Exception as e:
            # A sink that failed to store a payload (disk full, say): the
            # request cannot be answered in step, so this connection ends.
            self.log.failure("Failed while {state}", state=self._state.value)
            self._protocol_error(f"{type(e).__name__}: {e}")

    def _consume(self, data: bytes) -> None:
        while data and self._state is not _State.CLOSED:
            if self._state in (_State.BUSY, _State.SENDING):
                self._pending += data
                if len(self._pending) > MAX_READ_AHEAD:
                    raise ProtocolError("the client sent too much while a request was served")
                return
            if self._state is _State.CONTROL:
                data = self._read_control(data)
            elif self._state is _State.MESSAGE:
                data = self._read_message(data)
            elif self._state is _State.STREAMS:
                data = self._read_streams(data)

    def _read_message(self, data: bytes) -> bytes:
        self._arm(self._settings.heartbeat_timeout)
        payload = self._inflater.feed(data)
        if payload is None:
            return b""
        rest = self._inflater.unused
        self._inflater = Inflater(self._settings.limits)
        tree = bson.decode_document(payload, self._settings.limits)
        try:
            message, refs = decode_envelope(tree, self._registry, RequestMessage)
        except CodecError as e:
            self._refuse_undecodable(tree, e)
            return b""
        if not isinstance(message, RequestMessage):
            raise ProtocolError("expected a request message")
        self._request = message
        self._sink_error = None
        self._streams = DataStreamReader(
            [ExpectedStream(r.id, r.length) for r in refs],
            sink_factory=self._make_sink,
            limits=self._settings.limits,
        )
        if self._streams.done:
            self._pending += rest
            self._ready()
            return b""
        self._state = _State.STREAMS
        return rest

    def _make_sink(self, stream: ExpectedStream) -> StreamSink:
        """
        The operation's own sink for this stream, or the spool.  A sink the
        operation refuses to give is remembered as the request's answer.
        """
        assert self._request is not None
        if self._sink_error is None:
            try:
                sink = self._dispatcher.sink_for(self._request, stream)
            except Exception as e:
                self._sink_error = Failure(e)
            else:
                return sink or SpoolingSink(self._settings.limits.max_stream_memory_bytes)
        return DiscardingSink()

    def _ready(self) -> None:
        """
        Every part of the request is here: serve it.  Anything that arrives
        meanwhile waits in C{_pending}.
        """
        assert self._streams is not None and self._request is not None
        self._received = self._streams.received
        self._streams = None
        self._state = _State.BUSY
        self._cancel_timer()
        request, self._request = self._request, None
        self._serve(request)

    def _read_streams(self, data: bytes) -> bytes:
        assert self._streams is not None
        self._arm(self._settings.heartbeat_timeout)
        rest = self._streams.feed(data)
        if rest is None:
            return b""
        self._pending += rest
        self._ready()
        return b""

    def _read_control(self, data: bytes) -> bytes:
        self._control += data
        while self._state is _State.CONTROL:
            end = self._control.find(b"\n")
            if end < 0:
                if len(self._control) > MAX_CONTROL_LINE:
                    raise ProtocolError("a control line is too long")
                if self._control.strip(b"\r"):
                    self._arm(self._settings.heartbeat_timeout)
                return b""
            line, self._control = self._control[:end], self._control[end + 1 :]
            word = line.rstrip(b"\r").decode("ascii", "replace")
            if not word:
                continue  # Halibut skips blank lines between control messages
            if word == "NEXT":
                self._link.write(b"PROCEED\r\n")
                self._state = _State.MESSAGE
                rest, self._control = self._control, b""
                self._arm(self._settings.heartbeat_timeout)
                return rest
            if word == "END":
                self._close()
                return b""
            raise ProtocolError(f"unexpected control message {word[:40]!r}")
        return b""

    # --- serving --------------------------------------------------------------

    def _serve(self, request: RequestMessage) -> None:
        context = CallContext(self._peer, request, {s.id: s for s in self._received})
        self._started = self._clock.seconds()
        if self._sink_error is not None:
            error, self._sink_error = self._sink_error, None
            d: Deferred[ResponseMessage] = succeed(
                ResponseMessage(
                    request.id,
                    ServerError(error.getErrorMessage(), error.getTraceback()),
                )
            )
        else:
            d = self._dispatcher.dispatch(request, context)
        d.addCallback(self._respond, context)
        d.addErrback(self._failed_to_respond)

    def _respond(self, response: ResponseMessage, context: CallContext) -> Deferred[None] | None:
        if self._state is _State.CLOSED:
            self._discard_received()
            return None
        try:
            data, outgoing = encode_message(response)
        except (TypeError, ValueError) as e:
            self.log.error(
                "Could not encode the response to {id}: {error}", id=response.id, error=str(e)
            )
            data, outgoing = encode_message(
                ResponseMessage(response.id, ServerError(f"The agent could not encode its response: {e}"))
            )
        self._link.write(compress(data))
        self.requests_served += 1
        self._log_served(context.request, response)
        return Deferred.fromCoroutine(self._send_streams(outgoing, context))

    def _log_served(self, request: RequestMessage, response: ResponseMessage) -> None:
        """
        One structured event per answered request: what the audit log and
        the metrics are made of.
        """
        error = response.error
        self.log.debug(
            "{service}.{method} for {thumbprint} at {peer}: {outcome} in {duration:.3f} s",
            event="request_served",
            peer=self._address,
            thumbprint=self._who,
            service=request.service,
            method=request.method,
            outcome="error" if error is not None else "ok",
            error=error.message if error is not None else None,
            duration=self._clock.seconds() - self._started,
            request_id=request.id,
            **self._dispatcher.summarize(request),
        )

    async def _send_streams(self, outgoing: list[DataStream], context: CallContext) -> None:
        if outgoing:
            # A peer that stops taking a stream must not hold the connection
            # (and the file) for ever: it gets the heartbeat's grace.
            self._state = _State.SENDING
            self._arm(self._settings.heartbeat_timeout)
        for stream in outgoing:
            opener = context.outgoing.get(stream.id)
            if opener is None:
                raise ProtocolError(f"no payload for outgoing data stream {stream.id}")
            self._link.write(stream_header(stream.id, stream.length))
            await PayloadSender(
                self._link, opener(), stream.length,
                on_chunk=lambda: self._arm(self._settings.heartbeat_timeout),
            ).start()
            self._link.write(stream_trailer(stream.length))
        self._discard_received()
        self._await_control()

    def _await_control(self) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CONTROL
        self._arm(self._settings.idle_timeout)
        pending, self._pending = self._pending, b""
        if pending:
            self.dataReceived(pending)

    def _failed_to_respond(self, failure: Failure) -> None:
        self._discard_received()
        if self._state is not _State.CLOSED:
            self._protocol_error(failure.getErrorMessage())

    def _refuse_undecodable(self, tree: dict[str, Any], error: CodecError) -> None:
        """
        A well-framed request we cannot accept (say, a C{$type} we do not
        allow): answer the error when we can tell whom to, then close, since
        any data streams it declared cannot be told apart from what follows.
        """
        body = tree.get("Message")
        request_id = body.get("id") if isinstance(body, dict) else None
        self.log.warn(
            "Refused a request from {thumbprint}: {error}", thumbprint=self._who, error=str(error)
        )
        if isinstance(request_id, str):
            data, _ = encode_message(
                ResponseMessage(request_id, ServerError(f"The request could not be read: {error}"))
            )
            self._link.write(compress(data))
        self._close()

    # --- ending ---------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._deadline.arm(seconds)

    def _cancel_timer(self) -> None:
        self._deadline.cancel()

    def _timed_out(self) -> None:
        self.log.info(
            "Closing the connection from {thumbprint}: {what} while {state}",
            thumbprint=self._who,
            what="it took nothing" if self._state is _State.SENDING else "nothing received",
            state=self._state.value,
            event="connection_timed_out",
        )
        self._abort()

    def _protocol_error(self, why: str) -> None:
        self.log.warn(
            "Closing the connection from {thumbprint}: protocol error while {state}: {why}",
            thumbprint=self._who,
            state=self._state.value,
            why=why,
        )
        self._abort()

    def _discard_received(self) -> None:
        for stream in self._received:
            stream.sink.discard()
        self._received = []

    def _close(self) -> None:
        self._state = _State.CLOSED
        self._cancel_timer()
        self._link.loseConnection()

    def _abort(self) -> None:
        self._state = _State.CLOSED
        self._cancel_timer()
        if self._streams is not None:
            self._streams.abort()
            self._streams = None
        self._link.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._state = _State.CLOSED
        self._cancel_timer()
        if self._streams is not None:
            self._streams.abort()
            self._streams = None


def exchange_factory(
    dispatcher: Dispatcher,
    registry: TypeRegistry,
    clock: IReactorTime,
    settings: ExchangeSettings = ExchangeSettings(),
) -> Callable[[PeerIdentity], MessageExchange]:
    """
    The listener's C{session_factory}: a fresh exchange per authenticated connection.
    """
    return lambda peer: MessageExchange(dispatcher, registry, peer, clock, settings)


__all__ = ["ExchangeSettings", "MessageExchange", "ProtocolError", "exchange_factory"]
