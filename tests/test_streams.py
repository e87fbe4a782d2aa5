"""
Tests for L{tentacle.halibut.streams}.
"""

from __future__ import annotations

import os
import random
import uuid
from datetime import timedelta

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.errors import CodecError, CodecLimits
from tentacle.halibut.streams import (
    DataStreamReader,
    ExpectedStream,
    MemoryBudget,
    SpoolingSink,
    StreamSink,
    stream_header,
    stream_trailer,
)

PROPERTY = settings(max_examples=150, deadline=timedelta(milliseconds=500), database=None)
A = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
B = uuid.UUID("11111111-2222-3333-4444-555555555555")


@attrs.define
class RecordingSink:
    """
    A sink that keeps everything, and remembers what was done to it.
    """

    data: bytearray = attrs.Factory(bytearray)
    finished: bool = False
    discarded: bool = False

    def write(self, data: bytes) -> None:
        assert not (self.finished or self.discarded)
        self.data += data

    def finish(self) -> None:
        self.finished = True

    def discard(self) -> None:
        self.discarded = True


def recording_reader(
    expected: list[ExpectedStream],
) -> tuple[DataStreamReader, list[RecordingSink]]:
    sinks: list[RecordingSink] = []

    def factory(stream: ExpectedStream) -> StreamSink:
        sinks.append(RecordingSink())
        return sinks[-1]

    return DataStreamReader(expected, factory), sinks


def frame(stream_id: uuid.UUID, payload: bytes) -> bytes:
    return stream_header(stream_id, len(payload)) + payload + stream_trailer(len(payload))


def feed_in_pieces(reader: DataStreamReader, data: bytes, cuts: list[int]) -> bytes | None:
    """
    Feed C{data} split at C{cuts}; return what came after the last stream.
    """
    start = 0
    for end in sorted(set(cuts)) + [len(data)]:
        rest = reader.feed(data[start:end])
        start = max(start, end)
        if rest is not None:
            return rest + data[start:]
    return None


class FramingTests(SynchronousTestCase):
    def test_headerAndTrailer(self) -> None:
        self.assertEqual(
            stream_header(A, 5000000000),
            bytes.fromhex("33221100554477668899aabbccddeeff") + bytes.fromhex("00f2052a01000000"),
        )
        self.assertEqual(stream_trailer(1), b"\x01" + bytes(7))

    def test_badLengths(self) -> None:
        self.assertRaises(ValueError, stream_header, A, -1)
        self.assertRaises(ValueError, stream_trailer, 2**63)


