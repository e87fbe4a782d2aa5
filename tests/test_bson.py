"""
Tests for L{tentacle.halibut.bson}.
"""

from __future__ import annotations

import struct
import tracemalloc
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.bson import Int64, decode_document, encode_document
from tentacle.halibut.errors import CodecError, CodecLimits, LimitExceeded
from tests.codec_cores import on_both_cores

# Produced by Json.NET 6.0 (Debian's Newtonsoft.Json.dll, whose BsonWriter
# writes what Newtonsoft.Json.Bson's BsonDataWriter writes) under Mono, by
# JsonSerializer.Serialize of a class with these public fields, in order:
#   string id, Guid activityId, int small = 42, int negative = -7,
#   long longSmall = 5, long longBig = 1234567890123, double dbl = 1.5,
#   double dblNeg = -0.1, bool yes, bool no, string nothing = null,
#   string unicode, string empty, TimeSpan ts = 10 min,
#   DateTimeOffset when = 2024-02-29 13:14:15.678 +02:00,
#   DateTime utc = 1969-12-31 23:59:59.9995 UTC, byte[] blob,
#   object[] mixed = {1, "two", null, int[0], Dictionary<string,object>()},
#   Inner stream = {long length = 3, Guid id}, List<Inner> streams = empty,
#   Dictionary<string,object> dict = {"kéy": 1L, "b": {{2.0}}}
JSONNET_MESSAGE = bytes.fromhex(
    "fb0100000269640048000000495363726970745365727669636556323a3a537461727453"
    "63726970745b315d202f2030633861356633372d316432622d346139652d396633632d37"
    "6236653164326333613462000561637469766974794964001000000004375f8a0c2b1d9e"
    "4a9f3c7b6e1d2c3a4b10736d616c6c002a000000106e6567617469766500f9ffffff126c"
    "6f6e67536d616c6c000500000000000000126c6f6e6742696700cb04fb711f0100000164"
    "626c00000000000000f83f0164626c4e6567009a9999999999b9bf087965730001086e6f"
    "00000a6e6f7468696e670002756e69636f6465001a00000068c3a96c6c6f20e4b896e795"
    "8c20f09f9880206e756c00696e0002656d70747900010000000002747300090000003030"
    "3a31303a303000097768656e00fe7592f48d010000097574630000000000000000000562"
    "6c6f62000400000000000102ff046d69786564002a000000103000010000000231000400"
    "000074776f000a320004330005000000000334000500000000000373747265616d002e00"
    "0000126c656e677468000300000000000000056964001000000004332211005544776688"
    "99aabbccddeeff000473747265616d730005000000000364696374002e000000126bc3a9"
    "790001000000000000000462001800000004300010000000013000000000000000004000"
    "000000"
)

UTC = timezone.utc

# The Python tree for JSONNET_MESSAGE, as decoding gives it back.
JSONNET_TREE: dict[str, Any] = {
    "id": "IScriptServiceV2::StartScript[1] / 0c8a5f37-1d2b-4a9e-9f3c-7b6e1d2c3a4b",
    "activityId": uuid.UUID("0c8a5f37-1d2b-4a9e-9f3c-7b6e1d2c3a4b"),
    "small": 42,
    "negative": -7,
    "longSmall": Int64(5),
    "longBig": Int64(1234567890123),
    "dbl": 1.5,
    "dblNeg": -0.1,
    "yes": True,
    "no": False,
    "nothing": None,
    "unicode": "h\u00e9llo \u4e16\u754c \U0001f600 nul\x00in",
    "empty": "",
    "ts": "00:10:00",
    "when": datetime(2024, 2, 29, 11, 14, 15, 678000, tzinfo=UTC),
    # .NET truncates -0.5 ms towards zero: the epoch itself.
    "utc": datetime(1970, 1, 1, tzinfo=UTC),
    "blob": b"\x00\x01\x02\xff",
    "mixed": [1, "two", None, [], {}],
    "stream": {"length": Int64(3), "id": uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")},
    "streams": [],
    "dict": {"k\u00e9y": Int64(1), "b": [[2.0]]},
}

FUZZ = settings(max_examples=300, deadline=timedelta(milliseconds=500), database=None)
ROUNDTRIP = settings(max_examples=150, deadline=timedelta(milliseconds=500), database=None)

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_keys = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1).map(Int64),
    st.floats(allow_nan=False),
    _text,
    st.binary(max_size=20),
    st.uuids(),
    st.datetimes(timezones=st.just(UTC)).map(
        lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000)
    ),
)
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=25,
)
documents = st.dictionaries(_keys, _values, max_size=6)


