"""
The agent's X.509 identity: generating, importing, storing and fingerprinting it.

Octopus pins peers by the SHA-1 thumbprint of the DER certificate (what .NET's
``X509Certificate2.Thumbprint`` gives: 40 upper-case hex digits).  We show that
and the SHA-256 fingerprint, and accept either in trust lists.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from tentacle.fsutil import atomic_write, private_folder

#: What Octopus Tentacle puts in its own certificates; servers do not check it,
#: but keeping it makes our agent look familiar in Octopus's UI and logs.
DEFAULT_COMMON_NAME = "Octopus Tentacle"
#: Tentacle's certificates are valid for 100 years: rotation is by re-pinning,
#: never by expiry, since Halibut never checks validity dates.
VALIDITY_DAYS = 36525

CERTIFICATE_FILE = "certificate.pem"
PRIVATE_KEY_FILE = "private-key.pem"


class IdentityError(Exception):
    """
    A certificate or key could not be created, read or imported.
    """


_HEX_DIGITS = re.compile(r"[0-9A-F]+")


def normalize_thumbprint(text: str) -> str:
    """
    Turn a user-supplied thumbprint into the canonical form we store and compare.

    Accepts any case, colons and surrounding spaces; the result is upper-case
    hex without separators.  Only SHA-1 (40 digits) and SHA-256 (64 digits)
    lengths are accepted, because those are the only digests we compute.

    @raise ValueError: with a message saying what was expected.
    """
    cleaned = text.strip().replace(":", "").upper()
    if not _HEX_DIGITS.fullmatch(cleaned) or len(cleaned) not in (40, 64):
        raise ValueError(
            f"{text!r} is not a thumbprint: expected 40 hex digits (SHA-1) "
            "or 64 hex digits (SHA-256), in any case, colons allowed"
        )
    return cleaned


def sha1_thumbprint(certificate: x509.Certificate) -> str:
    """
    The SHA-1 of the DER certificate, 40 upper-case hex digits, as Octopus shows it.
    """
    return certificate.fingerprint(hashes.SHA1()).hex().upper()


def sha256_fingerprint(certificate: x509.Certificate) -> str:
    """
    The SHA-256 of the DER certificate, 64 upper-case hex digits.
    """
    return certificate.fingerprint(hashes.SHA256()).hex().upper()


def describe_subject(certificate: x509.Certificate) -> str:
    """
    The subject as an RFC 4514 string with control characters escaped, so a
    hostile certificate cannot forge log lines.
    """
    subject = certificate.subject.rfc4514_string()
    return subject.encode("ascii", "backslashreplace").decode("ascii").replace(
        "\n", "\\n"
    ).replace("\r", "\\r")


@attrs.frozen
class Identity:
    """
    A certificate and its private key: what the agent presents in TLS.
    """

    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey

    @property
    def thumbprint(self) -> str:
        return sha1_thumbprint(self.certificate)

    @property
    def sha256(self) -> str:
        return sha256_fingerprint(self.certificate)

    @classmethod
    def generate(
        cls,
        common_name: str = DEFAULT_COMMON_NAME,
        now: datetime.datetime | None = None,
    ) -> Identity:
        """
        A new self-signed RSA-2048 / SHA-256 certificate like Tentacle's own:
        valid from yesterday (to tolerate clock skew) for 100 years.
        """
        if now is None:
            now = datetime.datetime.now(datetime.timezone.utc)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    @classmethod
    def from_pem(cls, data: bytes, password: bytes | None = None) -> Identity:
        """
        Read a certificate and its RSA key from PEM text holding both.
        """
        try:
            certificate = x509.load_pem_x509_certificate(data)
        except ValueError as e:
            raise IdentityError(f"no PEM certificate found ({e})") from None
        try:
            key = serialization.load_pem_private_key(data, password)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"no usable PEM private key found ({e})") from None
        return cls._checked(certificate, key)

    @classmethod
    def from_pkcs12(cls, data: bytes, password: bytes | None = None) -> Identity:
        """
        Read a PKCS#12 (.pfx/.p12) bundle, as exported by Octopus Tentacle.
        """
        try:
            key, certificate, _ = pkcs12.load_key_and_certificates(data, password)
        except (ValueError, TypeError) as e:
            raise IdentityError(
                f"not a PKCS#12 file, or the password is wrong ({e})"
            ) from None
        if certificate is None or key is None:
            raise IdentityError("the PKCS#12 file holds no certificate with a key")
        return cls._checked(certificate, key)

    @classmethod
    def from_file(cls, path: Path, password: bytes | None = None) -> Identity:
        """
        Import from a file, PEM or PKCS#12, chosen by its content.
        """
        try:
            data = path.read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read {path}: {e.strerror}") from None
        if b"-----BEGIN" in data:
            return cls.from_pem(data, password)
        return cls.from_pkcs12(data, password)

    @classmethod
    def _checked(cls, certificate: x509.Certificate, key: object) -> Identity:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise IdentityError(
                "only RSA keys are supported (Octopus Server expects RSA)"
            )
        if key.public_key().public_numbers() != certificate.public_key().public_numbers():  # type: ignore[union-attr]
            raise IdentityError("the private key does not match the certificate")
        return cls(certificate, key)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@attrs.frozen
class IdentityStore:
    """
    Where an instance keeps its identity: two PEM files in its home.
    """

    home: Path

    @property
    def certificate_path(self) -> Path:
        return self.home / CERTIFICATE_FILE

    @property
    def private_key_path(self) -> Path:
        return self.home / PRIVATE_KEY_FILE

    def exists(self) -> bool:
        return self.certificate_path.exists() or self.private_key_path.exists()

    def load(self) -> Identity:
        """
        @raise IdentityError: when there is no identity or it is unreadable.
        """
        if not self.exists():
            raise IdentityError(
                f"no certificate in {self.home}; create one with "
                "'tentacle new-certificate'"
            )
        try:
            data = self.certificate_path.read_bytes() + self.private_key_path.read_bytes()
        except OSError as e:
            from tentacle.errors import describe_os_error

            raise IdentityError(f"cannot read the identity: {describe_os_error(e)}") from None
        return Identity.from_pem(data)

    def save(self, identity: Identity) -> None:
        """
        Write the key first, readable by the owner only (0600), then the
        certificate (0600 too, as every file of the agent); each atomically,
        so a crash never leaves half a key.
        """
        private_folder(self.home)
        atomic_write(self.private_key_path, identity.private_key_pem(), mode=0o600)
        atomic_write(self.certificate_path, identity.certificate_pem(), mode=0o600)

