"""
.NET value conventions that Json.NET puts on the Halibut wire.

 - C{Guid}: 16 bytes in C{Guid.ToByteArray()} order, which is
   L{uuid.UUID.bytes_le} (first three fields little-endian).
 - C{TimeSpan}: a string in the constant ("c") format,
   C{[-][d.]hh:mm:ss[.fffffff]}, exact to 100 ns ticks.
 - C{DateTime}/C{DateTimeOffset}: a BSON UTC datetime, whole milliseconds
   since the Unix epoch, truncated towards zero as C# integer division does.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta, timezone

import attrs

from tentacle.halibut.errors import CodecError

TICKS_PER_MICROSECOND = 10
TICKS_PER_MILLISECOND = 10_000
TICKS_PER_SECOND = 10_000_000
TICKS_PER_MINUTE = 60 * TICKS_PER_SECOND
TICKS_PER_HOUR = 60 * TICKS_PER_MINUTE
TICKS_PER_DAY = 24 * TICKS_PER_HOUR

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# --- Guid -------------------------------------------------------------------


def guid_to_bytes(value: uuid.UUID) -> bytes:
    """
    The 16 bytes .NET C{Guid.ToByteArray()} gives for C{value}.
    """
    return value.bytes_le


def guid_from_bytes(data: bytes) -> uuid.UUID:
    """
    Inverse of L{guid_to_bytes}; the input comes from the wire, so a wrong
    length is a L{CodecError}.
    """
    if len(data) != 16:
        raise CodecError(f"a Guid is 16 bytes, got {len(data)}")
    return uuid.UUID(bytes_le=bytes(data))


# --- TimeSpan ---------------------------------------------------------------


def _int64_ticks(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"TimeSpan ticks out of Int64 range: {value!r}")


# What .NET's invariant TimeSpan.Parse accepts of the shapes Json.NET and
# Halibut produce: "c" format ([-][d.]hh:mm[:ss[.f..f]]) and bare days.
# Digit counts are bounded so parsing cost and int() sizes stay small.
_TIMESPAN_RE = re.compile(
    r"""
    \s*(?P<sign>-)?
    (?:
        (?:(?P<days>[0-9]{1,8})\.)?
        (?P<hours>[0-9]{1,2}):(?P<minutes>[0-9]{1,2})
        (?::(?P<seconds>[0-9]{1,2})(?:\.(?P<fraction>[0-9]{1,7}))?)?
    |
        (?P<only_days>[0-9]{1,8})
    )\s*
    """,
    re.VERBOSE | re.ASCII,
)


@attrs.frozen(order=True)
class TimeSpan:
    """
    A .NET C{TimeSpan}: a signed count of 100 ns ticks in Int64 range.

    L{timedelta} only resolves microseconds, so values decoded from the wire
    are kept as ticks; that way re-encoding reproduces what Json.NET wrote.
    """

    ticks: int = attrs.field(validator=_int64_ticks)

    @classmethod
    def from_timedelta(cls, value: timedelta) -> TimeSpan:
        """
        Exact: every microsecond is a whole number of ticks.

        @raise ValueError: C{value} is beyond the range of a .NET TimeSpan.
        """
        micros = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        return cls(micros * TICKS_PER_MICROSECOND)

    def to_timedelta(self) -> timedelta:
        """
        The nearest L{timedelta}: sub-microsecond ticks round half to even,
        as L{timedelta} itself rounds.
        """
        micros, rest = divmod(self.ticks, TICKS_PER_MICROSECOND)
        if rest > 5 or (rest == 5 and micros % 2 == 1):
            micros += 1
        return timedelta(microseconds=micros)

    @classmethod
    def parse(cls, text: str) -> TimeSpan:
        """
        Parse what Json.NET writes for a TimeSpan (C{TimeSpan.ToString()}).

        Accepts C{[-][d.]hh:mm[:ss[.fffffff]]} (1 to 7 fraction digits) and a
        bare day count, with .NET's component ranges. Other forms .NET's
        lenient parser allows (C{d:hh:mm:ss}, or C{24:00:00}, which it reads
        as 24 days) are never written by Json.NET and are rejected.

        @raise CodecError: C{text} is not such a TimeSpan or is out of range.
        """
        match = _TIMESPAN_RE.fullmatch(text)
        if match is None:
            raise CodecError(f"not a TimeSpan: {text[:64]!r}")
        groups = match.groupdict()
        if groups["only_days"] is not None:
            magnitude = int(groups["only_days"]) * TICKS_PER_DAY
        else:
            hours = int(groups["hours"])
            minutes = int(groups["minutes"])
            seconds = int(groups["seconds"] or 0)
            if hours > 23 or minutes > 59 or seconds > 59:
                raise CodecError(f"TimeSpan component out of range: {text[:64]!r}")
            fraction = groups["fraction"] or ""
            magnitude = (
                int(groups["days"] or 0) * TICKS_PER_DAY
                + hours * TICKS_PER_HOUR
                + minutes * TICKS_PER_MINUTE
                + seconds * TICKS_PER_SECOND
                + int(fraction.ljust(7, "0"))
            )
        ticks = -magnitude if groups["sign"] else magnitude
        if not _INT64_MIN <= ticks <= _INT64_MAX:
            raise CodecError(f"TimeSpan out of range: {text[:64]!r}")
        return cls(ticks)

    def format(self) -> str:
        """
        C{TimeSpan.ToString()} ("c" format): days only when non-zero, the
        seven-digit fraction only when non-zero, a leading C{-} if negative.
        """
        magnitude = abs(self.ticks)
        days, rest = divmod(magnitude, TICKS_PER_DAY)
        hours, rest = divmod(rest, TICKS_PER_HOUR)
        minutes, rest = divmod(rest, TICKS_PER_MINUTE)
        seconds, fraction = divmod(rest, TICKS_PER_SECOND)
        parts = ["-" if self.ticks < 0 else ""]
        if days:
            parts.append(f"{days}.")
        parts.append(f"{hours:02d}:{minutes:02d}:{seconds:02d}")
        if fraction:
            parts.append(f".{fraction:07d}")
        return "".join(parts)

    def __str__(self) -> str:
        return self.format()


def parse_timespan(text: str) -> TimeSpan:
    """
    Shorthand for L{TimeSpan.parse}.
    """
    return TimeSpan.parse(text)


def format_timespan(value: TimeSpan | timedelta) -> str:
    """
    Json.NET's string for a TimeSpan given as L{TimeSpan} or L{timedelta}.

    @raise ValueError: a L{timedelta} beyond the range of a .NET TimeSpan.
    """
    if isinstance(value, timedelta):
        value = TimeSpan.from_timedelta(value)
    return value.format()


# --- DateTime / DateTimeOffset ---------------------------------------------


def datetime_to_bson_millis(value: datetime) -> int:
    """
    Milliseconds since the epoch as Json.NET's BSON writer computes them:
    the UTC instant, truncated towards zero (so instants before 1970 with a
    sub-millisecond part move towards the epoch, as C# C{/} does).

    @raise TypeError: C{value} is naive; .NET would read it as local time,
        which is never what a caller here means.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise TypeError("naive datetime: attach a timezone (e.g. timezone.utc)")
    delta = value - UNIX_EPOCH
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    millis = abs(micros) // 1000
    return -millis if micros < 0 else millis


def datetime_from_bson_millis(millis: int) -> datetime:
    """
    The aware UTC datetime for a BSON datetime.

    @raise CodecError: outside year 1 to 9999, the range shared by .NET
        C{DateTime} and Python.
    """
    try:
        return UNIX_EPOCH + timedelta(milliseconds=millis)
    except OverflowError:
        raise CodecError(f"BSON datetime out of range: {millis}") from None
