"""
Who may drive this agent: the list of trusted server thumbprints.

Trust is decided after the TLS handshake, by the SHA-1 thumbprint or SHA-256
fingerprint of the certificate the peer presented, as Halibut does.  The list
can change while the agent runs; whoever holds live connections subscribes to
hear which thumbprints were removed, so it can cut them off at once.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Iterable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import crypto

from tentacle.identity import describe_subject, normalize_thumbprint


@attrs.frozen
class PeerIdentity:
    """
    What we know of a peer's certificate, enough to decide and to log.

    Made for every connection and kept as long as it lasts, so the
    thumbprints are hashes of the DER bytes, the certificate object is the
    one the TLS connection holds anyway, and the subject (parsing the
    certificate, for log lines and error messages only) is worked out
    when first asked for.
    """

    thumbprint: str
    sha256: str
    #: The certificate: C{cryptography}'s, or pyOpenSSL's C{X509}.
    _certificate: Any = attrs.field(eq=False, repr=False, alias="certificate")

    @classmethod
    def from_der(cls, der: bytes, certificate: Any = None) -> PeerIdentity:
        return cls(
            thumbprint=hashlib.sha1(der).hexdigest().upper(),
            sha256=hashlib.sha256(der).hexdigest().upper(),
            certificate=certificate if certificate is not None else x509.load_der_x509_certificate(der),
        )

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> PeerIdentity:
        return cls.from_der(certificate.public_bytes(Encoding.DER), certificate)

    @classmethod
    def from_openssl(cls, certificate: Any) -> PeerIdentity:
        """
        From the C{OpenSSL.crypto.X509} a TLS transport's
        C{getPeerCertificate} gives, without converting it.
        """
        return cls.from_der(crypto.dump_certificate(crypto.FILETYPE_ASN1, certificate), certificate)

    @functools.cached_property
    def subject(self) -> str:
        """
        The subject, as L{describe_subject} writes it.
        """
        certificate = self._certificate
        if not isinstance(certificate, x509.Certificate):
            certificate = certificate.to_cryptography()
        return describe_subject(certificate)


RemovalListener = Callable[[frozenset[str]], None]


class TrustList:
    """
    The thumbprints (canonical: upper-case hex) of the servers we obey;
    given in any case, with or without colons, as the CLI accepts them.

    @raise ValueError: for a string that is not a thumbprint.
    """

    def __init__(self, thumbprints: Iterable[str] = ()) -> None:
        self._thumbprints = frozenset(normalize_thumbprint(t) for t in thumbprints)
        self._listeners: list[RemovalListener] = []

    @property
    def thumbprints(self) -> frozenset[str]:
        return self._thumbprints

    def trusts(self, peer: PeerIdentity) -> bool:
        return peer.thumbprint in self._thumbprints or peer.sha256 in self._thumbprints

    def replace(self, thumbprints: Iterable[str]) -> tuple[frozenset[str], frozenset[str]]:
        """
        Install a new list; tell subscribers what was removed.

        @return: the thumbprints added and removed.
        """
        new = frozenset(normalize_thumbprint(t) for t in thumbprints)
        added, removed = new - self._thumbprints, self._thumbprints - new
        self._thumbprints = new
        if removed:
            for listener in list(self._listeners):
                listener(removed)
        return added, removed

    def on_removal(self, listener: RemovalListener) -> Callable[[], None]:
        """
        Call C{listener} with the removed thumbprints whenever some are removed.

        @return: a function that unsubscribes.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)
