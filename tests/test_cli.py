"""
The C{tentacle} command: every command's happy path, and every error path's
message and exit status.
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.trial.unittest import SynchronousTestCase

from tentacle.cli import main
from tentacle.config import ConfigFile
from tentacle.identity import IdentityStore
from tests.support import identity

SHA1 = "ab" * 20
SHA256 = "cd" * 32


class CLITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()

    def run_cli(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        environ = {"TENTACLE_HOME": str(self.home)} if env is None else env
        code = main(list(argv), out, err, environ)
        return code, out.getvalue(), err.getvalue()

    def assertFails(self, code: int, message: str, *argv: str) -> None:
        got, out, err = self.run_cli(*argv)
        self.assertEqual((got, out), (code, ""), err)
        self.assertIn(message, err)
        self.assertEqual(err.count("\n"), 1, f"not one line: {err!r}")


class HelpTests(CLITestCase):
    def test_lists_commands(self) -> None:
        code, out, _ = self.run_cli("--help")
        self.assertEqual(code, 0)
        for command in [
            "new-certificate", "import-certificate", "show-thumbprint",
            "configure", "show-configuration", "run",
        ]:
            self.assertIn(command, out)

    def test_every_command_has_help(self) -> None:
        for command in [
            "new-certificate", "import-certificate", "show-thumbprint",
            "configure", "show-configuration", "run",
        ]:
            code, out, _ = self.run_cli(command, "--help")
            self.assertEqual(code, 0)
            self.assertIn(f"usage: tentacle {command}", out)

    def test_no_command(self) -> None:
        self.assertFails(2, "the following arguments are required: COMMAND")

    def test_unknown_command(self) -> None:
        self.assertFails(2, "invalid choice: 'frobnicate'", "frobnicate")


class CertificateTests(CLITestCase):
    def test_new_then_show(self) -> None:
        code, out, _ = self.run_cli("new-certificate")
        self.assertEqual(code, 0)
        stored = IdentityStore(self.home).load()
        self.assertIn(stored.thumbprint, out)
        self.assertEqual(stat.S_IMODE(IdentityStore(self.home).private_key_path.stat().st_mode), 0o600)
        code, out, _ = self.run_cli("show-thumbprint")
        self.assertEqual(code, 0)
        self.assertIn(f"The thumbprint of this Tentacle is: {stored.thumbprint}\n", out)
        self.assertIn(stored.sha256, out)
        code, out, _ = self.run_cli("show-thumbprint", "--format", "json")
        self.assertEqual(json.loads(out), {"Thumbprint": stored.thumbprint, "Sha256": stored.sha256})

    def test_home_option_beats_environment(self) -> None:
        other = Path(self.mktemp())
        code, _, _ = self.run_cli("--home", str(other), "new-certificate")
        self.assertEqual(code, 0)
        self.assertTrue(IdentityStore(other).exists())
        self.assertFalse(IdentityStore(self.home).exists())

    def test_new_refuses_to_overwrite(self) -> None:
        self.run_cli("new-certificate")
        before = IdentityStore(self.home).load().thumbprint
        self.assertFails(1, "already has a certificate; use --force", "new-certificate")
        self.assertEqual(IdentityStore(self.home).load().thumbprint, before)

    def test_new_if_blank_keeps_existing(self) -> None:
        self.run_cli("new-certificate")
        before = IdentityStore(self.home).load().thumbprint
        code, out, _ = self.run_cli("new-certificate", "--if-blank")
        self.assertEqual(code, 0)
        self.assertIn(before, out)
        self.assertEqual(IdentityStore(self.home).load().thumbprint, before)

    def test_new_force_replaces(self) -> None:
        self.run_cli("new-certificate")
        before = IdentityStore(self.home).load().thumbprint
        self.assertEqual(self.run_cli("new-certificate", "--force")[0], 0)
        self.assertNotEqual(IdentityStore(self.home).load().thumbprint, before)

    def test_show_without_certificate(self) -> None:
        self.home.mkdir()
        self.assertFails(1, "no certificate in", "show-thumbprint")

    def test_show_bad_format(self) -> None:
        self.assertFails(2, "invalid choice: 'xml'", "show-thumbprint", "--format", "xml")

    def write_pfx(self, password: bytes) -> Path:
        ident = identity("imported")
        path = Path(self.mktemp())
        path.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"x", ident.private_key, ident.certificate, None,
                serialization.BestAvailableEncryption(password),
            )
        )
        return path

    def test_import_pkcs12(self) -> None:
        path = self.write_pfx(b"pw")
        code, out, err = self.run_cli("import-certificate", "--from-file", str(path), "--password", "pw")
        self.assertEqual(code, 0, err)
        self.assertEqual(IdentityStore(self.home).load().thumbprint, identity("imported").thumbprint)

    def test_import_pem(self) -> None:
        ident = identity("imported")
        path = Path(self.mktemp())
        path.write_bytes(ident.certificate_pem() + ident.private_key_pem())
        self.assertEqual(self.run_cli("import-certificate", "-f", str(path))[0], 0)
        self.assertEqual(IdentityStore(self.home).load().thumbprint, ident.thumbprint)

    def test_import_wrong_password(self) -> None:
        path = self.write_pfx(b"pw")
        self.assertFails(1, "the password is wrong", "import-certificate", "--from-file", str(path), "--password", "no")
        self.assertFalse(IdentityStore(self.home).exists())

    def test_import_missing_file(self) -> None:
        self.assertFails(1, "cannot read", "import-certificate", "--from-file", "/nonexistent/x.pfx")

    def test_import_requires_file(self) -> None:
        self.assertFails(2, "the following arguments are required: --from-file/-f", "import-certificate")

    def test_import_refuses_to_overwrite(self) -> None:
        self.run_cli("new-certificate")
        path = self.write_pfx(b"pw")
        self.assertFails(1, "already has a certificate; use --force", "import-certificate", "-f", str(path), "--password", "pw")


class ConfigureTests(CLITestCase):
    def config(self):  # type: ignore[no-untyped-def]
        return ConfigFile(self.home).load()

    def test_trust_and_remove(self) -> None:
        code, out, _ = self.run_cli("configure", "--trust", SHA1, "--trust", SHA256.upper())
        self.assertEqual(code, 0)
        self.assertEqual(self.config().trusted_thumbprints, (SHA1.upper(), SHA256.upper()))
        code, _, _ = self.run_cli("configure", "--remove-trust", SHA1.upper())
        self.assertEqual(self.config().trusted_thumbprints, (SHA256.upper(),))

    def test_trust_with_colons(self) -> None:
        with_colons = ":".join(SHA1[i : i + 2] for i in range(0, 40, 2))
        self.assertEqual(self.run_cli("configure", "--trust", with_colons)[0], 0)
        self.assertEqual(self.config().trusted_thumbprints, (SHA1.upper(),))

    def test_reset_trust(self) -> None:
        self.run_cli("configure", "--trust", SHA1, "--trust", SHA256)
        self.assertEqual(self.run_cli("configure", "--reset-trust", "--trust", SHA256)[0], 0)
        self.assertEqual(self.config().trusted_thumbprints, (SHA256.upper(),))

    def test_port_address_app(self) -> None:
        code, _, err = self.run_cli("configure", "--port", "10934", "--listen-ip", "127.0.0.1", "--app", "/srv/apps")
        self.assertEqual(code, 0, err)
        config = self.config()
        self.assertEqual((config.port, config.listen_address), (10934, "127.0.0.1"))
        self.assertEqual(config.applications, Path("/srv/apps"))
        self.run_cli("configure", "--listen-ip", "any")
        self.assertIsNone(self.config().listen_address)

    def test_bad_thumbprints(self) -> None:
        for bad in ["abc", "zz" * 20, "ab" * 21]:
            self.assertFails(2, "expected 40 hex digits (SHA-1) or 64 hex digits (SHA-256)", "configure", "--trust", bad)
        self.assertFails(2, "expected 40 hex digits", "configure", "--remove-trust", "nope")

    def test_remove_untrusted(self) -> None:
        self.assertFails(1, f"{SHA1.upper()} is not in the trust list", "configure", "--remove-trust", SHA1)

    def test_bad_port(self) -> None:
        for bad in ["0", "65536", "http", "-1"]:
            self.assertFails(2, "expected a port number from 1 to 65535", "configure", "--port", bad)

    def test_bad_address(self) -> None:
        self.assertFails(2, "'example.com' is not an IP address", "configure", "--listen-ip", "example.com")

    def test_nothing_to_change(self) -> None:
        self.assertFails(2, "nothing to change", "configure")

    def test_broken_config_file(self) -> None:
        self.home.mkdir()
        ConfigFile(self.home).path.write_text("{")
        self.assertFails(1, "is not valid JSON", "configure", "--trust", SHA1)
        self.assertFails(1, "is not valid JSON", "show-configuration")


class ShowConfigurationTests(CLITestCase):
    def test_text(self) -> None:
        self.run_cli("configure", "--trust", SHA1)
        code, out, _ = self.run_cli("show-configuration")
        self.assertEqual(code, 0)
        self.assertIn("Listen port:           10933", out)
        self.assertIn(f"\n  {SHA1.upper()}\n", out)
        self.assertIn("none (run tentacle new-certificate)", out)

    def test_json(self) -> None:
        self.run_cli("new-certificate")
        self.run_cli("configure", "--trust", SHA1)
        code, out, _ = self.run_cli("show-configuration", "--format", "json")
        data = json.loads(out)
        self.assertEqual(data["listen-port"], 10933)
        self.assertEqual(data["trusted-thumbprints"], [SHA1.upper()])
        self.assertEqual(data["thumbprint"], IdentityStore(self.home).load().thumbprint)
        self.assertEqual(data["home"], str(self.home))
