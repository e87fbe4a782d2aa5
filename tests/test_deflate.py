"""
Tests for L{tentacle.halibut.deflate}.
"""

from __future__ import annotations

import tracemalloc
import zlib
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.deflate import (
    Inflater,
    compress,
    compress_slices,
    compressed_input_limit,
    decompress,
)
from tentacle.halibut.errors import CodecError, CodecLimits, LimitExceeded
from tests.test_bson import JSONNET_MESSAGE

# JSONNET_MESSAGE written through System.IO.Compression.DeflateStream
# (CompressionMode.Compress) under Mono.
DOTNET_DEFLATED = bytes.fromhex(
    "fbcdc8c0c09499c2e0c1c0c0e0199c5c945950129c5a5496999c1a666465155c92585402"
    "118d368c55d0573048b648344d3336d7354c314ad23549b44cd5b54c334ed6354f324b05"
    "0a251b279a2431b026269764966596547aa6300800cd65318fefe2d1969de735dfa63a4f"
    "56c7ca5ba03837312787410b282790979a9e08549dcaf0f3ffffff4239f979e9c1604956"
    "0608000b3965a6339c66f95d280f742d634a520e54ee873d88e3979ace306b2608ecdccf"
    "51995accc0c89197cfc0c095975f92919997cec0549a97999c9f92ca2005d4927178654e"
    "4ebec2931dd39e4fed51f8307f4683425e690e43661e03536a6e4149250323c860a69262"
    "064e206d60606568606560c0c0599e919ac7f0af74d2975ea002ced292640618604dcac9"
    "4f626001b31999feb3e46656a4a640fc6600368dc9102c5b529ecfc065c4c0620cf11ab3"
    "09d48bccc52545a989b90c7a60cfa6e6a597643030c3ccce8486a0b1922043a84b795ac7"
    "cc55bbcfdc7df79f8105a2ab186a584a667209c484ecc32ba19e00e94b62900051066053"
    "180d606e76001100"
)

MiB = 1024 * 1024
PROPERTY = settings(max_examples=150, deadline=timedelta(milliseconds=500), database=None)
# A non-final, empty stored block: five bytes, no output.
EMPTY_STORED_BLOCK = b"\x00\x00\x00\xff\xff"


def feed_in_pieces(inflater: Inflater, data: bytes, cuts: list[int]) -> tuple[list[bytes], bytes]:
    """
    Feed C{data} split at C{cuts} until the stream ends, as a protocol
    would.

    @return: Every message L{Inflater.feed} gave back, and the bytes for the
        next reader: L{Inflater.unused} plus the pieces never fed.
    """
    messages = []
    start = 0
    for end in sorted(set(cuts)) + [len(data)]:
        result = inflater.feed(data[start:end])
        start = max(start, end)
        if result is not None:
            messages.append(result)
            break
    return messages, inflater.unused + data[start:]


class DotnetCompatibilityTests(SynchronousTestCase):
    def test_inflateDotnetDeflateStream(self) -> None:
        message, unused = decompress(DOTNET_DEFLATED + b"NEXT\r\n")
        self.assertEqual(message, JSONNET_MESSAGE)
        self.assertEqual(unused, b"NEXT\r\n")

    def test_compressIsRawDeflate(self) -> None:
        """
        No zlib or gzip header: .NET's DeflateStream reads RFC 1951 only.
        """
        compressed = compress(JSONNET_MESSAGE)
        self.assertEqual(zlib.decompress(compressed, -15), JSONNET_MESSAGE)
        self.assertRaises(zlib.error, zlib.decompress, compressed, 15)


