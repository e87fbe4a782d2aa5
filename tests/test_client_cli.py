"""
C{tentacle-client} before it contacts any agent: options before or after
the command, targets and their pins, the targets file's errors, and every
usage error's message and exit status (in-process; the agents' side is in
L{tests.e2e.test_client_cli}).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tentacle import __version__
from tentacle.client.cli import _destinations, build_parser, main, resolve_targets
from tentacle.client.connection import Pin
from tentacle.client.targets import TargetError, load_targets_file, parse_target
from tentacle.identity import IdentityStore
from tests.support import identity

SHA1 = "AB" * 20
SHA256 = "CD" * 32


class ClientCLITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        IdentityStore(self.home).save(identity("server"))

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(list(argv), out, err)
        return code, out.getvalue(), err.getvalue()

    def assertFails(self, code: int, message: str, *argv: str) -> str:
        got, out, err = self.run_cli(*argv)
        self.assertEqual((got, out), (code, ""), err)
        self.assertIn(message, err)
        self.assertEqual(err.count("\n"), 1, f"not one line: {err!r}")
        return err


class OptionTests(ClientCLITestCase):
    def test_version(self) -> None:
        out = io.StringIO()
        import contextlib

        with contextlib.redirect_stdout(out):
            code = main(["--version"], io.StringIO(), io.StringIO())
        self.assertEqual((code, out.getvalue()), (0, f"tentacle-client {__version__}\n"))

    def test_common_options_before_or_after_the_command(self) -> None:
        parser = build_parser()
        before = parser.parse_args(["--home", "/h", "--thumbprint", SHA1, "--json", "--concurrency", "3",
                                    "--target", "b", "run", "a", "-c", "x"])
        after = parser.parse_args(["run", "a", "-c", "x", "--home", "/h", "--thumbprint", SHA1, "--json",
                                   "--concurrency", "3", "--target", "b"])
        self.assertEqual(vars(before), vars(after))
        self.assertEqual((before.home, before.thumbprint, before.json, before.concurrency, before.target),
                         ("/h", SHA1, True, 3, ["b"]))

    def test_an_option_after_the_command_does_not_undo_one_before(self) -> None:
        args = build_parser().parse_args(["--home", "/h", "--json", "check", "a"])
        self.assertEqual((args.home, args.json, args.target), ("/h", True, []))


class TargetTests(ClientCLITestCase):
    def test_per_target_pins(self) -> None:
        targets = resolve_targets(
            [f"web01:10934={SHA1.lower()}", f"[::1]={SHA256}", "plain"], SHA1, Path("/nonexistent")
        )
        self.assertEqual([name for name, _ in targets], ["web01:10934", "[::1]", "plain"])
        self.assertEqual([(t.host, t.port) for _, t in targets], [("web01", 10934), ("::1", 10933), ("plain", 10933)])
        self.assertEqual([t.pin for _, t in targets], [Pin(SHA1), Pin(SHA256), Pin(SHA1)])

    def test_a_pin_overrides_the_targets_file(self) -> None:
        named = {"web": parse_target(f"10.0.0.1:2000={SHA1}", {})}
        target = parse_target(f"web={SHA256}", named)
        self.assertEqual((target.host, target.port, target.pin), ("10.0.0.1", 2000, Pin(SHA256)))

    def test_bad_per_target_pin(self) -> None:
        self.assertFails(2, "the thumbprint of web01: 'nope' is not a thumbprint",
                         "run", "--home", str(self.home), "web01=nope", "-c", "x")

    def test_unpinned(self) -> None:
        self.assertFails(2, "no thumbprint for web01: give --thumbprint, write TARGET=THUMBPRINT",
                         "run", "--home", str(self.home), "web01", "-c", "x")


class TargetsFileTests(ClientCLITestCase):
    def write(self, content: object) -> Path:
        path = Path(self.mktemp())
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    def assertBadFile(self, content: object, message: str) -> None:
        path = self.write(content)
        err = self.assertFails(2, message, "check", "--targets-file", str(path), "web01")
        self.assertIn(str(path), err)
        self.assertNotIn("Traceback", err)

    def test_missing_host(self) -> None:
        self.assertBadFile({"web01": {"port": 10933}}, "target 'web01': field 'host' is missing")

    def test_bad_port(self) -> None:
        self.assertBadFile({"web01": {"host": "h", "port": "http"}},
                           "target 'web01': field 'port' must be a number from 1 to 65535, not 'http'")

    def test_bad_thumbprint(self) -> None:
        self.assertBadFile({"web01": {"host": "h", "thumbprint": "xyz"}},
                           "target 'web01': field 'thumbprint': 'xyz' is not a thumbprint")

    def test_unknown_field(self) -> None:
        self.assertBadFile({"web01": {"hots": "h"}}, "target 'web01': unknown field 'hots'")

    def test_entry_not_an_object(self) -> None:
        self.assertBadFile({"web01": "10.0.0.1"}, "target 'web01': expected an object with host, port and thumbprint")

    def test_not_an_object(self) -> None:
        self.assertBadFile(["web01"], "expected an object of named targets")

    def test_not_json(self) -> None:
        self.assertBadFile("{", "is not valid JSON")

    def test_named_file_missing(self) -> None:
        self.assertFails(2, "the targets file /no/such/targets.json does not exist",
                         "check", "--targets-file", "/no/such/targets.json", "web01")

    def test_default_file_may_be_missing(self) -> None:
        self.assertEqual(load_targets_file(Path("/no/such/targets.json"), required=False), {})
        self.assertRaises(TargetError, load_targets_file, Path("/no/such/targets.json"), True)

    def test_a_good_file(self) -> None:
        path = self.write({"web01": {"host": "10.0.0.5", "port": 10934, "thumbprint": SHA1.lower()}})
        [(name, target)] = resolve_targets(["web01"], None, path, required=True)
        self.assertEqual((name, target.host, target.port, target.pin), ("web01", "10.0.0.5", 10934, Pin(SHA1)))


class UsageErrorTests(ClientCLITestCase):
    def pinned(self, command: str, *argv: str) -> tuple[str, ...]:
        return (command, "--home", str(self.home), "--thumbprint", SHA1, "127.0.0.1:1", *argv)

    def package(self, name: str) -> Path:
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / name
        path.write_bytes(b"not really")
        return path

    def test_bad_variable(self) -> None:
        package = self.package("app.1.0.0.tar.gz")
        self.assertFails(2, "--var: 'x' is not NAME=VALUE", *self.pinned("deploy", str(package), "--var", "x"))
        self.assertFails(2, "--var: '1x' is not a variable name", *self.pinned("rollback", "app", "--var", "1x=2"))

    def test_package_name_names_the_options(self) -> None:
        package = self.package("app.tar.gz")
        self.assertFails(2, "give them with --id and --version", *self.pinned("deploy", str(package)))
        self.assertFails(2, "--version: 'x y' is not a version", *self.pinned("deploy", str(package), "--id", "app",
                                                                              "--version", "x y"))
        self.assertFails(2, "--id: 'a/b' is not a package id", *self.pinned("deploy", str(package), "--id", "a/b",
                                                                            "--version", "1.0"))

    def test_missing_package(self) -> None:
        self.assertFails(2, "the package /no/app.1.0.tar.gz does not exist", *self.pinned("deploy", "/no/app.1.0.tar.gz"))

    def test_bad_file_arg(self) -> None:
        self.assertFails(2, "--file-arg 'x' is not NAME=PATH", *self.pinned("run", "-c", "x", "--file-arg", "x"))

    def test_missing_local_files_are_sentences(self) -> None:
        err = self.assertFails(1, "the file to upload: /no/such/file does not exist",
                               *self.pinned("upload", "/no/such/file", "remote"))
        self.assertNotIn("Errno", err)
        self.assertFails(1, "--file: /no/script.sh does not exist", *self.pinned("run", "--file", "/no/script.sh"))

    def test_no_identity(self) -> None:
        empty = Path(self.mktemp())
        self.assertFails(1, "no certificate in", "check", "--home", str(empty), "127.0.0.1:1")

    def test_no_or_bad_targets(self) -> None:
        self.assertFails(2, "give at least one TARGET", "check", "--home", str(self.home))
        self.assertFails(2, "'h:x' is not host[:port]", "check", "--home", str(self.home), "h:x")


class DownloadDestinationTests(ClientCLITestCase):
    def test_one_target_to_a_file(self) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        self.assertEqual(_destinations(str(folder / "x.log"), "app.log", ["a"]), {"a": folder / "x.log"})

    def test_one_target_into_an_existing_folder(self) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        self.assertEqual(_destinations(str(folder), "app.log", ["a"]), {"a": folder / "app.log"})

    def test_several_targets_one_file_each(self) -> None:
        folder = Path(self.mktemp()).absolute()
        self.assertEqual(
            _destinations(str(folder), "app.log", ["web01", "10.0.0.1:10933"]),
            {"web01": folder / "web01" / "app.log", "10.0.0.1:10933": folder / "10.0.0.1:10933" / "app.log"},
        )

    def test_several_targets_into_a_file_is_refused(self) -> None:
        existing = Path(self.mktemp())
        existing.write_text("x")
        self.assertFails(1, "with 2 targets LOCAL must be a folder",
                         "download", "--home", str(self.home), "--thumbprint", SHA1, "a", "--target", "b",
                         "logs/app.log", str(existing))

    def test_missing_folder_is_checked_before_transferring(self) -> None:
        self.assertFails(1, "cannot save to /no/such/app.log: the folder /no/such does not exist",
                         "download", "--home", str(self.home), "--thumbprint", SHA1, "a", "app.log",
                         "/no/such/app.log")

    def test_remote_folder_is_refused(self) -> None:
        self.assertFails(2, "'logs/' names a folder", "download", "--home", str(self.home), "--thumbprint", SHA1,
                         "a", "logs/", "/tmp")

    def test_windows_paths(self) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        self.assertEqual(_destinations(str(folder), "app.log", ["a"]), {"a": folder / "app.log"})
        from tentacle.client.cli import _remote_name

        self.assertEqual(_remote_name("C:\\Logs\\app.log"), "app.log")
