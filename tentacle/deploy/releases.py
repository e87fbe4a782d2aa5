"""
Releases of one package on disk, and which of them is live.

::

    <applications>/<id>/
        <version>/            one folder per release, as extracted
        current -> <version>  a relative symlink: the live release
        .releases.json        the deployment order, with each package's SHA-1
        .lock                 held (flock) by whoever changes any of this
        .extract-<random>/    an extraction in progress (or left by a crash)

Nothing here follows a symlink planted in C{<id>/} (by a package's own
script, say): the lock is opened with C{O_NOFOLLOW}, the journal read
likewise, a release or leftover that is a link is unlinked rather than
entered, and C{current} may only point at a real release folder.  The
folder is private (0700): releases may hold substituted secrets.

Activation makes a new symlink beside C{current} and renames it over
C{current}: C{rename(2)} is atomic, so a reader sees the old release or the
new one, never neither.  The journal orders releases by when they were last
deployed; retention and rollback both follow it.  A release folder the
journal does not know (say, after a crash between extracting and recording)
counts as the oldest.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import stat
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs

from tentacle.deploy.packages import PackageError, check_id, check_version
from tentacle.fsutil import atomic_write, fsync_directory, private_folder

CURRENT = "current"
JOURNAL = ".releases.json"
LOCK = ".lock"
EXTRACT_PREFIX = ".extract-"
_LINK_PREFIX = ".current-"


class ReleaseError(Exception):
    """
    The releases on disk do not allow what was asked (no earlier release,
    C{current} is not a link, ...).
    """


@attrs.frozen
class Release:
    version: str
    path: Path
    deployed: str | None
    sha1: str | None
    current: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "path": str(self.path), "deployed": self.deployed,
            "sha1": self.sha1, "current": self.current,
        }


def remove_tree(path: Path) -> None:
    """
    Delete a folder even where a package made parts of it read-only;
    symlinks, inside it or in its place, are removed, never followed.
    """
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(status.st_mode):
        os.unlink(path)  # a link (or a file) planted where a folder was expected
        return
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            child = os.path.join(dirpath, name)
            if stat.S_ISDIR(os.lstat(child).st_mode):
                os.chmod(child, stat.S_IRWXU)
    os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path)


def _is_real_folder(path: Path) -> bool:
    """
    A folder itself, not a link to one.
    """
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _not_a_link(path: Path) -> None:
    if path.is_symlink():
        raise ReleaseError(f"{path} is a symlink; the releases of a package must be in a folder of their own")


def _read_regular(path: Path) -> str:
    """
    A small file's text, never through a link nor from a FIFO or device.

    @raise ReleaseError: it is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ReleaseError(f"{path} is a symlink; remove it") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReleaseError(f"{path} is not a regular file; remove it")
        return f.read().decode("utf-8")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReleaseStore:
    """
    The releases of one package id under an applications folder.  Callers
    hold L{locked} around anything that changes them.
    """

    def __init__(self, applications: Path, package_id: str) -> None:
        self.applications = applications
        self.package_id = check_id(package_id)
        self.root = applications / package_id

    # --- locking and temp folders ---------------------------------------------------

    @contextmanager
    def locked(self, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
        """
        Hold this package's lock: two deployments of one id never interleave,
        whoever started them.  C{on_wait} is called if someone else holds it.

        @raise ReleaseError: the package's folder, or its lock file, is a
            symlink (nothing in it is followed).
        """
        private_folder(self.root)
        _not_a_link(self.root)
        try:
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ReleaseError(f"{self.root / LOCK} is a symlink; remove it") from None
            raise
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def new_extract_folder(self) -> Path:
        folder = self.root / f"{EXTRACT_PREFIX}{secrets.token_hex(8)}"
        folder.mkdir(mode=0o700)  # fails on anything already there, a link too
        return folder

    def clean_leftovers(self) -> list[Path]:
        """
        Remove extractions and half-made links a killed deployment left
        (only safe under the lock).
        """
        removed = []
        for child in self.root.iterdir():
            if child.name.startswith(EXTRACT_PREFIX):
                remove_tree(child)
                removed.append(child)
            elif child.name.startswith(_LINK_PREFIX) and child.is_symlink():
                child.unlink()
                removed.append(child)
        return removed

    # --- reading --------------------------------------------------------------------

    def _journal(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(_read_regular(self.root / JOURNAL))
        except FileNotFoundError:
            return []
        except ValueError as e:
            raise ReleaseError(f"{self.root / JOURNAL} is damaged ({e}); delete it to start the order afresh") from None
        entries = data.get("releases", []) if isinstance(data, dict) else []
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("version"), str)]

    def _write_journal(self, entries: list[dict[str, Any]]) -> None:
        data = {"id": self.package_id, "releases": entries}
        atomic_write(self.root / JOURNAL, (json.dumps(data, indent=2) + "\n").encode())

    def current_version(self) -> str | None:
        """
        The version C{current} points to, if it points to a release here.
        """
        link = self.root / CURRENT
        if not link.is_symlink():
            if link.exists():
                raise ReleaseError(f"{link} is not a symlink; move it away so releases can be activated")
            return None
        target = os.readlink(link)
        version = os.path.basename(os.path.normpath(target))
        if os.path.dirname(os.path.normpath(os.path.join(self.root, target))) != str(self.root):
            return None
        return version if _is_real_folder(self.root / version) else None

    def _versions_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            if child.name[:1].isdigit() and child.is_dir() and not child.is_symlink():
                try:
                    found.append(check_version(child.name))
                except PackageError:
                    continue
        return found

    def releases(self) -> list[Release]:
        """
        Every release on disk, least recently deployed first.
        """
        on_disk = set(self._versions_on_disk())
        journal = [e for e in self._journal() if e["version"] in on_disk]
        known = {e["version"] for e in journal}
        unknown = sorted(on_disk - known, key=lambda v: (self.root / v).stat().st_mtime)
        current = self.current_version()
        result = [Release(v, self.root / v, None, None, v == current) for v in unknown]
        for e in journal:
            version = e["version"]
            result.append(Release(version, self.root / version, e.get("deployed"), e.get("sha1"), version == current))
        return result

    def find(self, version: str) -> Release | None:
        for release in self.releases():
            if release.version == version:
                return release
        return None

    def previous(self, version: str) -> Release | None:
        """
        The release deployed just before C{version}: what a rollback goes to.
        """
        order = self.releases()
        for i, release in enumerate(order):
            if release.version == version:
                return order[i - 1] if i > 0 else None
        return None

    # --- changing -------------------------------------------------------------------

    def install(self, extracted: Path, version: str) -> Path:
        """
        Move a finished extraction into place as C{<version>}.
        """
        destination = self.root / check_version(version)
        if destination.is_symlink():
            raise ReleaseError(f"{destination} is a symlink; remove it to deploy {version}")
        os.rename(extracted, destination)
        fsync_directory(self.root)
        return destination

    def record(self, version: str, sha1: str | None) -> None:
        """
        Note C{version} as the most recently deployed release.
        """
        entries = [e for e in self._journal() if e["version"] != version]
        entries.append({"version": version, "sha1": sha1, "deployed": _now()})
        self._write_journal(entries)

    def activate(self, version: str) -> None:
        """
        Point C{current} at C{version}, atomically.
        """
        if not _is_real_folder(self.root / check_version(version)):
            raise ReleaseError(f"there is no release {version} of {self.package_id}")
        self.current_version()  # refuses when current is a real folder
        temp = self.root / f"{_LINK_PREFIX}{secrets.token_hex(8)}"
        os.symlink(version, temp)
        try:
            os.replace(temp, self.root / CURRENT)
        except BaseException:
            temp.unlink()
            raise
        fsync_directory(self.root)

    def remove(self, version: str) -> None:
        """
        Delete a release and forget it.  Never the current one.
        """
        if version == self.current_version():
            raise ReleaseError(f"{version} is the current release of {self.package_id}; it cannot be removed")
        remove_tree(self.root / check_version(version))
        entries = self._journal()
        if any(e["version"] == version for e in entries):
            self._write_journal([e for e in entries if e["version"] != version])

    def prune(self, keep: int) -> list[str]:
        """
        Keep the C{keep} most recently deployed releases, and the current
        one whatever its age; delete the rest.  The deleted versions.
        """
        if keep < 1:
            raise ReleaseError("at least one release must be kept")
        order = self.releases()
        kept = {r.version for r in order[-keep:]} | {r.version for r in order if r.current}
        deleted = [r.version for r in order if r.version not in kept]
        for version in deleted:
            self.remove(version)
        return deleted
