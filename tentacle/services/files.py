"""
C{IFileTransferService}: how packages reach the agent, and files leave it.

Tentacle's semantics, kept for compatibility: a relative path resolves
against the agent's home, an absolute path is used as given (the trusted
server is fully privileged), C{\\} becomes C{/}, the answer to an upload is
the SHA-1 of what was stored, and downloading a missing file returns null.

What we add: an upload is written to a temp file beside its destination
while it streams, hashed on the way, fsynced and renamed over the
destination only once complete, so no reader ever sees a partial file and a
failed upload leaves nothing at the destination (an agent killed mid-upload
leaves a recognisable temp file, which the next upload to that destination
sweeps away).  When C{allowed-roots} is configured, uploads and downloads
outside those folders are refused.

Modes: a new file is stored 0600 and a folder made for it 0700, readable by
the agent's user only, since packages and the files servers send often hold
secrets; a file that replaces an existing one keeps that file's permission
bits, so a file deliberately shared stays shared.  A path ending in C{/}
names a folder and is refused.

Downloads open the file with C{O_NOFOLLOW | O_NOCTTY | O_NONBLOCK}, so a
FIFO, a terminal or a symlink swapped in after the path was checked cannot
hold or trick the agent, and send only regular files.  A file of at most
L{READ_AHEAD} bytes is read whole before the answer, so a C{/proc} or
C{/sys} file, whose size is not what it holds, is sent as it reads, and a
read error is the call's answer rather than a broken connection.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Protocol

import attrs
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from tentacle.contracts import DataStream, UploadResult
from tentacle import events
from tentacle.dispatch import CallContext, RequestError
from tentacle.fsutil import Writeback, fsync_directory, private_folder
from tentacle.halibut.streams import ExpectedStream

__all__ = [
    "STALE_UPLOAD_SECONDS",
    "TEMP_MARKER",
    "FileTransferError",
    "FileTransferService",
    "Target",
    "UploadSink",
    "resolve_remote_path",
]

#: Part of every upload temp file's name: C{.<name>.tentacle-upload-<hex>.tmp}.
TEMP_MARKER = ".tentacle-upload-"
#: An upload temp file untouched this long was left by a dead agent; the
#: next upload to the same destination removes it.  A live upload touches
#: its file far more often (the exchange drops a peer silent for a minute).
STALE_UPLOAD_SECONDS = 3600.0


class FileTransferError(RequestError):
    """
    A transfer was refused or failed; the message is what the server sees.
    """


class _FreeSpace(Protocol):
    @property
    def f_bavail(self) -> int: ...

    @property
    def f_frsize(self) -> int: ...


StatVfs = Callable[[str], _FreeSpace]


@attrs.frozen
class Target:
    """
    Where a remote path points.

    @ivar full_path: the absolute path as the server named it, normalised
        lexically (what Tentacle reports as C{FullPath}).
    @ivar real_path: the same with every symlink resolved: what is actually
        opened, so the root check and the write agree.
    """

    full_path: str
    real_path: str


def resolve_remote_path(
    remote_path: str | None, home: Path, allowed_roots: tuple[Path, ...] = ()
) -> Target:
    """
    Apply the path rules; touches nothing on disk but to resolve symlinks.

    @raise FileTransferError: the path is empty, holds a NUL, or lies
        outside every allowed root (when roots are set).
    """
    if not remote_path:
        raise FileTransferError("No path was given")
    if "\0" in remote_path:
        raise FileTransferError(f"The path {remote_path!r} contains a NUL character")
    full = os.path.abspath(os.path.join(home, remote_path.replace("\\", "/")))
    try:
        real = os.path.realpath(full)
    except OSError as e:  # a link changing under us as it is resolved
        raise FileTransferError(f"Could not resolve {full}: {_describe(e)}") from None
    if allowed_roots and not any(_inside(real, root) for root in allowed_roots):
        roots = ", ".join(str(r) for r in allowed_roots)
        shown = full if real == full else f"{full} (which resolves to {real})"
        raise FileTransferError(f"{shown} is outside the allowed roots ({roots})")
    return Target(full, real)


def _inside(path: str, root: Path) -> bool:
    """
    Strictly below C{root}: C{/srv/app-evil} is not inside C{/srv/app}.
    """
    prefix = os.path.realpath(root).rstrip(os.sep) + os.sep
    return path.startswith(prefix)


def _mode_for(destination: str) -> int:
    """
    An upload's permission bits: those of the file it replaces, else 0600.
    """
    try:
        status = os.stat(destination)
    except OSError:
        return 0o600
    return status.st_mode & 0o777 if stat.S_ISREG(status.st_mode) else 0o600


def _describe(error: OSError) -> str:
    reason = error.strerror or str(error)
    if error.errno == errno.EFBIG:
        return f"{reason} (the agent's file-size limit, RLIMIT_FSIZE, was reached)"
    return reason


#: Payload is written in batches of this size rather than as the TLS layer
#: delivers it (16 KiB records): 64 times fewer system calls.
WRITE_BATCH = 1024 * 1024
#: At most this much of an upload waits in the page cache for the disk:
#: each batch is handed to the disk as it is written, so the fsync before
#: the answer is short whatever the upload's size, and the answer starts
#: well within the Server's five minutes (L{tentacle.fsutil.Writeback}).
WRITEBACK_WINDOW = 32 * WRITE_BATCH
#: Files up to this size are read whole before a download is answered.
READ_AHEAD = 64 * 1024


@attrs.define(eq=False)
class UploadSink:
    """
    One upload's payload, written to a temp file beside its destination as
    it arrives (in L{WRITE_BATCH} pieces) and hashed on the way.  L{commit}
    makes it the destination.

    Each batch is handed to the disk as it is written, and the sink waits
    for the disk when more than L{WRITEBACK_WINDOW} is unwritten, so the
    commit's fsync is short however large the upload.

    A failed write (disk full, file-size limit) does not stop the stream:
    the temp file is removed at once, the rest of the payload is read past
    so the connection stays in step, and the error is the call's answer.

    @ivar target: where the file goes once complete.
    @ivar temp_path: the temp file, in the destination's folder so the final
        rename is atomic.
    @ivar expected_length: what the request declared.
    @ivar received: payload bytes handed to L{write} so far.
    @ivar error: why the upload failed, once it has.
    """

    target: Target
    temp_path: str
    expected_length: int
    _fd: int | None
    log: Logger = attrs.field(kw_only=True, factory=lambda: Logger(namespace=__name__))
    _sha1: Any = attrs.field(init=False, factory=lambda: hashlib.sha1(usedforsecurity=False))
    _batch: bytearray = attrs.field(init=False, factory=bytearray)
    received: int = attrs.field(init=False, default=0)
    _written: int = attrs.field(init=False, default=0)
    error: FileTransferError | None = attrs.field(init=False, default=None)
    _writeback: Writeback | None = attrs.field(init=False, default=None)
    _finished: bool = attrs.field(init=False, default=False)
    _committed: bool = attrs.field(init=False, default=False)
    _removed: bool = attrs.field(init=False, default=False)
    _discarded: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        if self._fd is not None:
            self._writeback = Writeback(self._fd, WRITEBACK_WINDOW)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self._fd is None:
            return
        self._sha1.update(data)
        self._batch += data
        if len(self._batch) >= WRITE_BATCH:
            self._write_batch()

    def finish(self) -> None:
        self._finished = True
        if self._fd is None:
            return
        if self.received != self.expected_length:
            self._fail(
                f"The upload to {self.target.full_path} was {self.received} bytes "
                f"but {self.expected_length} were declared"
            )
            return
        self._write_batch()

    def _write_batch(self) -> None:
        assert self._fd is not None
        batch, self._batch = self._batch, bytearray()
        view = memoryview(batch)
        done = 0
        try:
            while done < len(batch):
                done += os.write(self._fd, view[done:])
            if self._writeback is not None:
                self._writeback.wrote(self._written, done)
        except OSError as e:
            self._fail(
                f"Could not write {self.target.full_path} after {self._written + done} of "
                f"{self.expected_length} bytes: {_describe(e)}"
            )
        self._written += done

    def discard(self) -> None:
        """
        Remove the temp file, unless the upload was committed; safe to repeat.
        """
        if self._committed or self._discarded:
            return
        self._discarded = True
        if not self._finished:
            self.log.warn(
                "Upload to {path} abandoned after {received} of {length} bytes; "
                "its temp file is removed",
                path=self.target.full_path,
                received=self.received,
                length=self.expected_length,
                event=events.UPLOAD_ABANDONED,
            )
        self._drop()

    def commit(self) -> UploadResult:
        """
        Make the upload durable and visible: fsync, rename over the
        destination, fsync the folder.  Blocking: run it in a thread.

        @raise FileTransferError: the payload failed or the commit did; the
            temp file is gone either way.
        """
        if self.error is not None:
            raise self.error
        if not self._finished or self._fd is None:
            raise FileTransferError(f"The upload to {self.target.full_path} is incomplete")
        fd, self._fd = self._fd, None
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(self.temp_path, self.target.real_path)
            self._committed = True
            fsync_directory(Path(self.target.real_path).parent)
        except OSError as e:
            if not self._committed:
                raise self._fail(
                    f"Could not store {self.target.full_path}: {_describe(e)}"
                ) from None
            raise FileTransferError(
                f"Stored {self.target.full_path}, but could not make it durable: {_describe(e)}"
            ) from None
        return UploadResult(self.target.full_path, self._sha1.hexdigest(), self.received)

    def check(self, declared_length: int) -> None:
        """
        @raise FileTransferError: the payload failed, or is not as long as
            the request's C{DataStream} argument says.
        """
        if self.error is None and self.received != declared_length:
            self._fail(
                f"The upload to {self.target.full_path} was {self.received} bytes "
                f"but {declared_length} were declared"
            )
        if self.error is not None:
            raise self.error

    def _fail(self, message: str) -> FileTransferError:
        if self.error is None:
            self.error = FileTransferError(message)
        self._drop()
        return self.error

    def _drop(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if not self._committed and not self._removed:
            self._removed = True
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass


def _reactor_threads() -> IReactorThreads:
    from twisted.internet import reactor

    threads: IReactorThreads = reactor  # type: ignore[assignment]
    return threads


@attrs.define
class FileTransferService:
    """
    Serves C{IFileTransferService}.

    @ivar home: where relative paths resolve.
    @ivar allowed_roots: when not empty, the only folders transfers may touch.
    @ivar reactor: runs the blocking commit (fsync, rename) in its thread
        pool, so flushing a large file never stalls other connections.
    @ivar statvfs: reports free space; replaceable for tests.
    @ivar log: where its events go (the agent's publisher).
    """

    home: Path
    allowed_roots: tuple[Path, ...] = ()
    reactor: IReactorThreads = attrs.field(factory=_reactor_threads)
    statvfs: StatVfs = os.statvfs
    clock: Callable[[], float] = time.time
    log: Logger = attrs.field(kw_only=True, factory=lambda: Logger(namespace=__name__))

    def resolve(self, remote_path: str | None) -> Target:
        return resolve_remote_path(remote_path, self.home, self.allowed_roots)

    def upload_file_sink(
        self, remote_path: str | None, upload: DataStream | None, *, stream: ExpectedStream
    ) -> UploadSink:
        """
        Check the path and the free space, then open the temp file the
        payload streams into.  Refuses before creating anything.
        """
        try:
            return self._open_upload(remote_path, stream.length)
        except FileTransferError as e:
            self.log.warn(
                "Upload refused: {error}", error=str(e), path=remote_path, event=events.UPLOAD_REFUSED
            )
            raise

    def _open_upload(self, remote_path: str | None, length: int) -> UploadSink:
        target = self.resolve(remote_path)
        if remote_path and remote_path.replace("\\", "/").endswith("/"):
            raise FileTransferError(
                f"{remote_path!r} ends with a '/', so it names a folder: give the file's name too"
            )
        destination = target.real_path
        if os.path.isdir(destination):
            raise FileTransferError(f"{target.full_path} is a folder, not a file")
        folder = os.path.dirname(destination)
        self._check_free_space(folder, length, target)
        try:
            private_folder(Path(folder))
        except OSError as e:
            raise FileTransferError(
                f"Could not create the folder for {target.full_path}: {_describe(e)}"
            ) from None
        name = os.path.basename(destination)
        self._remove_stale_temp_files(folder, name)
        temp = os.path.join(folder, f".{name}{TEMP_MARKER}{uuid.uuid4().hex}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.fchmod(fd, _mode_for(destination))
        except OSError as e:
            raise FileTransferError(f"Could not write {target.full_path}: {_describe(e)}") from None
        self.log.debug(
            "Receiving {length} bytes for {path}", length=length, path=target.full_path
        )
        return UploadSink(target, temp, length, fd, log=self.log)

    def _check_free_space(self, folder: str, length: int, target: Target) -> None:
        existing = folder
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        try:
            usage = self.statvfs(existing)
        except OSError as e:
            raise FileTransferError(
                f"Could not check the free space for {target.full_path}: {_describe(e)}"
            ) from None
        free = usage.f_bavail * usage.f_frsize
        if free < length:
            raise FileTransferError(
                f"Not enough free disk space for {target.full_path}: the upload is "
                f"{length} bytes but only {free} are free in {existing}"
            )

    def _remove_stale_temp_files(self, folder: str, name: str) -> None:
        """
        Best effort: temp files an agent killed mid-upload left for this name.
        """
        prefix = f".{name}{TEMP_MARKER}"
        cutoff = self.clock() - STALE_UPLOAD_SECONDS
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
                continue
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    self.log.info("Removed a stale upload temp file {path}", path=entry.path)
            except OSError:
                pass

    async def upload_file(
        self, remote_path: str | None, upload: DataStream | None, *, context: CallContext
    ) -> UploadResult:
        """
        Commit the upload the sink received, off the reactor thread.
        """
        if upload is None:
            raise FileTransferError("UploadFile needs a data stream")
        received = context.received.get(upload.id)
        sink = received.sink if received is not None else None
        if not isinstance(sink, UploadSink):
            raise FileTransferError(f"No upload arrived for data stream {upload.id}")
        sink.check(upload.length)
        result: UploadResult = await deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), sink.commit
        )
        self.log.debug(
            "Stored {path} ({length} bytes, SHA-1 {hash})",
            path=result.full_path,
            length=result.length,
            hash=result.hash,
            event=events.UPLOAD_STORED,
        )
        return result

    def download_file(
        self, remote_path: str | None, *, context: CallContext
    ) -> DataStream | None:
        """
        Stream a file in chunks (the exchange pulls them as the connection
        drains); C{None} when there is no such file, as Tentacle answers.
        """
        target = self.resolve(remote_path)
        # Non-blocking, so a FIFO cannot hold the reactor up in open(); not
        # following a link swapped in since the path was resolved; never
        # becoming the agent's controlling terminal.
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
        try:
            fd = os.open(target.real_path, flags)
        except (FileNotFoundError, NotADirectoryError):
            self.log.debug("Download of missing {path}", path=target.full_path)
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise FileTransferError(f"{target.full_path} changed into a symbolic link while it was opened") from None
            raise FileTransferError(f"Could not read {target.full_path}: {_describe(e)}") from None
        try:
            status = os.fstat(fd)
            if stat.S_ISDIR(status.st_mode):
                raise FileTransferError(f"{target.full_path} is a folder, not a file")
            if not stat.S_ISREG(status.st_mode):
                raise FileTransferError(f"{target.full_path} is not a regular file")
            if status.st_size <= READ_AHEAD:
                content = _read_small(fd, target)
            else:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except BaseException:
            os.close(fd)
            raise
        if status.st_size <= READ_AHEAD:
            os.close(fd)
            length = len(content)
            opener: Callable[[], IO[bytes]] = lambda: io.BytesIO(content)
        else:
            source: IO[bytes] = os.fdopen(fd, "rb")
            length = status.st_size
            opener = lambda: source
        self.log.debug(
            "Sending {path} ({length} bytes)",
            path=target.full_path,
            length=length,
            event=events.DOWNLOAD_STARTED,
        )
        # Opened now, so the length declared is that of the file being sent.
        return context.send(length, opener)


def _read_small(fd: int, target: Target) -> bytes:
    """
    A small file whole: its real content, whatever its size said (files in
    C{/proc} say 0, in C{/sys} 4096).

    @raise FileTransferError: it cannot be read (a write-only C{/sys}
        attribute answers EIO), or it holds more than L{READ_AHEAD} bytes
        though it said it held fewer.
    """
    chunks = []
    size = 0
    try:
        while size <= READ_AHEAD and (chunk := os.read(fd, READ_AHEAD + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except BlockingIOError:
        raise FileTransferError(f"{target.full_path} has no data to read yet") from None
    except OSError as e:
        raise FileTransferError(f"Could not read {target.full_path}: {_describe(e)}") from None
    if size > READ_AHEAD:
        raise FileTransferError(
            f"{target.full_path} holds more than its size says (a /proc or /sys file?), "
            f"and more than {READ_AHEAD} bytes: it cannot be sent"
        )
    return b"".join(chunks)
