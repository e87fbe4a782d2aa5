"""
L{tentacle.fsutil.Writeback}: a file written front to back never has more
than its window waiting for the disk, and a failed write-back is reported.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tentacle import fsutil
from tentacle.fsutil import Writeback

MiB = 1024 * 1024


class WritebackTests(SynchronousTestCase):
    def write(self, window: int, pieces: int) -> tuple[Writeback, list[int], Path]:
        path = Path(self.mktemp())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.addCleanup(os.close, fd)
        writeback = Writeback(fd, window)
        pending = []
        for i in range(pieces):
            piece = bytes([i]) * MiB
            os.write(fd, piece)
            writeback.wrote(i * MiB, MiB)
            pending.append(writeback.pending)
        return writeback, pending, path

    def check(self, window: int) -> None:
        writeback, pending, path = self.write(window, 24)
        self.assertTrue(writeback.enabled)
        self.assertLessEqual(max(pending), window + MiB)
        self.assertGreater(max(pending), 0)
        data = path.read_bytes()
        self.assertEqual([data[i * MiB] for i in range(24)], list(range(24)))
        path.unlink()

    def test_at_most_a_window_waits(self) -> None:
        self.check(4 * MiB)

    def test_without_sync_file_range(self) -> None:
        """
        Elsewhere than Linux: an fdatasync every window.
        """
        self.patch(fsutil, "_sync_file_range", None)
        self.check(4 * MiB)

    def test_switched_off_where_not_supported(self) -> None:
        if fsutil._sync_file_range is None:
            raise self.skipTest("sync_file_range is Linux's")
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        self.addCleanup(os.close, write)
        writeback = Writeback(write, MiB)
        os.write(write, b"x" * 10)
        writeback.wrote(0, 10)  # ESPIPE: not for pipes
        self.assertFalse(writeback.enabled)

    def test_a_failed_write_back_is_raised(self) -> None:
        """
        The final fsync might no longer see it, so it must not be lost.
        """
        fd = os.open(self.mktemp(), os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        with self.assertRaises(OSError) as caught:
            Writeback(fd, MiB).wrote(0, 10)
        self.assertEqual(caught.exception.errno, errno.EBADF)
