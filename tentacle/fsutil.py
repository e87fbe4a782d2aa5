"""
Durable file writes: nothing partial is ever visible where a complete file is expected.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
    """
    Replace C{path} with C{data}: write a temp file beside it (created with
    C{mode}, so a key is never readable by others even for a moment), fsync
    it, rename it over the target, then fsync the folder so the rename
    survives a crash.

    @param durable: C{False} skips both fsyncs: a reader still never sees a
        partial file, but a power cut may bring back the old one.  For
        states that a crash makes moot anyway.
    """
    folder = path.parent
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_directory(folder)


def fsync_directory(folder: Path) -> None:
    """
    Make a rename or creation in C{folder} durable.
    """
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_folder(folder: Path) -> None:
    """
    Make C{folder}, and whichever of its parents are missing, readable by
    their owner only (0700) whatever the umask; folders that exist are left
    as they are.
    """
    if folder.is_dir():
        return
    if not folder.parent.is_dir() and folder.parent != folder:
        private_folder(folder.parent)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        if folder.is_dir():  # made by someone else meanwhile
            return
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(folder)) from None
    os.chmod(folder, 0o700)  # mkdir's mode is only ever narrowed by the umask


def tighten_folder(folder: Path) -> bool:
    """
    Make an existing folder of ours private (0700) if others may enter it:
    folders an older agent made 0755.  A folder owned by someone else is
    left alone.  Whether it was changed.
    """
    try:
        status = os.lstat(folder)
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid() or not status.st_mode & 0o077:
        return False
    os.chmod(folder, stat.S_IMODE(status.st_mode) & 0o700 | 0o700)
    return True


def sync_tree(folder: Path) -> int:
    """
    fsync every file and folder under C{folder}, and C{folder} itself,
    deepest first; symlinks are not followed.  Before a tree is made live,
    so a power cut cannot leave it with empty files.  How many were synced.
    """
    synced = 0
    for dirpath, dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue  # a symlink: its target is synced where it lies
                raise
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.fsync(fd)
                    synced += 1
            finally:
                os.close(fd)
        fsync_directory(Path(dirpath))
        synced += 1
    return synced


# --- write-back of large files as they are written --------------------------------

_SYNC_FILE_RANGE_WAIT_BEFORE = 1
_SYNC_FILE_RANGE_WRITE = 2
_SYNC_FILE_RANGE_WAIT_AFTER = 4
#: Errors that mean "not here" (a file system or kernel without it), not a
#: failed write.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP})


def _load_sync_file_range() -> Callable[[int, int, int, int], None] | None:
    """
    Linux's C{sync_file_range(2)}, which Python's C{os} lacks.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Any = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
        if function(fd, offset, length, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return sync_file_range


_sync_file_range = _load_sync_file_range()


class Writeback:
    """
    Keeps a file that is written front to back from piling up in the page
    cache: each piece written is handed to the disk at once, and a writer
    that gets more than C{window} bytes ahead of the disk waits for it.  So
    the final C{fsync} of a huge upload has at most C{window} bytes left to
    write, instead of whatever the kernel's dirty limits allow (gigabytes,
    minutes on a slow disk).

    On Linux this is C{sync_file_range(2)}; elsewhere an C{fdatasync} every
    C{window} bytes.  Neither makes the file durable (the final C{fsync}
    still does); both report a failed write, which the final C{fsync}
    might then no longer see, so the caller must treat it as the upload's
    failure.
    """

    def __init__(self, fd: int, window: int) -> None:
        self._fd = fd
        self._window = window
        self._synced = 0  #: bytes known written to the disk
        self._end = 0
        self.enabled = True

    @property
    def pending(self) -> int:
        """
        Bytes written but not yet known to be on the disk: at most
        C{window} plus the last piece, while enabled.
        """
        return self._end - self._synced

    def wrote(self, offset: int, length: int) -> None:
        """
        C{length} bytes were just written at C{offset}.

        @raise OSError: writing back failed (EIO, ENOSPC...).
        """
        if not self.enabled or length <= 0:
            return
        end = self._end = offset + length
        try:
            if _sync_file_range is not None:
                _sync_file_range(self._fd, offset, length, _SYNC_FILE_RANGE_WRITE)
                target = end - self._window
                if target > self._synced:
                    _sync_file_range(
                        self._fd, self._synced, target - self._synced,
                        _SYNC_FILE_RANGE_WAIT_BEFORE | _SYNC_FILE_RANGE_WRITE | _SYNC_FILE_RANGE_WAIT_AFTER,
                    )
                    self._synced = target
            elif end - self._synced >= self._window:
                os.fdatasync(self._fd)
                self._synced = end
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                self.enabled = False
                return
            raise
