"""
Packages: names, hashes, and safe extraction of real archives built here,
honest ones and malicious ones (zip slip, tar traversal, absolute paths,
link escapes, devices).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from tentacle.deploy.packages import (
    PackageError,
    PackageName,
    extract,
    file_hashes,
    parse_package_name,
    verify_hashes,
)
from tentacle.deploy.substitution import SubstitutionError, files_to_substitute, substitute_file, substitute_text

# --- building archives ------------------------------------------------------------------


def tar_file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def tar_link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, b""


def tar_special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.devmajor, info.devminor = 1, 3
    return info, b""


def tar_dir(name: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, b""


def make_tar(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def zip_entry(name: str, data: bytes = b"x", mode: int | None = None) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    if mode is not None:
        info.create_system = 3
        info.external_attr = mode << 16
    return info, data


def make_zip(path: Path, *entries: tuple[zipfile.ZipInfo, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def snapshot(folder: Path) -> list[str]:
    """
    Everything under C{folder}, links included, as relative names.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), folder))
    return sorted(found)


# --- names and hashes ------------------------------------------------------------------


class NameTests(TestCase):
    def test_id_and_version_from_the_name(self) -> None:
        cases = {
            "app.1.0.0.tar.gz": ("app", "1.0.0", ".tar.gz"),
            "My.App2.1.2.3-beta.4.zip": ("My.App2", "1.2.3-beta.4", ".zip"),
            "Foo.2D.1.0.nupkg": ("Foo.2D", "1.0", ".nupkg"),
            "web_site-x.2024.1.tgz": ("web_site-x", "2024.1", ".tgz"),
            "Acme.Web.1.0.0+build.7.TAR.GZ": ("Acme.Web", "1.0.0+build.7", ".tar.gz"),
        }
        for name, (package_id, version, extension) in cases.items():
            self.assertEqual(parse_package_name(name), PackageName(package_id, version, extension), name)

    def test_explicit_id_and_version_win(self) -> None:
        self.assertEqual(parse_package_name("build-output.zip", "shop", "3.1"), PackageName("shop", "3.1", ".zip"))
        self.assertEqual(parse_package_name("shop.3.1.zip", version="3.1.0"), PackageName("shop", "3.1.0", ".zip"))

    def test_canonical_file_name(self) -> None:
        self.assertEqual(parse_package_name("x.zip", "shop", "3.1").file_name, "shop.3.1.zip")

    def test_refused(self) -> None:
        for name in ("app.tar.gz", "app.1.0.rar", "app.v1.zip", "app.1.0"):
            with self.assertRaises(PackageError, msg=name):
                parse_package_name(name)
        for package_id, version in (("..", "1.0"), ("a/b", "1.0"), ("app", "current"), ("app", "../1"), ("app", "1/2")):
            with self.assertRaises(PackageError, msg=f"{package_id} {version}"):
                parse_package_name("p.zip", package_id, version)


class HashTests(TestCase):
    def test_hashes_checked(self) -> None:
        path = Path(self.mktemp())
        path.write_bytes(b"package bytes")
        sha1, sha256 = hashlib.sha1(b"package bytes").hexdigest(), hashlib.sha256(b"package bytes").hexdigest()
        self.assertEqual(file_hashes(path), (sha1, sha256, 13))
        self.assertEqual(verify_hashes(path, sha1.upper(), sha256), sha1)
        with self.assertRaises(PackageError) as caught:
            verify_hashes(path, sha256="0" * 64)
        self.assertIn("SHA-256", str(caught.exception))
        with self.assertRaises(PackageError):
            verify_hashes(path, sha1="0" * 40)


# --- extraction ------------------------------------------------------------------------


class ExtractTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.destination = self.base / "apps" / ".extract-1"
        self.destination.mkdir(parents=True)
        self.outside = self.base / "outside"
        self.outside.mkdir()

    def refused(self, archive: Path, kind: str, expected: str) -> None:
        """
        The archive is refused, and nothing at all was written outside the
        extraction folder.
        """
        before = snapshot(self.base)
        with self.assertRaises(PackageError) as caught:
            extract(archive, kind, self.destination)
        self.assertIn(expected, str(caught.exception))
        written = set(snapshot(self.base)) - set(before)
        self.assertTrue(all(p.startswith(os.path.join("apps", ".extract-1")) for p in written), written)
        self.assertEqual(snapshot(self.outside), [])
        self.assertFalse((self.base / "evil").exists())

    def test_tar_honest(self) -> None:
        archive = make_tar(
            self.base / "app.1.0.tar.gz",
            tar_dir("./"),
            tar_file("./Deploy.sh", b"echo hi\n", 0o4755),
            tar_dir("./lib"),
            tar_file("./lib/libx.so.1", b"lib"),
            tar_link("./lib/libx.so", "libx.so.1"),
            tar_link("./bin/tool", "../lib/libx.so.1"),
            tar_link("./lib/copy", "lib/libx.so.1", tarfile.LNKTYPE),
        )
        extract(archive, "tar", self.destination)
        d = self.destination
        self.assertEqual(
            snapshot(d), ["Deploy.sh", "bin", "bin/tool", "lib", "lib/copy", "lib/libx.so", "lib/libx.so.1"]
        )
        self.assertEqual((d / "bin" / "tool").read_bytes(), b"lib")
        self.assertEqual(os.readlink(d / "lib" / "libx.so"), "libx.so.1")
        self.assertEqual((d / "lib" / "copy").stat().st_ino, (d / "lib" / "libx.so.1").stat().st_ino)
        mode = stat.S_IMODE((d / "Deploy.sh").stat().st_mode)
        self.assertEqual(mode, 0o755, "executable kept, setuid dropped")

    def test_zip_honest(self) -> None:
        archive = make_zip(
            self.base / "app.1.0.nupkg",
            zip_entry("Deploy.sh", b"echo hi\n", stat.S_IFREG | 0o755),
            zip_entry("content/"),
            zip_entry("content/site.css", b"body {}"),
            zip_entry("content\\win.txt", b"made on Windows"),
            zip_entry("content/latest", b"site.css", stat.S_IFLNK | 0o777),
        )
        extract(archive, "zip", self.destination)
        d = self.destination
        self.assertEqual(snapshot(d), ["Deploy.sh", "content", "content/latest", "content/site.css", "content/win.txt"])
        self.assertEqual((d / "content" / "latest").read_bytes(), b"body {}")
        self.assertTrue((d / "Deploy.sh").stat().st_mode & 0o100)

    # tar: traversal, absolute, links, devices

    def test_tar_dot_dot(self) -> None:
        self.refused(make_tar(self.base / "p.tgz", tar_file("ok"), tar_file("../evil")), "tar", "'..'")
        self.refused(make_tar(self.base / "q.tgz", tar_file("a/../../evil")), "tar", "'..'")

    def test_tar_absolute(self) -> None:
        self.refused(make_tar(self.base / "p.tgz", tar_file(str(self.base / "evil"))), "tar", "absolute")

    def test_tar_symlink_escapes(self) -> None:
        self.refused(make_tar(self.base / "a.tgz", tar_link("out", str(self.outside))), "tar", "absolute")
        self.refused(make_tar(self.base / "b.tgz", tar_link("out", "../../outside")), "tar", "outside the package")
        self.refused(make_tar(self.base / "c.tgz", tar_link("sub/out", "../..")), "tar", "outside the package")

    def test_tar_write_through_a_link(self) -> None:
        # A link that looks harmless, then a file "under" it.
        archive = make_tar(self.base / "p.tgz", tar_link("sub", "."), tar_file("sub/evil"))
        self.refused(archive, "tar", "under the link")
        # The same name twice: a link, then a file written through it.
        archive = make_tar(self.base / "q.tgz", tar_link("x", "y"), tar_file("x"))
        self.refused(archive, "tar", "twice")

    def test_tar_link_chain(self) -> None:
        # Each link alone stays inside; followed together they leave.
        archive = make_tar(
            self.base / "p.tgz", tar_dir("a"), tar_link("a/up", ".."), tar_link("a/out", "up/../outside")
        )
        self.refused(archive, "tar", "outside")

    def test_tar_hard_link_outside(self) -> None:
        target = self.base / "secret"
        target.write_text("secret")
        self.refused(make_tar(self.base / "p.tgz", tar_link("h", "../../secret", tarfile.LNKTYPE)), "tar", "hard link")
        self.refused(make_tar(self.base / "q.tgz", tar_link("h", str(target), tarfile.LNKTYPE)), "tar", "hard link")
        self.assertEqual(target.stat().st_nlink, 1)

    def test_tar_devices(self) -> None:
        self.refused(make_tar(self.base / "c.tgz", tar_special("null", tarfile.CHRTYPE)), "tar", "device")
        self.refused(make_tar(self.base / "b.tgz", tar_special("disk", tarfile.BLKTYPE)), "tar", "device")
        self.refused(make_tar(self.base / "f.tgz", tar_special("pipe", tarfile.FIFOTYPE)), "tar", "FIFO")

    # zip: slip, absolute, backslashes, links, devices

    def test_zip_slip(self) -> None:
        self.refused(make_zip(self.base / "a.zip", zip_entry("ok"), zip_entry("../evil")), "zip", "'..'")
        self.refused(make_zip(self.base / "b.zip", zip_entry("..\\..\\evil")), "zip", "'..'")
        self.refused(make_zip(self.base / "c.zip", zip_entry("a/./../../evil")), "zip", "'..'")

    def test_zip_absolute(self) -> None:
        self.refused(make_zip(self.base / "a.zip", zip_entry(str(self.base / "evil"))), "zip", "absolute")
        self.refused(make_zip(self.base / "b.zip", zip_entry("C:/evil")), "zip", "absolute")
        self.refused(make_zip(self.base / "c.zip", zip_entry("\\evil")), "zip", "absolute")

    def test_zip_symlink_escapes(self) -> None:
        link = stat.S_IFLNK | 0o777
        archive = make_zip(self.base / "a.zip", zip_entry("out", b"../../outside", link))
        self.refused(archive, "zip", "outside the package")
        archive = make_zip(self.base / "b.zip", zip_entry("out", str(self.outside).encode(), link))
        self.refused(archive, "zip", "absolute")
        archive = make_zip(self.base / "c.zip", zip_entry("sub", b".", link), zip_entry("sub/evil"))
        self.refused(archive, "zip", "under the link")
        archive = make_zip(
            self.base / "d.zip", zip_entry("a/up", b"..", link), zip_entry("a/out", b"up/../outside", link)
        )
        self.refused(archive, "zip", "outside")

    def test_zip_devices(self) -> None:
        self.refused(make_zip(self.base / "a.zip", zip_entry("null", b"", stat.S_IFCHR | 0o666)), "zip", "device")
        self.refused(make_zip(self.base / "b.zip", zip_entry("pipe", b"", stat.S_IFIFO | 0o666)), "zip", "FIFO")

    def test_not_an_archive(self) -> None:
        junk = self.base / "junk.zip"
        junk.write_bytes(b"not a zip at all")
        self.refused(junk, "zip", "not a readable zip")
        self.refused(junk, "tar", "not a readable tar")