class ReaderTests(SynchronousTestCase):
    def test_twoStreamsAndLeftover(self) -> None:
        expected = [ExpectedStream(A, 3), ExpectedStream(B, 0)]
        reader, sinks = recording_reader(expected)
        rest = reader.feed(frame(A, b"abc") + frame(B, b"") + b"NEXT\r\n")
        self.assertEqual(rest, b"NEXT\r\n")
        self.assertTrue(reader.done)
        self.assertEqual([(s.id, s.length) for s in reader.received], [(A, 3), (B, 0)])
        self.assertEqual([bytes(s.data) for s in sinks], [b"abc", b""])
        self.assertTrue(all(s.finished and not s.discarded for s in sinks))
        self.assertEqual(reader.feed(b"more"), b"more")
        reader.abort()
        self.assertFalse(any(s.discarded for s in sinks))

    def test_anyOrder(self) -> None:
        reader, sinks = recording_reader([ExpectedStream(A, 1), ExpectedStream(B, 2)])
        self.assertEqual(reader.feed(frame(B, b"bb") + frame(A, b"a")), b"")
        self.assertEqual([s.id for s in reader.received], [B, A])

    def test_byteAtATime(self) -> None:
        reader, sinks = recording_reader([ExpectedStream(A, 4)])
        data = frame(A, b"data")
        for index in range(len(data) - 1):
            self.assertIsNone(reader.feed(data[index : index + 1]))
        self.assertEqual(reader.feed(data[-1:]), b"")
        self.assertEqual(bytes(sinks[0].data), b"data")

    def test_nothingExpected(self) -> None:
        reader = DataStreamReader([])
        self.assertTrue(reader.done)
        self.assertEqual(reader.feed(b"END\r\n"), b"END\r\n")

    def test_negativeDeclaredLength(self) -> None:
        self.assertRaises(CodecError, DataStreamReader, [ExpectedStream(A, -1)])

    def assertRejected(self, expected: list[ExpectedStream], data: bytes) -> list[RecordingSink]:
        """
        C{data} fails with L{CodecError}, every sink ends up discarded and
        the reader stays failed.
        """
        reader, sinks = recording_reader(expected)
        self.assertRaises(CodecError, reader.feed, data)
        self.assertTrue(all(s.discarded for s in sinks))
        self.assertEqual(reader.received, [])
        self.assertRaises(CodecError, reader.feed, b"")
        return sinks

    def test_unexpectedId(self) -> None:
        self.assertRejected([ExpectedStream(A, 1)], frame(B, b"b"))

    def test_repeatedId(self) -> None:
        sinks = self.assertRejected(
            [ExpectedStream(A, 1), ExpectedStream(B, 1)], frame(A, b"a") + frame(A, b"a")
        )
        self.assertTrue(sinks[0].finished)

    def test_lengthDiffersFromMessage(self) -> None:
        self.assertRejected([ExpectedStream(A, 3)], frame(A, b"ab"))

    def test_negativeLength(self) -> None:
        header = A.bytes_le + (-1).to_bytes(8, "little", signed=True)
        self.assertRejected([ExpectedStream(A, 3)], header)

    def test_trailerMismatch(self) -> None:
        data = stream_header(A, 2) + b"ab" + stream_trailer(3)
        sinks = self.assertRejected([ExpectedStream(A, 2)], data)
        self.assertFalse(sinks[0].finished)

    def test_abort(self) -> None:
        reader, sinks = recording_reader([ExpectedStream(A, 1), ExpectedStream(B, 10)])
        self.assertIsNone(reader.feed(frame(A, b"a") + stream_header(B, 10) + b"part"))
        reader.abort()
        self.assertEqual([s.discarded for s in sinks], [True, True])
        self.assertRaises(CodecError, reader.feed, b"rest")

    def test_defaultSinkSpills(self) -> None:
        payload = os.urandom(10_000)
        reader = DataStreamReader(
            [ExpectedStream(A, len(payload))], limits=CodecLimits(max_stream_memory_bytes=4096)
        )
        self.assertEqual(reader.feed(frame(A, payload)), b"")
        sink = reader.received[0].sink
        assert isinstance(sink, SpoolingSink)
        self.assertTrue(sink.spilled)
        self.assertEqual(b"".join(sink.read_chunks(1000)), payload)
        sink.discard()

    def test_streams_of_one_message_share_a_memory_budget(self) -> None:
        """
        150 files of 600 bytes, each under the per-stream threshold, hold
        at most the message's total in memory; the rest spill, intact.
        """
        payloads = [os.urandom(600) for _ in range(150)]
        ids = [uuid.uuid4() for _ in payloads]
        limits = CodecLimits(max_stream_memory_bytes=1000, max_streams_memory_bytes=4000)
        reader = DataStreamReader([ExpectedStream(i, len(p)) for i, p in zip(ids, payloads)], limits=limits)
        held = []
        data = b"".join(frame(i, p) for i, p in zip(ids, payloads))
        for start in range(0, len(data), 997):
            reader.feed(data[start : start + 997])
            sinks = [s.sink for s in reader.received]
            held.append(sum(s.buffered_bytes for s in sinks if isinstance(s, SpoolingSink)))
        self.assertTrue(reader.done)
        self.assertLessEqual(max(held), 4000)
        self.assertEqual(reader.memory.used, held[-1])
        sinks = [s.sink for s in reader.received]
        assert all(isinstance(s, SpoolingSink) for s in sinks)
        self.assertEqual(sum(not s.spilled for s in sinks), 6, "the first six fit, then they spill")
        self.assertEqual([b"".join(s.read_chunks()) for s in sinks], payloads)
        for sink in sinks:
            sink.discard()
        self.assertEqual(reader.memory.used, 0, "discarding gives the memory back")

    @PROPERTY
    @given(
        st.lists(st.binary(max_size=300), min_size=1, max_size=4),
        st.binary(max_size=20),
        st.lists(st.integers(0, 1400), max_size=10),
        st.randoms(use_true_random=False),
    )
    def test_anySplitAnyOrder(
        self, payloads: list[bytes], trailing: bytes, cuts: list[int], rng: random.Random
    ) -> None:
        ids = [uuid.uuid4() for _ in payloads]
        expected = [ExpectedStream(i, len(p)) for i, p in zip(ids, payloads)]
        order = list(range(len(payloads)))
        rng.shuffle(order)
        data = b"".join(frame(ids[i], payloads[i]) for i in order) + trailing
        reader, sinks = recording_reader(expected)
        self.assertEqual(feed_in_pieces(reader, data, cuts), trailing)
        received = {s.id: bytes(sink.data) for s, sink in zip(reader.received, sinks)}
        self.assertEqual(received, dict(zip(ids, payloads)))

    @PROPERTY
    @given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=4))
    def test_arbitraryInput(self, data: bytes, cuts: list[int]) -> None:
        reader, sinks = recording_reader([ExpectedStream(A, 5), ExpectedStream(B, 0)])
        try:
            feed_in_pieces(reader, A.bytes_le + data, cuts)
        except CodecError:
            self.assertTrue(all(s.discarded for s in sinks))


