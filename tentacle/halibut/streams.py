"""
DataStream framing: the raw file payloads that follow a Halibut message.

A message refers to each DataStream only as C{{"id": Guid, "length": long}};
after the compressed message every stream follows in serialization order as::

    16 bytes  Guid, Guid.ToByteArray() order (UUID.bytes_le)
     8 bytes  Int64 length, little-endian
     N bytes  payload, uncompressed, unchunked
     8 bytes  Int64 length again

The sender writes payloads itself in chunks, so it only needs
L{stream_header} and L{stream_trailer}. The receiver pushes network bytes
into a L{DataStreamReader}, which checks every frame against what the
message declared and routes payload into per-stream sinks.
"""

from __future__ import annotations

import io
import struct
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Protocol

import attrs

from tentacle.halibut.dotnet import guid_from_bytes, guid_to_bytes
from tentacle.halibut.errors import CodecError, CodecLimits, LimitExceeded

__all__ = [
    "HEADER_SIZE",
    "TRAILER_SIZE",
    "stream_header",
    "stream_trailer",
    "ExpectedStream",
    "ReceivedStream",
    "StreamSink",
    "MemoryBudget",
    "SpoolingSink",
    "DataStreamReader",
]

HEADER_SIZE = 24
TRAILER_SIZE = 8

_I64 = struct.Struct("<q")
_INT64_MAX = 2**63 - 1
_DEFAULT_LIMITS = CodecLimits()


def _check_length(length: int) -> None:
    if not 0 <= length <= _INT64_MAX:
        raise ValueError(f"DataStream length out of range: {length}")


def stream_header(id: uuid.UUID, length: int) -> bytes:
    """
    The 24 bytes that precede a stream's payload.

    @raise ValueError: C{length} is negative or beyond Int64.
    """
    _check_length(length)
    return guid_to_bytes(id) + _I64.pack(length)


def stream_trailer(length: int) -> bytes:
    """
    The 8 bytes that follow a stream's payload: its length again.

    @raise ValueError: C{length} is negative or beyond Int64.
    """
    _check_length(length)
    return _I64.pack(length)


@attrs.frozen
class ExpectedStream:
    """
    A DataStream as the decoded message declared it.
    """

    id: uuid.UUID
    length: int


class StreamSink(Protocol):
    """
    Where a L{DataStreamReader} puts one stream's payload.
    """

    def write(self, data: bytes) -> None:
        """
        Append the next piece of payload.
        """

    def finish(self) -> None:
        """
        The whole payload has arrived and its trailer checked out.
        """

    def discard(self) -> None:
        """
        Drop whatever was stored; the stream is not wanted (or failed).
        """


@attrs.define(eq=False)
class MemoryBudget:
    """
    The memory the sinks of one message may hold together: each takes from
    it before buffering, and gives back what it frees (by spilling or being
    discarded).
    """

    limit: int = _DEFAULT_LIMITS.max_streams_memory_bytes
    used: int = 0

    def take(self, size: int) -> bool:
        """
        Reserve C{size} bytes; C{False}, reserving nothing, when they do not fit.
        """
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used = max(0, self.used - size)


