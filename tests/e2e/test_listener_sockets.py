"""
The listener on a real loopback socket, driven by real TLS clients
(Python's C{ssl}, curl, a raw socket), in the ways the issue spells out.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tentacle.config import ConfigFile
from tentacle.halibut.handshake import MAX_INITIAL_REQUEST, SERVER_IDENTITY as IDENTITY_ANSWER
from tentacle.page import FRIENDLY_PAGE, HEADERS
from tentacle.listener import Accepted
from tests.support import (
    LogCapture,
    agent_port,
    client_context,
    converse,
    identity,
    in_thread,
    start_agent,
)

MX = b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n"


class HoldOpen(Protocol):
    """
    A message exchange that does nothing, so an authenticated connection stays open.
    """

    def __init__(self, accepted: Accepted) -> None:
        self.peer = accepted.peer


class FriendlyPageTests(TestCase):
    async def test_https_get_without_client_certificate(self) -> None:
        service = start_agent(self)
        result = await in_thread(
            converse,
            agent_port(service),
            client_context(),
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        self.assertEqual(result.received, FRIENDLY_PAGE)
        head, body = result.received.split(b"\r\n\r\n", 1)
        lines = head.decode("ascii").split("\r\n")
        self.assertEqual(lines[0], "HTTP/1.0 200 OK")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        self.assertEqual(headers["Content-Type"], "text/html; charset=utf-8")
        self.assertEqual(int(headers["Content-Length"]), len(body))
        for name, value in HEADERS:
            self.assertEqual(headers[name], value)
        self.assertIn(b"Only servers with a trusted certificate can control this agent", body)

    async def test_curl(self) -> None:
        curl = shutil.which("curl")
        if curl is None:
            self.skipTest("curl is not installed")  # type: ignore[attr-defined]
        service = start_agent(self)
        out, err, code = await getProcessOutputAndValue(
            curl,
            ["-sk", "-i", "--max-time", "10", f"https://127.0.0.1:{agent_port(service)}/"],
            env=dict(os.environ),
        )
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/1.0 200 OK\r\n"), out[:100])
        self.assertIn(b"X-Frame-Options: DENY", out)
        self.assertIn(b"Referrer-Policy: no-referrer", out)
        self.assertTrue(out.endswith(b"</html>\n"))

    async def test_plain_http_is_closed_quickly(self) -> None:
        service = start_agent(self)

        def plain_get() -> tuple[bytes, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", agent_port(service)), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                received = b""
                try:
                    while chunk := s.recv(4096):
                        received += chunk
                except ConnectionResetError:
                    pass
            return received, time.monotonic() - started

        received, elapsed = await in_thread(plain_get)
        self.assertLess(elapsed, 5)
        self.assertNotIn(b"HTTP/1.0 200", received)


class TrustTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    async def test_untrusted_certificate_receives_nothing(self) -> None:
        service = start_agent(self, trusted=(identity("server").thumbprint,))
        result = await in_thread(
            converse,
            agent_port(service),
            client_context(identity("intruder"), Path(self.mktemp()).parent),
            MX,
        )
        self.assertEqual(result.received, b"")
        self.assertIn(result.ending, ("reset", "closed"))
        [event] = self.logs.matching(event="client_denied")
        self.assertEqual(event["thumbprint"], identity("intruder").thumbprint)
        self.assertTrue(event["peer"].startswith("127.0.0.1:"), event["peer"])

    async def test_no_certificate_receives_nothing(self) -> None:
        service = start_agent(self, trusted=(identity("server").thumbprint,))
        result = await in_thread(converse, agent_port(service), client_context(), MX)
        self.assertEqual(result.received, b"")
        self.assertIn(result.ending, ("reset", "closed"))
        [event] = self.logs.matching(event="client_denied")
        self.assertTrue(event["peer"].startswith("127.0.0.1:"))

    async def test_trusted_by_sha1_then_sha256(self) -> None:
        server = identity("server")
        folder = Path(self.mktemp()).parent
        for pin in (server.thumbprint, server.sha256):
            service = start_agent(self, trusted=(pin,))
            result = await in_thread(
                converse, agent_port(service), client_context(server, folder), MX,
                expect=len(IDENTITY_ANSWER),
            )
            self.assertEqual(result.received, IDENTITY_ANSWER)

    async def test_tls_1_1_is_refused(self) -> None:
        service = start_agent(self)
        old = client_context(maximum=ssl.TLSVersion.TLSv1_1, minimum=ssl.TLSVersion.TLSv1)
        old.set_ciphers("ALL:@SECLEVEL=0")

        def handshake(context: ssl.SSLContext) -> str:
            with socket.create_connection(("127.0.0.1", agent_port(service)), timeout=10) as raw:
                try:
                    with context.wrap_socket(raw) as tls:
                        return str(tls.version())
                except ssl.SSLError as e:
                    return f"refused: {e.reason}"

        self.assertEqual(await in_thread(handshake, old), "refused: TLSV1_ALERT_PROTOCOL_VERSION")
        # The same client allowed TLS 1.2 connects: the refusal was the version.
        self.assertEqual(
            await in_thread(handshake, client_context(maximum=ssl.TLSVersion.TLSv1_2)),
            "TLSv1.2",
        )
        self.assertEqual(await in_thread(handshake, client_context()), "TLSv1.3")

    async def test_overlong_initial_request_is_refused(self) -> None:
        service = start_agent(self)
        result = await in_thread(
            converse, agent_port(service), client_context(), b"A" * 25000 + b"\r\n\r\n"
        )
        self.assertEqual(result.received, b"")
        self.assertTrue(self.logs.matching(limit=MAX_INITIAL_REQUEST))

    async def test_silent_peer_is_disconnected(self) -> None:
        service = start_agent(self, handshake_timeout=0.5)

        def silent() -> tuple[bytes, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", agent_port(service)), timeout=10) as s:
                try:
                    data = s.recv(100)
                except ConnectionResetError:
                    data = b""
            return data, time.monotonic() - started

        data, elapsed = await in_thread(silent)
        self.assertEqual(data, b"")
        self.assertLess(elapsed, 5)


class TrustReloadTests(TestCase):
    """
    Trust changes reach a running agent through its configuration file
    and SIGHUP, without a restart.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.home = Path(self.mktemp())
        self.home.mkdir()
        self.config_file = ConfigFile(self.home)

    def start(self, *trusted: str) -> Any:
        self.config_file.save(self.config_file.load().trust(trusted[0]) if trusted else self.config_file.load())
        return start_agent(
            self,
            home=self.home,
            trusted=trusted,
            service_options={
                "config_file": self.config_file,
                "handle_sighup": True,
                "session_factory": HoldOpen,
            },
        )

    def edit_and_hangup(self, *trusted: str) -> None:
        config = self.config_file.load()
        config = type(config)(home=config.home, trusted_thumbprints=tuple(trusted))
        self.config_file.save(config)
        os.kill(os.getpid(), signal.SIGHUP)

    async def test_added_thumbprint_is_accepted(self) -> None:
        service = self.start(identity("other").thumbprint)
        port = agent_port(service)
        folder = Path(self.mktemp()).parent
        before = await in_thread(converse, port, client_context(identity("server"), folder), MX)
        self.assertEqual(before.received, b"")
        reloaded = self.logs.wait_for(event="trust_added", thumbprint=identity("server").thumbprint)
        self.edit_and_hangup(identity("other").thumbprint, identity("server").thumbprint)
        await reloaded
        self.assertIn(identity("server").thumbprint, service.trust.thumbprints)
        after = await in_thread(
            converse, port, client_context(identity("server"), folder), MX, 5.0,
            len(IDENTITY_ANSWER),
        )
        self.assertEqual(after.received, IDENTITY_ANSWER)

    async def test_removed_thumbprint_is_cut_off_within_a_second(self) -> None:
        server = identity("server")
        service = self.start(server.thumbprint)
        port = agent_port(service)
        folder = Path(self.mktemp()).parent
        authenticated = self.logs.wait_for(event="client_authenticated")
        held = in_thread(converse, port, client_context(server, folder), MX, 30.0)
        await authenticated
        removed_at = time.monotonic()
        self.edit_and_hangup(identity("other").thumbprint)
        result = await held
        self.assertLess(time.monotonic() - removed_at, 1.0)
        self.assertEqual(result.received, IDENTITY_ANSWER)
        self.assertIn(result.ending, ("reset", "closed"))
        again = await in_thread(converse, port, client_context(server, folder), MX)
        self.assertEqual(again.received, b"")
