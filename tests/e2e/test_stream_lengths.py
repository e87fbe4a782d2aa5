"""
A data stream is exactly as long as its message declared, or the
connection ends (Halibut's DataStreamFixture, and its 2026 size checks):
a sender whose source runs short aborts, one whose source grew sends only
the declared bytes, and a receiver checks the trailing length.  Each
through real sockets, and the next request works on a new connection.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import RpcRetryPolicy, Target, TentacleClient
from tentacle.client.connection import Pin, RequestFailed
from tentacle.contracts import tentacle_registry
from tentacle.dispatch import Dispatcher
from tentacle.halibut.connection import ExchangeSettings, HalibutConnection
from tentacle.halibut.deflate import compress
from tentacle.halibut.roles import ListeningService
from tentacle.halibut.serializer import DataStream, RequestMessage, ResponseMessage, encode_message
from tentacle.halibut.streams import stream_header, stream_trailer
from tentacle.listener import Accepted
from tests.e2e.test_exchange_sockets import TEST_SERVICE, TestService
from tests.e2e.test_network_faults import on_event
from tests.support import LogCapture, agent_port, identity, start_agent, remove_big_files

MiB = 1024 * 1024
#: Retries a moment apart, so a test does not wait for the Server's backoff.
QUICK = RpcRetryPolicy(window=30.0, backoff=lambda n: 0.05)


class StreamLengthTests(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True)
        self.agent = start_agent(self, home=self.home, trusted=(identity("server").thumbprint,))

    def client(self, **options: Any) -> TentacleClient:
        target = Target("127.0.0.1", agent_port(self.agent), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor, **options)
        self.addCleanup(client.close)
        return client

    def source(self, size: int) -> Path:
        path = self.base / "source.bin"
        path.write_bytes(os.urandom(size))
        return path

    def accepted(self) -> int:
        return len(self.logs.matching(event="client_authenticated"))

    # --- the agent sends (what a Server would see) ------------------------------------

    async def test_agent_file_shrank_while_sent(self) -> None:
        """
        The agent aborts rather than send fewer bytes than it declared; the
        client's retry, on a new connection, gets the file as it is now.
        """
        exported = self.home / "Exports" / "app.log"
        exported.parent.mkdir()
        exported.write_bytes(os.urandom(2 * MiB))
        on_event(self, lambda _: os.truncate(exported, MiB), event="download_started")
        local = self.base / "app.log"
        length, sha1 = await self.client(rpc_retry=QUICK).download("Exports/app.log", local)
        self.assertEqual(length, MiB)
        self.assertEqual(local.read_bytes(), exported.read_bytes())
        [error] = self.logs.matching(event="protocol_error")
        self.assertIn(f"a data stream ended {MiB} bytes short", error["why"])
        self.assertEqual(len(self.logs.matching(event="call_retried")), 1)
        self.assertEqual(self.accepted(), 2, "the retry came on a new connection")

    async def test_agent_file_grew_while_sent(self) -> None:
        """
        Only the declared bytes are sent; the connection stays in step and
        carries the next call.
        """
        exported = self.home / "Exports" / "app.log"
        exported.parent.mkdir()
        original = os.urandom(MiB)
        exported.write_bytes(original)

        def grow(_: Any) -> None:
            with exported.open("ab") as f:
                f.write(b"more" * 100_000)

        on_event(self, grow, event="download_started")
        client = self.client(rpc_retry=None)
        local = self.base / "app.log"
        length, sha1 = await client.download("Exports/app.log", local)
        self.assertEqual((length, sha1), (MiB, hashlib.sha1(original).hexdigest()))
        self.assertEqual(local.read_bytes(), original)
        self.assertIn("IScriptServiceV2", await client.capabilities())
        self.assertEqual(self.accepted(), 1, "the same connection carried on")
        self.assertEqual(self.logs.matching(event="protocol_error"), [])

    # --- the client sends ---------------------------------------------------------------

    async def test_client_file_shrank_while_sent(self) -> None:
        source = self.source(MiB)
        shrunk: list[bool] = []

        def shrink(done: int, total: int) -> None:
            if not shrunk:
                shrunk.append(True)
                os.truncate(source, 100_000)

        abandoned = self.logs.wait_for(event="upload_abandoned")
        client = self.client(rpc_retry=None)
        with self.assertRaises(RequestFailed) as caught:
            await client.upload(source, "Packages/app.bin", progress=shrink)
        self.assertIn(f"a data stream ended {MiB - 100_000} bytes short", str(caught.exception))
        await abandoned
        packages = self.home / "Packages"
        self.assertEqual(list(packages.iterdir()) if packages.exists() else [], [], "nothing stored, no temp file")
        source.write_bytes(b"x" * 1000)
        result = await client.upload(source, "Packages/app.bin")
        self.assertEqual(result.length, 1000)
        self.assertEqual(self.accepted(), 2, "the next upload came on a new connection")

    async def test_client_file_grew_while_sent(self) -> None:
        source = self.source(MiB)
        original = source.read_bytes()
        grown: list[bool] = []

        def grow(done: int, total: int) -> None:
            if not grown:
                grown.append(True)
                with source.open("ab") as f:
                    f.write(b"more" * 100_000)

        client = self.client(rpc_retry=None)
        result = await client.upload(source, "Packages/app.bin", progress=grow)
        self.assertEqual((result.length, result.hash), (MiB, hashlib.sha1(original).hexdigest()))
        self.assertEqual((self.home / "Packages" / "app.bin").read_bytes(), original)
        self.assertIn("IScriptServiceV2", await client.capabilities())
        self.assertEqual(self.accepted(), 1, "the same connection carried on")


class TrailerTests(TestCase):
    """
    A peer whose trailing length differs from the leading one: the client
    drops that connection and its retry works on a new one.  (The agent's
    own check is in L{tests.e2e.test_exchange_sockets}.)
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        dispatcher = Dispatcher()
        dispatcher.register(TEST_SERVICE, TestService())
        self.sessions = 0

        def sessions(accepted: Accepted) -> HalibutConnection:
            self.sessions += 1
            role = lying_once if self.sessions == 1 else ListeningService(dispatcher)
            return HalibutConnection(reactor, tentacle_registry(), ExchangeSettings(), peer=accepted.peer, role=role)

        self.agent = start_agent(
            self, trusted=(identity("server").thumbprint,), service_options={"session_factory": sessions}
        )

    async def test_trailer_mismatch_on_receipt(self) -> None:
        target = Target("127.0.0.1", agent_port(self.agent), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, identity("server"), reactor, rpc_retry=QUICK)
        self.addCleanup(client.close)
        ref = DataStream.fresh(1000)
        result, streams = await client.call_idempotent(
            "ITestService", "Mirror", ref, payloads={ref.id: lambda: io.BytesIO(b"m" * 1000)}
        )
        [stream] = streams
        self.assertEqual(b"".join(stream.sink.read_chunks()), b"m" * 1000)  # type: ignore[attr-defined]
        stream.sink.discard()
        [retried] = self.logs.matching(event="call_retried")
        self.assertIn("trailer says 999 bytes, header said 1000", retried["error"])
        self.assertEqual(self.sessions, 2)


async def lying_once(connection: HalibutConnection) -> None:
    """
    Answers the first request with a stream whose trailer says one byte
    less than its header, then waits for the peer to hang up.
    """
    envelope = await connection.read_envelope(RequestMessage, first=60, what="a request")
    assert isinstance(envelope.message, RequestMessage)
    for stream in envelope.streams:
        stream.sink.discard()
    ref = DataStream.fresh(1000)
    data, _ = encode_message(ResponseMessage(envelope.message.id, None, ref))
    connection.write(compress(data) + stream_header(ref.id, 1000) + b"x" * 1000 + stream_trailer(999))
    await connection.read_control(first=60, what="the client to hang up")
