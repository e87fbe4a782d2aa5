"""
A script's durable state on disk: its workspace folder, its log, its state file.

    <home>/Work/<ticket>/
        Bootstrap.sh        the script body (CRLF normalised to LF)
        <files>             the script's extra files
        Output.log          one JSON array per line: [source, text, occurred]
        scriptstate.json    the V2 state, replaced atomically

Everything a server may need after an agent restart is here, so a status can
be answered from disk alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from array import array
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import attrs

from tentacle.contracts import ProcessOutput, ProcessOutputSource, ProcessState
from tentacle.dispatch import RequestError
from tentacle.fsutil import atomic_write

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


class ScriptLog:
    """
    The append-only log of one script, readable from any sequence number.

    Each entry is one line of JSON, so a crash can at worst cut the last
    line, which is then ignored.  An index of line offsets is kept in
    memory (8 bytes a line), never the text itself.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offsets = array("q")
        self._end = 0
        self._writer: IO[bytes] | None = None
        if path.exists():
            self._index_existing()

    def _index_existing(self) -> None:
        offset = 0
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a line cut short by a crash
                self._offsets.append(offset)
                offset += len(line)
        self._end = offset

    def __len__(self) -> int:
        return len(self._offsets)

    def append(self, source: ProcessOutputSource, text: str, occurred: datetime) -> None:
        if self._writer is None:
            self._writer = self.path.open("ab")
            self._writer.truncate(self._end)
        line = json.dumps([_SOURCE_NAMES[source], text, occurred.isoformat()]).encode() + b"\n"
        self._writer.write(line)
        self._offsets.append(self._end)
        self._end += len(line)

    def flush(self) -> None:
        """
        Hand buffered lines to the OS, so they survive the agent's death.
        """
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read(self, after: int, max_entries: int, max_bytes: int) -> tuple[list[ProcessOutput], int]:
        """
        Entries from sequence C{after} on, at most C{max_entries} of them and
        about C{max_bytes} of text, so one status answer stays small.

        @return: the entries and the sequence number to ask from next.
        """
        start = max(0, min(after, len(self._offsets)))
        if start >= len(self._offsets):
            return [], len(self._offsets)
        self.flush()
        entries: list[ProcessOutput] = []
        size = 0
        with self.path.open("rb") as f:
            f.seek(self._offsets[start])
            for line in f:
                if len(entries) >= max_entries or (entries and size >= max_bytes):
                    break
                if not line.endswith(b"\n") or start + len(entries) >= len(self._offsets):
                    break
                source, text, occurred = json.loads(line)
                entries.append(
                    ProcessOutput(_SOURCES[source], datetime.fromisoformat(occurred), text)
                )
                size += len(line)
        return entries, start + len(entries)


@attrs.define
class ScriptWorkspace:
    """
    One script's folder.
    """

    root: Path
    ticket: str
    _log: ScriptLog | None = None

    @property
    def log(self) -> ScriptLog:
        if self._log is None:
            self._log = ScriptLog(self.root / OUTPUT_LOG)
        return self._log

    def exists(self) -> bool:
        return self.root.is_dir()

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def write_bootstrap(self, body: str) -> Path:
        path = self.root / BOOTSTRAP
        # Not fsynced: if the agent dies now, the script reports -46 anyway.
        atomic_write(path, body.replace("\r\n", "\n").encode("utf-8"), mode=0o700, durable=False)
        return path

    def add_file(self, name: str, source: IO[bytes]) -> Path:
        """
        Copy a script file in, in chunks.

        @raise WorkspaceError: when the name would leave the workspace.
        """
        target = safe_file_name(self.root, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as out:
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

    def delete(self) -> None:
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@attrs.frozen
class WorkspaceStore:
    """
    All workspaces of an agent, under C{<home>/Work}.
    """

    home: Path

    @property
    def root(self) -> Path:
        return self.home / WORK_FOLDER

    def workspace(self, ticket: str) -> ScriptWorkspace:
        """
        @raise WorkspaceError: for a ticket that is not a safe folder name.
        """
        return ScriptWorkspace(self.root / ticket_folder_name(ticket), ticket)

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
