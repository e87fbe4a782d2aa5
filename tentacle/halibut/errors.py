"""
The one error type the Halibut codecs raise on bad input, and their limits.

Every decoder in this package turns malformed, truncated or oversized input
into L{CodecError}, so callers guarding a connection catch exactly one type;
anything else escaping a decoder is a bug.
"""

from __future__ import annotations

import attrs

MiB = 1024 * 1024


class CodecError(Exception):
    """
    Bytes from the peer do not form a valid Halibut message or stream.
    """


class LimitExceeded(CodecError):
    """
    Input is well-formed so far but exceeds a configured L{CodecLimits} bound.
    """


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen
class CodecLimits:
    """
    Bounds that keep a hostile peer from making a decoder allocate or recurse
    without limit.

    Halibut itself has no such limits; the defaults are generous for real
    Tentacle traffic (files travel as DataStreams, not inside messages).

    @ivar max_message_bytes: Largest decompressed (BSON) message accepted.
    @ivar max_depth: Deepest nesting of documents/arrays; the top-level
        document is depth 1.
    @ivar max_string_bytes: Largest UTF-8 string or key, in bytes.
    @ivar max_stream_memory_bytes: DataStream bytes kept in memory before a
        sink spills to a temporary file.
    @ivar max_streams_memory_bytes: DataStream bytes of one message (a
        request, or a response), all its streams together, kept in memory;
        each stream past it spills to a temporary file, so 150 files of
        0.6 MB hold 4 MiB of memory, not 90 MB.
    @ivar max_streams: data streams one message may declare; each that
        spills holds a file descriptor until the message is complete, so
        a peer could otherwise exhaust them.
    """

    max_message_bytes: int = attrs.field(default=4 * MiB, validator=_positive)
    max_depth: int = attrs.field(default=64, validator=_positive)
    max_string_bytes: int = attrs.field(default=4 * MiB, validator=_positive)
    max_stream_memory_bytes: int = attrs.field(default=1 * MiB, validator=_positive)
    max_streams_memory_bytes: int = attrs.field(default=4 * MiB, validator=_positive)
    max_streams: int = attrs.field(default=256, validator=_positive)


class ProtocolError(Exception):
    """
    The peer broke the protocol (a bad control line, a stream of the wrong
    length, a timeout's worth of silence): the connection must close.
    """