@attrs.define(eq=False)
class SpoolingSink:
    """
    Keeps a stream in memory up to a threshold, then in an anonymous
    temporary file, so a large upload never sits wholly in memory.

    The file (L{tempfile.TemporaryFile}) has no name on POSIX and vanishes
    when closed or when the process dies, so nothing leaks to disk.

    @ivar memory_limit: Most bytes held in memory before spilling.
    @ivar directory: Where the temporary file goes; the system default when
        L{None}.
    @ivar budget: Shared with the other sinks of the same message: the
        stream spills as soon as the message's streams together would hold
        more than it allows.
    """

    memory_limit: int = _DEFAULT_LIMITS.max_stream_memory_bytes
    directory: str | None = None
    budget: MemoryBudget | None = None
    _buffer: bytearray | None = attrs.field(init=False, repr=False, factory=bytearray)
    _file: IO[bytes] | None = attrs.field(init=False, repr=False, default=None)
    _size: int = attrs.field(init=False, default=0)
    _discarded: bool = attrs.field(init=False, default=False)

    @property
    def size(self) -> int:
        """
        Bytes written so far.
        """
        return self._size

    @property
    def spilled(self) -> bool:
        """
        Whether the payload now lives in a temporary file.
        """
        return self._file is not None

    @property
    def buffered_bytes(self) -> int:
        """
        Bytes currently held in memory (never above the memory limit).
        """
        return 0 if self._buffer is None else len(self._buffer)

    def write(self, data: bytes) -> None:
        self._check_live()
        if self._file is None:
            assert self._buffer is not None
            if len(self._buffer) + len(data) <= self.memory_limit and (
                self.budget is None or self.budget.take(len(data))
            ):
                self._buffer += data
                self._size += len(data)
                return
            spill = tempfile.TemporaryFile(dir=self.directory)
            try:
                spill.write(self._buffer)
            except BaseException:
                spill.close()
                raise
            self._release()
            self._file, self._buffer = spill, None
        self._file.write(data)
        self._size += len(data)

    def finish(self) -> None:
        self._check_live()
        if self._file is not None:
            self._file.flush()

    def fileobj(self) -> IO[bytes]:
        """
        A readable binary file positioned at the start of the payload.

        It belongs to this sink: L{discard} closes it.
        """
        self._check_live()
        if self._file is None:
            assert self._buffer is not None
            return io.BytesIO(bytes(self._buffer))
        self._file.flush()
        self._file.seek(0)
        return self._file

    def read_chunks(self, chunk_size: int = 65536) -> Iterator[bytes]:
        """
        The payload in pieces of at most C{chunk_size} bytes.
        """
        source = self.fileobj()
        while chunk := source.read(chunk_size):
            yield chunk

    def discard(self) -> None:
        """
        Free memory and close (thus delete) the file; safe to repeat.
        """
        self._discarded = True
        self._release()
        self._buffer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _release(self) -> None:
        if self.budget is not None and self._buffer:
            self.budget.give_back(len(self._buffer))

    def _check_live(self) -> None:
        if self._discarded:
            raise ValueError("SpoolingSink was discarded")


@attrs.frozen
class ReceivedStream:
    """
    A stream whose payload and trailer have fully arrived.
    """

    id: uuid.UUID
    length: int
    sink: StreamSink


SinkFactory = Callable[[ExpectedStream], StreamSink]

_HEADER, _PAYLOAD, _TRAILER, _DONE, _FAILED = range(5)


