"""
A script's durable state on disk: its workspace folder, its log, its state file.

    <home>/Work/<ticket>/
        Bootstrap.sh        the script body (CRLF normalised to LF)
        <files>             the script's extra files
        Output.log          one JSON array per line: [source, text, occurred]
        Output.idx          a sparse index of Output.log, for restarts
        scriptstate.json    the V2 state, replaced atomically

Everything a server may need after an agent restart is here, so a status can
be answered from disk alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from datetime import datetime
from itertools import accumulate
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import attrs

from tentacle.contracts import ProcessOutput, ProcessOutputSource, ProcessState
from tentacle.dispatch import RequestError
from tentacle.fsutil import atomic_write, private_folder

WORK_FOLDER = "Work"
BOOTSTRAP = "Bootstrap.sh"
OUTPUT_LOG = "Output.log"
STATE_FILE = "scriptstate.json"

_SOURCE_NAMES = {
    ProcessOutputSource.StdOut: "stdout",
    ProcessOutputSource.StdErr: "stderr",
    ProcessOutputSource.Debug: "debug",
}
_SOURCES = {name: source for source, name in _SOURCE_NAMES.items()}
_SAFE_TICKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class WorkspaceError(RequestError):
    """
    A ticket or file name that cannot be stored safely.
    """


def ticket_folder_name(ticket: str) -> str:
    """
    The folder for a ticket.  Tickets compare ignoring case, so the folder
    name is lower case; anything that could leave C{Work/} is refused, since
    V2 tickets are chosen by the client.
    """
    if not _SAFE_TICKET.fullmatch(ticket) or ".." in ticket:
        raise WorkspaceError(
            f"{ticket!r} cannot be a script ticket: use letters, digits, '.', '_' "
            "and '-' only (at most 200)"
        )
    return ticket.lower()


def safe_file_name(root: Path, name: str) -> Path:
    """
    Where a script's extra file goes; names that would escape the workspace
    (absolute, C{..}, NUL, backslash tricks) are refused.
    """
    normalised = name.replace("\\", "/")
    parts = normalised.split("/")
    if (
        not name
        or "\x00" in name
        or normalised.startswith("/")
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise WorkspaceError(f"{name!r} is not a file name inside the script's workspace")
    return root.joinpath(*parts)


@attrs.define
class ScriptState:
    """
    What C{scriptstate.json} holds: enough to answer a status after a restart.
    """

    created: datetime
    started: datetime | None = None
    completed: datetime | None = None
    state: ProcessState = ProcessState.Pending
    exit_code: int | None = None
    ran_to_completion: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "Created": self.created.isoformat(),
            "Started": self.started.isoformat() if self.started else None,
            "Completed": self.completed.isoformat() if self.completed else None,
            "State": self.state.name,
            "ExitCode": self.exit_code,
            "RanToCompletion": self.ran_to_completion,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScriptState:
        def when(key: str) -> datetime | None:
            value = data.get(key)
            return datetime.fromisoformat(value) if value else None

        created = when("Created")
        if created is None:
            raise ValueError("no Created time")
        return cls(
            created=created,
            started=when("Started"),
            completed=when("Completed"),
            state=ProcessState[str(data["State"])],
            exit_code=data.get("ExitCode"),
            ran_to_completion=bool(data.get("RanToCompletion")),
        )


#: The log's index keeps the offset of one line in every this many ...
INDEX_EVERY_LINES = 4096
#: ... and of at least one line in every this many bytes, so reaching any
#: line reads at most about this much of the file beyond the page itself.
INDEX_EVERY_BYTES = 1 << 20
#: When a script's output passes its limit, at most this many of its last
#: lines, and this many characters of them, are kept to be stored at its end.
TAIL_LINES = 1000
TAIL_CHARS = 1 << 20
#: The scan that indexes a log found on disk reads it in pieces this big.
_SCAN_CHUNK = 1 << 20

_encode_text = json.encoder.encode_basestring_ascii


@attrs.frozen
class LogPage:
    """
    One answer's worth of log.

    @ivar bytes_read: how much of the file was read to find and decode it.
    @ivar thread: the thread that read it.
    """

    entries: list[ProcessOutput]
    next_sequence: int
    bytes_read: int
    thread: int = attrs.field(factory=threading.get_ident)


class ScriptLog:
    """
    The append-only log of one script, readable from any sequence number.

    Each entry is one line of JSON, so a crash can at worst cut the last
    line, which is then ignored.  Memory does not grow with the log: a
    sparse index keeps the offset of one line in every L{INDEX_EVERY_LINES}
    (and at least one per L{INDEX_EVERY_BYTES}), so a page is found by a
    seek and at most that much skipping.

    The index is also saved beside the log (L{index_path}) as it grows.
    A log that already exists on disk (after an agent restart) must be
    indexed once, by L{index_existing}, before it is read or appended to:
    that reads the saved index and scans the log from its last entry (the
    whole log when there is none), so callers on the reactor thread run it
    in a thread.

    @param limit: stop storing lines once the file would pass this many
        bytes (C{None}: no limit).  A marker line says so, and the last
        lines (L{TAIL_LINES}, L{TAIL_CHARS}) are stored by L{finish}.
    """

    def __init__(self, path: Path, limit: int | None = None) -> None:
        self.path = path
        self.limit = limit
        #: Sequence numbers and file offsets of the indexed lines.
        self._lines = array("q", [0])
        self._offsets = array("q", [0])
        self._count = 0
        self._end = 0
        self._writer: IO[bytes] | None = None
        self._index_writer: IO[bytes] | None = None
        #: Index entries not yet saved: written after the lines they point to.
        self._unsaved = array("q")
        self._indexed = False
        #: Lines over the limit: the newest few, and how many in all.
        self._capped = False
        self._tail: deque[tuple[ProcessOutputSource, str, datetime]] = deque()
        self._tail_chars = 0
        self._held = 0
        self._finished = False
        #: The thread of each scan of the file (L{index_existing}).
        self.scans: list[int] = []
        self._scan_lock = threading.Lock()

    @property
    def indexed(self) -> bool:
        """
        Whether the log can be read and appended to without a scan.
        """
        return self._indexed or not os.path.exists(self.path)

    @property
    def index_size(self) -> int:
        """
        How many lines the index remembers an offset for.
        """
        return len(self._lines)

    def index_existing(self) -> None:
        """
        Scan the file on disk to build the index: blocking, in chunks, so
        memory stays bounded whatever the file's size.  A line cut short by
        a crash ends the log.  Safe to call again, from any thread (it does
        nothing once done).
        """
        with self._scan_lock:
            self._scan()

    def _scan(self) -> None:
        if self._indexed:
            return
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            self._indexed = True
            return
        with f:
            lines, offsets = self._saved_index(f)
            count = lines[-1]
            base = end = offsets[-1]
            f.seek(base)
            while chunk := f.read(_SCAN_CHUNK):
                newlines = chunk.count(b"\n")
                if newlines:
                    # One checkpoint per chunk: the line after its first
                    # newline, so no read skips more than two chunks.
                    lines.append(count + 1)
                    offsets.append(base + chunk.find(b"\n") + 1)
                    count += newlines
                    end = base + chunk.rfind(b"\n") + 1
                base += len(chunk)
        self._lines, self._offsets, self._count, self._end = lines, offsets, count, end
        self.scans.append(threading.get_ident())
        self._indexed = True

    def _saved_index(self, log: IO[bytes]) -> tuple[array[int], array[int]]:
        """
        The index saved beside the log (L{index_path}), up to its last entry
        that is still a line start of the file: the scan goes on from
        there, so after a restart only the log's tail is read.  Anything
        doubtful falls back to the start of the file.
        """
        lines, offsets = array("q", [0]), array("q", [0])
        try:
            saved = self.index_path.read_bytes()
        except OSError:
            return lines, offsets
        pairs = array("q")
        pairs.frombytes(saved[: len(saved) - len(saved) % 16])
        size = os.fstat(log.fileno()).st_size
        for line, offset in zip(pairs[2::2], pairs[3::2]):
            if not (lines[-1] < line and offsets[-1] < offset <= size):
                break
            lines.append(line)
            offsets.append(offset)
        while len(lines) > 1:
            log.seek(offsets[-1] - 1)
            if log.read(1) == b"\n":
                break
            lines.pop()
            offsets.pop()
        return lines, offsets

    @property
    def index_path(self) -> Path:
        """
        Where the index is saved as it grows (pairs of 64-bit line numbers
        and offsets), so a restart need not scan the whole log.
        """
        return self.path.with_suffix(".idx")

    def _ensure_indexed(self) -> None:
        if not self._indexed:
            self.index_existing()

    def __len__(self) -> int:
        self._ensure_indexed()
        return self._count

    def append(self, source: ProcessOutputSource, text: str, occurred: datetime) -> None:
        self.append_lines(source, [text], occurred)

    def append_lines(self, source: ProcessOutputSource, texts: list[str], occurred: datetime) -> None:
        """
        Store lines that arrived together, in one write: a script printing
        millions of short lines costs a fraction of a microsecond a line.
        """
        if not texts:
            return
        self._ensure_indexed()
        if self._capped:
            self._hold(source, texts, occurred)
            return
        head = '["' + _SOURCE_NAMES[source] + '", '
        tail = ', "' + occurred.isoformat() + '"]\n'
        encoded = list(map(_encode_text, texts))
        fixed = len(head) + len(tail)
        if self.limit is not None and self._end + sum(map(len, encoded)) + fixed * len(encoded) > self.limit:
            sizes = list(accumulate(len(e) + fixed for e in encoded))
            fits = bisect_right(sizes, self.limit - self._end)
            self._write(head, tail, encoded[:fits])
            self._write_marker(
                f"tentacle: this script's output passed the script-output-limit of "
                f"{self.limit} bytes. Later lines are not stored, except the last "
                f"{TAIL_LINES}, which follow when the script ends.",
                occurred,
            )
            self._capped = True
            self._hold(source, texts[fits:], occurred)
            return
        self._write(head, tail, encoded)

    def _write(self, head: str, tail: str, encoded: list[str]) -> None:
        if not encoded:
            return
        if self._writer is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._writer = os.fdopen(fd, "ab")
            self._writer.truncate(self._end)
            del self._unsaved[:]  # the index file is (re)written whole
            for line, offset in zip(self._lines, self._offsets):
                self._unsaved.extend((line, offset))
            if self._end:
                self._open_index()  # a log written before: its saved index is rewritten now, as it stands
        body = (head + (tail + head).join(encoded) + tail).encode("ascii")
        first, start, n = self._count, self._end, len(encoded)
        if (
            first + n - 1 - self._lines[-1] >= INDEX_EVERY_LINES
            or start + len(body) - self._offsets[-1] > INDEX_EVERY_BYTES
        ):
            self._index(first, start, len(head) + len(tail), encoded)
        self._writer.write(body)
        self._count += n
        self._end += len(body)

    def _index(self, first: int, start: int, fixed: int, encoded: list[str]) -> None:
        """
        Add the checkpoints that fall among these lines, about to be
        written at C{start}: where C{INDEX_EVERY_LINES} lines or
        C{INDEX_EVERY_BYTES} bytes have passed since the last one.
        """
        starts = list(accumulate((len(e) + fixed for e in encoded), initial=0))
        n = len(encoded)
        while True:
            by_lines = self._lines[-1] + INDEX_EVERY_LINES - first
            by_bytes = bisect_left(starts, self._offsets[-1] + INDEX_EVERY_BYTES - start)
            j = max(min(by_lines, by_bytes), self._lines[-1] - first + 1, 0)
            if j >= n:
                return
            self._lines.append(first + j)
            self._offsets.append(start + starts[j])
            self._unsaved.extend((first + j, start + starts[j]))

    def _write_marker(self, text: str, occurred: datetime) -> None:
        self._write('["stdout", ', ', "' + occurred.isoformat() + '"]\n', [_encode_text(text)])

    def _hold(self, source: ProcessOutputSource, texts: list[str], occurred: datetime) -> None:
        """
        Over the limit: keep only the newest lines, in bounded memory.
        """
        self._held += len(texts)
        for text in texts[-TAIL_LINES:]:
            self._tail.append((source, text, occurred))
            self._tail_chars += len(text)
        while len(self._tail) > TAIL_LINES or (self._tail_chars > TAIL_CHARS and len(self._tail) > 1):
            self._tail_chars -= len(self._tail.popleft()[1])

    def finish(self, occurred: datetime) -> None:
        """
        The script has ended: store the last lines held back by the limit,
        after a line saying how many were not stored.
        """
        if not self._capped or self._finished:
            return
        self._finished = True
        tail, self._tail = self._tail, deque()
        self._tail_chars = 0
        self._write_marker(
            f"tentacle: {self._held - len(tail)} lines of output were not stored (the "
            f"script-output-limit is {self.limit} bytes); the last {len(tail)} follow.",
            occurred,
        )
        for source, text, when in tail:
            self._write(
                '["' + _SOURCE_NAMES[source] + '", ', ', "' + when.isoformat() + '"]\n', [_encode_text(text)]
            )

    def _open_index(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        self._index_writer = os.fdopen(os.open(self.index_path, flags, 0o600), "ab")

    def flush(self) -> None:
        """
        Hand buffered lines to the OS, so they survive the agent's death.

        A new log's index file is created only once the index holds more
        than the first line's entry (after L{INDEX_EVERY_LINES} lines or
        L{INDEX_EVERY_BYTES} bytes): before that, a restart scans the whole
        log whether the file exists or not, and most scripts' logs never
        get that long.  One file creation less per script (about as costly
        as the first line's write on ext4).
        """
        if self._writer is not None:
            self._writer.flush()
        if self._index_writer is None and self._writer is not None and len(self._lines) > 1:
            self._open_index()
        if self._unsaved and self._index_writer is not None:
            self._index_writer.write(self._unsaved.tobytes())
            self._index_writer.flush()
            del self._unsaved[:]

    def close(self) -> None:
        self.flush()
        for writer in (self._writer, self._index_writer):
            if writer is not None:
                writer.close()
        self._writer = self._index_writer = None

    def span(self, after: int) -> int:
        """
        How many bytes of the file lie between the index entry a read from
        C{after} starts at and the end: an upper bound on what it reads.
        """
        self._ensure_indexed()
        start = max(0, min(after, self._count))
        return self._end - self._offsets[bisect_right(self._lines, start) - 1]

    def read(self, after: int, max_entries: int, max_bytes: int) -> tuple[list[ProcessOutput], int]:
        """
        Entries from sequence C{after} on, at most C{max_entries} of them and
        about C{max_bytes} of text, so one status answer stays small.

        @return: the entries and the sequence number to ask from next.
        """
        page = self.read_page(after, max_entries, max_bytes)
        return page.entries, page.next_sequence

    def read_page(self, after: int, max_entries: int, max_bytes: int, flush: bool = True) -> LogPage:
        """
        L{read}, saying how much of the file it read.  Blocking.  With
        C{flush=False} it may run in a thread while the reactor thread
        appends (flush first, there): it reads only lines that were on disk
        when it started.
        """
        self._ensure_indexed()
        count = self._count
        start = max(0, min(after, count))
        if start >= count:
            return LogPage([], count, 0)
        if flush:
            self.flush()
        i = bisect_right(self._lines, start) - 1
        line_number, offset = self._lines[i], self._offsets[i]
        entries: list[ProcessOutput] = []
        size = 0
        with open(self.path, "rb") as f:
            f.seek(offset)
            for _ in range(start - line_number):
                f.readline()
            while len(entries) < max_entries and not (entries and size >= max_bytes):
                if start + len(entries) >= count:
                    break
                line = f.readline()
                if not line.endswith(b"\n"):
                    break
                source, text, occurred = json.loads(line)
                entries.append(
                    ProcessOutput(_SOURCES[source], datetime.fromisoformat(occurred), text)
                )
                size += len(line)
            bytes_read = f.tell() - offset
        return LogPage(entries, start + len(entries), bytes_read)


@attrs.define
class ScriptWorkspace:
    """
    One script's folder.
    """

    root: Path
    ticket: str
    _log: ScriptLog | None = None
    #: The script-output-limit of its log, in bytes (C{None}: none).
    output_limit: int | None = attrs.field(default=None, kw_only=True)

    @property
    def log(self) -> ScriptLog:
        if self._log is None:
            self._log = ScriptLog(self.root / OUTPUT_LOG, self.output_limit)
        return self._log

    def exists(self) -> bool:
        return self.root.is_dir()

    def create(self) -> None:
        """
        Make the folder (and C{Work/}, if new) private, 0700 whatever the
        process's umask: scripts and their files may hold secrets.
        """
        private_folder(self.root)

    def write_bootstrap(self, body: str, prelude: str = "") -> Path:
        """
        @param prelude: put before the body's first line, on that line.
        """
        path = self.root / BOOTSTRAP
        # Not fsynced: if the agent dies now, the script reports -46 anyway.
        text = prelude + body.replace("\r\n", "\n")
        atomic_write(path, text.encode("utf-8"), mode=0o600, durable=False)
        return path

    def add_file(self, name: str, source: IO[bytes]) -> Path:
        """
        Copy a script file in, in chunks.

        @raise WorkspaceError: when the name would leave the workspace.
        """
        target = safe_file_name(self.root, name)
        private_folder(target.parent)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 65536)
        return target

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def save_state(self, state: ScriptState) -> None:
        """
        Only the final state is fsynced: losing a Pending or Running state
        to a power cut changes nothing, since either way a restart reports
        -46, and each fsync costs milliseconds before the script can start.
        """
        atomic_write(
            self.state_path,
            json.dumps(state.to_json(), indent=2).encode(),
            mode=0o600,
            durable=state.state is ProcessState.Complete,
        )

    def load_state(self) -> ScriptState | None:
        """
        The saved state, or C{None} when there is none or it is unreadable.
        """
        try:
            return ScriptState.from_json(json.loads(self.state_path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def close(self) -> None:
        """
        Close the log's files (it opens them again if written to).
        """
        if self._log is not None:
            self._log.close()

    def delete(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)


@attrs.frozen
class WorkspaceStore:
    """
    All workspaces of an agent, under C{<home>/Work}.
    """

    home: Path
    #: Each script log's limit in bytes (the script-output-limit).
    output_limit: int | None = None

    @property
    def root(self) -> Path:
        return self.home / WORK_FOLDER

    def workspace(self, ticket: str) -> ScriptWorkspace:
        """
        @raise WorkspaceError: for a ticket that is not a safe folder name.
        """
        return ScriptWorkspace(
            self.root / ticket_folder_name(ticket), ticket, output_limit=self.output_limit
        )

    def all(self) -> Iterator[ScriptWorkspace]:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.is_dir(follow_symlinks=False):
                yield ScriptWorkspace(Path(entry.path), entry.name)


def remove_stale_workspaces(
    store: WorkspaceStore,
    max_age: float,
    in_use: Callable[[str], bool],
    now: float,
) -> list[Path]:
    """
    Delete workspaces untouched for more than C{max_age} seconds whose
    scripts are no longer known in memory (servers normally remove them with
    CompleteScript; this catches the ones they never did).

    @return: the folders removed.
    """
    removed = []
    for workspace in store.all():
        if in_use(workspace.root.name):
            continue
        paths = (workspace.root, workspace.root / OUTPUT_LOG, workspace.state_path)
        touched = max((p.stat().st_mtime for p in paths if p.exists()), default=now)
        if now - touched > max_age:
            workspace.delete()
            removed.append(workspace.root)
    return removed
