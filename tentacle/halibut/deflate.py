"""
Raw DEFLATE (RFC 1951) framing of one Halibut message.

Halibut wraps each BSON message in .NET's C{DeflateStream}: no zlib or gzip
header and no length prefix. The message ends where the DEFLATE stream's
final block ends, and whatever follows on the connection (DataStreams or the
next control line) arrives in the same reads, so the receive side has to
decompress incrementally and hand the surplus on as L{Inflater.unused}.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import attrs

from tentacle.halibut.errors import CodecError, CodecLimits, LimitExceeded

__all__ = ["compress", "compress_slices", "Inflater", "decompress", "SLICE_BYTES"]

_RAW_DEFLATE = -15  # zlib wbits: raw stream, 32 KiB window
_DEFAULT_LIMITS = CodecLimits()

#: Input per step of L{compress_slices}: about half a millisecond of zlib
#: on a 2020s server core.
SLICE_BYTES = 64 * 1024


def compress(payload: bytes, level: int = zlib.Z_DEFAULT_COMPRESSION) -> bytes:
    """
    Compress one message as a complete raw DEFLATE stream (final block set).
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, _RAW_DEFLATE)
    return compressor.compress(payload) + compressor.flush(zlib.Z_FINISH)


def compress_slices(
    payload: bytes, slice_bytes: int = SLICE_BYTES, level: int = zlib.Z_DEFAULT_COMPRESSION
) -> Iterator[bytes]:
    """
    L{compress} one step at a time: each step compresses at most
    C{slice_bytes} of C{payload} and yields what zlib has ready (often
    nothing: zlib keeps up to a few hundred KB before it emits), and the
    last step ends the stream. The pieces joined are one complete raw
    DEFLATE stream of C{payload}.

    Compressing a big message (a 5,000-line status page is about 700 KB of
    BSON and 6 ms of zlib at once) this way lets a caller give the reactor
    a turn between steps, for instance with
    C{twisted.internet.task.cooperate}; alternatively L{compress} may run in
    a worker thread, as zlib releases the GIL while it works.

    @raise ValueError: C{slice_bytes} is not positive.
    """
    if slice_bytes <= 0:
        raise ValueError(f"slice_bytes must be positive, got {slice_bytes!r}")
    compressor = zlib.compressobj(level, zlib.DEFLATED, _RAW_DEFLATE)
    view = memoryview(payload)
    try:
        for start in range(0, len(view), slice_bytes):
            yield compressor.compress(view[start : start + slice_bytes])
        yield compressor.flush(zlib.Z_FINISH)
    finally:
        view.release()


def compressed_input_limit(limits: CodecLimits) -> int:
    """
    The most compressed bytes one message may take.

    Without it a peer could send empty non-final blocks for ever: no output,
    so C{max_message_bytes} never trips. Real DEFLATE output is at most a
    fraction of a percent larger than its input, so twice the message limit
    plus slack never rejects genuine traffic.
    """
    return 2 * limits.max_message_bytes + 65536


@attrs.define(eq=False)
class Inflater:
    """
    Push-style decompressor for one message arriving in arbitrary pieces.

    Call L{feed} with each chunk received; it returns the whole decompressed
    message once the DEFLATE stream ends, after which L{unused} holds the
    bytes that followed it. Output is capped at C{limits.max_message_bytes}
    while decompressing, so a decompression bomb allocates at most one byte
    beyond the limit before L{LimitExceeded} is raised.
    """

    _limits: CodecLimits = _DEFAULT_LIMITS
    _decompressor: zlib._Decompress = attrs.field(
        init=False, repr=False, factory=lambda: zlib.decompressobj(_RAW_DEFLATE)
    )
    _chunks: list[bytes] = attrs.field(init=False, repr=False, factory=list)
    _size: int = attrs.field(init=False, default=0)
    _consumed: int = attrs.field(init=False, default=0)
    _finished: bool = attrs.field(init=False, default=False)
    _failed: bool = attrs.field(init=False, default=False)
    _unused: bytes = attrs.field(init=False, repr=False, default=b"")

    @property
    def finished(self) -> bool:
        """
        Whether the DEFLATE stream's final block has been seen.
        """
        return self._finished

    @property
    def unused(self) -> bytes:
        """
        Bytes fed after the end of the DEFLATE stream; empty until then.
        """
        return self._unused

    @property
    def decompressed_size(self) -> int:
        """
        Bytes of message produced so far.
        """
        return self._size

    def feed(self, data: bytes) -> bytes | None:
        """
        Decompress the next chunk from the network.

        @return: The complete message when this chunk finished the DEFLATE
            stream, else L{None} (more input needed).
        @raise CodecError: Corrupt DEFLATE data, or a limit exceeded (as
            L{LimitExceeded}); the inflater is unusable afterwards.
        @raise ValueError: Called after the message was returned, or after
            an error.
        """
        if self._finished or self._failed:
            raise ValueError("Inflater already finished; pass on .unused instead")
        try:
            return self._feed(data)
        except CodecError:
            self._failed = True
            self._chunks = []
            raise

    def _feed(self, data: bytes) -> bytes | None:
        decompressor = self._decompressor
        pending = bytes(data)
        while pending:
            room = self._limits.max_message_bytes - self._size
            try:
                # Asking for one byte beyond the room is how an overflow is
                # seen without ever allocating more than that.
                out = decompressor.decompress(pending, room + 1)
            except zlib.error as e:
                raise CodecError(f"corrupt DEFLATE data: {e}") from None
            self._size += len(out)
            if self._size > self._limits.max_message_bytes:
                raise LimitExceeded(
                    f"message decompresses beyond {self._limits.max_message_bytes} bytes"
                )
            if out:
                self._chunks.append(out)
            tail = decompressor.unconsumed_tail
            if decompressor.eof:
                self._unused = decompressor.unused_data + tail
                self._consumed += len(pending) - len(self._unused)
            else:
                self._consumed += len(pending) - len(tail)
            if self._consumed > compressed_input_limit(self._limits):
                raise LimitExceeded("DEFLATE stream is implausibly long for its output")
            if decompressor.eof:
                self._finished = True
                message = b"".join(self._chunks)
                self._chunks = []
                return message
            pending = tail
        return None


def decompress(data: bytes, limits: CodecLimits = _DEFAULT_LIMITS) -> tuple[bytes, bytes]:
    """
    Decompress a message that is wholly in C{data}.

    The same checks as L{Inflater} fed C{data} in one piece, in one zlib
    call.

    @return: C{(message, unused)} where C{unused} is what followed the
        DEFLATE stream.
    @raise CodecError: Corrupt or truncated stream, or a limit exceeded.
    """
    decompressor = zlib.decompressobj(_RAW_DEFLATE)
    try:
        # One byte beyond the limit shows an overflow without allocating more.
        message = decompressor.decompress(data, limits.max_message_bytes + 1)
    except zlib.error as e:
        raise CodecError(f"corrupt DEFLATE data: {e}") from None
    if len(message) > limits.max_message_bytes:
        raise LimitExceeded(f"message decompresses beyond {limits.max_message_bytes} bytes")
    finished = decompressor.eof
    unused = decompressor.unused_data if finished else b""
    consumed = len(data) - len(unused) - len(decompressor.unconsumed_tail)
    if consumed > compressed_input_limit(limits):
        raise LimitExceeded("DEFLATE stream is implausibly long for its output")
    if not finished:
        raise CodecError("DEFLATE stream is truncated")
    return message, unused
