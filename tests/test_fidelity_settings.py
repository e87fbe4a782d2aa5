"""
Settings and names a real Octopus Server and its scripts depend on: the
proxy and instance name scripts are told, the friendly name of the
certificate's signature algorithm, and whole-string checks of names that
become folders and units.
"""

from __future__ import annotations

import datetime
import json
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from tentacle.config import ConfigError, ConfigFile, ProxySetting, TentacleConfig
from tentacle.identity import normalize_thumbprint
from tentacle.services.script_environment import script_variables, signature_algorithm_name
from tentacle.systemd import check_instance
from tentacle.workspace import WorkspaceError, ticket_folder_name


class ProxySettingTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(ProxySetting.parse(None), ProxySetting(use_default=True))
        self.assertEqual(ProxySetting.parse("none"), ProxySetting(use_default=False))
        self.assertEqual(
            ProxySetting.parse("http://proxy:8080"), ProxySetting(False, "proxy", 8080)
        )
        self.assertEqual(ProxySetting.parse("http://proxy"), ProxySetting(False, "proxy", 80))
        self.assertEqual(
            ProxySetting.parse("http://me%40corp:p%3Aw@[::1]:3128/"),
            ProxySetting(False, "::1", 3128, "me@corp", "p:w"),
        )

    def test_round_trip(self) -> None:
        for text in (None, "none", "http://proxy:80", "http://me%40corp:p%3Aw@[::1]:3128", "http://u@h:1"):
            self.assertEqual(ProxySetting.parse(text).to_json(), text)

    def test_refused(self) -> None:
        for bad in ("socks5://h:1", "http://", "http://h:99999", "http://h/path", 5, "proxy:80"):
            self.assertRaises(ValueError, ProxySetting.parse, bad)

    def test_config_file(self) -> None:
        home = Path(self.mktemp())
        file = ConfigFile(home)
        config = TentacleConfig(home=home, instance_name="web-1", proxy=ProxySetting.parse("http://h:3"))
        file.save(config)
        loaded = file.load()
        self.assertEqual((loaded.instance_name, loaded.proxy), ("web-1", ProxySetting(False, "h", 3)))
        self.assertEqual(stat.S_IMODE(file.path.stat().st_mode), 0o600, "the agent's files are private")
        data = json.loads(file.path.read_text())
        self.assertEqual((data["instance-name"], data["proxy"]), ("web-1", "http://h:3"))

    def test_a_proxy_password_makes_the_file_private(self) -> None:
        home = Path(self.mktemp())
        file = ConfigFile(home)
        file.save(TentacleConfig(home=home, proxy=ProxySetting.parse("http://u:secret@h:3")))
        self.assertEqual(stat.S_IMODE(file.path.stat().st_mode), 0o600)

    def test_bad_settings_name_the_key(self) -> None:
        for key, value in (("proxy", "ftp://x"), ("instance-name", "web\n"), ("instance-name", 3)):
            with self.assertRaises(ConfigError) as caught:
                TentacleConfig.from_json(Path("/h"), {key: value})
            self.assertIn(key, str(caught.exception))


def certificate(hash_algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hash_algorithm)
    )


class ScriptVariableTests(SynchronousTestCase):
    def test_signature_algorithm_names(self) -> None:
        self.assertEqual(signature_algorithm_name(certificate(hashes.SHA256())), "sha256RSA")
        self.assertEqual(signature_algorithm_name(certificate(hashes.SHA384())), "sha384RSA")
        self.assertEqual(signature_algorithm_name(certificate(hashes.SHA512())), "sha512RSA")

    def test_relative_folders_become_absolute(self) -> None:
        variables = script_variables(home=Path("h"), applications=Path("apps"), executable="/opt/t/bin/tentacle")
        self.assertEqual(variables["TentacleHome"], str(Path("h").absolute()))
        self.assertEqual(variables["TentacleApplications"], str(Path("apps").absolute()))
        self.assertEqual(
            (variables["TentacleProgramDirectoryPath"], variables["AgentProgramDirectoryPath"]),
            ("/opt/t/bin", "/opt/t/bin"),
        )


class WholeNameTests(SynchronousTestCase):
    """
    C{$} matches before a final newline: these checks match the whole name.
    """

    def test_ticket(self) -> None:
        self.assertEqual(ticket_folder_name("OK-1"), "ok-1")
        for bad in ("ok\n", "ok\r", "\nok", "ok\nok"):
            self.assertRaises(WorkspaceError, ticket_folder_name, bad)

    def test_instance(self) -> None:
        self.assertEqual(check_instance("web-1"), "web-1")
        for bad in ("web\n", "web\nx", ""):
            self.assertRaises(ValueError, check_instance, bad)

    def test_thumbprint(self) -> None:
        self.assertEqual(normalize_thumbprint("ab" * 20), "AB" * 20)
        self.assertRaises(ValueError, normalize_thumbprint, "ab" * 19 + "\na")
