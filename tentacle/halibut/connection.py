"""
One Halibut connection after TLS: the object all four roles share.

Every role does the same few things on its connection, in its own order:
read an envelope (a compressed message and the data streams after it), read
a control line (C{NEXT}, C{PROCEED}, C{END}), read the peer's identity line,
and write the same.  L{HalibutConnection} does those, each against a
deadline, and the roles in L{tentacle.halibut.roles} are short C{async}
loops over it.

Reading is push-style underneath (bytes are parsed as they arrive, stream
payloads go straight to their sinks) and one Deferred fires per whole unit
read, so a 1 GiB upload costs no Deferred per chunk.  At most one read is
outstanding; bytes that arrive while none is (a client sending C{NEXT}
ahead of the response, say) wait, up to C{max_read_ahead}.

A broken rule (bad framing, a timeout, an over-long line) closes this
connection only; the role waiting on it sees the error and ends.
"""

from __future__ import annotations

import io
import uuid
from typing import IO, Any, Callable, Coroutine, Mapping, Protocol as TypingProtocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.interfaces import IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tentacle.halibut import bson
from tentacle.halibut.deadline import Deadline
from tentacle.halibut.deflate import SLICE_BYTES, Inflater, compress, compress_slices
from tentacle.halibut.errors import CodecError, CodecLimits, ProtocolError
from tentacle.halibut.handshake import IdentityError, IdentityKind, IdentityReader, RemoteIdentity
from tentacle.halibut.serializer import (
    DataStream,
    Message,
    RequestMessage,
    ResponseMessage,
    TypeRegistry,
    decode_envelope,
    encode_message,
)
from tentacle.halibut.streams import (
    DataStreamReader,
    ExpectedStream,
    ReceivedStream,
    StreamSink,
    stream_header,
    stream_trailer,
)

#: Halibut's wait for the next request on an idle listening connection.
DEFAULT_IDLE_TIMEOUT = 600.0
#: Halibut's heartbeat: a control line, or a message or stream that has
#: begun, must keep arriving (or be taken) at least this often.
DEFAULT_HEARTBEAT_TIMEOUT = 60.0
#: How long the first byte of a response may take (Halibut's recommended
#: TcpClientReceiveResponseTimeout): a StartScript may wait for its script.
DEFAULT_RESPONSE_TIMEOUT = 300.0
#: A polling agent's wait for the next envelope (Halibut's 30 s queue wait
#: plus 30 s of slack).
DEFAULT_POLLING_REQUEST_TIMEOUT = 60.0
#: A polling server sends the NULL keep-alive after this long with no work.
DEFAULT_POLLING_QUEUE_WAIT = 30.0
MAX_CONTROL_LINE = 1024
#: Bytes a peer may send ahead while nothing is being read from it.
MAX_READ_AHEAD = 65536
CHUNK_SIZE = 65536

#: Event names this layer logs (see L{tentacle.events} for all of them).
CONNECTION_TIMED_OUT = "connection_timed_out"
PROTOCOL_ERROR = "protocol_error"


