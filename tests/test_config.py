"""
The configuration file: defaults, validation with clear messages, atomic saves.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tentacle.admission import AdmissionLimits
from tentacle.halibut.connection import KeepAlive
from tentacle.config import (
    DEFAULT_PORT,
    ConfigError,
    ConfigFile,
    TentacleConfig,
    resolve_home,
)


class HomeTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        self.assertEqual(resolve_home("/a", {"TENTACLE_HOME": "/b"}), Path("/a"))
        self.assertEqual(resolve_home(None, {"TENTACLE_HOME": "/b"}), Path("/b"))
        self.assertEqual(resolve_home(None, {}), Path("~/.tentacle").expanduser())


class ConfigFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp())
        self.file = ConfigFile(self.home)

    def test_defaults_without_file(self) -> None:
        config = self.file.load()
        self.assertEqual(config.port, DEFAULT_PORT)
        self.assertIsNone(config.listen_address)
        self.assertEqual(config.trusted_thumbprints, ())
        self.assertEqual(config.applications, self.home / "Applications")
        self.assertEqual(config.handshake_timeout, 10.0)
        self.assertEqual(config.first_byte_timeout, 5.0)

    def test_round_trip(self) -> None:
        config = TentacleConfig(
            home=self.home, port=1234, listen_address="::1",
            trusted_thumbprints=("A" * 40, "B" * 64),
            application_directory=Path("/srv/apps"), handshake_timeout=5,
        )
        self.file.save(config)
        self.assertEqual(self.file.load(), config)
        self.assertEqual(json.loads(self.file.path.read_text())["listen-port"], 1234)

    def test_trust_is_normalized_and_deduplicated(self) -> None:
        config = TentacleConfig(home=self.home).trust("a" * 40).trust("A" * 40)
        self.assertEqual(config.trusted_thumbprints, ("A" * 40,))

    def test_distrust_unknown(self) -> None:
        e = self.assertRaises(ConfigError, TentacleConfig(home=self.home).distrust, "a" * 40)
        self.assertIn("is not in the trust list", str(e))

    def write(self, data: object) -> None:
        self.home.mkdir()
        self.file.path.write_text(json.dumps(data) if not isinstance(data, str) else data)

    def test_invalid_json(self) -> None:
        self.write("{nope")
        e = self.assertRaises(ConfigError, self.file.load)
        self.assertIn("is not valid JSON", str(e))

    def test_bad_values_name_the_key(self) -> None:
        cases = [
            ({"listen-port": 0}, "listen-port: the port must be"),
            ({"listen-port": "10933"}, "listen-port: the port must be"),
            ({"listen-address": "nowhere"}, "listen-address: 'nowhere' is not an IP address"),
            ({"trusted-thumbprints": ["xyz"]}, "'xyz' is not a thumbprint"),
            ({"trusted-thumbprints": "A" * 40}, "must be a list"),
            ({"handshake-timeout": -1}, "handshake-timeout: a timeout must be a positive"),
            ({"colour": "blue"}, "unknown setting(s): colour"),
            ([], "must be a JSON object"),
        ]
        for data, message in cases:
            self.file.path.unlink(missing_ok=True)
            self.home.mkdir(exist_ok=True)
            self.file.path.write_text(json.dumps(data))
            e = self.assertRaises(ConfigError, self.file.load)
            self.assertIn(message, str(e))
            self.assertIn(str(self.file.path), str(e))

    def test_max_connections(self) -> None:
        self.assertEqual(self.file.load().max_connections, 1000)
        self.write({"max-connections": None})
        self.assertIsNone(self.file.load().max_connections, "null: no limit")
        self.file.path.write_text(json.dumps({"max-connections": 0}))
        e = self.assertRaises(ConfigError, self.file.load)
        self.assertIn("max-connections: expected a whole number of at least 1", str(e))

    def test_unauthenticated_budgets(self) -> None:
        """
        The budgets and deadlines before authentication: defaults, a file's
        values, their checks, and the listener's view of them.
        """
        defaults = self.file.load().admission
        self.assertEqual(
            (defaults.max_connections, defaults.max_unauthenticated, defaults.max_unauthenticated_per_address,
             defaults.first_byte_timeout, defaults.handshake_timeout, defaults.connection_log_lines),
            (1000, 250, 50, 5.0, 10.0, 20),
        )
        self.write({
            "max-connections": 2000, "max-unauthenticated-connections": 300,
            "max-unauthenticated-per-address": 20, "first-byte-timeout": 2, "handshake-timeout": 8,
            "connection-log-lines": 0,
        })
        loaded = self.file.load()
        self.assertEqual(
            loaded.admission,
            AdmissionLimits(max_connections=2000, max_unauthenticated=300, max_unauthenticated_per_address=20,
                            first_byte_timeout=2.0, handshake_timeout=8.0, connection_log_lines=0),
        )
        self.file.save(loaded)
        self.assertEqual(self.file.load().admission, loaded.admission)
        for key, value, message in [
            ("max-unauthenticated-connections", 0, "expected a whole number of at least 1"),
            ("max-unauthenticated-connections", None, "expected a whole number of at least 1"),
            ("max-unauthenticated-per-address", 1.5, "expected a whole number of at least 1"),
            ("first-byte-timeout", 0, "a timeout must be a positive number"),
            ("connection-log-lines", -1, "expected a whole number of 0 or more"),
            ("connection-log-lines", True, "expected a whole number of 0 or more"),
            ("connection-log-lines", "20", "expected a whole number of 0 or more"),
        ]:
            self.file.path.write_text(json.dumps({key: value}))
            e = self.assertRaises(ConfigError, self.file.load)
            self.assertIn(f"{key}: {message}", str(e))

    def test_signature_changes_on_save(self) -> None:
        self.assertIsNone(self.file.signature())
        self.file.save(TentacleConfig(home=self.home))
        first = self.file.signature()
        self.file.save(TentacleConfig(home=self.home, port=2))
        self.assertNotEqual(first, self.file.signature())

    def test_tcp_keepalive(self) -> None:
        self.assertEqual(self.file.load().tcp_keepalive, KeepAlive(15, 5, 10), "Halibut's")
        self.write({"tcp-keepalive": {"idle": 30}})
        self.assertEqual(self.file.load().tcp_keepalive, KeepAlive(30, 5, 10), "the others as Halibut's")
        self.file.path.write_text(json.dumps({"tcp-keepalive": None}))
        self.assertIsNone(self.file.load().tcp_keepalive, "null: off")
        for bad, message in [
            ({"idle": 0}, "idle must be a whole number of seconds from 1"),
            ({"count": 1.5}, "count must be a whole number from 1 to 127"),
            ({"probes": 3}, "unknown keepalive setting(s): probes"),
            (True, "expected {"),
        ]:
            self.file.path.write_text(json.dumps({"tcp-keepalive": bad}))
            e = self.assertRaises(ConfigError, self.file.load)
            self.assertIn(f"tcp-keepalive: {message}", str(e))
        config = TentacleConfig(home=self.home, tcp_keepalive=KeepAlive(20, 4, 3))
        self.file.save(config)
        self.assertEqual(self.file.load().tcp_keepalive, KeepAlive(20, 4, 3))
        self.assertEqual(json.loads(self.file.path.read_text())["tcp-keepalive"], {"idle": 20, "interval": 4, "count": 3})

class LibraryNormalisationTests(SynchronousTestCase):
    """
    Code that builds a configuration gets the thumbprints the CLI would store.
    """

    def test_config(self) -> None:
        sha1 = "ab" * 20
        with_colons = ":".join(sha1[i:i + 2] for i in range(0, 40, 2))
        config = TentacleConfig(home=Path("/h"), trusted_thumbprints=[with_colons, f" {sha1.upper()} ", "cd" * 32])
        self.assertEqual(config.trusted_thumbprints, ("AB" * 20, "CD" * 32))
        self.assertRaises(ValueError, TentacleConfig, home=Path("/h"), trusted_thumbprints=["nope"])

    def test_trust_list(self) -> None:
        from tentacle.trust import TrustList

        trust = TrustList(["ab:" * 19 + "ab"])
        self.assertEqual(trust.thumbprints, {"AB" * 20})
        added, removed = trust.replace(["ab" * 20, "cd" * 32])
        self.assertEqual((added, removed), ({"CD" * 32}, frozenset()))
