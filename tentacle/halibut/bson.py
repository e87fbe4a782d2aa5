"""
BSON as Json.NET's C{BsonDataWriter} writes it, and a hardened reader.

Only the element types Json.NET produces for Halibut messages are supported.
The encoder is byte-for-byte what Newtonsoft.Json.Bson's C{BsonBinaryWriter}
emits for the same tree: little-endian lengths computed bottom-up, keys as
C strings, strings as int32 length (including the NUL) + UTF-8 + NUL, array
keys C{"0"}, C{"1"}, ..., C{Guid} as binary subtype 4 in C{ToByteArray()}
order.

Python value model (both directions)::

    dict             <-> 0x03 document (key order kept)
    list / tuple      -> 0x04 array  (decodes to list)
    str              <-> 0x02 string
    bool             <-> 0x08 boolean
    None             <-> 0x0A null
    int              <-> 0x10 int32 (ints outside int32 encode as int64)
    Int64            <-> 0x12 int64 (a .NET long, even when small)
    float            <-> 0x01 double
    bytes            <-> 0x05 binary, subtype 0
    uuid.UUID        <-> 0x05 binary, subtype 4 (Guid.ToByteArray order)
    aware datetime   <-> 0x09 UTC datetime, milliseconds (decodes as UTC)

The decoder is iterative, so hostile nesting can only hit
L{CodecLimits.max_depth}, never Python's recursion limit, and every failure
on bad input is a L{CodecError}.

L{encode_document} and L{decode_document} run on the compiled core when
L{tentacle.halibut.accel} has one; it returns the same bytes and trees or
declines, and then the pure-Python functions here
(L{encode_document_python}, L{decode_document_python}) run.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from types import ModuleType
from typing import Any

from tentacle.halibut import accel
from tentacle.halibut.dotnet import (
    datetime_from_bson_millis,
    datetime_to_bson_millis,
    guid_from_bytes,
    guid_to_bytes,
)
from tentacle.halibut.errors import CodecError, CodecLimits, LimitExceeded

__all__ = [
    "Int64",
    "encode_document",
    "decode_document",
    "encode_document_python",
    "decode_document_python",
]

_DOUBLE = 0x01
_STRING = 0x02
_DOCUMENT = 0x03
_ARRAY = 0x04
_BINARY = 0x05
_BOOLEAN = 0x08
_DATETIME = 0x09
_NULL = 0x0A
_INT32 = 0x10
_INT64 = 0x12

_SUBTYPE_GENERIC = 0x00
_SUBTYPE_BINARY_OLD = 0x02
_SUBTYPE_UUID_OLD = 0x03
_SUBTYPE_UUID = 0x04

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_I32 = struct.Struct("<i")
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")

_DEFAULT_LIMITS = CodecLimits()


class Int64(int):
    """
    An integer that is a .NET C{long} on the wire.

    Json.NET writes every C{long} as BSON int64 however small it is, and
    decoding gives back this type, so re-encoding a decoded tree reproduces
    the original bytes.
    """

    __slots__ = ()

    def __new__(cls, value: int = 0) -> Int64:
        self = super().__new__(cls, value)
        if not _INT64_MIN <= self <= _INT64_MAX:
            raise ValueError(f"out of Int64 range: {int(self)}")
        return self

    def __repr__(self) -> str:
        return f"Int64({int(self)})"


# --- encoding ---------------------------------------------------------------


# The compiled core caps its own recursion far below this anyway.
_CORE_DEPTH_CAP = 1 << 20


def encode_document(doc: Mapping[str, Any], limits: CodecLimits = _DEFAULT_LIMITS) -> bytes:
    """
    Serialize C{doc} as a top-level BSON document, as Json.NET would.

    The compiled core's result when it has one, else (and for every
    error) L{encode_document_python}'s.
    """
    core = accel.core
    if core is not None:
        data: bytes | None = core.encode_document(doc, min(limits.max_depth, _CORE_DEPTH_CAP))
        if data is not None:
            return data
    return encode_document_python(doc, limits)


def encode_document_python(
    doc: Mapping[str, Any], limits: CodecLimits = _DEFAULT_LIMITS
) -> bytes:
    """
    Serialize C{doc} as a top-level BSON document, as Json.NET would.

    Only C{limits.max_depth} is applied (it also stops reference cycles);
    the other limits are for what a peer sends us.

    @raise TypeError: a value, or a key, of a type outside the model, or a
        naive datetime.
    @raise ValueError: a value of a supported type that Json.NET could not
        write either: a key containing NUL, an int beyond Int64, a string
        that is not encodable as UTF-8 (lone surrogates), nesting deeper
        than C{limits.max_depth}, or a document of 2 GiB or more.
    """
    if not isinstance(doc, Mapping):
        raise TypeError(f"a BSON document must be a mapping, not {type(doc).__name__}")
    return _encode_container(doc.items(), 1, limits.max_depth)


def _encode_container(items: Iterable[tuple[object, Any]], depth: int, max_depth: int) -> bytes:
    if depth > max_depth:
        raise ValueError(f"nesting deeper than {max_depth}")
    parts = [_encode_element(_encode_key(key), value, depth, max_depth) for key, value in items]
    body = b"".join(parts)
    size = len(body) + 5
    if size > _INT32_MAX:
        raise ValueError("BSON document too large")
    return _I32.pack(size) + body + b"\x00"


def _encode_key(key: object) -> bytes:
    if not isinstance(key, str):
        raise TypeError(f"BSON keys must be str, not {type(key).__name__}")
    if "\x00" in key:
        raise ValueError("a BSON key must not contain NUL")
    return key.encode("utf-8") + b"\x00"


def _encode_element(key: bytes, value: Any, depth: int, max_depth: int) -> bytes:
    # Order matters: bool and Int64 are int subclasses.
    if value is None:
        return bytes((_NULL,)) + key
    if isinstance(value, bool):
        return bytes((_BOOLEAN,)) + key + (b"\x01" if value else b"\x00")
    if isinstance(value, Int64):
        return bytes((_INT64,)) + key + _I64.pack(value)
    if isinstance(value, int):
        if _INT32_MIN <= value <= _INT32_MAX:
            return bytes((_INT32,)) + key + _I32.pack(value)
        if _INT64_MIN <= value <= _INT64_MAX:
            return bytes((_INT64,)) + key + _I64.pack(value)
        raise ValueError(f"integer out of Int64 range: {value}")
    if isinstance(value, float):
        return bytes((_DOUBLE,)) + key + _F64.pack(value)
    if isinstance(value, str):
        encoded = value.encode("utf-8")
        return bytes((_STRING,)) + key + _I32.pack(len(encoded) + 1) + encoded + b"\x00"
    if isinstance(value, (bytes, bytearray)):
        return _binary(key, _SUBTYPE_GENERIC, bytes(value))
    if isinstance(value, uuid.UUID):
        return _binary(key, _SUBTYPE_UUID, guid_to_bytes(value))
    if isinstance(value, datetime):
        return bytes((_DATETIME,)) + key + _I64.pack(datetime_to_bson_millis(value))
    if isinstance(value, Mapping):
        return bytes((_DOCUMENT,)) + key + _encode_container(value.items(), depth + 1, max_depth)
    if isinstance(value, (list, tuple)):
        items = ((str(index), item) for index, item in enumerate(value))
        return bytes((_ARRAY,)) + key + _encode_container(items, depth + 1, max_depth)
    raise TypeError(f"cannot encode {type(value).__name__} as BSON")


def _binary(key: bytes, subtype: int, data: bytes) -> bytes:
    return bytes((_BINARY,)) + key + _I32.pack(len(data)) + bytes((subtype,)) + data


# --- decoding ---------------------------------------------------------------


def decode_document(data: bytes, limits: CodecLimits = _DEFAULT_LIMITS) -> dict[str, Any]:
    """
    Parse one top-level BSON document that must span all of C{data}.

    The compiled core's result when it has one, else (and for every
    error) L{decode_document_python}'s.

    @raise CodecError: see L{decode_document_python}.
    """
    core = accel.core
    if core is not None:
        tree: dict[str, Any] | None = core.decode_document(
            data, limits.max_message_bytes, limits.max_depth, limits.max_string_bytes
        )
        if tree is not None:
            return tree
    return decode_document_python(data, limits)


def decode_document_python(data: bytes, limits: CodecLimits = _DEFAULT_LIMITS) -> dict[str, Any]:
    """
    Parse one top-level BSON document that must span all of C{data}.

    Stricter than Json.NET's reader where that closes doors to a hostile
    peer and costs nothing with Json.NET's own output: declared lengths must
    match exactly, strings must be valid UTF-8 with their NUL, booleans must
    be 0 or 1, and a key may not repeat within a document (Json.NET would
    let the last one win, which invites parser-differential tricks with
    C{$type}). Array keys are not checked, as Json.NET ignores them.

    @raise CodecError: C{data} is not such a document, uses an element type
        outside the model, or breaks C{limits} (as L{LimitExceeded}).
    """
    data = bytes(data)
    size = len(data)
    if size > limits.max_message_bytes:
        raise LimitExceeded(f"message of {size} bytes exceeds {limits.max_message_bytes}")
    if size < 5:
        raise CodecError("BSON document shorter than 5 bytes")
    (declared,) = _I32.unpack_from(data, 0)
    if declared != size:
        raise CodecError(f"BSON document declares {declared} bytes but has {size}")

    max_string = limits.max_string_bytes
    root: dict[str, Any] = {}
    # One frame per open container: (container, offset just past its end).
    stack: list[tuple[dict[str, Any] | list[Any], int]] = [(root, size)]
    pos = 4
    while stack:
        container, end = stack[-1]
        if pos >= end:
            raise CodecError("BSON container is missing its terminator")
        kind = data[pos]
        pos += 1
        if kind == 0:
            if pos != end:
                raise CodecError("BSON container ends before its declared length")
            stack.pop()
            continue

        nul = data.find(b"\x00", pos, end)
        if nul < 0:
            raise CodecError("unterminated BSON key")
        if nul - pos > max_string:
            raise LimitExceeded(f"BSON key longer than {max_string} bytes")
        key_start, pos = pos, nul + 1

        value: Any
        if kind == _DOCUMENT or kind == _ARRAY:
            if pos + 4 > end:
                raise CodecError("truncated BSON container length")
            (length,) = _I32.unpack_from(data, pos)
            if length < 5 or length > end - pos:
                raise CodecError(f"BSON container length {length} is inconsistent")
            if len(stack) >= limits.max_depth:
                raise LimitExceeded(f"BSON nested deeper than {limits.max_depth}")
            value = {} if kind == _DOCUMENT else []
            child_end = pos + length
            pos += 4
        elif kind == _STRING:
            if pos + 4 > end:
                raise CodecError("truncated BSON string length")
            (length,) = _I32.unpack_from(data, pos)
            if length < 1 or length > end - pos - 4:
                raise CodecError(f"BSON string length {length} is inconsistent")
            if length - 1 > max_string:
                raise LimitExceeded(f"BSON string longer than {max_string} bytes")
            stop = pos + 4 + length - 1
            if data[stop] != 0:
                raise CodecError("BSON string is missing its NUL terminator")
            value = _utf8(data[pos + 4 : stop])
            pos = stop + 1
        elif kind == _INT32:
            if pos + 4 > end:
                raise CodecError("truncated BSON int32")
            (value,) = _I32.unpack_from(data, pos)
            pos += 4
        elif kind == _INT64:
            if pos + 8 > end:
                raise CodecError("truncated BSON int64")
            value = Int64(_I64.unpack_from(data, pos)[0])
            pos += 8
        elif kind == _DOUBLE:
            if pos + 8 > end:
                raise CodecError("truncated BSON double")
            (value,) = _F64.unpack_from(data, pos)
            pos += 8
        elif kind == _BOOLEAN:
            if pos + 1 > end:
                raise CodecError("truncated BSON boolean")
            if data[pos] > 1:
                raise CodecError(f"BSON boolean byte is {data[pos]}, not 0 or 1")
            value = data[pos] == 1
            pos += 1
        elif kind == _NULL:
            value = None
        elif kind == _DATETIME:
            if pos + 8 > end:
                raise CodecError("truncated BSON datetime")
            value = datetime_from_bson_millis(_I64.unpack_from(data, pos)[0])
            pos += 8
        elif kind == _BINARY:
            value, pos = _decode_binary(data, pos, end)
        else:
            raise CodecError(f"unsupported BSON element type 0x{kind:02x}")

        if isinstance(container, list):
            container.append(value)
        else:
            key = _utf8(data[key_start:nul])
            if key in container:
                raise CodecError(f"duplicate BSON key {key[:64]!r}")
            container[key] = value
        if kind == _DOCUMENT or kind == _ARRAY:
            stack.append((value, child_end))
    return root


def _decode_binary(data: bytes, pos: int, end: int) -> tuple[Any, int]:
    if pos + 5 > end:
        raise CodecError("truncated BSON binary header")
    (length,) = _I32.unpack_from(data, pos)
    subtype = data[pos + 4]
    start = pos + 5
    if length < 0 or length > end - start:
        raise CodecError(f"BSON binary length {length} is inconsistent")
    payload = data[start : start + length]
    if subtype == _SUBTYPE_UUID or (subtype == _SUBTYPE_UUID_OLD and length == 16):
        return guid_from_bytes(payload), start + length
    if subtype == _SUBTYPE_BINARY_OLD:
        # The deprecated subtype repeats the length inside the payload.
        if length < 4 or _I32.unpack_from(payload, 0)[0] != length - 4:
            raise CodecError("BSON old-style binary has an inconsistent inner length")
        payload = payload[4:]
    return payload, start + length


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CodecError(f"invalid UTF-8 in BSON: {e.reason}") from None


# --- the compiled core --------------------------------------------------------


def _configure(core: ModuleType) -> None:
    # UUID's own slots, set as UUID.__init__ sets them, when they are the
    # ones this was written against; otherwise the core calls UUID().
    slots = uuid.UUID.__dict__.get("__slots__")
    fast = slots == ("int", "is_safe", "__weakref__")
    core.configure_values(
        int64=Int64,
        uuid=uuid.UUID,
        uuid_int=uuid.UUID.__dict__["int"] if fast else None,
        uuid_is_safe=uuid.UUID.__dict__["is_safe"] if fast else None,
        safe_unknown=uuid.SafeUUID.unknown,
        utc=timezone.utc,
        int_enum=enum.IntEnum,
    )


accel.register(_configure)
