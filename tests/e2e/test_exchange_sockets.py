"""
The message exchange over a real TLS socket, driven by a client that speaks
the wire protocol independently of the agent's code.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path
from typing import IO, Iterator

from twisted.trial.unittest import TestCase

from tentacle.contracts import Operation, Parameter, ServiceContract
from tentacle.dispatch import CallContext, Dispatcher
from tentacle.halibut.serializer import DataStream
from tests.support import LogCapture, agent_port, client_context, identity, in_thread, start_agent
from tests.wire_client import WireClient, request

TEST_SERVICE = ServiceContract(
    "ITestService",
    "Tentacle.Tests.ITestService, Tentacle.Tests",
    (
        Operation("Echo", (Parameter("text", str),), str),
        Operation("Digest", (Parameter("data", DataStream),), str),
        Operation("Mirror", (Parameter("data", DataStream),), DataStream),
    ),
)


class TestService:
    def echo(self, text: str) -> str:
        return text

    def digest(self, data: DataStream, *, context: CallContext) -> str:
        digest = hashlib.sha1()
        f = context.payload(data)
        while chunk := f.read(65536):
            digest.update(chunk)
        return digest.hexdigest()

    def mirror(self, data: DataStream, *, context: CallContext) -> DataStream:
        source = context.payload(data)
        return context.send(data.length, lambda: _reopen(source))


def _reopen(f: IO[bytes]) -> IO[bytes]:
    f.seek(0)
    return f


def pattern(total: int, chunk: int = 65536) -> Iterator[bytes]:
    """
    Deterministic bytes generated on the fly, never whole in memory.
    """
    block = bytes(range(256)) * (chunk // 256)
    sent = 0
    while sent < total:
        piece = block[: min(chunk, total - sent)]
        sent += len(piece)
        yield piece


def pattern_sha1(total: int) -> str:
    digest = hashlib.sha1()
    for piece in pattern(total):
        digest.update(piece)
    return digest.hexdigest()


class ExchangeSocketTests(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        dispatcher = Dispatcher()
        dispatcher.register(TEST_SERVICE, TestService())
        self.service = start_agent(
            self,
            trusted=(identity("server").thumbprint,),
            service_options={"dispatcher": dispatcher},
        )
        self.context = client_context(identity("server"), Path(self.mktemp()).parent)

    def client(self) -> WireClient:
        return WireClient(agent_port(self.service), self.context)

    async def test_hundred_requests_on_one_connection(self) -> None:
        def run() -> list[str]:
            client = self.client()
            answers = []
            for i in range(100):
                if i:
                    client.next()
                response, streams = client.call(request("ITestService", "Echo", f"hello {i}"))
                assert response.error is None, response.error
                answers.append(response.result)
            client.end()
            return answers

        answers = await in_thread(run)
        self.assertEqual(answers, [f"hello {i}" for i in range(100)])
        self.assertEqual(len(self.logs.matching(event="client_authenticated")), 1)

    async def test_fifty_megabyte_stream_round_trip(self) -> None:
        size = 50 * 1024 * 1024
        ref = DataStream.fresh(size)

        def run() -> tuple[str, str, int]:
            client = self.client()
            response, _ = client.call(request("ITestService", "Digest", ref), {ref.id: pattern(size)})
            client.next()
            mirror_ref = DataStream.fresh(size)
            mirrored, streams = client.call(
                request("ITestService", "Mirror", mirror_ref), {mirror_ref.id: pattern(size)}
            )
            [stream] = streams
            digest = hashlib.sha1()
            for chunk in stream.sink.read_chunks():  # type: ignore[attr-defined]
                digest.update(chunk)
            stream.sink.discard()
            client.end()
            return str(response.result), digest.hexdigest(), stream.length

        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            digest, mirrored_digest, length = await in_thread(run)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(digest, pattern_sha1(size))
        self.assertEqual((mirrored_digest, length), (pattern_sha1(size), size))
        # Agent and client together, in this process: far below the 50 MB stream.
        self.assertLess(peak, 8 * 1024 * 1024)

    async def test_trailer_mismatch_closes_only_that_connection(self) -> None:
        ref = DataStream.fresh(1000)

        def bad() -> str:
            client = self.client()
            client.send_request(
                request("ITestService", "Digest", ref), {ref.id: [b"x" * 1000]}, trailer_override=999
            )
            try:
                client.read_response()
            except (ConnectionError, OSError) as e:
                return type(e).__name__
            return "answered"

        def good() -> str:
            client = self.client()
            response, _ = client.call(request("ITestService", "Echo", "still here"))
            client.end()
            return str(response.result)

        self.assertNotEqual(await in_thread(bad), "answered")
        self.assertTrue(
            [e for e in self.logs.events if "trailer" in str(e.get("why", ""))],
            "the protocol error is logged",
        )
        self.assertEqual(await in_thread(good), "still here")

    async def test_errors_keep_the_connection(self) -> None:
        def run() -> list[object]:
            client = self.client()
            first, _ = client.call(request("INoSuchService", "Echo", "x"))
            client.next()
            second, _ = client.call(request("ITestService", "Echo", "y"))
            client.end()
            return [first.error, second.result]

        error, result = await in_thread(run)
        self.assertEqual(error.halibut_error_type, "Halibut.Exceptions.ServiceNotFoundHalibutClientException")  # type: ignore[attr-defined]
        self.assertEqual(result, "y")
