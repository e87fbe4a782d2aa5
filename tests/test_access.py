"""
Whether another user can reach a file, from permission bits: what
C{tentacle service --install --user} checks of the interpreter and home.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tentacle.access import Account, unreachable

#: Someone who owns nothing here and is in none of our groups.
STRANGER = Account("stranger", 54321, frozenset({54321}))


class UnreachableTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Not under trial's folders, which are 0700, nor under the
        # checkout, wherever it is: in a folder of the system's temp area.
        self.root = Path(tempfile.mkdtemp(prefix="tentacle-access-"))
        self.addCleanup(shutil.rmtree, self.root)
        self.root.chmod(0o755)
        self.assertIsNone(unreachable(self.root, STRANGER, os.X_OK), "the temp area is open to everyone")

    def file(self, relative: str, mode: int = 0o755) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(mode)
        return path

    def test_open_file(self) -> None:
        self.assertIsNone(unreachable(self.file("bin/python"), STRANGER, os.R_OK | os.X_OK))

    def test_closed_folder_on_the_way(self) -> None:
        python = self.file("private/venv/bin/python")
        (self.root / "private").chmod(0o700)
        self.assertEqual(unreachable(python, STRANGER, os.R_OK), self.root / "private")

    def test_unreadable_file(self) -> None:
        python = self.file("bin/python", 0o750)
        self.assertEqual(unreachable(python, STRANGER, os.R_OK | os.X_OK), python)

    def test_group_and_owner_bits(self) -> None:
        python = self.file("bin/python", 0o750)
        st = python.stat()
        self.assertIsNone(unreachable(python, Account("g", 54321, frozenset({st.st_gid})), os.R_OK | os.X_OK))
        self.assertIsNone(unreachable(python, Account("o", st.st_uid, frozenset()), os.R_OK))

    def test_symlink_into_a_closed_folder(self) -> None:
        real = self.file("private/python3.11")
        (self.root / "private").chmod(0o700)
        link = self.root / "venv" / "bin" / "python"
        link.parent.mkdir(parents=True)
        link.symlink_to(real)
        self.assertEqual(unreachable(link, STRANGER, os.R_OK), self.root / "private")

    def test_missing_file(self) -> None:
        self.assertEqual(unreachable(self.root / "nothing", STRANGER), self.root / "nothing")