class InflaterTests(SynchronousTestCase):
    def test_byteAtATime(self) -> None:
        data = compress(JSONNET_MESSAGE) + b"\x01\x02trailing"
        inflater = Inflater()
        results = [inflater.feed(data[i : i + 1]) for i in range(len(data) - 10)]
        self.assertEqual([r for r in results if r is not None], [JSONNET_MESSAGE])
        self.assertIsNotNone(results[-1], "message returned by the chunk ending the stream")
        self.assertTrue(inflater.finished)
        self.assertEqual(inflater.unused, b"")
        self.assertEqual(inflater.decompressed_size, len(JSONNET_MESSAGE))

    def test_unusedFromSameChunk(self) -> None:
        inflater = Inflater()
        self.assertIsNone(inflater.feed(b""))
        self.assertEqual(inflater.feed(compress(b"hello") + b"PROCEED\r\n"), b"hello")
        self.assertEqual(inflater.unused, b"PROCEED\r\n")

    def test_feedAfterFinish(self) -> None:
        inflater = Inflater()
        inflater.feed(compress(b"x"))
        self.assertRaises(ValueError, inflater.feed, b"more")

    def test_corrupt(self) -> None:
        inflater = Inflater()
        self.assertRaises(CodecError, inflater.feed, b"\xff\xff\xff")
        self.assertRaises(ValueError, inflater.feed, b"")

    def test_truncated(self) -> None:
        self.assertRaises(CodecError, decompress, compress(JSONNET_MESSAGE)[:-3])

    def test_exactLimit(self) -> None:
        limits = CodecLimits(max_message_bytes=1000)
        self.assertEqual(decompress(compress(bytes(1000)), limits)[0], bytes(1000))
        self.assertRaises(LimitExceeded, decompress, compress(bytes(1001)), limits)

    def test_bombNeverAllocatesBeyondLimit(self) -> None:
        """
        64 MiB of zeros compresses to 64 KiB; inflating it against a 1 MiB
        limit fails without holding more than about the limit in memory.
        """
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        chunk = bytes(MiB)
        bomb = b"".join(compressor.compress(chunk) for _ in range(64)) + compressor.flush()
        limits = CodecLimits(max_message_bytes=MiB)
        inflater = Inflater(limits)
        tracemalloc.start()
        try:
            with self.assertRaises(LimitExceeded):
                for start in range(0, len(bomb), 4096):
                    inflater.feed(bomb[start : start + 4096])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 3 * MiB)

    def test_endlessEmptyBlocks(self) -> None:
        """
        A stream that never ends and never produces output still fails.
        """
        limits = CodecLimits(max_message_bytes=1024)
        inflater = Inflater(limits)
        blocks = EMPTY_STORED_BLOCK * (compressed_input_limit(limits) // len(EMPTY_STORED_BLOCK))
        self.assertIsNone(inflater.feed(blocks))
        self.assertRaises(LimitExceeded, inflater.feed, EMPTY_STORED_BLOCK * 2)

    @PROPERTY
    @given(
        st.binary(max_size=3000),
        st.binary(max_size=50),
        st.lists(st.integers(0, 4000), max_size=8),
        st.sampled_from([0, 1, 6, 9]),
    )
    def test_anySplit(self, payload: bytes, trailing: bytes, cuts: list[int], level: int) -> None:
        compressed = compress(payload, level)
        inflater = Inflater()
        messages, rest = feed_in_pieces(inflater, compressed + trailing, cuts)
        self.assertEqual(messages, [payload])
        self.assertEqual(rest, trailing)

    @PROPERTY
    @given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=4))
    def test_arbitraryInput(self, data: bytes, cuts: list[int]) -> None:
        inflater = Inflater(CodecLimits(max_message_bytes=4096))
        try:
            messages, _ = feed_in_pieces(inflater, data, cuts)
        except CodecError:
            return
        self.assertLessEqual(sum(map(len, messages)), 4096)

    @PROPERTY
    @given(st.binary(min_size=1, max_size=2000), st.data())
    def test_mutatedStreams(self, payload: bytes, data: st.DataObject) -> None:
        compressed = bytearray(compress(payload))
        index = data.draw(st.integers(0, len(compressed) - 1))
        compressed[index] ^= data.draw(st.integers(1, 255))
        try:
            decompress(bytes(compressed), CodecLimits(max_message_bytes=4096))
        except CodecError:
            pass


class CompressSlicesTests(SynchronousTestCase):
    """
    L{compress_slices}: the same message, one bounded step at a time.
    """

    @PROPERTY
    @given(st.binary(max_size=5000), st.integers(1, 700))
    def test_pieces_form_one_stream(self, payload: bytes, slice_bytes: int) -> None:
        pieces = list(compress_slices(payload, slice_bytes))
        self.assertEqual(decompress(b"".join(pieces) + b"next"), (payload, b"next"))
        # One step per slice of input, and one to end the stream.
        self.assertEqual(len(pieces), -(-len(payload) // slice_bytes) + 1)

    def test_big_message_in_steps(self) -> None:
        payload = b"".join(b"line %d of the script's output\n" % n for n in range(40_000))
        pieces = list(compress_slices(payload))
        self.assertGreater(len(pieces), 3)
        self.assertEqual(decompress(b"".join(pieces)), (payload, b""))
        self.assertEqual(zlib.decompress(b"".join(pieces), -15), payload)

    def test_empty_and_bad_slice(self) -> None:
        self.assertEqual(decompress(b"".join(compress_slices(b""))), (b"", b""))
        self.assertRaises(ValueError, list, compress_slices(b"x", 0))


class DecompressMatchesInflaterTests(SynchronousTestCase):
    """
    L{decompress} is L{Inflater} fed everything at once, in one zlib call.
    """

    def both(self, data: bytes, limits: CodecLimits) -> None:
        inflater = Inflater(limits)
        try:
            message = inflater.feed(data)
        except CodecError as e:
            expected: object = type(e)
        else:
            expected = "truncated" if message is None else (message, inflater.unused)
        try:
            got: object = decompress(data, limits)
        except CodecError as e:
            got = "truncated" if "truncated" in str(e) else type(e)
        self.assertEqual(got, expected)

    @PROPERTY
    @given(st.binary(max_size=3000), st.binary(max_size=20), st.data())
    def test_same_outcome(self, payload: bytes, after: bytes, data: st.DataObject) -> None:
        wire = bytearray(compress(payload) + after)
        for _ in range(data.draw(st.integers(0, 2))):
            if wire:
                wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(wire)))
        limits = data.draw(st.sampled_from([CodecLimits(), CodecLimits(max_message_bytes=100)]))
        self.both(bytes(wire[:cut]), limits)
        self.both(bytes(wire), limits)

    def test_implausibly_long_input(self) -> None:
        limits = CodecLimits(max_message_bytes=16)
        self.both(EMPTY_STORED_BLOCK * 20_000, limits)
        self.both(EMPTY_STORED_BLOCK * 20_000 + compress(b"x"), limits)