# --- substitution ----------------------------------------------------------------------


class SubstitutionTests(TestCase):
    def test_text(self) -> None:
        variables = {"Name": "web", "Port": "8080", "Empty": ""}
        self.assertEqual(
            substitute_text("#{Name}:#{Port} #{Unknown} ##{Name} #{ Name } #{Empty}| #{} #{a{b}}", variables),
            "web:8080 #{Unknown} #{Name} web | #{} #{a{b}}",
        )

    def test_files(self) -> None:
        folder = Path(self.mktemp())
        (folder / "config").mkdir(parents=True)
        conf = folder / "config" / "app.conf"
        conf.write_bytes(b"port=#{Port}\nraw=\xff\n#{Other}\n")
        conf.chmod(0o640)
        untouched = folder / "readme.txt"
        untouched.write_text("#{Port}")
        files, unmatched = files_to_substitute(folder, ["config/*.conf", "missing/*.xml"])
        self.assertEqual((files, unmatched), ([conf.resolve()], ["missing/*.xml"]))
        self.assertTrue(substitute_file(files[0], {"Port": "80"}))
        self.assertEqual(conf.read_bytes(), b"port=80\nraw=\xff\n#{Other}\n")
        self.assertEqual(stat.S_IMODE(conf.stat().st_mode), 0o640)
        self.assertEqual(untouched.read_text(), "#{Port}")
        self.assertFalse(substitute_file(files[0], {"Port": "80"}), "nothing left to change")

    def test_files_outside_refused(self) -> None:
        base = Path(self.mktemp()).absolute()
        folder = base / "release"
        folder.mkdir(parents=True)
        (base / "secret.conf").write_text("#{Port}")
        (folder / "link.conf").symlink_to(base / "secret.conf")
        for pattern in ("../secret.conf", "/etc/passwd", "link.conf"):
            with self.assertRaises(SubstitutionError, msg=pattern):
                files_to_substitute(folder, [pattern])
        self.assertEqual((base / "secret.conf").read_text(), "#{Port}")
