"""
One client connection to a listening tentacle: TLS, the pin check, the
identity exchange, then requests and responses with NEXT/PROCEED between.

The mirror of L{tentacle.halibut.exchange} from the server's side, built on
the same pure codec.
"""

from __future__ import annotations

import enum
import hmac
import uuid
from typing import Any, Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tentacle.contracts import tentacle_registry
from tentacle.dispatch import PayloadOpener
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.errors import CodecError, CodecLimits
from tentacle.halibut.exchange import PayloadSender
from tentacle.halibut.serializer import (
    RequestMessage,
    ResponseMessage,
    TypeRegistry,
    decode_message,
    encode_message,
)
from tentacle.halibut.streams import (
    DataStreamReader,
    ExpectedStream,
    ReceivedStream,
    stream_header,
    stream_trailer,
)
from tentacle.identity import normalize_thumbprint
from tentacle.timers import Deadline
from tentacle.trust import PeerIdentity

IDENTITY = b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n"
IDENTITY_ANSWER = b"MX-SERVER 1.0\r\n\r\n"
PROCEED = b"PROCEED\r\n"
#: Halibut's heartbeat: a pooled connection must answer NEXT this fast.
HEARTBEAT_TIMEOUT = 60.0
#: How long the first byte of a response may take (Tentacle's recommended
#: TcpClientReceiveResponseTimeout); a script's StartScript may wait a while.
RESPONSE_TIMEOUT = 300.0


class ClientError(Exception):
    """
    Base of everything the client raises about a connection.
    """


class ConnectionFailed(ClientError):
    """
    The agent could not be reached or the connection broke before a request
    was sent: safe to try again.
    """


class UnexpectedCertificate(ClientError):
    """
    The agent presented a certificate other than the pinned one.  Never
    retried: it is either a misconfiguration or an impostor.
    """


class AgentRefused(ClientError):
    """
    The agent reset the connection right after our identity: most likely it
    does not trust our certificate.
    """


class RequestFailed(ClientError):
    """
    The connection broke, or the agent broke the protocol, after the request
    was sent; not retried, since the agent may have acted on it.
    """


@attrs.frozen
class Pin:
    """
    The agent certificate we expect: a SHA-1 thumbprint (what Octopus shows)
    or a SHA-256 fingerprint, compared ignoring case.
    """

    thumbprint: str = attrs.field(converter=normalize_thumbprint)

    def matches(self, peer: PeerIdentity) -> bool:
        presented = peer.thumbprint if len(self.thumbprint) == 40 else peer.sha256
        return hmac.compare_digest(presented, self.thumbprint)


class _State(enum.Enum):
    CONNECTING = "connecting"
    IDENTIFYING = "waiting for MX-SERVER"
    IDLE = "idle"
    RESPONSE = "waiting for a response"
    PROCEED = "waiting for PROCEED"
    CLOSED = "closed"


