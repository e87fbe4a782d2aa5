"""
Packages: their names, their hashes, and extracting them without letting an
archive write anywhere but the folder it is extracted into.

A package is C{<id>.<version>.<ext>}: C{.tar.gz}, C{.tgz}, C{.zip} or
C{.nupkg} (a zip).  Both the id and the version become folder names, so both
are checked here, once, before any path is built from them.

Extraction refuses the whole archive, before writing anything, when any
entry:

  - has an absolute name (C{/x}, C{C:x}, C{\\\\x}) or a C{..} part, counting
    C{\\} as a separator too (zip slip);
  - is a device, a FIFO or anything but a file, folder or link;
  - is a symlink whose target is absolute or leaves the folder, or a hard
    link to anything but an earlier file of the same archive;
  - lies under a link of the same archive, or repeats a name (an archive
    could otherwise write through a link it planted first).

Tar archives are then extracted with C{filter="data"} (PEP 706) as a second
line; zip entries are written by hand with C{O_EXCL | O_NOFOLLOW}.  Finally
every symlink in the result is resolved for real, which catches chains of
links that look harmless one by one, and the archive is refused if one
points outside.  Callers extract into a fresh temp folder and rename it into
place only when this succeeds, so a refused archive leaves nothing behind.

An archive is also refused, as early as its sizes are known, when it holds
more than L{PackageLimits} allow: bytes once extracted (10 GiB), entries
(200,000), or an expansion over 200 times its own size beyond the first
100 MiB (a decompression bomb).  For a zip the sizes come from its central
directory, before anything is written; for a tar from each header, before
that entry's data is read.  A link target is read only up to 4 KiB, and a
tar's long-name and extended headers only up to 256 KiB, so no entry's
metadata can fill memory; names in error messages are cut to a few
hundred characters.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterator

import attrs

#: Archive kinds by file name ending, longest first.
EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".tar.gz", "tar"),
    (".tgz", "tar"),
    (".nupkg", "zip"),
    (".zip", "zip"),
)

#: A package id: letters, digits, C{.}, C{_}, C{-}; never C{.} or C{..} alone.
_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
#: A version as a folder name: starts with a digit, so it can never be
#: C{current} or one of our dot-named temp folders.
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+_-]{0,99}")
#: The part of a file name that looks like a version (SemVer or NuGet's
#: four parts), used to find where the id ends.
_VERSION_IN_NAME = re.compile(r"\d+(\.\d+)*(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")

_COPY_CHUNK = 1 << 20
#: The longest link target an archive may hold (Linux's PATH_MAX).
MAX_LINK = 4096
#: The largest tar long-name or extended (pax) header read.
MAX_TAR_HEADER = 256 * 1024
#: Names longer than this many characters are cut in error messages.
_SHOWN = 200

GiB = 1 << 30
MiB = 1 << 20


class PackageError(Exception):
    """
    A package that cannot be deployed: a bad name, a wrong hash, an unsafe
    or unreadable archive.
    """


@attrs.frozen
class PackageLimits:
    """
    What one package may expand to (settable with the deploy tool's
    C{--max-extracted-bytes}, C{--max-entries} and C{--max-ratio}).

    @ivar max_bytes: the total size of its files once extracted.
    @ivar max_entries: files, folders and links together.
    @ivar max_ratio: extracted size over archive size, checked once the
        extracted size passes C{ratio_floor} (small archives of very
        compressible text are fine).
    """

    max_bytes: int = 10 * GiB
    max_entries: int = 200_000
    max_ratio: int = 200
    ratio_floor: int = 100 * MiB

    def check(self, archive: Path, archive_size: int, entries: int, extracted: int) -> None:
        """
        @raise PackageError: C{entries} or C{extracted} bytes so far are
            over a limit.
        """
        if entries > self.max_entries:
            raise PackageError(
                f"{archive.name} holds more than {self.max_entries:,} entries (the --max-entries limit)"
            )
        if extracted > self.max_bytes:
            raise PackageError(
                f"{archive.name} would extract to more than {self.max_bytes:,} bytes "
                "(the --max-extracted-bytes limit)"
            )
        if extracted > max(self.ratio_floor, archive_size * self.max_ratio):
            raise PackageError(
                f"{archive.name} ({archive_size:,} bytes) would extract to at least "
                f"{extracted:,} bytes, over {self.max_ratio} times its size: it looks like "
                "a decompression bomb, so it is refused (the --max-ratio limit)"
            )


def shown(name: str) -> str:
    """
    A name from an archive as an error message shows it: quoted, and cut
    in the middle when long, so a hostile name cannot flood a log.
    """
    if len(name) <= _SHOWN:
        return repr(name)
    half = _SHOWN // 2
    return f"{name[:half]!r}...{name[-half:]!r} ({len(name):,} characters)"


@attrs.frozen
class PackageName:
    """
    What a package is, independent of where its file lies.
    """

    id: str = attrs.field()
    version: str = attrs.field()
    extension: str

    @id.validator
    def _check_id(self, _: object, value: str) -> None:
        check_id(value)

    @version.validator
    def _check_version(self, _: object, value: str) -> None:
        check_version(value)

    @property
    def kind(self) -> str:
        return archive_kind(self.extension)

    @property
    def file_name(self) -> str:
        """
        The canonical name, under which the agent caches the package.
        """
        return f"{self.id}.{self.version}{self.extension}"


def check_id(value: str) -> str:
    if not _ID.fullmatch(value) or value in (".", ".."):
        raise PackageError(f"{value!r} is not a package id (letters, digits, '.', '_', '-'; at most 100)")
    return value


def check_version(value: str) -> str:
    if not _VERSION.fullmatch(value):
        raise PackageError(
            f"{value!r} is not a version (it must start with a digit; letters, digits, '.', '+', '_', '-')"
        )
    return value


def split_extension(file_name: str) -> tuple[str, str]:
    """
    C{("app.1.0", ".tar.gz")}; the extension keeps the case it had.
    """
    lower = file_name.lower()
    for extension, _ in EXTENSIONS:
        if lower.endswith(extension):
            return file_name[: -len(extension)], extension.lower()
    known = ", ".join(e for e, _ in EXTENSIONS)
    raise PackageError(f"{file_name!r} is not a package: the name must end with one of {known}")


def archive_kind(extension: str) -> str:
    return dict(EXTENSIONS)[extension.lower()]


def parse_package_name(file_name: str, package_id: str | None = None, version: str | None = None) -> PackageName:
    """
    Split C{<id>.<version>.<ext>}: the version starts at the first dotted
    part that begins with a digit and from which the rest reads as a
    version (C{My.App2.1.0.0-beta.1.zip} is C{My.App2} at C{1.0.0-beta.1}).
    An explicit id or version wins over the name.
    """
    stem, extension = split_extension(os.path.basename(file_name))
    if package_id is not None and version is not None:
        return PackageName(package_id, version, extension)
    parts = stem.split(".")
    for i in range(1, len(parts)):
        rest = ".".join(parts[i:])
        if _VERSION_IN_NAME.fullmatch(rest):
            return PackageName(package_id or ".".join(parts[:i]), version or rest, extension)
    if version is not None and package_id is None and stem.endswith(f".{version}"):
        return PackageName(stem[: -len(version) - 1], version, extension)
    raise PackageError(
        f"cannot tell the id and version from {file_name!r}: name it <id>.<version>{extension} "
        "or give the id and version"
    )


def file_hashes(path: Path) -> tuple[str, str, int]:
    """
    SHA-1, SHA-256 (lower-case hex) and length, in one pass.
    """
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            sha1.update(chunk)
            sha256.update(chunk)
            length += len(chunk)
    return sha1.hexdigest(), sha256.hexdigest(), length


def verify_hashes(path: Path, sha1: str | None = None, sha256: str | None = None) -> str:
    """
    Check the file against whichever hashes are given; its SHA-1.

    @raise PackageError: a hash differs.
    """
    actual_sha1, actual_sha256, _ = file_hashes(path)
    for name, expected, actual in (("SHA-1", sha1, actual_sha1), ("SHA-256", sha256, actual_sha256)):
        if expected is not None and expected.strip().lower() != actual:
            raise PackageError(f"{path} has {name} {actual}, not the expected {expected.strip().lower()}")
    return actual_sha1


# --- checking entries -----------------------------------------------------------------


@attrs.frozen
class _Entry:
    """
    One archive member, reduced to what the safety rules look at.
    """

    name: str  # normalised: relative, '/'-separated, no '.' parts
    kind: str  # "file", "dir", "symlink", "hardlink"
    link: str = ""


def _normalise(raw: str) -> str:
    """
    The entry name as a relative POSIX path, or L{PackageError} if it could
    leave the folder on any system.
    """
    if "\0" in raw:
        raise PackageError(f"entry {shown(raw)} has a NUL character in its name")
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise PackageError(f"entry {shown(raw)} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PackageError(f"entry {shown(raw)} has a '..' in its path")
    if not parts:
        return ""
    return "/".join(parts)


def _check_entries(entries: list[_Entry]) -> None:
    """
    The rules that need the whole archive: no entry under a link, no name
    twice, every link target inside and every hard link to an earlier file.
    """
    seen: dict[str, _Entry] = {}
    links: set[str] = set()
    for entry in entries:
        if not entry.name:
            if entry.kind == "dir":
                continue  # "./" itself
            raise PackageError("an entry has an empty name")
        if entry.name in seen:
            if entry.kind == "dir" and seen[entry.name].kind == "dir":
                continue
            raise PackageError(f"entry {shown(entry.name)} appears twice")
        path = PurePosixPath(entry.name)
        for parent in path.parents:
            if str(parent) in links:
                raise PackageError(f"entry {shown(entry.name)} lies under the link {shown(str(parent))}")
        if entry.kind == "symlink":
            target = entry.link.replace("\\", "/")
            if not target or target.startswith("/") or re.match(r"[A-Za-z]:", target):
                raise PackageError(f"link {shown(entry.name)} points to an absolute path ({shown(entry.link)})")
            resolved = os.path.normpath(os.path.join(str(path.parent), target))
            if resolved == ".." or resolved.startswith("../"):
                raise PackageError(f"link {shown(entry.name)} points outside the package ({shown(entry.link)})")
            links.add(entry.name)
        elif entry.kind == "hardlink":
            try:
                target = _normalise(entry.link)
            except PackageError:
                target = ""
            if seen.get(target, _Entry("", "")).kind != "file":
                raise PackageError(f"hard link {shown(entry.name)} does not point to an earlier file ({shown(entry.link)})")
            links.add(entry.name)
        seen[entry.name] = entry
    # Any folder an entry implies must not be a file or link of the archive.
    for name in seen:
        for parent in PurePosixPath(name).parents:
            other = seen.get(str(parent))
            if other is not None and other.kind != "dir":
                raise PackageError(f"entry {shown(name)} lies under {other.kind} {shown(str(parent))}")


def _check_links_resolved(folder: Path) -> None:
    """
    Resolve every symlink under C{folder} for real: a chain of links can
    leave the folder though each one alone stays inside.
    """
    root = os.path.realpath(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                target = os.path.realpath(path)
                if target != root and not target.startswith(root + os.sep):
                    relative = os.path.relpath(path, folder)
                    raise PackageError(f"link {shown(relative)} resolves outside the package ({shown(os.readlink(path))})")


# --- extraction -----------------------------------------------------------------------


def extract(archive: Path, kind: str, destination: Path, limits: PackageLimits = PackageLimits()) -> None:
    """
    Extract C{archive} (C{"tar"} or C{"zip"}) into C{destination}, an empty
    folder; nothing is written outside it.

    @raise PackageError: the archive is unsafe, unreadable or over a limit;
        whatever was written to C{destination} is for the caller to delete.
    """
    try:
        if kind == "tar":
            _extract_tar(archive, destination, limits)
        elif kind == "zip":
            _extract_zip(archive, destination, limits)
        else:
            raise PackageError(f"unknown archive kind {kind!r}")
    except PackageError:
        raise
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, UnicodeError) as e:
        raise PackageError(f"{archive.name} is not a readable {kind} archive: {e}") from None
    _check_links_resolved(destination)


def _tar_entries(members: list[tarfile.TarInfo]) -> Iterator[_Entry]:
    for member in members:
        name = _normalise(member.name)
        if member.isreg():
            yield _Entry(name, "file")
        elif member.isdir():
            yield _Entry(name, "dir")
        elif member.issym():
            if len(member.linkname) > MAX_LINK:
                raise PackageError(f"link {shown(member.name)} has a target over {MAX_LINK} characters")
            yield _Entry(name, "symlink", member.linkname)
        elif member.islnk():
            yield _Entry(name, "hardlink", member.linkname)
        else:
            what = "device" if member.ischr() or member.isblk() else "FIFO" if member.isfifo() else "special file"
            raise PackageError(f"entry {shown(member.name)} is a {what}")


#: Tar headers whose data is metadata, read whole by tarfile.
_LONG_HEADERS = {
    tarfile.GNUTYPE_LONGNAME: "long-name",
    tarfile.GNUTYPE_LONGLINK: "long-link",
    tarfile.XHDTYPE: "extended (pax)",
    tarfile.XGLTYPE: "global extended (pax)",
    tarfile.SOLARIS_XHDTYPE: "extended (Solaris)",
}


class _BoundedTarInfo(tarfile.TarInfo):
    """
    A tar header that refuses to read more than L{MAX_TAR_HEADER} bytes of
    long-name or extended header: tarfile reads those whole into memory.
    """

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:
        kind = _LONG_HEADERS.get(self.type)
        if kind is not None and self.size > MAX_TAR_HEADER:
            raise PackageError(
                f"an entry's {kind} header is {self.size:,} bytes; at most {MAX_TAR_HEADER:,} are read"
            )
        return super()._proc_member(tarfile)  # type: ignore[misc]


def _extract_tar(archive: Path, destination: Path, limits: PackageLimits) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise PackageError("this Python has no tar extraction filters (PEP 706); use 3.10.12, 3.11.4 or later")
    size = archive.stat().st_size
    with tarfile.open(archive, "r:*", tarinfo=_BoundedTarInfo) as tar:
        # Header by header, so an archive over a limit is refused as soon
        # as the header that passes it is read, before that entry's data.
        members: list[tarfile.TarInfo] = []
        total = 0
        while (member := tar.next()) is not None:
            members.append(member)
            if member.isreg():
                total += member.size
            limits.check(archive, size, len(members), total)
        _check_entries(list(_tar_entries(members)))
        tar.errorlevel = 2
        try:
            tar.extractall(destination, members=members, filter="data")
        except tarfile.FilterError as e:
            raise PackageError(f"{archive.name}: {e}") from None


#: The largest zip central directory read (it is read whole).
MAX_ZIP_DIRECTORY = 128 * MiB


def _check_zip_directory(archive: Path, limits: PackageLimits) -> None:
    """
    Count the zip's entries by walking its central directory record by
    record, before C{zipfile} reads it whole into memory (the count in the
    end record may lie: C{zipfile} does not use it).
    """
    with archive.open("rb") as f:
        end = zipfile._EndRecData(f)  # type: ignore[attr-defined]
        if not end:
            return  # not a zip: ZipFile says so
        size = end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
        if size > MAX_ZIP_DIRECTORY:
            raise PackageError(
                f"{archive.name} has a central directory of {size:,} bytes; at most "
                f"{MAX_ZIP_DIRECTORY:,} are read"
            )
        zip64 = end[zipfile._ECD_SIGNATURE] == zipfile.stringEndArchive64  # type: ignore[attr-defined]
        start = end[zipfile._ECD_LOCATION] - size - (76 if zip64 else 0)  # type: ignore[attr-defined]
        if start < 0:
            return  # damaged: ZipFile says so
        f.seek(start)
        archive_size = archive.stat().st_size
        entries = 0
        buffer = b""
        position = 0
        left = size
        while True:
            if len(buffer) - position < 46 and left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
                buffer = buffer[position:] + chunk
                position = 0
            if len(buffer) - position < 46 or buffer[position : position + 4] != b"PK\x01\x02":
                return  # the end, or damage: ZipFile says so
            names, extra, comment = struct.unpack_from("<3H", buffer, position + 28)
            entries += 1
            limits.check(archive, archive_size, entries, 0)
            skip = 46 + names + extra + comment
            while len(buffer) - position < skip and left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
                buffer = buffer[position:] + chunk
                position = 0
            position += skip


def _zip_entry(info: zipfile.ZipInfo, zf: zipfile.ZipFile) -> _Entry:
    name = _normalise(info.filename)
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode):  # made on Unix, with a file type
        if stat.S_ISLNK(mode):
            return _Entry(name, "symlink", _zip_link(info, zf))
        if stat.S_ISDIR(mode):
            return _Entry(name, "dir")
        if not stat.S_ISREG(mode):
            device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            what = "device" if device else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise PackageError(f"entry {shown(info.filename)} is a {what}")
    return _Entry(name, "dir" if info.is_dir() else "file")


def _zip_link(info: zipfile.ZipInfo, zf: zipfile.ZipFile) -> str:
    """
    A link entry's target: at most L{MAX_LINK} bytes are ever inflated,
    whatever the entry claims or holds.
    """
    if info.file_size > MAX_LINK:
        raise PackageError(
            f"link {shown(info.filename)} has a target of {info.file_size:,} bytes; at most {MAX_LINK} are allowed"
        )
    with zf.open(info) as source:
        target = source.read(MAX_LINK + 1)
    if len(target) > MAX_LINK:
        raise PackageError(f"link {shown(info.filename)} has a target over {MAX_LINK} bytes")
    return target.decode("utf-8", "surrogateescape")


def _extract_zip(archive: Path, destination: Path, limits: PackageLimits) -> None:
    root = os.path.realpath(destination)
    _check_zip_directory(archive, limits)
    size = archive.stat().st_size
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # The sizes the directory declares are the most each entry yields.
        limits.check(archive, size, len(infos), sum(info.file_size for info in infos))
        entries = [_zip_entry(info, zf) for info in infos]
        _check_entries(entries)
        written = 0
        symlinks: list[tuple[str, str]] = []
        for info, entry in zip(infos, entries):
            if not entry.name:
                continue
            target = os.path.join(root, *entry.name.split("/"))
            # Links are made last, so nothing below resolves through one;
            # the check still guards against a mistake in the rules above.
            if os.path.commonpath([os.path.realpath(os.path.dirname(target)), root]) != root:
                raise PackageError(f"entry {shown(info.filename)} would be written outside the package")
            if entry.kind == "dir":
                os.makedirs(target, exist_ok=True)
            elif entry.kind == "symlink":
                symlinks.append((entry.link, target))
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                executable = (info.external_attr >> 16) & 0o100 if info.create_system == 3 else 0
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                fd = os.open(target, flags, 0o755 if executable else 0o644)
                with os.fdopen(fd, "wb") as out, zf.open(info) as source:
                    while chunk := source.read(_COPY_CHUNK):
                        written += len(chunk)
                        limits.check(archive, size, len(infos), written)
                        out.write(chunk)
        for link, target in symlinks:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(link, target)
