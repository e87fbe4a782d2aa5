"""
Hostile packages: archives built to exhaust memory or disk (decompression
bombs, a gigabyte link, a gigabyte tar header, too many entries), names
built to flood logs, and symlinks planted in a package's releases folder.
"""

from __future__ import annotations

import os
import resource
import stat
import tarfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tentacle.deploy.packages import MAX_LINK, PackageError, PackageLimits, extract
from tentacle.deploy.releases import CURRENT, JOURNAL, LOCK, ReleaseError, ReleaseStore
from tentacle.fsutil import sync_tree
from tests.support import remove_big_files
from tests.bombs import MiB, empty_zip_entries, targz_of_zeros, zip_of_zeros
from tests.figures import record
from tests.test_deploy_packages import make_tar, make_zip, tar_dir, tar_file, tar_link, zip_entry


def peak_rss() -> int:
    """
    This process's peak RSS so far, in bytes.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class BombTests(SynchronousTestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.destination = self.folder / "out"
        self.destination.mkdir()
        self.addCleanup(lambda: [p.unlink() for p in self.folder.glob("*.*") if p.is_file()])

    def refused(self, archive: Path, kind: str, limits: PackageLimits = PackageLimits()) -> str:
        before = peak_rss()
        with self.assertRaises(PackageError) as caught:
            extract(archive, kind, self.destination, limits)
        self.assertLess(peak_rss() - before, 64 * MiB, "memory stayed flat")
        self.assertEqual(list(self.destination.iterdir()), [], "nothing was written")
        return str(caught.exception)

    def test_two_megabyte_zip_expanding_to_two_gigabytes_is_refused_before_writing(self) -> None:
        archive = zip_of_zeros(self.folder / "bomb.1.0.zip", [("zeros.bin", 1908, 0)])
        self.assertLess(archive.stat().st_size, 2_100_000)
        message = self.refused(archive, "zip")
        self.assertIn("would extract to at least 2,000,683,008 bytes", message)
        self.assertIn("decompression bomb", message)
        record(self, "hostile", f"a {archive.stat().st_size / MiB:.1f} MiB zip that expands to 2 GB",
               "refused from its central directory before a byte was written: 'looks like a decompression bomb'",
               inputs=1)

    def test_two_megabyte_tar_gz_expanding_to_two_gigabytes_is_refused_at_its_header(self) -> None:
        archive = targz_of_zeros(self.folder / "bomb.1.0.tar.gz", "zeros.bin", 1908)
        message = self.refused(archive, "tar")
        self.assertIn("decompression bomb", message)

    def test_many_small_bombs_refused_at_the_ratio(self) -> None:
        archive = zip_of_zeros(self.folder / "bombs.1.0.zip", [(f"z{i}", 2, 0) for i in range(200)])
        message = self.refused(archive, "zip")
        self.assertIn("decompression bomb", message)

    def test_extracted_size_limit(self) -> None:
        archive = zip_of_zeros(self.folder / "big.1.0.zip", [("a", 3, 0)])
        limits = PackageLimits(max_bytes=2 * MiB)
        self.assertIn("more than 2,097,152 bytes (the --max-extracted-bytes limit)", self.refused(archive, "zip", limits))
        # Under the limits, it extracts.
        extract(archive, "zip", self.destination)
        self.assertEqual((self.destination / "a").stat().st_size, 3 * MiB)

    def test_zip_of_200001_entries_refused_before_its_directory_is_read(self) -> None:
        archive = empty_zip_entries(self.folder / "many.1.0.zip", 200_001)
        message = self.refused(archive, "zip")
        self.assertIn("more than 200,000 entries", message)

    def test_tar_of_too_many_entries_refused(self) -> None:
        archive = make_tar(self.folder / "many.1.0.tar.gz", *[tar_file(f"f{i}") for i in range(11)])
        message = self.refused(archive, "tar", PackageLimits(max_entries=10))
        self.assertIn("more than 10 entries (the --max-entries limit)", message)

    def test_zip_symlink_entry_of_a_gigabyte_reads_at_most_4_kib(self) -> None:
        archive = zip_of_zeros(self.folder / "link.1.0.zip", [("link", 1024, stat.S_IFLNK | 0o777)])
        message = self.refused(archive, "zip", PackageLimits(max_ratio=10**6))
        self.assertIn(f"has a target of 1,073,741,824 bytes; at most {MAX_LINK} are allowed", message)
        record(self, "hostile", f"a {archive.stat().st_size / MiB:.1f} MiB zip whose symlink entry inflates to 1 GiB",
               "refused from its declared size; at most 4 KiB of a link is ever read", inputs=1)

    def test_tar_long_name_header_of_a_gigabyte_refused(self) -> None:
        archive = targz_of_zeros(self.folder / "name.1.0.tar.gz", "././@LongLink", 1024, tarfile.GNUTYPE_LONGNAME)
        message = self.refused(archive, "tar")
        self.assertIn("long-name header is 1,073,741,824 bytes; at most 262,144 are read", message)

    def test_long_names_are_cut_in_errors(self) -> None:
        name = "x" * 60_000
        archive = make_zip(self.folder / "long.1.0.zip", zip_entry("/" + name))
        message = self.refused(archive, "zip")
        self.assertLess(len(message), 1000)
        self.assertIn("(60,001 characters)", message)
        self.assertIn("has an absolute path", message)
        archive = make_tar(self.folder / "long.1.0.tar.gz", tar_link("l", "/" + "y" * 3000))
        message = self.refused(archive, "tar")
        self.assertLess(len(message), 1000)


class PlantedSymlinkTests(SynchronousTestCase):
    """
    A package's scripts run as the agent's user, so they can plant links in
    C{<apps>/<id>/} for the next deployment to follow; none is followed.
    """

    def setUp(self) -> None:
        self.apps = Path(self.mktemp()).absolute()
        self.store = ReleaseStore(self.apps, "app")
        with self.store.locked():
            pass
        self.victim = Path(self.mktemp()).absolute()
        (self.victim / "inner").mkdir(parents=True)
        (self.victim / "inner" / "data").write_text("precious")
        os.chmod(self.victim / "inner", 0o755)

    def assertVictimUntouched(self) -> None:
        self.assertEqual((self.victim / "inner" / "data").read_text(), "precious")
        self.assertEqual(stat.S_IMODE((self.victim / "inner").stat().st_mode), 0o755)

    def test_the_folder_is_private(self) -> None:
        self.assertEqual(stat.S_IMODE(self.store.root.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE((self.store.root / LOCK).stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.store.new_extract_folder().stat().st_mode), 0o700)

    def test_a_planted_lock_link_is_not_followed(self) -> None:
        (self.store.root / LOCK).unlink()
        (self.store.root / LOCK).symlink_to(self.victim / "created-by-lock")
        with self.assertRaises(ReleaseError) as caught:
            with self.store.locked():
                pass
        self.assertIn("is a symlink", str(caught.exception))
        self.assertFalse((self.victim / "created-by-lock").exists())

    def test_a_planted_leftover_link_is_removed_not_entered(self) -> None:
        (self.store.root / ".extract-planted").symlink_to(self.victim)
        with self.store.locked():
            removed = self.store.clean_leftovers()
        self.assertEqual([p.name for p in removed], [".extract-planted"])
        self.assertFalse((self.store.root / ".extract-planted").is_symlink())
        self.assertVictimUntouched()

    def test_a_planted_release_link_is_never_made_current(self) -> None:
        (self.store.root / "9.9.9").symlink_to(self.victim)
        with self.assertRaises(ReleaseError):
            self.store.activate("9.9.9")
        self.assertEqual(self.store.releases(), [])
        self.assertFalse((self.store.root / CURRENT).exists())
        (self.store.root / CURRENT).symlink_to("9.9.9")
        self.assertIsNone(self.store.current_version())
        self.assertVictimUntouched()

    def test_a_planted_journal_fifo_does_not_hang(self) -> None:
        os.mkfifo(self.store.root / JOURNAL)
        with self.assertRaises(ReleaseError) as caught:
            self.store.releases()
        self.assertIn("is not a regular file", str(caught.exception))
        (self.store.root / JOURNAL).unlink()
        (self.store.root / JOURNAL).symlink_to(self.victim / "inner" / "data")
        with self.assertRaises(ReleaseError):
            self.store.releases()

    def test_the_package_folder_itself_a_link(self) -> None:
        (self.apps / "linked").symlink_to(self.victim)
        with self.assertRaises(ReleaseError):
            with ReleaseStore(self.apps, "linked").locked():
                pass
        self.assertFalse((self.victim / LOCK).exists())
        record(self, "hostile", "symlinks planted in a package's folder: the lock, a leftover extraction, "
               "a release, the journal (and a FIFO), the folder itself",
               "none followed: refused or unlinked; the victim folder untouched", refused=6)


class DurableExtractionTests(SynchronousTestCase):
    def test_every_file_and_folder_is_synced_links_not_followed(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        archive = make_tar(
            folder / "app.1.0.tar.gz", tar_dir("a"), tar_file("a/one"), tar_file("a/two"), tar_file("three"),
            tar_link("a/link", "../three"),
        )
        out = folder / "out"
        out.mkdir()
        extract(archive, "tar", out)
        # Three files, two folders (out and a); the link is not a file of its own.
        self.assertEqual(sync_tree(out), 5)
        os.mkfifo(out / "fifo")
        self.assertEqual(sync_tree(out), 5, "a FIFO is neither opened for long nor synced")
