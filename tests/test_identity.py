"""
Certificates: generation like Tentacle's, thumbprints like .NET's, imports, and key file modes.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.trial.unittest import SynchronousTestCase

from tentacle.identity import (
    Identity,
    IdentityError,
    IdentityStore,
    normalize_thumbprint,
)
from tests.support import der, identity


class GenerateTests(SynchronousTestCase):
    def test_like_tentacles_own(self) -> None:
        ident = identity("agent")
        cert = ident.certificate
        self.assertEqual(ident.private_key.key_size, 2048)
        self.assertIsInstance(cert.signature_hash_algorithm, hashes.SHA256)
        self.assertEqual(cert.subject, cert.issuer)
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertGreaterEqual(lifetime.days, 36525)

    def test_thumbprint_is_sha1_of_der_upper_case(self) -> None:
        ident = identity("agent")
        self.assertEqual(ident.thumbprint, hashlib.sha1(der(ident)).hexdigest().upper())
        self.assertEqual(ident.sha256, hashlib.sha256(der(ident)).hexdigest().upper())


class NormalizeThumbprintTests(SynchronousTestCase):
    def test_accepted_forms(self) -> None:
        sha1 = "0f3d74b42b4bb3bec413017c8ee527408c158586"
        self.assertEqual(normalize_thumbprint(sha1), sha1.upper())
        with_colons = ":".join(sha1[i : i + 2] for i in range(0, 40, 2))
        self.assertEqual(normalize_thumbprint(f"  {with_colons} "), sha1.upper())
        self.assertEqual(len(normalize_thumbprint("ab" * 32)), 64)

    def test_rejected_forms(self) -> None:
        for bad in ["", "abc", "g" * 40, "a" * 39, "a" * 41, "a" * 63, "0x" + "a" * 38]:
            e = self.assertRaises(ValueError, normalize_thumbprint, bad)
            self.assertIn("expected 40 hex digits (SHA-1) or 64 hex digits (SHA-256)", str(e))


class StoreTests(SynchronousTestCase):
    def test_save_and_load(self) -> None:
        store = IdentityStore(Path(self.mktemp()))
        self.assertFalse(store.exists())
        store.save(identity("agent"))
        self.assertEqual(store.load().thumbprint, identity("agent").thumbprint)

    def test_private_key_is_0600(self) -> None:
        store = IdentityStore(Path(self.mktemp()))
        store.save(identity("agent"))
        self.assertEqual(stat.S_IMODE(store.private_key_path.stat().st_mode), 0o600)
        # and stays so when replaced
        store.save(identity("other"))
        self.assertEqual(stat.S_IMODE(store.private_key_path.stat().st_mode), 0o600)
        self.assertEqual(list(store.home.glob("*.tmp")), [])

    def test_missing(self) -> None:
        e = self.assertRaises(IdentityError, IdentityStore(Path(self.mktemp())).load)
        self.assertIn("tentacle new-certificate", str(e))


class ImportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.ident = identity("imported")

    def test_pem(self) -> None:
        path = self.folder / "both.pem"
        path.write_bytes(self.ident.certificate_pem() + self.ident.private_key_pem())
        self.assertEqual(Identity.from_file(path).thumbprint, self.ident.thumbprint)

    def test_pkcs12_with_password(self) -> None:
        path = self.folder / "id.pfx"
        path.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"x", self.ident.private_key, self.ident.certificate, None,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        self.assertEqual(Identity.from_file(path, b"secret").thumbprint, self.ident.thumbprint)
        e = self.assertRaises(IdentityError, Identity.from_file, path, b"wrong")
        self.assertIn("password is wrong", str(e))

    def test_mismatched_key(self) -> None:
        path = self.folder / "mixed.pem"
        path.write_bytes(self.ident.certificate_pem() + identity("agent").private_key_pem())
        e = self.assertRaises(IdentityError, Identity.from_file, path)
        self.assertIn("does not match", str(e))

    def test_certificate_without_key(self) -> None:
        path = self.folder / "cert.pem"
        path.write_bytes(self.ident.certificate_pem())
        e = self.assertRaises(IdentityError, Identity.from_file, path)
        self.assertIn("private key", str(e))

    def test_non_rsa_key(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([])
        import datetime

        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        path = self.folder / "ec.pem"
        path.write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
            + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        e = self.assertRaises(IdentityError, Identity.from_file, path)
        self.assertIn("only RSA", str(e))

    def test_garbage(self) -> None:
        path = self.folder / "junk"
        path.write_bytes(b"\x00not a certificate")
        e = self.assertRaises(IdentityError, Identity.from_file, path)
        self.assertIn("PKCS#12", str(e))

    def test_missing_file(self) -> None:
        e = self.assertRaises(IdentityError, Identity.from_file, self.folder / "nope")
        self.assertIn("cannot read", str(e))


class PeerIdentityTests(SynchronousTestCase):
    """
    What the listener and the dialler know of a peer's certificate.
    """

    def test_from_either_kind_of_certificate(self) -> None:
        from OpenSSL import crypto

        from tentacle.trust import PeerIdentity

        agent = identity("agent")
        ours = PeerIdentity.from_certificate(agent.certificate)
        theirs = PeerIdentity.from_openssl(crypto.X509.from_cryptography(agent.certificate))
        self.assertEqual(ours, theirs)
        self.assertEqual((ours.thumbprint, ours.sha256), (agent.thumbprint, agent.sha256))
        self.assertEqual(ours.thumbprint, hashlib.sha1(der(agent)).hexdigest().upper())
        self.assertEqual((ours.subject, theirs.subject), ("CN=agent", "CN=agent"))
        self.assertEqual(PeerIdentity.from_der(der(agent)).subject, "CN=agent")
        self.assertNotIn("BEGIN", repr(ours))

    def test_hostile_subject_cannot_forge_log_lines(self) -> None:
        from tentacle.identity import Identity
        from tentacle.trust import PeerIdentity

        forged = Identity.generate("x\nERROR forged line\r")
        self.assertEqual(PeerIdentity.from_certificate(forged.certificate).subject, "CN=x\\nERROR forged line\\r")