def _keepalive_seconds(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KEEPALIVE_SECONDS:
        raise ValueError(
            f"{attribute.name} must be a whole number of seconds from 1 to {MAX_KEEPALIVE_SECONDS}, not {value!r}"
        )


def _keepalive_count(_instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KEEPALIVE_PROBES:
        raise ValueError(
            f"{attribute.name} must be a whole number from 1 to {MAX_KEEPALIVE_PROBES}, not {value!r}"
        )


#: Linux's limits for TCP_KEEPIDLE/TCP_KEEPINTVL and TCP_KEEPCNT.
MAX_KEEPALIVE_SECONDS = 32767
MAX_KEEPALIVE_PROBES = 127


@attrs.frozen
class KeepAlive:
    """
    TCP keepalive, as Halibut sets it on every connection
    (C{HalibutTimeoutsAndLimits.TcpKeepAlive*}): after C{idle} seconds of
    silence the kernel probes the peer every C{interval} seconds, and
    C{count} unanswered probes end the connection.  So a peer that vanished
    (a host powered off, a NAT that forgot the flow) is noticed in about a
    minute even while nothing is being read or written, and idle
    connections keep their NAT and firewall entries alive.
    """

    idle: int = attrs.field(default=15, validator=_keepalive_seconds)
    interval: int = attrs.field(default=5, validator=_keepalive_seconds)
    count: int = attrs.field(default=10, validator=_keepalive_count)

    def to_json(self) -> dict[str, int]:
        return {"idle": self.idle, "interval": self.interval, "count": self.count}


@attrs.frozen
class ExchangeSettings:
    """
    Limits and timeouts of a connection, the same for every role; each role
    uses the ones that apply to it.

    @ivar keepalive: TCP keepalive for the connection's socket (C{None}:
        off), applied by whoever owns the socket (the dialler, the
        listener).
    """

    limits: CodecLimits = CodecLimits()
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    response_timeout: float = DEFAULT_RESPONSE_TIMEOUT
    polling_request_timeout: float = DEFAULT_POLLING_REQUEST_TIMEOUT
    polling_queue_wait: float = DEFAULT_POLLING_QUEUE_WAIT
    max_read_ahead: int = MAX_READ_AHEAD
    keepalive: KeepAlive | None = KeepAlive()


class ConnectionClosed(Exception):
    """
    The connection ended (the peer closed or reset it, or this side gave up
    on it) before what was asked of it was done.
    """


class TimedOut(ConnectionClosed):
    """
    The peer sent nothing (or took nothing) for too long; the connection
    has been dropped.
    """


class UndecodableMessage(ProtocolError):
    """
    A well-framed message we will not read (a C{$type} we do not allow,
    say).  Its id, when it had one, lets the service answer before closing.
    """

    def __init__(self, error: CodecError, request_id: str | None) -> None:
        super().__init__(str(error))
        self.request_id = request_id


@attrs.frozen
class Envelope:
    """
    One message as read, and the data streams that followed it (their sinks
    belong to the reader, who discards them).  C{message} is C{None} for
    the NULL envelope, a polling server's keep-alive.
    """

    message: Message | None
    streams: list[ReceivedStream]


#: Picks the sink for a data stream of a decoded message.
SinkChooser = Callable[[Message, ExpectedStream], StreamSink]
#: A role: runs on the connection from when it starts until it ends.
Role = Callable[["HalibutConnection"], Coroutine[Any, Any, None]]


class _Reader(TypingProtocol):
    started: bool

    def feed(self, data: bytes) -> tuple[Any, bytes] | None: ...

    def abort(self) -> None: ...

    def activity(self) -> str: ...


class _EnvelopeReader:
    def __init__(
        self,
        registry: TypeRegistry,
        limits: CodecLimits,
        expected: type[RequestMessage] | type[ResponseMessage],
        sinks: SinkChooser | None,
        what: str,
    ) -> None:
        self._registry = registry
        self._limits = limits
        self._expected = expected
        self._sinks = sinks
        self._what = what
        self._inflater: Inflater | None = Inflater(limits)
        self._message: Message | None = None
        self._streams: DataStreamReader | None = None
        self.started = False

    def activity(self) -> str:
        return "reading data streams" if self._streams is not None else f"reading {self._what}"

    def feed(self, data: bytes) -> tuple[Envelope, bytes] | None:
        self.started = True
        if self._inflater is not None:
            payload = self._inflater.feed(data)
            if payload is None:
                return None
            data = self._inflater.unused
            self._inflater = None
            tree = bson.decode_document(payload, self._limits)
            try:
                message, refs = decode_envelope(tree, self._registry, self._expected)
            except CodecError as e:
                body = tree.get("Message")
                request_id = body.get("id") if isinstance(body, dict) else None
                raise UndecodableMessage(e, request_id if isinstance(request_id, str) else None) from None
            self._message = message
            chooser = self._sinks
            self._streams = DataStreamReader(
                [ExpectedStream(r.id, r.length) for r in refs],
                sink_factory=None if chooser is None or message is None else (lambda s: chooser(message, s)),
                limits=self._limits,
            )
        assert self._streams is not None
        rest = self._streams.feed(data)
        if rest is None:
            return None
        return Envelope(self._message, self._streams.received), rest

    def abort(self) -> None:
        if self._streams is not None:
            self._streams.abort()


class _ControlReader:
    def __init__(self, what: str) -> None:
        self._what = what
        self._buffer = b""
        self.started = False

    def activity(self) -> str:
        return f"waiting for {self._what}"

    def feed(self, data: bytes) -> tuple[str, bytes] | None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_CONTROL_LINE:
                    raise ProtocolError("a control line is too long")
                # Blank lines do not count as progress: Halibut skips them.
                self.started = bool(self._buffer.strip(b"\r"))
                return None
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            word = line.rstrip(b"\r").decode("ascii", "replace")
            if word:
                return word, self._buffer

    def abort(self) -> None:
        pass


class _IdentityReader:
    def __init__(self, accept: frozenset[IdentityKind]) -> None:
        self._reader = IdentityReader(accept)
        self.started = False

    def activity(self) -> str:
        return "waiting for the peer's identity"

    def feed(self, data: bytes) -> tuple[RemoteIdentity, bytes] | None:
        self.started = True
        try:
            return self._reader.feed(data)
        except IdentityError as e:
            raise ProtocolError(str(e)) from None

    def abort(self) -> None:
        pass


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
    transport takes them, and never more or fewer bytes than declared.
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
        self._finish(ConnectionClosed("the connection closed while sending a data stream"))

    def _finish(self, error: Exception | None) -> None:
        if self.done.called:
            return
        self._transport.unregisterProducer()
        self._source.close()
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


class HalibutConnection(Protocol):
    """
    Reads and writes Halibut's units on one connection, each against a
    deadline, for whichever role runs on it.

    @param peer: who is at the other end, as the layer that authenticated
        it knows them; handed to the requests served here.
    @param label: names the peer in log lines.
    @param role: started as soon as the connection is made (accepting
        side); a dialling side that must check the peer's certificate first
        calls L{start} itself.
    @ivar closed: fires once the connection is gone.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        registry: TypeRegistry,
        settings: ExchangeSettings = ExchangeSettings(),
        *,
        peer: Any = None,
        label: str = "?",
        role: Role | None = None,
        log: Logger | None = None,
    ) -> None:
        self.clock = clock
        self.registry = registry
        self.settings = settings
        self.peer = peer
        self.label = label
        self._role = role
        if log is not None:
            self.log = log
        self.connected = False
        self.closed: Deferred[None] = Deferred()
        self._buffer = b""
        self._reader: _Reader | None = None
        self._waiting: Deferred[Any] | None = None
        self._progress = settings.heartbeat_timeout
        self._sending: str | None = None
        self._pumping = False
        self._finished = False
        self._deadline = Deadline(clock, self._timed_out)
        #: What unless_closed waits on (made when first needed: most
        #: connections never wait so).
        self._guarded: set[Deferred[Any]] | None = None
        self._payload: PayloadSender | None = None
        #: Why the connection ended, once it has.
        self._failure: ConnectionClosed | None = None

    @property
    def _link(self) -> Any:
        assert self.transport is not None
        return self.transport

    @property
    def activity(self) -> str:
        """
        What the connection is doing, for log lines.
        """
        if self._sending is not None:
            return self._sending
        if self._reader is not None:
            return self._reader.activity()
        return "idle" if self.connected else "closed"

    @property
    def reading(self) -> bool:
        return self._reader is not None

    def connectionMade(self) -> None:
        self.connected = True
        if self._role is not None:
            self.start(self._role)

    def start(self, role: Role) -> None:
        """
        Run C{role} on this connection; see L{role_ended} for how it may end.
        """
        d: Deferred[None] = Deferred.fromCoroutine(role(self))
        d.addErrback(self.role_ended)

    def role_ended(self, failure: Failure) -> None:
        """
        A role (or a step of one) ended by an error: a broken protocol is
        logged and closes the connection (unless that happened already,
        where it was found); the end of the connection just ends it;
        anything else is a bug, logged, and the connection dropped.
        """
        error = failure.value
        if isinstance(error, ProtocolError):
            self.protocol_error(str(error), error)
        elif isinstance(error, (ConnectionClosed, CancelledError)):
            self.abort()
        else:
            self.log.failure("A Halibut role failed on the connection from {peer}", failure, peer=self.label)
            self.abort()

    # --- reading ---------------------------------------------------------------------

    def read_envelope(
        self,
        expected: type[RequestMessage] | type[ResponseMessage],
        *,
        first: float,
        what: str,
        sinks: SinkChooser | None = None,
    ) -> Deferred[Envelope]:
        """
        The next message and its data streams.

        @param first: seconds to wait for its first byte; later bytes must
            keep coming within the heartbeat.
        @param sinks: where each data stream goes; spooled by default.
        """
        return self._read(_EnvelopeReader(self.registry, self.settings.limits, expected, sinks, what), first)

    def read_control(self, *, first: float, what: str) -> Deferred[str]:
        """
        The next control word (blank lines skipped, as Halibut skips them).
        """
        return self._read(_ControlReader(what), first)

    def read_identity(self, accept: frozenset[IdentityKind], *, first: float) -> Deferred[RemoteIdentity]:
        """
        The peer's identity line and the empty line after it.
        """
        return self._read(_IdentityReader(accept), first)

    def _read(self, reader: _Reader, first: float) -> Deferred[Any]:
        if self._reader is not None:
            raise RuntimeError(f"already {self.activity}")
        d: Deferred[Any] = Deferred()
        if self._finished:
            d.errback(ConnectionClosed(f"the connection is closed ({reader.activity()})"))
            return d
        self._reader, self._waiting = reader, d
        self._arm(first)
        self._pump()
        return d

    def dataReceived(self, data: bytes) -> None:
        if self._finished:
            return
        self._buffer = self._buffer + data if self._buffer else data
        self._pump()

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._buffer and self._reader is not None and not self._finished:
                reader = self._reader
                data, self._buffer = self._buffer, b""
                try:
                    done = reader.feed(data)
                except UndecodableMessage as e:
                    # Well framed: the role may answer it before closing.
                    self._fail_read(e)
                    return
                except (ProtocolError, CodecError) as e:
                    self.protocol_error(str(e), e if isinstance(e, ProtocolError) else ProtocolError(str(e)))
                    return
                except Exception as e:
                    # A sink that failed to store a payload (disk full, say):
                    # the message cannot be answered in step, so this ends.
                    self.log.failure("Failed while {state}", state=reader.activity())
                    self.protocol_error(f"{type(e).__name__}: {e}")
                    return
                if done is None:
                    if reader.started:
                        self._arm(self._progress)
                    continue
                value, self._buffer = done
                self._settle(value)
            if self._reader is None and len(self._buffer) > self.settings.max_read_ahead:
                self.protocol_error("the peer sent too much while nothing was read from it")
        finally:
            self._pumping = False

    def _fail_read(self, error: Exception) -> None:
        reader, d = self._reader, self._waiting
        self._reader = self._waiting = None
        self._deadline.pause()
        assert reader is not None and d is not None
        reader.abort()
        d.errback(error)

    def _settle(self, value: Any) -> None:
        d = self._waiting
        self._reader = self._waiting = None
        self._deadline.pause()
        assert d is not None
        d.callback(value)

    # --- writing ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Bytes as they are: a preamble, an identity, a compressed message.
        """
        if not self._finished:
            self._link.write(data)

    def send_line(self, word: str) -> None:
        """
        A control line (C{NEXT}, C{PROCEED}, C{END}).
        """
        self.write(word.encode("ascii") + b"\r\n")

    async def send_envelope(
        self, message: Message | None, payloads: Mapping[uuid.UUID, Callable[[], IO[bytes]]] | None = None
    ) -> None:
        """
        One message and the payloads of the data streams it refers to.

        @raise TypeError: or C{ValueError}, the message cannot be encoded
            (nothing was sent).
        """
        data, streams = encode_message(message)
        await self.send_encoded(data, streams, payloads or {})

    async def send_encoded(
        self,
        data: bytes,
        streams: list[DataStream],
        payloads: Mapping[uuid.UUID, Callable[[], IO[bytes]]],
    ) -> None:
        """
        An encoded message (BSON, DEFLATEd here), then each data stream:
        header, exactly the declared length of payload, trailer.  A payload
        that runs short aborts the connection: the peer could never tell
        where the next message starts.  A peer that takes none of a large
        message or of a stream for the heartbeat's time is dropped, as
        Halibut's one-minute write timeout drops it.

        A big message (a 5,000-line status page is about 700 KB) is
        compressed a slice at a time, with a turn of the reactor between
        slices, so other connections are not held up while it is.

        @raise ConnectionClosed: the connection ended first (L{TimedOut}:
            the peer stopped taking what we sent).
        """
        if self._finished:
            raise ConnectionClosed("the connection closed before the message was sent")
        if len(data) <= SLICE_BYTES:
            data = compress(data)
        else:
            pieces = []
            for piece in compress_slices(data):
                pieces.append(piece)
                await deferLater(self.clock, 0, lambda: None)
                if self._finished:
                    raise ConnectionClosed("the connection closed while the message was compressed")
            data = b"".join(pieces)
        if len(data) <= CHUNK_SIZE and not streams:
            self._link.write(data)  # the transport's buffer takes it whole
            return
        heartbeat = self.settings.heartbeat_timeout
        self._arm(heartbeat)
        try:
            self._sending = "sending a message"
            if len(data) <= CHUNK_SIZE:
                self._link.write(data)
            else:
                await self._send_payload(io.BytesIO(data), len(data))
            self._sending = "sending data streams"
            for stream in streams:
                opener = payloads.get(stream.id)
                if opener is None:
                    raise ProtocolError(f"no payload for outgoing data stream {stream.id}")
                self._link.write(stream_header(stream.id, stream.length))
                await self._send_payload(opener(), stream.length)
                self._link.write(stream_trailer(stream.length))
        except ProtocolError as e:
            self.protocol_error(str(e), e)
            raise
        finally:
            self._sending = None
            if self._reader is None:
                self._deadline.pause()

    async def _send_payload(self, source: IO[bytes], length: int) -> None:
        """
        Exactly C{length} bytes of C{source}, a chunk each time the
        transport has taken the last; each one taken pushes the heartbeat
        deadline back.
        """
        heartbeat = self.settings.heartbeat_timeout
        sender = self._payload = PayloadSender(self._link, source, length, on_chunk=lambda: self._arm(heartbeat))
        try:
            await sender.start()
        except ConnectionClosed:
            raise self._failure or ConnectionClosed(f"the connection closed while {self._sending}") from None
        finally:
            self._payload = None
        if self._finished:
            raise self._failure or ConnectionClosed(f"the connection closed while {self._sending}")

    # --- ending ----------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._deadline.arm(seconds)

    def _disarm(self) -> None:
        """
        For good: the connection is finished, and the clock must not keep it.
        """
        self._deadline.cancel()

    def _timed_out(self) -> None:
        state = self.activity
        what = "it took nothing" if self._sending is not None else "nothing received"
        self.log.info(
            "Closing the connection from {peer}: {what} while {state}",
            peer=self.label,
            what=what,
            state=state,
            event=CONNECTION_TIMED_OUT,
        )
        self._fail(TimedOut(f"{what} while {state}"))

    def protocol_error(self, why: str, error: Exception | None = None) -> None:
        """
        The peer broke the protocol: log it, drop the connection, and fail
        whatever was waiting on it.
        """
        if self._finished:
            return
        self.log.warn(
            "Closing the connection from {peer}: protocol error while {state}: {why}",
            peer=self.label,
            state=self.activity,
            why=why,
            event=PROTOCOL_ERROR,
        )
        self._fail(error or ProtocolError(why))

    def _fail(self, error: Exception, drop: bool = True) -> None:
        if self._failure is None and isinstance(error, ConnectionClosed):
            self._failure = error
        self._finished = True
        self._disarm()
        reader, d = self._reader, self._waiting
        self._reader = self._waiting = None
        if reader is not None:
            reader.abort()
        if drop and self.transport is not None and self.connected:
            self._link.abortConnection()
        for guarded in list(self._guarded or ()):
            guarded.cancel()
        if self._payload is not None:
            self._payload.stopProducing()  # whatever the transport does about it
        if d is not None:
            d.errback(error)

    def close(self) -> None:
        """
        End the connection politely (after what was written is sent).
        """
        self._finished = True
        self._disarm()
        if self.transport is not None:
            self._link.loseConnection()

    def abort(self) -> None:
        """
        Drop the connection at once.
        """
        if not self._finished:
            self._fail(ConnectionClosed("the connection was dropped"))
        elif self.transport is not None and self.connected:
            self._link.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        if self._finished and self._reader is None and not self._guarded and self._payload is None:
            # Closed here already, with nothing waiting to be told why (a
            # connection after END): nothing to fail, nor a reason to word.
            self._disarm()
        else:
            self._lost(reason)
        if not self.closed.called:
            self.closed.callback(None)

    def _lost(self, reason: Failure) -> None:
        self._fail(
            ConnectionClosed(f"the connection was lost while {self.activity}: {reason.getErrorMessage()}"),
            drop=False,
        )

    async def unless_closed(self, d: Deferred[Any]) -> Any:
        """
        C{d}'s result; but if the connection ends first, C{d} is cancelled
        and L{ConnectionClosed} raised (a polling server waiting for work
        must not take a request off the queue for a connection that died).
        """
        if self._finished:
            d.cancel()
            raise ConnectionClosed("the connection is closed")
        if self._guarded is None:
            self._guarded = set()
        guarded = self._guarded
        guarded.add(d)
        try:
            return await d
        except CancelledError:
            if self._finished:
                raise ConnectionClosed("the connection closed while waiting") from None
            raise
        finally:
            guarded.discard(d)


__all__ = [
    "CONNECTION_TIMED_OUT",
    "PROTOCOL_ERROR",
    "ConnectionClosed",
    "DiscardingSink",
    "Envelope",
    "ExchangeSettings",
    "HalibutConnection",
    "KeepAlive",
    "PayloadSender",
    "Role",
    "SinkChooser",
    "TimedOut",
    "UndecodableMessage",
]
