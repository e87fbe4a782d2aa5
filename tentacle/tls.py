"""
The agent's TLS policy: which versions and suites, and how client certificates are taken.

Like Halibut's listener we I{request} a client certificate but never require
or validate one during the handshake: browsers and curl must complete it to see
the friendly page, and a server's self-signed certificate has no chain to
check.  Trust is decided afterwards, by thumbprint (L{tentacle.trust}).
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from tentacle.identity import Identity

#: Forward-secret AEAD suites only for TLS 1.2 (Mozilla "intermediate" without
#: the DHE ones, which need parameters we do not ship).  TLS 1.3 suites are all
#: AEAD and are not governed by this string.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def _accept_any_certificate(
    connection: SSL.Connection, certificate: Any, errno: int, depth: int, ok: int
) -> bool:
    """
    Let every client certificate through the handshake; the listener checks
    its thumbprint against the trust list before acting on anything.
    """
    return True


def _no_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    return SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLServerConnectionCreator)
class AgentTLSOptions:
    """
    Server-side TLS for the listener: TLS 1.2 minimum (1.3 preferred by
    OpenSSL when both sides have it), AEAD suites, our certificate, and a
    request for the client's certificate that tolerates its absence.
    """

    def __init__(self, identity: Identity) -> None:
        # cryptography objects are what pyOpenSSL 26 wants; Twisted's hints
        # still name the older pyOpenSSL types.
        self._options = CertificateOptions(
            privateKey=identity.private_key,  # type: ignore[arg-type]
            certificate=identity.certificate,  # type: ignore[arg-type]
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(TLS12_CIPHERS),
            enableSessions=False,
        )
        self._context: SSL.Context | None = None

    def _get_context(self) -> SSL.Context:
        if self._context is None:
            context = self._options.getContext()
            context.set_verify(SSL.VERIFY_PEER, _accept_any_certificate)
            # Refuse renegotiation outright rather than rely on the OpenSSL
            # build's default (1.1.1 allowed a client to start one).
            context.set_options(SSL.OP_NO_RENEGOTIATION)
            # We speak no ALPN protocol.  Twisted 26.10's default selector
            # answers an empty name, which OpenSSL turns into an
            # internal-error alert: every browser and curl offers ALPN.
            context.set_alpn_select_callback(_no_alpn)
            self._context = context
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self._get_context()  # CertificateOptions builds connections from this cached context
        return self._options.serverConnectionForTLS(tlsProtocol)


class DirectTLS(TLSMemoryBIOProtocol):
    """
    TLS on a Halibut connection (accepted or dialled), which sends what it
    is given at once.

    Twisted's default TLS transport (C{BufferingTLSTransport}) gathers
    small writes until the reactor's next turn, and a TCP transport sends
    only when the reactor next polls; so a request's answer left the agent
    one or two turns after it was written, behind whatever else the turn
    did.  A Halibut connection writes each unit (a control line, a whole
    compressed message, a chunk of a data stream) in one call, so here a
    write is encrypted and handed to the socket there and then: the peer
    starts on it while this side finishes its turn.  Only while a producer
    streams into the connection (a data stream's payload), or once it is
    closing, does TCP keep its usual pace: its buffer and its producer's
    pauses stay in charge of a bulk transfer.

    Sent at once, small writes must not wait for Nagle's algorithm: a
    second small write on a connection whose first is not yet acknowledged
    would wait for the peer's delayed ACK (40 ms on Linux), twice per
    polled request.  So the socket gets C{TCP_NODELAY}.
    """

    def makeConnection(self, transport: Any) -> None:
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not a TCP socket after all (a test's fake, a UNIX socket)
        super().makeConnection(transport)

    def write(self, data: bytes) -> None:
        super().write(data)
        tcp: Any = self.transport
        if (
            getattr(tcp, "producer", True) is None
            and getattr(tcp, "connected", False)
            and not tcp.disconnecting
            and hasattr(tcp, "doWrite")
        ):
            # What the reactor calls once the socket is writable; a socket
            # that takes nothing now keeps the bytes for the reactor to send,
            # and a broken one fails there too, where the reactor ends it.
            tcp.doWrite()
