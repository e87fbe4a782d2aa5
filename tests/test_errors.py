"""
OS errors as sentences (L{tentacle.errors}), for both commands.
"""

from __future__ import annotations

import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from tentacle.errors import describe_os_error


class SentenceTests(SynchronousTestCase):
    def test_common_errors(self) -> None:
        for number, expected in [
            (errno.ENOENT, "/x/app.tar.gz does not exist"),
            (errno.EACCES, "permission denied for /x/app.tar.gz (run as its owner, or fix its permissions)"),
            (errno.EISDIR, "/x/app.tar.gz is a folder, not a file"),
            (errno.ENOSPC, "there is no space left on the device holding /x/app.tar.gz"),
        ]:
            text = describe_os_error(OSError(number, os.strerror(number), "/x/app.tar.gz"))
            self.assertEqual(text, expected)
            self.assertNotIn("Errno", text)

    def test_a_name_of_our_own(self) -> None:
        error = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/.tmp")
        self.assertEqual(describe_os_error(error, "the package"), "the package does not exist")

    def test_other_errors_keep_their_text_without_the_number(self) -> None:
        error = OSError(errno.EBUSY, os.strerror(errno.EBUSY), "/dev/x")
        self.assertEqual(describe_os_error(error), "/dev/x: device or resource busy")
        self.assertEqual(describe_os_error(OSError("plain")), "plain")