class SpoolingSinkTests(SynchronousTestCase):
    def test_staysInMemoryUpToLimit(self) -> None:
        sink = SpoolingSink(memory_limit=10)
        sink.write(b"12345")
        sink.write(b"67890")
        self.assertFalse(sink.spilled)
        self.assertEqual(sink.buffered_bytes, 10)
        self.assertEqual(sink.fileobj().read(), b"1234567890")
        sink.discard()

    def test_spillsPastLimit(self) -> None:
        directory = self.mktemp()
        os.mkdir(directory)
        sink = SpoolingSink(memory_limit=10, directory=directory)
        for piece in [b"abcdefgh", b"ijk", b"lmnop" * 100]:
            sink.write(piece)
            self.assertLessEqual(sink.buffered_bytes, 10)
        sink.finish()
        self.assertTrue(sink.spilled)
        self.assertEqual(sink.buffered_bytes, 0)
        self.assertEqual(sink.size, 511)
        expected = b"abcdefghijk" + b"lmnop" * 100
        self.assertEqual(b"".join(sink.read_chunks(64)), expected)
        self.assertEqual(max(len(c) for c in sink.read_chunks(64)), 64)
        fileobj = sink.fileobj()
        self.assertEqual(fileobj.read(), expected)
        sink.discard()
        self.assertTrue(fileobj.closed)
        self.assertEqual(os.listdir(directory), [])
        sink.discard()
        self.assertRaises(ValueError, sink.write, b"x")
        self.assertRaises(ValueError, sink.fileobj)

    def test_budget_shared_between_sinks(self) -> None:
        budget = MemoryBudget(limit=10)
        first, second = SpoolingSink(memory_limit=8, budget=budget), SpoolingSink(memory_limit=8, budget=budget)
        first.write(b"123456")
        second.write(b"abcd")
        self.assertEqual((budget.used, first.spilled, second.spilled), (10, False, False))
        second.write(b"e")
        self.assertTrue(second.spilled, "over the shared budget: spilled though under its own limit")
        self.assertEqual(budget.used, 6, "what it held is given back")
        first.write(b"78")
        self.assertEqual(budget.used, 8)
        first.write(b"9")
        self.assertTrue(first.spilled, "over its own limit")
        self.assertEqual(budget.used, 0)
        self.assertEqual((first.fileobj().read(), second.fileobj().read()), (b"123456789", b"abcde"))
        third = SpoolingSink(memory_limit=8, budget=budget)
        third.write(b"xyz")
        third.discard()
        third.discard()
        self.assertEqual(budget.used, 0)
        first.discard()
        second.discard()

    def test_spillDirectoryMustExist(self) -> None:
        sink = SpoolingSink(memory_limit=1, directory=self.mktemp())
        self.assertRaises(OSError, sink.write, b"ab")