def element(kind: int, key: bytes, payload: bytes) -> bytes:
    return bytes((kind,)) + key + b"\x00" + payload


def document(*elements: bytes) -> bytes:
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def string(text: bytes) -> bytes:
    return struct.pack("<i", len(text) + 1) + text + b"\x00"


def nested_arrays(depth: int) -> bytes:
    """
    A document holding C{depth - 1} arrays nested in one another, built
    without recursion.
    """
    sizes = [5]
    for _ in range(depth - 1):
        sizes.append(sizes[-1] + 8)
    head = b"".join(struct.pack("<i", size) + b"\x040\x00" for size in reversed(sizes[1:]))
    return head + struct.pack("<i", 5) + b"\x00" * depth


class JsonNetCompatibilityTests(SynchronousTestCase):
    """
    Bytes produced by Json.NET itself.
    """

    def test_encodeMatchesJsonNet(self) -> None:
        self.assertEqual(encode_document(JSONNET_TREE), JSONNET_MESSAGE)

    def test_decodeJsonNet(self) -> None:
        decoded = decode_document(JSONNET_MESSAGE)
        self.assertEqual(decoded, JSONNET_TREE)
        self.assertEqual(list(decoded), list(JSONNET_TREE))
        self.assertIsInstance(decoded["longSmall"], Int64)
        self.assertNotIsInstance(decoded["small"], Int64)

    def test_reencodeIsIdentical(self) -> None:
        self.assertEqual(encode_document(decode_document(JSONNET_MESSAGE)), JSONNET_MESSAGE)

    def test_emptyAndNullEnvelope(self) -> None:
        self.assertEqual(encode_document({}), bytes.fromhex("0500000000"))
        self.assertEqual(
            encode_document({"Message": None}), bytes.fromhex("0e0000000a4d6573736167650000")
        )

    def test_guidIsSubtypeFourInToByteArrayOrder(self) -> None:
        guid = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
        self.assertEqual(
            encode_document({"g": guid}),
            document(element(0x05, b"g", bytes.fromhex("1000000004") + guid.bytes_le)),
        )


class EncodeTests(SynchronousTestCase):
    """
    Python values to BSON elements.
    """

    def test_intWidth(self) -> None:
        self.assertEqual(encode_document({"i": 2**31 - 1})[4], 0x10)
        self.assertEqual(encode_document({"i": -(2**31)})[4], 0x10)
        self.assertEqual(encode_document({"i": 2**31})[4], 0x12)
        self.assertEqual(encode_document({"i": -(2**31) - 1})[4], 0x12)
        self.assertEqual(encode_document({"i": Int64(0)}), document(element(0x12, b"i", bytes(8))))

    def test_boolIsNotInt(self) -> None:
        self.assertEqual(encode_document({"b": True}), document(element(0x08, b"b", b"\x01")))

    def test_tupleAndBytearray(self) -> None:
        self.assertEqual(encode_document({"a": (1, "x")}), encode_document({"a": [1, "x"]}))
        self.assertEqual(encode_document({"a": bytearray(b"z")}), encode_document({"a": b"z"}))

    def test_awareDatetimeWithOffset(self) -> None:
        plus2 = timezone(timedelta(hours=2))
        self.assertEqual(
            encode_document({"d": datetime(1970, 1, 1, 2, 0, 1, tzinfo=plus2)}),
            document(element(0x09, b"d", struct.pack("<q", 1000))),
        )

    def test_rejectsTypes(self) -> None:
        for value in [datetime(2020, 1, 1), {1, 2}, object(), 1j, timedelta(1)]:
            self.assertRaises(TypeError, encode_document, {"v": value})
        self.assertRaises(TypeError, encode_document, {1: "non-str key"})
        self.assertRaises(TypeError, encode_document, [("a", 1)])

    def test_rejectsValues(self) -> None:
        self.assertRaises(ValueError, encode_document, {"a\x00b": 1})
        self.assertRaises(ValueError, encode_document, {"i": 2**63})
        self.assertRaises(ValueError, encode_document, {"s": "\ud800"})
        self.assertRaises(ValueError, Int64, 2**63)
        self.assertEqual(repr(Int64(-3)), "Int64(-3)")

    def test_depthAndCycles(self) -> None:
        deep: dict[str, Any] = {}
        inner = deep
        for _ in range(63):
            inner["x"] = inner = {}
        encode_document(deep)
        inner["x"] = {}
        self.assertRaises(ValueError, encode_document, deep)
        loop: list[Any] = []
        loop.append(loop)
        self.assertRaises(ValueError, encode_document, {"loop": loop})


