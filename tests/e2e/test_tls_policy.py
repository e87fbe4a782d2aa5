"""
The TLS policy as a scanner sees it, probed with C{openssl s_client}
against a real agent: TLS 1.0 and 1.1, suites without forward secrecy or
without AEAD, compression and renegotiation are refused; TLS 1.2 with the
ECDHE AEAD suites and TLS 1.3 with its AEAD suites are accepted.

(sslyze's Python API was the first choice, but installing it downgrades
C{cryptography} below what the agent requires, so the probes are
C{openssl s_client}, which scanners such as testssl.sh use as well.)
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from typing import Any

from OpenSSL import SSL
from twisted.trial.unittest import TestCase

from tentacle.tls import AgentTLSOptions
from tests.figures import record
from tests.support import agent_port, client_context, identity, in_thread, start_agent

REFUSED = [
    ("TLS 1.0", ["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"], "alert protocol version"),
    ("TLS 1.1", ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], "alert protocol version"),
    ("TLS 1.2, RSA key exchange, CBC", ["-tls1_2", "-cipher", "AES128-SHA"], "handshake failure"),
    ("TLS 1.2, RSA key exchange, GCM", ["-tls1_2", "-cipher", "AES256-GCM-SHA384"], "handshake failure"),
    ("TLS 1.2, ECDHE, CBC-SHA1", ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA"], "handshake failure"),
    ("TLS 1.2, ECDHE, CBC-SHA384", ["-tls1_2", "-cipher", "ECDHE-RSA-AES256-SHA384"], "handshake failure"),
    ("TLS 1.2, DHE, GCM", ["-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256"], "handshake failure"),
    ("TLS 1.2, 3DES", ["-tls1_2", "-cipher", "DES-CBC3-SHA:@SECLEVEL=0"], "handshake failure"),
    ("TLS 1.2, no encryption", ["-tls1_2", "-cipher", "NULL:@SECLEVEL=0"], "handshake failure"),
]
ACCEPTED = [
    ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256", ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"]),
    ("TLSv1.2", "ECDHE-RSA-AES256-GCM-SHA384", ["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"]),
    ("TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305", ["-tls1_2", "-cipher", "ECDHE-RSA-CHACHA20-POLY1305"]),
    ("TLSv1.3", "TLS_AES_128_GCM_SHA256", ["-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"]),
    ("TLSv1.3", "TLS_AES_256_GCM_SHA384", ["-tls1_3", "-ciphersuites", "TLS_AES_256_GCM_SHA384"]),
    ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256", ["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"]),
]


class TLSPolicyTests(TestCase):
    def setUp(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise AssertionError("the TLS policy probes need the openssl command (apt-get install openssl)")
        self.openssl = openssl
        self.port = agent_port(start_agent(self))

    async def probe(self, options: list[str]) -> tuple[int, str]:
        """
        One handshake; s_client's exit status and what it printed.  Its
        input is empty, so it leaves as soon as the handshake is done.
        """
        result = await in_thread(
            subprocess.run,
            [self.openssl, "s_client", "-connect", f"127.0.0.1:{self.port}", *options],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        )
        return result.returncode, result.stdout + result.stderr

    async def test_weak_versions_and_suites_are_refused(self) -> None:
        offered = 0
        for name, options, alert in REFUSED:
            code, output = await self.probe(options)
            self.assertNotEqual(code, 0, name)
            if "no cipher match" in output or "no ciphers available" in output:
                continue  # this openssl cannot even offer it; the list check below covers it
            offered += 1
            self.assertIn("Cipher is (NONE)", output, name)
            self.assertIn(alert, output, name)
        self.assertGreaterEqual(offered, 7)
        # What the agent would ever pick on TLS 1.2 and below: ECDHE with AEAD only.
        connection = SSL.Connection(AgentTLSOptions(identity("agent"))._get_context(), None)
        legacy = [c for c in connection.get_cipher_list() if not c.startswith("TLS_")]
        self.assertTrue(legacy)
        for cipher in legacy:
            self.assertTrue(cipher.startswith("ECDHE-"), cipher)
            self.assertTrue("-GCM-" in cipher or cipher.endswith("CHACHA20-POLY1305"), cipher)
        record(self, "tls", f"{len(REFUSED)} weak offers: TLS 1.0, TLS 1.1, RSA key exchange, "
               "CBC, DHE, 3DES, NULL", f"every handshake refused ({offered} offered on the wire, "
               "the rest checked in the agent's suite list)", inputs=len(REFUSED))

    async def test_aead_suites_on_tls_1_2_and_1_3_are_accepted(self) -> None:
        for version, suite, options in ACCEPTED:
            code, output = await self.probe(options)
            self.assertEqual(code, 0, output)
            self.assertIn(f"New, {version}, Cipher is {suite}", output)
            self.assertIn("Compression: NONE", output)
        record(self, "tls", f"{len(ACCEPTED)} strong offers: the ECDHE AEAD suites on TLS 1.2, "
               "the AEAD suites of TLS 1.3", "every handshake completes, uncompressed",
               inputs=len(ACCEPTED))

    async def test_compression_is_never_negotiated(self) -> None:
        context = client_context(maximum=ssl.TLSVersion.TLSv1_2)
        context.options &= ~ssl.OP_NO_COMPRESSION  # ask for it

        def compression() -> Any:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
                with context.wrap_socket(raw) as tls:
                    return tls.compression()

        self.assertIsNone(await in_thread(compression))
        options = AgentTLSOptions(identity("agent"))._get_context().set_options(0)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION, "the agent's context forbids it")

    async def test_renegotiation_is_refused(self) -> None:
        def renegotiate() -> str:
            context = SSL.Context(SSL.TLS_METHOD)
            context.set_max_proto_version(SSL.TLS1_2_VERSION)
            with socket.create_connection(("127.0.0.1", self.port)) as raw:
                tls = SSL.Connection(context, raw)
                tls.set_connect_state()
                tls.do_handshake()
                tls.renegotiate()
                try:
                    tls.do_handshake()
                    tls.send(b"GET / HTTP/1.0\r\n\r\n")
                    tls.recv(65536)
                except SSL.Error as e:
                    return str(e)
                return f"renegotiated {tls.total_renegotiations()} time(s)"

        self.assertIn("no renegotiation", await in_thread(renegotiate))
        options = AgentTLSOptions(identity("agent"))._get_context().set_options(0)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)
        record(self, "tls", "compression asked for; a client-initiated renegotiation on TLS 1.2",
               "compression never negotiated; renegotiation refused (no_renegotiation alert)")
