"""
Hostile archives built in a few megabytes: deflate streams of zeros made
by repeating one independently compressed mebibyte, so a "2 GB" entry
costs 2 MB on disk and a second of CPU (for its honest CRC) to build.
"""

from __future__ import annotations

import gzip
import struct
import tarfile
import zlib
from pathlib import Path

MiB = 1 << 20
_ZEROS = b"\0" * MiB


def _zero_blocks() -> tuple[bytes, bytes]:
    """
    One MiB of zeros as raw deflate ending on a full flush (so it can be
    repeated), and the final empty block.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(_ZEROS) + c.flush(zlib.Z_FULL_FLUSH)
    return block, c.flush()


def zip_of_zeros(path: Path, entries: list[tuple[str, int, int]]) -> Path:
    """
    A zip whose entries are C{(name, MiB of zeros, Unix mode or 0)},
    deflated.  Sizes must stay under 4 GiB (no zip64).
    """
    block, end = _zero_blocks()
    local = bytearray()
    central = bytearray()
    for name, mebibytes, mode in entries:
        data = block * mebibytes + end
        size = mebibytes * MiB
        crc = 0
        for _ in range(mebibytes):
            crc = zlib.crc32(_ZEROS, crc)
        raw = name.encode()
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0x21, crc, len(data), size, len(raw), 0)
        local += raw + data
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", (3 << 8) | 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
            len(raw), 0, 0, 0, 0, mode << 16, offset,
        )
        central += raw
    count = len(entries)
    path.write_bytes(
        bytes(local) + bytes(central)
        + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local), 0)
    )
    return path


def empty_zip_entries(path: Path, count: int) -> Path:
    """
    A zip of C{count} empty stored files.
    """
    local = bytearray()
    central = bytearray()
    for i in range(count):
        raw = f"f{i}".encode()
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(raw), 0) + raw
        central += struct.pack(
            "<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(raw), 0, 0, 0, 0, 0, offset
        ) + raw
    end = bytearray()
    if count > 0xFFFF:  # zip64 end records carry the count
        zip64_offset = len(local) + len(central)
        end += struct.pack(
            "<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, count, count, len(central), len(local)
        )
        end += struct.pack("<4sLQL", b"PK\x06\x07", 0, zip64_offset, 1)
    short = min(count, 0xFFFF)
    end += struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, short, short, len(central), len(local), 0)
    path.write_bytes(bytes(local) + bytes(central) + bytes(end))
    return path


def targz_of_zeros(path: Path, name: str, mebibytes: int, kind: bytes = tarfile.REGTYPE) -> Path:
    """
    A .tar.gz of one entry of C{mebibytes} MiB of zeros (of C{kind}: a
    file, or a GNU long-name header whose "name" is all that).
    """
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = mebibytes * MiB
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    block, _ = _zero_blocks()
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    trailer = 2 * tarfile.BLOCKSIZE * b"\0"
    last = c.compress(trailer) + c.flush()
    crc = zlib.crc32(header)
    for _ in range(mebibytes):
        crc = zlib.crc32(_ZEROS, crc)
    crc = zlib.crc32(trailer, crc)
    length = len(header) + mebibytes * MiB + len(trailer)
    with path.open("wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip, no name, no time
        f.write(first)
        for _ in range(mebibytes):
            f.write(block)
        f.write(last)
        f.write(struct.pack("<2L", crc, length & 0xFFFFFFFF))
    return path


def read_gzip(path: Path, limit: int) -> int:
    """
    How many bytes the gzip file inflates to, reading at most C{limit}.
    """
    total = 0
    with gzip.open(path) as f:
        while total < limit and (chunk := f.read(MiB)):
            total += len(chunk)
    return total
