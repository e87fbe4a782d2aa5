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
    INDEX_EVERY_BYTES,
    INDEX_EVERY_LINES,
    TAIL_LINES,
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


class SparseIndexTests(SynchronousTestCase):
    """
    The log's memory does not grow with its lines: an offset is kept for
    one line in 4096 (or per MiB), and a page costs a seek and a bounded
    skip.
    """

    LINES = 100_000

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = folder / "Output.log"
        self.addCleanup(self.path.unlink, missing_ok=True)
        self.addCleanup(self.path.with_suffix(".idx").unlink, missing_ok=True)

    def fill(self, log: ScriptLog, count: int, text: str = "line {}", batch: int = 997) -> None:
        for start in range(0, count, batch):
            log.append_lines(
                ProcessOutputSource.StdOut,
                [text.format(i) for i in range(start, min(count, start + batch))],
                WHEN,
            )
        log.flush()

    def check_pages(self, log: ScriptLog, count: int, max_skip: int) -> None:
        for after in (0, 1, 4095, 4096, 4097, count // 2, count - 4097, count - 1):
            page = log.read_page(after, 5, 10**6)
            self.assertEqual(
                [e.text for e in page.entries], [f"line {i}" for i in range(after, min(after + 5, count))]
            )
            self.assertEqual(page.next_sequence, min(after + 5, count))
            page_bytes = sum(len(e.text) + 60 for e in page.entries)
            self.assertLess(page.bytes_read, max_skip + page_bytes, after)

    def test_one_offset_per_4096_lines(self) -> None:
        log = ScriptLog(self.path)
        self.fill(log, self.LINES)
        self.assertEqual(len(log), self.LINES)
        self.assertEqual(log.index_size, -(-self.LINES // INDEX_EVERY_LINES))
        # A page skips at most 4095 lines of under 60 bytes.
        self.check_pages(log, self.LINES, INDEX_EVERY_LINES * 60)

    def test_long_lines_one_offset_per_mib(self) -> None:
        log = ScriptLog(self.path)
        line = 100_000
        self.fill(log, 200, "line {} " + "x" * line, batch=7)
        size = self.path.stat().st_size
        self.assertLessEqual(log.index_size, size // INDEX_EVERY_BYTES + 2)
        page = log.read_page(150, 1, 10**6)
        self.assertTrue(page.entries[0].text.startswith("line 150 "))
        self.assertLess(page.bytes_read, INDEX_EVERY_BYTES + 2 * line)

    def test_short_log_has_no_index_file(self) -> None:
        """
        A log with nothing to index past its first line creates no index
        file (one file creation less per script); a restart scans it, and
        the file appears once the log passes L{INDEX_EVERY_LINES}.
        """
        log = ScriptLog(self.path)
        self.fill(log, 10)
        self.assertFalse(log.index_path.exists())
        log.close()
        reopened = ScriptLog(self.path)
        reopened.index_existing()
        self.assertEqual([e.text for e in reopened.read(8, 5, 10**6)[0]], ["line 8", "line 9"])
        total = 10 + INDEX_EVERY_LINES + 1
        reopened.append_lines(ProcessOutputSource.StdOut, [f"line {i}" for i in range(10, total)], WHEN)
        reopened.flush()
        self.assertTrue(reopened.index_path.exists())
        reopened.close()
        again = ScriptLog(self.path)
        self.check_pages(again, total, INDEX_EVERY_LINES * 60)

    def test_saved_index_read_after_a_restart(self) -> None:
        """
        The index is saved as it grows: a restarted agent reads it and
        scans only the log's tail.
        """
        log = ScriptLog(self.path)
        self.fill(log, self.LINES)
        log.close()
        reopened = ScriptLog(self.path)
        self.assertFalse(reopened.indexed)
        reopened.index_existing()
        self.assertEqual(len(reopened), self.LINES)
        self.assertLessEqual(reopened.index_size, log.index_size + 1)
        self.check_pages(reopened, self.LINES, INDEX_EVERY_LINES * 60)
        reopened.index_existing()
        self.assertEqual(len(reopened.scans), 1, "scanned once")
        # And it goes on where it stopped.
        reopened.append(ProcessOutputSource.StdOut, f"line {self.LINES}", WHEN)
        reopened.close()
        again = ScriptLog(self.path)
        self.check_pages(again, self.LINES + 1, INDEX_EVERY_LINES * 60)

    def test_rebuilt_without_a_saved_index(self) -> None:
        """
        With no saved index (or a damaged one), the whole log is scanned,
        keeping one entry per MiB.
        """
        log = ScriptLog(self.path)
        self.fill(log, self.LINES)
        log.close()
        index = log.index_path.read_bytes()
        for damaged in (None, b"", index[:-5], b"\xff" * len(index), index[:16] + index[32:]):
            if damaged is None:
                log.index_path.unlink()
            else:
                log.index_path.write_bytes(damaged)
            reopened = ScriptLog(self.path)
            reopened.index_existing()
            self.assertEqual(len(reopened), self.LINES)
            self.assertLessEqual(reopened.index_size, log.index_size + 1)
            # At worst one entry per MiB: a page skips at most two MiB.
            self.check_pages(reopened, self.LINES, 2 * INDEX_EVERY_BYTES)

    def test_saved_index_past_the_lines_on_disk(self) -> None:
        """
        An agent killed before its last lines reached the disk: index
        entries beyond them are ignored.
        """
        log = ScriptLog(self.path)
        self.fill(log, self.LINES)
        log.close()
        cut = self.path.stat().st_size // 2
        with self.path.open("r+b") as f:
            f.truncate(cut)
        reopened = ScriptLog(self.path)
        reopened.index_existing()
        kept = len(reopened)
        self.assertEqual(self.path.read_bytes()[:cut].count(b"\n"), kept)
        self.check_pages(reopened, kept, INDEX_EVERY_LINES * 60)

    def test_output_limit_keeps_the_last_lines(self) -> None:
        limit = 64 * 1024
        log = ScriptLog(self.path, limit)
        self.fill(log, self.LINES)
        self.assertLessEqual(self.path.stat().st_size, limit + 300, "nothing stored past the limit but the marker")
        log.finish(WHEN)
        log.flush()
        entries, _ = log.read(0, 10**6, 10**9)
        texts = [e.text for e in entries]
        stored = texts.index(next(t for t in texts if "passed the script-output-limit of 65536 bytes" in t))
        self.assertEqual(texts[:stored], [f"line {i}" for i in range(stored)])
        marker = texts[stored + 1]
        self.assertIn(f"{self.LINES - stored - TAIL_LINES} lines of output were not stored", marker)
        self.assertEqual(texts[stored + 2 :], [f"line {i}" for i in range(self.LINES - TAIL_LINES, self.LINES)])
        self.assertLess(self.path.stat().st_size, limit + TAIL_LINES * 60 + 600)


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
