"""
Defects found in review of the client, against a hostile agent over real
sockets: each test here failed on the code as it was.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import ClientError, Pin
from tentacle.contracts import tentacle_registry
from tentacle.halibut.connection import ExchangeSettings
from tentacle.halibut.rpc import CallContext, IRequestHandler
from tentacle.halibut.serializer import RequestMessage, ResponseMessage
from tentacle.listener import ListenerFactory, ListeningTLSFactory, halibut_sessions
from tentacle.tls import AgentTLSOptions
from tentacle.trust import TrustList
from tests.support import identity

Answer = Callable[[RequestMessage, CallContext], Any]


@implementer(IRequestHandler)
class _Hostile:
    """
    An agent that answers every request with C{answer(request, context)}.
    """

    def __init__(self, answer: Answer) -> None:
        self._answer = answer

    def sink_for(self, request: Any, stream: Any) -> None:
        return None

    def handle(self, request: RequestMessage, context: CallContext) -> Deferred[ResponseMessage]:
        return succeed(ResponseMessage(request.id, None, self._answer(request, context)))


def hostile_agent(case: TestCase, answer: Answer) -> int:
    factory = ListenerFactory(
        TrustList([identity("server").thumbprint]), reactor,
        session_factory=halibut_sessions(
            reactor, tentacle_registry(), ExchangeSettings(), handler_for=lambda accepted: _Hostile(answer)
        ),
    )
    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, ListeningTLSFactory(AgentTLSOptions(identity("agent")), factory, clock=reactor), interface="127.0.0.1"
    )
    case.addCleanup(port.stopListening)
    case.addCleanup(lambda: [c.transport.abortConnection() for c in factory.authenticated_connections])
    return int(port.getHost().port)


def payload(context: CallContext, data: bytes) -> Any:
    return context.send(len(data), lambda: io.BytesIO(data))


class HostileDownloadTests(TestCase):
    """
    C{download} when the agent answers with more or fewer data streams
    than the one file asked for: a client error, and nothing left beside
    the destination.
    """

    timeout = 20

    def client(self, answer: Answer) -> TentacleClient:
        port = hostile_agent(self, answer)
        client = TentacleClient(
            Target("127.0.0.1", port, Pin(identity("agent").thumbprint)), identity("server"), reactor, rpc_retry=None
        )
        self.addCleanup(client.close)
        return client

    async def check(self, answer: Answer) -> None:
        folder = Path(self.mktemp()).absolute()
        folder.mkdir()
        try:
            await self.client(answer).download("file", folder / "file")
        except Exception as e:
            error: Exception | None = e
        else:
            error = None
        self.assertEqual(sorted(p.name for p in folder.iterdir()), [], "nothing left in the folder")
        self.assertIsInstance(error, ClientError)

    async def test_two_streams(self) -> None:
        from tentacle.contracts import ScriptFile, ScriptIsolationLevel, StartScriptCommand

        def two(request: RequestMessage, context: CallContext) -> Any:
            # Any registered type that holds two streams will do.
            return StartScriptCommand(
                script_body="", isolation=ScriptIsolationLevel.NoIsolation,
                files=(ScriptFile("a", payload(context, b"one")), ScriptFile("b", payload(context, b"two"))),
            )

        await self.check(two)

    async def test_no_stream(self) -> None:
        await self.check(lambda request, context: "not a stream")


class CloseTests(TestCase):
    timeout = 20

    async def test_close_while_a_call_is_in_flight(self) -> None:
        """
        A connection whose call was still running when the client closed
        is retired when the call ends, not put back in the pool (where it
        stayed open, its nine-minute expiry timer armed, after close).
        """
        answer: Deferred[Any] = Deferred()
        asked: Deferred[None] = Deferred()

        @implementer(IRequestHandler)
        class Slow(_Hostile):
            def handle(self, request: RequestMessage, context: CallContext) -> Deferred[ResponseMessage]:
                asked.callback(None)
                return answer.addCallback(lambda _: ResponseMessage(request.id, None, "done"))

        factory = ListenerFactory(
            TrustList([identity("server").thumbprint]), reactor,
            session_factory=halibut_sessions(
                reactor, tentacle_registry(), ExchangeSettings(), handler_for=lambda accepted: Slow(lambda r, c: None)
            ),
        )
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            0, ListeningTLSFactory(AgentTLSOptions(identity("agent")), factory, clock=reactor), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client = TentacleClient(
            Target("127.0.0.1", port.getHost().port, Pin(identity("agent").thumbprint)), identity("server"), reactor,
            rpc_retry=None,
        )
        call = Deferred.fromCoroutine(client.call("IThingService", "Echo", "x"))
        await asked
        await client.close()
        answer.callback(None)
        self.assertEqual((await call)[0], "done")
        self.assertEqual(client._idle, [], "nothing pooled after close")
        for connection in list(factory.authenticated_connections):
            await connection._session.closed  # the agent sees the client retire it


class UnencodableCallTests(TestCase):
    timeout = 20

    async def test_a_call_that_cannot_be_encoded_keeps_its_connection_pooled(self) -> None:
        """
        Nothing was sent, so the checked connection is as good as before:
        it goes back to the pool (it was left open, owned by nobody, until
        the agent gave up on it).
        """
        port = hostile_agent(self, lambda request, context: "ok")
        client = TentacleClient(
            Target("127.0.0.1", port, Pin(identity("agent").thumbprint)), identity("server"), reactor, rpc_retry=None
        )
        self.addCleanup(client.close)
        with self.assertRaises(TypeError):
            await client.call("IThingService", "Echo", object())
        self.assertEqual(len(client._idle), 1, "the connection is pooled again")
        self.assertEqual((await client.call("IThingService", "Echo", "x"))[0], "ok")
