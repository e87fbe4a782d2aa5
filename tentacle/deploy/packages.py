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
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
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


class PackageError(Exception):
    """
    A package that cannot be deployed: a bad name, a wrong hash, an unsafe
    or unreadable archive.
    """


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
        raise PackageError(f"entry {raw!r} has a NUL character in its name")
    name = raw.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise PackageError(f"entry {raw!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PackageError(f"entry {raw!r} has a '..' in its path")
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
            raise PackageError(f"entry {entry.name!r} appears twice")
        path = PurePosixPath(entry.name)
        for parent in path.parents:
            if str(parent) in links:
                raise PackageError(f"entry {entry.name!r} lies under the link {str(parent)!r}")
        if entry.kind == "symlink":
            target = entry.link.replace("\\", "/")
            if not target or target.startswith("/") or re.match(r"[A-Za-z]:", target):
                raise PackageError(f"link {entry.name!r} points to an absolute path ({entry.link!r})")
            resolved = os.path.normpath(os.path.join(str(path.parent), target))
            if resolved == ".." or resolved.startswith("../"):
                raise PackageError(f"link {entry.name!r} points outside the package ({entry.link!r})")
            links.add(entry.name)
        elif entry.kind == "hardlink":
            try:
                target = _normalise(entry.link)
            except PackageError:
                target = ""
            if seen.get(target, _Entry("", "")).kind != "file":
                raise PackageError(f"hard link {entry.name!r} does not point to an earlier file ({entry.link!r})")
            links.add(entry.name)
        seen[entry.name] = entry
    # Any folder an entry implies must not be a file or link of the archive.
    for name in seen:
        for parent in PurePosixPath(name).parents:
            other = seen.get(str(parent))
            if other is not None and other.kind != "dir":
                raise PackageError(f"entry {name!r} lies under {other.kind} {str(parent)!r}")


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
                    raise PackageError(f"link {relative!r} resolves outside the package ({os.readlink(path)!r})")


# --- extraction -----------------------------------------------------------------------


def extract(archive: Path, kind: str, destination: Path) -> None:
    """
    Extract C{archive} (C{"tar"} or C{"zip"}) into C{destination}, an empty
    folder; nothing is written outside it.

    @raise PackageError: the archive is unsafe or unreadable; whatever was
        written to C{destination} is for the caller to delete.
    """
    try:
        if kind == "tar":
            _extract_tar(archive, destination)
        elif kind == "zip":
            _extract_zip(archive, destination)
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
            yield _Entry(name, "symlink", member.linkname)
        elif member.islnk():
            yield _Entry(name, "hardlink", member.linkname)
        else:
            what = "device" if member.ischr() or member.isblk() else "FIFO" if member.isfifo() else "special file"
            raise PackageError(f"entry {member.name!r} is a {what}")


def _extract_tar(archive: Path, destination: Path) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise PackageError("this Python has no tar extraction filters (PEP 706); use 3.10.12, 3.11.4 or later")
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        _check_entries(list(_tar_entries(members)))
        tar.errorlevel = 2
        try:
            tar.extractall(destination, filter="data")
        except tarfile.FilterError as e:
            raise PackageError(f"{archive.name}: {e}") from None


def _zip_entry(info: zipfile.ZipInfo, zf: zipfile.ZipFile) -> _Entry:
    name = _normalise(info.filename)
    mode = info.external_attr >> 16
    if info.create_system == 3 and stat.S_IFMT(mode):  # made on Unix, with a file type
        if stat.S_ISLNK(mode):
            return _Entry(name, "symlink", zf.read(info).decode("utf-8", "surrogateescape"))
        if stat.S_ISDIR(mode):
            return _Entry(name, "dir")
        if not stat.S_ISREG(mode):
            device = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            what = "device" if device else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise PackageError(f"entry {info.filename!r} is a {what}")
    return _Entry(name, "dir" if info.is_dir() else "file")


def _extract_zip(archive: Path, destination: Path) -> None:
    root = os.path.realpath(destination)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        entries = [_zip_entry(info, zf) for info in infos]
        _check_entries(entries)
        symlinks: list[tuple[str, str]] = []
        for info, entry in zip(infos, entries):
            if not entry.name:
                continue
            target = os.path.join(root, *entry.name.split("/"))
            # Links are made last, so nothing below resolves through one;
            # the check still guards against a mistake in the rules above.
            if os.path.commonpath([os.path.realpath(os.path.dirname(target)), root]) != root:
                raise PackageError(f"entry {info.filename!r} would be written outside the package")
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
                        out.write(chunk)
        for link, target in symlinks:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(link, target)
