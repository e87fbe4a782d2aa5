"""
Fuzz targets for everything that reads a peer's bytes before (or while) it
is trusted: the first-request reader, the identity line, the BSON decoder
and the message layer over it, the DEFLATE message boundary, and the
data-stream reader.

Each target takes one C{bytes} input, uses its first bytes to choose how
the rest is split into network reads, and checks two things:

  - only the reader's documented error escapes (anything else is a crash);
  - the outcome does not depend on how the bytes were split into reads,
    and what follows a complete item is handed on intact.

They are shared by the hypothesis tests (C{tests/test_fuzz.py}) and the
atheris runner (C{tools/fuzz.py}); both replay C{tests/fuzz_corpus/}.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Callable

from tentacle.contracts import tentacle_registry
from tentacle.halibut import bson
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.errors import CodecError, CodecLimits
from tentacle.halibut.serializer import RequestMessage, decode_envelope
from tentacle.halibut.streams import (
    DataStreamReader,
    ExpectedStream,
    SpoolingSink,
    stream_header,
    stream_trailer,
)
from tentacle.halibut.handshake import IdentityError, IdentityReader, InitialRequestTooLong, PreambleReader

CORPUS = Path(__file__).parent / "fuzz_corpus"
#: Small limits, so the fuzzer reaches them with short inputs.
LIMITS = CodecLimits(
    max_message_bytes=4096, max_depth=8, max_string_bytes=512, max_stream_memory_bytes=64
)
_REGISTRY = tentacle_registry()


def split(data: bytes) -> tuple[bytes, list[bytes]]:
    """
    The input less its first two bytes, and those bytes' choice of reads:
    byte 0 picks a read size (1 to 256), byte 1 a first read of its own.
    """
    if len(data) < 2:
        return data, [data] if data else []
    size, first, body = data[0] + 1, data[1], data[2:]
    reads = [body[:first]] if first else []
    rest = body[first:]
    reads += [rest[i : i + size] for i in range(0, len(rest), size)]
    return body, reads


def preamble(data: bytes) -> None:
    body, reads = split(data)
    whole = _read_preamble([body])
    assert whole == _read_preamble(reads), "the outcome depends on how the bytes arrive"
    if isinstance(whole, tuple):
        request, rest = whole
        assert "\r" not in request
        assert body.endswith(rest)
        assert len(request) < 256


def _read_preamble(reads: list[bytes]) -> object:
    reader = PreambleReader(limit=256)
    try:
        for index, chunk in enumerate(reads):
            done = reader.feed(chunk)
            if done is not None:
                return done[0], done[1] + b"".join(reads[index + 1 :])
    except InitialRequestTooLong:
        return "too long"
    return None


def identity(data: bytes) -> None:
    body, reads = split(data)
    whole = _read_identity([body])
    assert whole == _read_identity(reads), "the outcome depends on how the bytes arrive"
    if isinstance(whole, tuple):
        assert body.endswith(whole[1])
        assert body.startswith(b"MX-CLIENT")


def _read_identity(reads: list[bytes]) -> object:
    reader = IdentityReader()
    try:
        for index, chunk in enumerate(reads):
            done = reader.feed(chunk)
            if done is not None:
                return done[0], done[1] + b"".join(reads[index + 1 :])
    except IdentityError:
        return "refused"
    return None


def bson_message(data: bytes) -> None:
    """
    BSON as it comes out of the inflater, then the request layer over it.
    """
    try:
        tree = bson.decode_document(data, LIMITS)
    except CodecError:
        return
    assert isinstance(tree, dict)
    try:
        decode_envelope(tree, _REGISTRY, RequestMessage)
    except CodecError:
        pass


def deflate(data: bytes) -> None:
    """
    Byte 2 chooses: arbitrary bytes as DEFLATE, or a real compressed
    message followed by what the connection carries next, split anywhere.
    """
    body, reads = split(data)
    if not body or body[0] % 2 == 0:
        inflater = Inflater(LIMITS)
        try:
            for chunk in reads:
                if inflater.finished:
                    break
                inflater.feed(chunk)
        except CodecError:
            pass
        return
    cut = body[1] if len(body) > 1 else 0
    message, following = body[2 : 2 + cut], body[2 + cut :]
    wire = compress(message) + following
    size = max(1, data[0] % 64)
    inflater = Inflater(LIMITS)
    result = None
    for offset in range(0, len(wire), size):
        result = inflater.feed(wire[offset : offset + size])
        if result is not None:
            unused = inflater.unused + wire[offset + size :]
            assert result == message, "the message came back changed"
            assert unused == following, "bytes after the message were lost or taken"
            return
    raise AssertionError("a complete DEFLATE stream was not recognised")


def streams(data: bytes) -> None:
    """
    Byte 2 chooses: arbitrary bytes against streams the next bytes declare,
    or correct frames for payloads cut from the input, split anywhere.
    """
    body, reads = split(data)
    if len(body) < 2:
        return
    ids = [uuid.UUID(int=n + 1) for n in range(body[1] % 4)]
    if body[0] % 2 == 0:
        declared = [ExpectedStream(i, b % 40) for i, b in zip(ids, body[2:])]
        reader = DataStreamReader(declared, limits=LIMITS)
        try:
            for chunk in reads:
                rest = reader.feed(chunk)
                if rest is not None:
                    break
        except CodecError:
            return
        if reader.done:
            for stream in reader.received:
                assert isinstance(stream.sink, SpoolingSink)
                assert stream.sink.size == stream.length
                stream.sink.discard()
        return
    payload = body[2:]
    pieces = [payload[i::3] for i in range(len(ids))]
    wire = b"".join(
        stream_header(i, len(p)) + p + stream_trailer(len(p)) for i, p in zip(ids, pieces)
    ) + b"NEXT"
    size = max(1, data[0] % 97)
    reader = DataStreamReader([ExpectedStream(i, len(p)) for i, p in zip(ids, pieces)], limits=LIMITS)
    rest = None
    offset = 0
    while rest is None and offset <= len(wire):
        rest = reader.feed(wire[offset : offset + size])
        offset += size
    assert rest is not None, "well-framed streams were not completed"
    assert rest + wire[offset:] == b"NEXT", "bytes after the streams were lost or taken"
    got = {s.id: s.sink.fileobj().read() for s in reader.received}  # type: ignore[attr-defined]
    assert got == dict(zip(ids, pieces)), "a payload came back changed"
    for stream in reader.received:
        stream.sink.discard()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "preamble": preamble,
    "identity": identity,
    "bson": bson_message,
    "deflate": deflate,
    "streams": streams,
}