@attrs.define(eq=False)
class DataStreamReader:
    """
    Push-style parser for the DataStreams that follow one message.

    Streams may arrive in any order (Halibut looks each id up), but each
    declared stream exactly once. An unknown or repeated id, a length other
    than the declared one, a negative length or a trailer mismatch raises
    L{CodecError}; the reader then discards every sink it created, partial
    or complete, because the message as a whole is unusable.

    @ivar expected: The streams the decoded message declared, in order.
    @ivar sink_factory: Makes the sink for each stream as its header
        arrives; by default a L{SpoolingSink} keeping
        C{limits.max_stream_memory_bytes} in memory, and all of them
        together C{limits.max_streams_memory_bytes} (L{memory}).
    """

    expected: Sequence[ExpectedStream]
    sink_factory: SinkFactory | None = None
    limits: CodecLimits = _DEFAULT_LIMITS
    _pending: list[ExpectedStream] = attrs.field(init=False, repr=False)
    _received: list[ReceivedStream] = attrs.field(init=False, repr=False, factory=list)
    _buffer: bytearray = attrs.field(init=False, repr=False, factory=bytearray)
    _current: ExpectedStream | None = attrs.field(init=False, repr=False, default=None)
    _sink: StreamSink | None = attrs.field(init=False, repr=False, default=None)
    _remaining: int = attrs.field(init=False, repr=False, default=0)
    _state: int = attrs.field(init=False, repr=False, default=_HEADER)
    memory: MemoryBudget = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        """
        @raise CodecError: A declared length is negative.
        """
        self.memory = MemoryBudget(self.limits.max_streams_memory_bytes)
        if len(self.expected) > self.limits.max_streams:
            raise LimitExceeded(
                f"the message declares {len(self.expected)} data streams, more than {self.limits.max_streams}"
            )
        for stream in self.expected:
            if stream.length < 0:
                raise CodecError(f"DataStream {stream.id} declares negative length")
        self._pending = list(self.expected)
        if not self._pending:
            self._state = _DONE

    def _new_sink(self, stream: ExpectedStream) -> StreamSink:
        if self.sink_factory is None:
            return SpoolingSink(self.limits.max_stream_memory_bytes, budget=self.memory)
        return self.sink_factory(stream)

    @property
    def done(self) -> bool:
        """
        Whether every expected stream has arrived.
        """
        return self._state == _DONE

    @property
    def received(self) -> list[ReceivedStream]:
        """
        Completed streams in arrival order; the caller owns their sinks once
        L{done}.
        """
        return list(self._received)

    def feed(self, data: bytes) -> bytes | None:
        """
        Consume the next bytes from the network.

        @return: L{None} while streams are outstanding; once the last one
            completes, the bytes after it (possibly empty). When already
            L{done}, C{data} is returned unchanged.
        @raise CodecError: The framing is wrong; see the class docstring.
        """
        if self._state == _DONE:
            return bytes(data)
        if self._state == _FAILED:
            raise CodecError("DataStreamReader already failed")
        try:
            return self._feed(memoryview(data))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """
        Give up (e.g. the connection dropped): discard every sink. Once
        L{done} the sinks are the caller's, so this does nothing.
        """
        if self._state == _DONE:
            return
        self._state = _FAILED
        if self._sink is not None:
            self._sink.discard()
            self._sink = None
        for stream in self._received:
            stream.sink.discard()
        self._received = []
        self._buffer = bytearray()

    def _feed(self, view: memoryview) -> bytes | None:
        pos = 0
        size = len(view)
        while pos < size:
            if self._state == _HEADER:
                pos = self._fill(view, pos, HEADER_SIZE)
                if len(self._buffer) == HEADER_SIZE:
                    self._start_stream()
            elif self._state == _PAYLOAD:
                take = min(self._remaining, size - pos)
                assert self._sink is not None
                self._sink.write(bytes(view[pos : pos + take]))
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self._state = _TRAILER
            elif self._state == _TRAILER:
                pos = self._fill(view, pos, TRAILER_SIZE)
                if len(self._buffer) == TRAILER_SIZE:
                    self._end_stream()
            if self._state == _DONE:
                return bytes(view[pos:])
        return None

    def _fill(self, view: memoryview, pos: int, want: int) -> int:
        take = min(want - len(self._buffer), len(view) - pos)
        self._buffer += view[pos : pos + take]
        return pos + take

    def _start_stream(self) -> None:
        stream_id = guid_from_bytes(bytes(self._buffer[:16]))
        (length,) = _I64.unpack_from(self._buffer, 16)
        self._buffer = bytearray()
        for index, stream in enumerate(self._pending):
            if stream.id == stream_id:
                break
        else:
            raise CodecError(f"unexpected DataStream {stream_id}")
        if length < 0:
            raise CodecError(f"DataStream {stream_id} has negative length {length}")
        if length != stream.length:
            raise CodecError(
                f"DataStream {stream_id} is {length} bytes but the message declared "
                f"{stream.length}"
            )
        del self._pending[index]
        self._current = stream
        self._sink = self._new_sink(stream)
        self._remaining = length
        self._state = _PAYLOAD if length else _TRAILER

    def _end_stream(self) -> None:
        (length,) = _I64.unpack_from(self._buffer, 0)
        self._buffer = bytearray()
        assert self._current is not None and self._sink is not None
        if length != self._current.length:
            raise CodecError(
                f"DataStream {self._current.id} trailer says {length} bytes, "
                f"header said {self._current.length}"
            )
        self._sink.finish()
        self._received.append(ReceivedStream(self._current.id, self._current.length, self._sink))
        self._current = None
        self._sink = None
        self._state = _HEADER if self._pending else _DONE
