"""
The first bytes of a Halibut connection, after TLS: the preamble and the
identity lines.  Pure, so they are simple to fuzz.

The side that dials writes, in one write::

    MX NL NL                                   the preamble
    MX-CLIENT 1.0 CRLF CRLF                     listening mode: "I will call you"
    MX-SUBSCRIBER 1.0 poll://id/ CRLF CRLF      polling mode: "give me work for id"

and the side that accepted answers C{MX-SERVER 1.0 CRLF CRLF}.  A listener
reads the preamble as Halibut does (byte by byte, carriage returns ignored,
up to a blank line, at most 20,000 characters); anything not starting with
C{MX} is a browser and gets the friendly page.
"""

from __future__ import annotations

import enum
import re

import attrs

#: Halibut stops reading a first request at this many characters.
MAX_INITIAL_REQUEST = 20000
#: An identity line is a few words; anything longer is not a Halibut peer.
MAX_IDENTITY_LINE = 1024
#: What a dialling side sends first.  Halibut writes C{Environment.NewLine},
#: so Windows peers send CRLFs and Linux ones bare LFs; both read the same.
PREAMBLE = b"MX\r\n\r\n"
VERSION = "1.0"


class IdentityKind(enum.Enum):
    CLIENT = "MX-CLIENT"
    SUBSCRIBER = "MX-SUBSCRIBER"
    SERVER = "MX-SERVER"


@attrs.frozen
class RemoteIdentity:
    """
    What a peer said it is: the kind, its version (ignored, as Halibut
    ignores it) and, for a subscriber, its subscription (normalised).
    """

    kind: IdentityKind
    version: str = VERSION
    subscription: str | None = None


_SUBSCRIPTION = re.compile(r"([a-z][a-z0-9+.-]*)://([^/\s?#]+)/?", re.IGNORECASE)


def normalize_subscription(uri: str) -> str:
    """
    A subscription URI as Halibut keys its queues: C{scheme://host/}, lower
    case.

    @raise ValueError: not such a URI.
    """
    match = _SUBSCRIPTION.fullmatch(uri)
    if match is None:
        raise ValueError(f"not a subscription URI (poll://ID/): {uri[:80]!r}")
    return f"{match.group(1)}://{match.group(2)}/".lower()


def identity_line(kind: IdentityKind, subscription: str | None = None) -> bytes:
    """
    An identity line and the empty line after it, to be sent in one write:
    old Halibut peers break when the two arrive apart.
    """
    words = [kind.value, VERSION]
    if kind is IdentityKind.SUBSCRIBER:
        if subscription is None:
            raise ValueError("a subscriber's identity names its subscription")
        words.append(normalize_subscription(subscription))
    return (" ".join(words) + "\r\n\r\n").encode("utf-8")


#: The accepting side's answer to any identity it takes.
SERVER_IDENTITY = identity_line(IdentityKind.SERVER)


class InitialRequestTooLong(Exception):
    pass


class PreambleReader:
    """
    Reads the first request as Halibut does: carriage returns ignored, ends
    at a blank line, capped in length.
    """

    def __init__(self, limit: int = MAX_INITIAL_REQUEST) -> None:
        self._limit = limit
        self._chars: list[str] = []
        self._previous_newline = False

    def feed(self, data: bytes) -> tuple[str, bytes] | None:
        """
        @return: C{None} while incomplete; else the request (lines joined by
            C{\\n}, without the blank line) and the bytes that followed it.
        @raise InitialRequestTooLong: past the limit.
        """
        for index, byte in enumerate(data):
            if byte == 0x0D:
                continue
            if byte == 0x0A:
                if self._previous_newline:
                    return "".join(self._chars), data[index + 1 :]
                self._previous_newline = True
            else:
                self._previous_newline = False
            # Latin-1 maps each byte to one character, as Halibut's byte-wise read does.
            self._chars.append(chr(byte))
            if len(self._chars) >= self._limit:
                raise InitialRequestTooLong()
        return None


class IdentityError(Exception):
    """
    What came is not an identity this side takes.
    """


class IdentityReader:
    """
    Reads one identity line (CRLF-terminated) and the empty line after it.

    @param accept: the kinds this side takes; any other is an error.
    """

    def __init__(
        self,
        accept: frozenset[IdentityKind] = frozenset({IdentityKind.CLIENT}),
        limit: int = MAX_IDENTITY_LINE,
    ) -> None:
        self._accept = accept
        self._limit = limit
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[RemoteIdentity, bytes] | None:
        """
        @return: C{None} while incomplete; else the identity and the bytes
            that followed the empty line (the start of the message exchange).
        @raise IdentityError: a malformed, unexpected or over-long identity.
        """
        self._buffer += data
        buffer = self._buffer
        first = buffer.find(b"\n")
        second = buffer.find(b"\n", first + 1) if first >= 0 else -1
        # The limit holds however the bytes arrive: whole, or a byte at a time.
        length = len(buffer) if second < 0 else second + 1
        if length > self._limit:
            raise IdentityError("the identity line is too long")
        if second < 0:
            return None
        line, blank, rest = buffer[: first + 1], buffer[first + 1 : second + 1], buffer[second + 1 :]
        if not line.endswith(b"\r\n") or blank != b"\r\n":
            raise IdentityError(
                "the identity line must be followed by an empty line, both ending in CRLF"
            )
        self._buffer = b""
        return self._parse(line[:-2].decode("utf-8", "replace")), rest

    def _parse(self, line: str) -> RemoteIdentity:
        parts = line.split(" ")
        try:
            kind = IdentityKind(parts[0])
        except ValueError:
            kind = None
        if kind is None or kind not in self._accept:
            expected = " or ".join(sorted(k.value for k in self._accept))
            raise IdentityError(f"unknown identity type {parts[0][:40]!r} (expected {expected})")
        version = parts[1] if len(parts) > 1 else ""
        if kind is not IdentityKind.SUBSCRIBER:
            return RemoteIdentity(kind, version)
        if len(parts) < 3:
            raise IdentityError("a subscriber's identity must name its subscription")
        try:
            return RemoteIdentity(kind, version, normalize_subscription(parts[2]))
        except ValueError as e:
            raise IdentityError(str(e)) from None


__all__ = [
    "MAX_IDENTITY_LINE",
    "MAX_INITIAL_REQUEST",
    "PREAMBLE",
    "SERVER_IDENTITY",
    "IdentityError",
    "IdentityKind",
    "IdentityReader",
    "InitialRequestTooLong",
    "PreambleReader",
    "RemoteIdentity",
    "identity_line",
    "normalize_subscription",
]
