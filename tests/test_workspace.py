"""
Workspaces on disk: safe names, the log, the state file, and the cleaner.
"""

from __future__ import annotations

import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import ProcessOutputSource, ProcessState
from tentacle.workspace import (
    ScriptLog,
    ScriptState,
    WorkspaceError,
    WorkspaceStore,
    remove_stale_workspaces,
    safe_file_name,
    ticket_folder_name,
)

WHEN = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)


class NameTests(SynchronousTestCase):
    def test_tickets(self) -> None:
        self.assertEqual(ticket_folder_name("ABCdef123"), "abcdef123")
        self.assertEqual(ticket_folder_name("20261126-123-1"), "20261126-123-1")
        for bad in ["", "..", "../x", "a/b", "a\\b", ".hidden", "a\x00", "x" * 201, "a..b"]:
            self.assertRaises(WorkspaceError, ticket_folder_name, bad)

    def test_file_names(self) -> None:
        root = Path("/w")
        self.assertEqual(safe_file_name(root, "a.txt"), Path("/w/a.txt"))
        self.assertEqual(safe_file_name(root, "sub\\b.txt"), Path("/w/sub/b.txt"))
        for bad in ["", "../x", "/etc/passwd", "a/../../x", "..\\x", "a//b", "./a", "a\x00"]:
            e = self.assertRaises(WorkspaceError, safe_file_name, root, bad)
            self.assertIn("is not a file name inside the script's workspace", str(e))


class LogTests(SynchronousTestCase):
    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = folder / "Output.log"

    def test_append_and_read_from_any_sequence(self) -> None:
        log = ScriptLog(self.path)
        for i in range(10):
            log.append(ProcessOutputSource.StdOut if i % 2 else ProcessOutputSource.StdErr, f"line {i}", WHEN)
        entries, next_sequence = log.read(0, 100, 10**6)
        self.assertEqual([e.text for e in entries], [f"line {i}" for i in range(10)])
        self.assertEqual(entries[0].source, ProcessOutputSource.StdErr)
        self.assertEqual(entries[1].occurred, WHEN)
        self.assertEqual(next_sequence, 10)
        entries, next_sequence = log.read(7, 100, 10**6)
        self.assertEqual(([e.text for e in entries], next_sequence), (["line 7", "line 8", "line 9"], 10))
        self.assertEqual(log.read(10, 100, 10**6), ([], 10))
        self.assertEqual(log.read(50, 100, 10**6), ([], 10))

    def test_read_is_bounded(self) -> None:
        log = ScriptLog(self.path)
        for i in range(100):
            log.append(ProcessOutputSource.StdOut, "x" * 100, WHEN)
        entries, next_sequence = log.read(0, 30, 10**6)
        self.assertEqual((len(entries), next_sequence), (30, 30))
        entries, next_sequence = log.read(30, 1000, 1000)
        self.assertLess(len(entries), 15)
        self.assertEqual(next_sequence, 30 + len(entries))

    def test_reopened_log_and_torn_last_line(self) -> None:
        log = ScriptLog(self.path)
        log.append(ProcessOutputSource.StdOut, "kept", WHEN)
        log.close()
        with self.path.open("ab") as f:
            f.write(b'["stdout", "torn')  # the agent died mid-write
        reopened = ScriptLog(self.path)
        self.assertEqual(len(reopened), 1)
        reopened.append(ProcessOutputSource.StdOut, "after", WHEN)
        reopened.flush()
        self.assertEqual([e.text for e in reopened.read(0, 10, 10**6)[0]], ["kept", "after"])

    def test_lines_are_json(self) -> None:
        log = ScriptLog(self.path)
        log.append(ProcessOutputSource.Debug, 'quote " and \n newline', WHEN)
        log.flush()
        [line] = self.path.read_bytes().splitlines()
        self.assertEqual(json.loads(line), ["debug", 'quote " and \n newline', WHEN.isoformat()])


class StateTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        store = WorkspaceStore(Path(self.mktemp()))
        workspace = store.workspace("Ticket1")
        workspace.create()
        self.assertIsNone(workspace.load_state())
        state = ScriptState(created=WHEN, started=WHEN, state=ProcessState.Complete, exit_code=3, ran_to_completion=True)
        workspace.save_state(state)
        self.assertEqual(workspace.load_state(), state)
        self.assertEqual(json.loads(workspace.state_path.read_text())["State"], "Complete")
        workspace.state_path.write_text("{broken")
        self.assertIsNone(workspace.load_state())

    def test_files_and_bootstrap(self) -> None:
        workspace = WorkspaceStore(Path(self.mktemp())).workspace("t")
        workspace.create()
        path = workspace.write_bootstrap("echo a\r\necho b\r\n")
        self.assertEqual(path.read_bytes(), b"echo a\necho b\n")
        self.assertEqual(workspace.add_file("d/f.txt", io.BytesIO(b"data")).read_bytes(), b"data")
        self.assertRaises(WorkspaceError, workspace.add_file, "../escape", io.BytesIO(b"x"))
        self.assertFalse((workspace.root.parent / "escape").exists())


class CleanerTests(SynchronousTestCase):
    def test_removes_only_old_unused(self) -> None:
        store = WorkspaceStore(Path(self.mktemp()))
        for name in ["old", "fresh", "busy"]:
            store.workspace(name).create()
        old = store.workspace("old").root
        busy = store.workspace("busy").root
        for folder in (old, busy):
            os.utime(folder, (1000.0, 1000.0))
        removed = remove_stale_workspaces(store, 86400, lambda name: name == "busy", now=1000.0 + 86401)
        self.assertEqual(removed, [old])
        self.assertFalse(old.exists())
        self.assertTrue(busy.exists())
        self.assertTrue(store.workspace("fresh").exists())