class DecodeTests(SynchronousTestCase):
    """
    BSON to Python, and everything malformed rejected as L{CodecError}.
    """

    def test_binarySubtypes(self) -> None:
        guid = uuid.uuid4()
        legacy = document(element(0x05, b"u", struct.pack("<i", 16) + b"\x03" + guid.bytes_le))
        self.assertEqual(decode_document(legacy), {"u": guid})
        short_legacy = document(element(0x05, b"u", struct.pack("<i", 2) + b"\x03ab"))
        self.assertEqual(decode_document(short_legacy), {"u": b"ab"})
        bad_uuid = document(element(0x05, b"u", struct.pack("<i", 2) + b"\x04ab"))
        self.assertRaises(CodecError, decode_document, bad_uuid)
        old_style = struct.pack("<i", 6) + b"\x02"
        old = document(element(0x05, b"o", old_style + struct.pack("<i", 2) + b"hi"))
        self.assertEqual(decode_document(old), {"o": b"hi"})
        bad_old = document(element(0x05, b"o", old_style + struct.pack("<i", 9) + b"hi"))
        self.assertRaises(CodecError, decode_document, bad_old)
        other = document(element(0x05, b"x", struct.pack("<i", 1) + b"\x80!"))
        self.assertEqual(decode_document(other), {"x": b"!"})

    def test_datetime(self) -> None:
        decoded = decode_document(document(element(0x09, b"d", struct.pack("<q", -1))))
        self.assertEqual(decoded["d"], datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC))
        self.assertIs(decoded["d"].tzinfo, UTC)
        out_of_range = document(element(0x09, b"d", struct.pack("<q", 2**62)))
        self.assertRaises(CodecError, decode_document, out_of_range)

    def test_malformed(self) -> None:
        good = document(element(0x02, b"s", string(b"hi")))
        cases = {
            "empty": b"",
            "short": b"\x05\x00\x00\x00",
            "trailing bytes": good + b"\x00",
            "length too small": b"\x04" + good[1:],
            "no terminator": document(element(0x02, b"s", string(b"hi")))[:-1] + b"\x01",
            "unknown type": document(element(0x07, b"o", bytes(12))),
            "undefined": document(element(0x06, b"u", b"")),
            "bad bool": document(element(0x08, b"b", b"\x02")),
            "string missing NUL": document(element(0x02, b"s", struct.pack("<i", 3) + b"hi!")),
            "string length zero": document(element(0x02, b"s", struct.pack("<i", 0))),
            "string past end": document(element(0x02, b"s", struct.pack("<i", 99) + b"hi\x00")),
            "bad utf8 value": document(element(0x02, b"s", string(b"\xff"))),
            "surrogate utf8": document(element(0x02, b"s", string(b"\xed\xa0\x80"))),
            "bad utf8 key": document(element(0x0A, b"\xc3", b"")),
            "unterminated key": struct.pack("<i", 8) + b"\x0aab\x00",
            "duplicate key": document(element(0x0A, b"k", b""), element(0x10, b"k", bytes(4))),
            "child past parent": document(element(0x03, b"d", struct.pack("<i", 50) + b"\x00")),
            "child too small": document(element(0x03, b"d", struct.pack("<i", 4) + b"\x00")),
            "child short": document(element(0x04, b"a", struct.pack("<i", 6) + b"\x00\x00")),
            "binary negative": document(element(0x05, b"b", struct.pack("<i", -1) + b"\x00")),
            "binary past end": document(element(0x05, b"b", struct.pack("<iB", 2**31 - 1, 0))),
            "truncated int64": document(element(0x12, b"i", bytes(7))),
            "truncated double": document(element(0x01, b"f", bytes(3))),
        }
        for name, data in cases.items():
            with self.subTest(name):
                self.assertRaises(CodecError, decode_document, data)

    def test_arrayKeysIgnored(self) -> None:
        array = document(element(0x10, b"7", bytes(4)), element(0x0A, b"x", b""))
        self.assertEqual(decode_document(document(element(0x04, b"a", array))), {"a": [0, None]})

    def test_limits(self) -> None:
        limits = CodecLimits(max_message_bytes=64, max_depth=3, max_string_bytes=4)
        decode_document(document(element(0x02, b"s", string(b"1234"))), limits)
        self.assertRaises(
            LimitExceeded, decode_document, document(element(0x02, b"s", string(b"12345"))), limits
        )
        self.assertRaises(
            LimitExceeded, decode_document, document(element(0x0A, b"12345", b"")), limits
        )
        decode_document(nested_arrays(3), limits)
        self.assertRaises(LimitExceeded, decode_document, nested_arrays(4), limits)
        big = document(element(0x02, b"s", string(b"x" * 60)))
        self.assertRaises(LimitExceeded, decode_document, big, limits)

    def test_defaultDepth(self) -> None:
        decode_document(nested_arrays(64))
        self.assertRaises(LimitExceeded, decode_document, nested_arrays(65))

    def test_noRecursion(self) -> None:
        """
        Decoding is iterative: nesting far past Python's recursion limit is
        only bounded by C{max_depth}.
        """
        depth = 50_000
        decoded = decode_document(nested_arrays(depth), CodecLimits(max_depth=depth))
        for _ in range(depth - 1):
            decoded = decoded["0"] if isinstance(decoded, dict) else decoded[0]
        self.assertEqual(decoded, [])

    def test_hugeDeclaredLengthsAllocateNothing(self) -> None:
        data = document(element(0x02, b"s", struct.pack("<i", 2**31 - 1) + b"x\x00"))
        tracemalloc.start()
        try:
            self.assertRaises(CodecError, decode_document, data)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 64 * 1024)


