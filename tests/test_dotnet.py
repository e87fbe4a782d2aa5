"""
Tests for L{tentacle.halibut.dotnet}.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.dotnet import (
    TimeSpan,
    datetime_from_bson_millis,
    datetime_to_bson_millis,
    format_timespan,
    guid_from_bytes,
    guid_to_bytes,
    parse_timespan,
)
from tentacle.halibut.errors import CodecError

UTC = timezone.utc
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TIMESPAN_LIKE = r"-?([0-9]{1,9}\.)?[0-9]{1,3}:[0-9]{1,3}(:[0-9]{1,3}(\.[0-9]{1,9})?)?"
PROPERTY = settings(max_examples=300, deadline=timedelta(milliseconds=500), database=None)

# new TimeSpan(ticks).ToString(), printed by Mono.
DOTNET_TIMESPANS = [
    (0, "00:00:00"),
    (1, "00:00:00.0000001"),
    (-1, "-00:00:00.0000001"),
    (10, "00:00:00.0000010"),
    (9999999, "00:00:00.9999999"),
    (10000000, "00:00:01"),
    (6000000000, "00:10:00"),
    (36000000000, "01:00:00"),
    (863999999999, "23:59:59.9999999"),
    (864000000000, "1.00:00:00"),
    (864000000001, "1.00:00:00.0000001"),
    (-864000000001, "-1.00:00:00.0000001"),
    (123456789012345, "142.21:21:18.9012345"),
    (9223372036854775807, "10675199.02:48:05.4775807"),
    (-9223372036854775808, "-10675199.02:48:05.4775808"),
    (5000, "00:00:00.0005000"),
    (15, "00:00:00.0000015"),
]

# TimeSpan.Parse(text, CultureInfo.InvariantCulture).Ticks under Mono, for
# non-canonical forms the parser here accepts too.
DOTNET_PARSES = [
    ("1.02:03:04.5", 937845000000),
    ("  7 ", 6048000000000),
    ("12:34", 452400000000),
    ("1.2:3", 937800000000),
    ("-0", 0),
    ("01:02:03.1", 37231000000),
]

# Rejected by .NET too, or never written by Json.NET ("c" format only).
REJECTED = [
    "",
    "-",
    "00:00:00.12345678",
    "00:60:00",
    "00:00:60",
    "24:00:00",
    "1:02:03:04",
    "10675199.02:48:05.4775808",
    "99999999.00:00:00",
    "00:00:00.",
    "1.",
    "\u0661:00",
    "00:10:00z",
]


class GuidTests(SynchronousTestCase):
    def test_toByteArrayOrder(self) -> None:
        guid = uuid.UUID("00112233-4455-6677-8899-aabbccddeeff")
        expected = bytes.fromhex("33221100554477668899aabbccddeeff")
        self.assertEqual(guid_to_bytes(guid), expected)
        self.assertEqual(guid_from_bytes(expected), guid)

    def test_wrongLength(self) -> None:
        self.assertRaises(CodecError, guid_from_bytes, bytes(15))
        self.assertRaises(CodecError, guid_from_bytes, bytes(17))

    @PROPERTY
    @given(st.uuids())
    def test_roundtrip(self, guid: uuid.UUID) -> None:
        self.assertEqual(guid_from_bytes(guid_to_bytes(guid)), guid)


class TimeSpanTests(SynchronousTestCase):
    def test_formatMatchesDotnet(self) -> None:
        for ticks, text in DOTNET_TIMESPANS:
            self.assertEqual(TimeSpan(ticks).format(), text)
            self.assertEqual(str(TimeSpan(ticks)), text)
            self.assertEqual(parse_timespan(text), TimeSpan(ticks))

    def test_parseMatchesDotnet(self) -> None:
        for text, ticks in DOTNET_PARSES:
            self.assertEqual(TimeSpan.parse(text).ticks, ticks)

    def test_rejects(self) -> None:
        for text in REJECTED:
            with self.subTest(text):
                self.assertRaises(CodecError, TimeSpan.parse, text)

    def test_range(self) -> None:
        self.assertRaises(ValueError, TimeSpan, INT64_MAX + 1)
        self.assertRaises(ValueError, TimeSpan, INT64_MIN - 1)
        self.assertRaises(ValueError, TimeSpan.from_timedelta, timedelta.max)

    def test_timedelta(self) -> None:
        self.assertEqual(format_timespan(timedelta(minutes=10)), "00:10:00")
        self.assertEqual(format_timespan(timedelta(microseconds=-1)), "-00:00:00.0000010")
        self.assertEqual(format_timespan(TimeSpan(5)), "00:00:00.0000005")
        self.assertEqual(TimeSpan.from_timedelta(timedelta(days=-1)).ticks, -864000000000)

    def test_toTimedeltaRoundsHalfEven(self) -> None:
        cases = {4: 0, 5: 0, 6: 1, 15: 2, 25: 2, -5: 0, -15: -2, -16: -2, -14: -1}
        for ticks, micros in cases.items():
            self.assertEqual(TimeSpan(ticks).to_timedelta(), timedelta(microseconds=micros))

    def test_ordering(self) -> None:
        self.assertLess(TimeSpan(-1), TimeSpan(0))

    @PROPERTY
    @given(st.integers(INT64_MIN, INT64_MAX))
    def test_ticksRoundtrip(self, ticks: int) -> None:
        self.assertEqual(TimeSpan.parse(TimeSpan(ticks).format()).ticks, ticks)

    @PROPERTY
    @given(st.timedeltas(min_value=timedelta(days=-10675198), max_value=timedelta(days=10675198)))
    def test_timedeltaRoundtrip(self, value: timedelta) -> None:
        span = TimeSpan.from_timedelta(value)
        self.assertEqual(span.to_timedelta(), value)
        self.assertEqual(parse_timespan(format_timespan(value)).to_timedelta(), value)

    @PROPERTY
    @given(st.text(max_size=40) | st.from_regex(TIMESPAN_LIKE))
    def test_parseArbitrary(self, text: str) -> None:
        try:
            span = TimeSpan.parse(text)
        except CodecError:
            return
        self.assertEqual(TimeSpan.parse(span.format()), span)


class DateTimeTests(SynchronousTestCase):
    def test_dotnetVectors(self) -> None:
        when = datetime(2024, 2, 29, 13, 14, 15, 678000, tzinfo=timezone(timedelta(hours=2)))
        self.assertEqual(datetime_to_bson_millis(when), 1709205255678)

    def test_truncatesTowardsZero(self) -> None:
        """
        C# integer division: before the epoch, sub-millisecond parts move
        towards 1970, not towards the past.
        """
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        self.assertEqual(datetime_to_bson_millis(epoch - timedelta(microseconds=500)), 0)
        self.assertEqual(datetime_to_bson_millis(epoch - timedelta(microseconds=1500)), -1)
        self.assertEqual(datetime_to_bson_millis(epoch + timedelta(microseconds=1999)), 1)

    def test_naiveRejected(self) -> None:
        self.assertRaises(TypeError, datetime_to_bson_millis, datetime(2020, 1, 1))

    def test_range(self) -> None:
        low = datetime(1, 1, 1, tzinfo=UTC)
        high = datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
        self.assertEqual(datetime_from_bson_millis(datetime_to_bson_millis(low)), low)
        self.assertEqual(datetime_from_bson_millis(datetime_to_bson_millis(high)), high)
        for millis in [datetime_to_bson_millis(low) - 1, datetime_to_bson_millis(high) + 1000]:
            self.assertRaises(CodecError, datetime_from_bson_millis, millis)
        self.assertRaises(CodecError, datetime_from_bson_millis, INT64_MAX)
        self.assertRaises(CodecError, datetime_from_bson_millis, INT64_MIN)

    @PROPERTY
    @given(st.datetimes(timezones=st.just(UTC)))
    def test_roundtripToMilliseconds(self, value: datetime) -> None:
        decoded = datetime_from_bson_millis(datetime_to_bson_millis(value))
        self.assertIs(decoded.tzinfo, UTC)
        self.assertLess(abs(decoded - value), timedelta(milliseconds=1))
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        self.assertLessEqual(abs(decoded - epoch), abs(value - epoch))