@implementer(IHandshakeListener)
class ClientConnection(Protocol):
    """
    One connection; one request at a time.

    @ivar ready: fires with the agent's L{PeerIdentity} once TLS, the pin
        and the identity exchange are done; fails with L{ClientError}.
    """

    log = Logger()

    def __init__(
        self,
        pin: Pin | None,
        clock: IReactorTime,
        registry: TypeRegistry | None = None,
        limits: CodecLimits = CodecLimits(),
        response_timeout: float = RESPONSE_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        self._pin = pin
        self._clock = clock
        self._registry = registry or tentacle_registry()
        self._limits = limits
        self._response_timeout = response_timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._state = _State.CONNECTING
        self._buffer = b""
        self._inflater: Inflater | None = None
        self._streams: DataStreamReader | None = None
        self._response: ResponseMessage | None = None
        self._waiting: Deferred[Any] | None = None
        self._deadline = Deadline(clock, self._timed_out)
        self.ready: Deferred[PeerIdentity] = Deferred()
        self.peer: PeerIdentity | None = None
        self.tls_version: str | None = None
        self.closed: Deferred[None] = Deferred()

    @property
    def idle(self) -> bool:
        return self._state is _State.IDLE

    @property
    def _link(self) -> Any:
        assert self.transport is not None
        return self.transport

    # --- opening ---------------------------------------------------------------

    def handshakeCompleted(self) -> None:
        certificate = self._link.getPeerCertificate()
        if certificate is None:
            self._fail_ready(UnexpectedCertificate("the agent presented no certificate"))
            return
        peer = PeerIdentity.from_certificate(certificate.to_cryptography())
        self.peer = peer
        handle = self._link.getHandle()
        self.tls_version = handle.get_protocol_version_name() if handle is not None else None
        if self._pin is not None and not self._pin.matches(peer):
            self._fail_ready(
                UnexpectedCertificate(
                    f"the agent presented an unexpected certificate: expected "
                    f"{self._pin.thumbprint}, but it presented {peer.thumbprint} "
                    f"(SHA-256 {peer.sha256}, subject {peer.subject})"
                )
            )
            return
        self._state = _State.IDENTIFYING
        self._link.write(IDENTITY)

    def _fail_ready(self, error: ClientError) -> None:
        self._state = _State.CLOSED
        if not self.ready.called:
            self.ready.errback(error)
        self._link.abortConnection()

    # --- calls -------------------------------------------------------------------

    def call(
        self, request: RequestMessage, payloads: Mapping[uuid.UUID, PayloadOpener] | None = None
    ) -> Deferred[tuple[ResponseMessage, list[ReceivedStream]]]:
        """
        Send one request and its streams; fires with the response and the
        streams that followed it (spooled; the caller discards them).
        """
        if self._state is not _State.IDLE:
            raise RuntimeError(f"the connection is {self._state.value}, not idle")
        data, streams = encode_message(request)
        self._state = _State.RESPONSE
        self._inflater = Inflater(self._limits)
        d: Deferred[tuple[ResponseMessage, list[ReceivedStream]]] = Deferred()
        self._waiting = d
        self._link.write(compress(data))
        if streams:
            # While the streams go out, the agent owes no answer: what must
            # not stall is our sending, so the heartbeat watches that.
            self._arm(self._heartbeat_timeout)
            Deferred.fromCoroutine(self._send_streams(streams, payloads or {})).addErrback(
                lambda f: self._broken(RequestFailed(f"sending a data stream failed: {f.getErrorMessage()}"))
            )
        else:
            self._arm(self._response_timeout)
        return d

    async def _send_streams(self, streams: list[Any], payloads: Mapping[uuid.UUID, PayloadOpener]) -> None:
        for stream in streams:
            opener = payloads.get(stream.id)
            if opener is None:
                raise ValueError(f"no payload given for data stream {stream.id}")
            self._link.write(stream_header(stream.id, stream.length))
            await PayloadSender(self._link, opener(), stream.length, on_chunk=self._sending).start()
            self._link.write(stream_trailer(stream.length))
        if self._state is _State.RESPONSE and self._response is None:
            # The response timeout counts from the end of the request, so a
            # large upload over a slow link is not cut off while it is sent.
            self._arm(self._response_timeout)

    def _sending(self) -> None:
        if self._state is _State.RESPONSE:
            self._arm(self._heartbeat_timeout)

    def next(self) -> Deferred[None]:
        """
        Check a pooled connection is alive before reusing it (NEXT/PROCEED).
        """
        if self._state is not _State.IDLE:
            raise RuntimeError(f"the connection is {self._state.value}, not idle")
        self._state = _State.PROCEED
        d: Deferred[None] = Deferred()
        self._waiting = d
        self._arm(self._heartbeat_timeout)
        self._link.write(b"NEXT\r\n")
        return d

    def end(self) -> None:
        """
        Retire the connection politely.
        """
        if self._state is _State.IDLE:
            self._link.write(b"END\r\n")
        self._state = _State.CLOSED
        self._cancel_timer()
        self._link.loseConnection()

    # --- reading -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            self._consume(data)
        except (CodecError, ValueError) as e:
            self._broken(RequestFailed(f"the agent's response could not be read: {e}"))

    def _consume(self, data: bytes) -> None:
        self._buffer += data
        while self._buffer and self._state is not _State.CLOSED:
            if self._state is _State.IDENTIFYING:
                if len(self._buffer) < len(IDENTITY_ANSWER):
                    return
                answer, self._buffer = self._buffer[: len(IDENTITY_ANSWER)], self._buffer[len(IDENTITY_ANSWER) :]
                if answer != IDENTITY_ANSWER:
                    self._fail_ready(ConnectionFailed(f"not a Halibut agent: it answered {answer[:40]!r}"))
                    return
                self._state = _State.IDLE
                assert self.peer is not None
                self.ready.callback(self.peer)
            elif self._state is _State.PROCEED:
                line_end = self._buffer.find(b"\n")
                if line_end < 0:
                    if len(self._buffer) > 64:
                        raise ValueError("an over-long control line")
                    return
                line, self._buffer = self._buffer[: line_end + 1], self._buffer[line_end + 1 :]
                if not line.strip():
                    continue
                if line.rstrip(b"\r\n") != b"PROCEED":
                    raise ValueError(f"expected PROCEED, got {line[:40]!r}")
                self._state = _State.IDLE
                self._cancel_timer()
                self._settle(None)
            elif self._state is _State.RESPONSE:
                self._read_response()
            else:
                raise ValueError(f"unexpected bytes while {self._state.value}")

    def _read_response(self) -> None:
        self._arm(self._heartbeat_timeout if self._response is not None else self._response_timeout)
        data, self._buffer = self._buffer, b""
        if self._response is None:
            assert self._inflater is not None
            payload = self._inflater.feed(data)
            if payload is None:
                return
            data = self._inflater.unused
            message, refs = decode_message(payload, self._registry, self._limits, ResponseMessage)
            if not isinstance(message, ResponseMessage):
                raise ValueError("expected a response message")
            self._response = message
            self._streams = DataStreamReader(
                [ExpectedStream(r.id, r.length) for r in refs], limits=self._limits
            )
        assert self._streams is not None
        rest = self._streams.feed(data)
        if rest is None:
            return
        response, received = self._response, self._streams.received
        self._response, self._streams, self._inflater = None, None, None
        self._buffer = rest
        self._state = _State.IDLE
        self._cancel_timer()
        self._settle((response, received))

    def _settle(self, result: Any) -> None:
        d, self._waiting = self._waiting, None
        if d is not None:
            d.callback(result)

    # --- ending -------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._deadline.arm(seconds)

    def _cancel_timer(self) -> None:
        self._deadline.cancel()

    def _timed_out(self) -> None:
        self._broken(RequestFailed(f"the agent sent nothing while {self._state.value}"))

    def _broken(self, error: ClientError) -> None:
        state = self._state
        self._state = _State.CLOSED
        if self._streams is not None:
            self._streams.abort()
            self._streams = None
        if state is _State.PROCEED:
            error = ConnectionFailed(f"a pooled connection failed its check: {error}")
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(error)
        if self.transport is not None:
            self._link.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state = self._state
        self._cancel_timer()
        if not self.ready.called:
            self._state = _State.CLOSED
            if state is _State.IDENTIFYING:
                self.ready.errback(
                    AgentRefused(
                        "the agent closed the connection right after our identity: "
                        "the agent may not trust this certificate"
                    )
                )
            else:
                self.ready.errback(ConnectionFailed(f"the connection failed: {reason.getErrorMessage()}"))
        elif state is not _State.CLOSED:
            self._broken(RequestFailed(f"the connection was lost while {state.value}: {reason.getErrorMessage()}"))
        self._state = _State.CLOSED
        if not self.closed.called:
            self.closed.callback(None)