class PropertyTests(SynchronousTestCase):
    """
    Round trips, and robustness against arbitrary input.
    """

    @ROUNDTRIP
    @given(documents)
    def test_roundtrip(self, doc: dict[str, Any]) -> None:
        data = encode_document(doc)
        decoded = decode_document(data)
        self.assertEqual(decoded, doc)
        self.assertEqual(encode_document(decoded), data)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_arbitraryBytes(self, data: bytes) -> None:
        try:
            decode_document(data)
        except CodecError:
            pass

    @FUZZ
    @given(st.binary(max_size=300))
    def test_arbitraryBodyWithValidLength(self, body: bytes) -> None:
        try:
            decode_document(struct.pack("<i", len(body) + 4) + body)
        except CodecError:
            pass

    @FUZZ
    @given(documents, st.data())
    def test_mutatedDocuments(self, doc: dict[str, Any], data: st.DataObject) -> None:
        encoded = bytearray(encode_document(doc))
        for _ in range(data.draw(st.integers(1, 4))):
            index = data.draw(st.integers(0, len(encoded) - 1))
            action = data.draw(st.sampled_from(["set", "delete", "insert", "truncate"]))
            if action == "set":
                encoded[index] = data.draw(st.integers(0, 255))
            elif action == "delete" and len(encoded) > 1:
                del encoded[index]
            elif action == "insert":
                encoded.insert(index, data.draw(st.integers(0, 255)))
            elif action == "truncate":
                del encoded[index:]
            if not encoded:
                break
        try:
            decoded = decode_document(bytes(encoded), CodecLimits(max_depth=8, max_string_bytes=64))
        except CodecError:
            return
        decode_document(encode_document(decoded))


on_both_cores(
    globals(),
    "JsonNetCompatibilityTests",
    "EncodeTests",
    "DecodeTests",
    "PropertyTests",
)
