"""
Defects found in review of the polling server and the hub (hostile-reviewer
tests): each test here failed on the code as it was.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.handshake import IdentityKind, RemoteIdentity
from tentacle.hub.polling_server import PollingServer
from tentacle.listener import Accepted
from tentacle.trust import PeerIdentity
from tests.support import LogCapture, identity
from tests.wire_client import request

SUBSCRIPTION = "poll://boundsubscription/"


def peer(name: str) -> PeerIdentity:
    return PeerIdentity.from_certificate(identity(name).certificate)


def subscriber(name: str, subscription: str = SUBSCRIPTION) -> Accepted:
    return Accepted(peer(name), RemoteIdentity(IdentityKind.SUBSCRIBER, "1.0", subscription), "192.0.2.1:5000")


class BindingTests(SynchronousTestCase):
    """
    A bound subscription may be claimed by its bound agents only.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.clock = Clock()

    def server(self, **options: Any) -> PollingServer:
        return PollingServer(
            identity("hub"), [identity("agent").thumbprint, identity("rogue").thumbprint], self.clock, **options
        )

    def test_bindings_are_keyed_as_subscriptions_are(self) -> None:
        """
        A binding given as the docs' C{poll://ID/} in another case, or
        without its final slash, still binds the subscription agents
        announce (normalised: lower case, with the slash).  It used to be
        silently ignored: any trusted agent could claim it.
        """
        for written in ("poll://BoundSubscription/", "poll://boundsubscription"):
            server = self.server(bindings={written: [identity("agent").thumbprint]})
            self.assertIsNone(server._source_for(subscriber("rogue")), written)
            self.assertIsNotNone(server._source_for(subscriber("agent")), written)

    def test_binding_cuts_an_agent_already_claiming(self) -> None:
        """
        Binding a subscription that another trusted agent holds already
        (the reason to bind it) cuts that agent off: it must not go on
        taking the subscription's requests.
        """
        server = self.server()
        connection = server.factory.session_factory(subscriber("rogue"))  # type: ignore[misc]
        transport = StringTransport()
        connection.makeConnection(transport)
        server.bind(SUBSCRIPTION, identity("agent").thumbprint)
        pending = server.queues.queue(SUBSCRIPTION).put(request("IThingService", "Echo", "secret"))
        self.assertEqual(transport.value(), b"", "the request was not sent to the rogue agent")
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(pending.outcome)
        pending.outcome.cancel()
        self.failureResultOf(pending.outcome)

    def test_a_reloaded_binding_cuts_an_agent_already_claiming(self) -> None:
        """
        The same through the hub's C{hub.json}: a reload that binds a
        subscription cuts the other agents polling it.
        """
        from pathlib import Path

        from tentacle.hub.config import HubConfig, HubConfigFile
        from tentacle.hub.service import HubService

        home = Path(self.mktemp()).absolute()
        home.mkdir()
        config_file = HubConfigFile(home)
        config = HubConfig(home, agents=(identity("agent").thumbprint, identity("rogue").thumbprint))
        config_file.save(config)
        hub = HubService(config, self.clock, identity=identity("hub"), config_file=config_file)
        connection = hub.server.factory.session_factory(subscriber("rogue"))  # type: ignore[misc]
        transport = StringTransport()
        connection.makeConnection(transport)
        config_file.save(config.bind(SUBSCRIPTION, identity("agent").thumbprint))
        hub.reload()
        self.assertTrue(transport.disconnecting)


class ManyStreamsTests(SynchronousTestCase):
    """
    A hostile agent's answer that declares many small data streams: each
    that spills would hold a descriptor, so a message may declare at most
    C{CodecLimits.max_streams} (256).
    """

    def test_descriptors_stay_bounded(self) -> None:
        import os

        from tentacle.contracts import ScriptFile, ScriptIsolationLevel, StartScriptCommand
        from tentacle.halibut.connection import ExchangeSettings
        from tentacle.halibut.errors import CodecLimits
        from tentacle.halibut.roles import ServerOfSubscriber
        from tentacle.halibut.serializer import DataStream, ResponseMessage
        from tentacle.halibut.streams import stream_header, stream_trailer
        from tentacle.hub.queues import PollingQueues
        from tests.test_polling_roles import Wire, envelope

        clock = Clock()
        queues = PollingQueues(clock)
        limits = CodecLimits(max_stream_memory_bytes=1024, max_streams_memory_bytes=1024)
        wire = Wire(ServerOfSubscriber(queues, SUBSCRIPTION), clock, ExchangeSettings(limits=limits))
        asked = request("IThingService", "Echo", "x")
        pending = queues.queue(SUBSCRIPTION).put(asked)
        wire.take()
        streams = [DataStream.fresh(16) for _ in range(300)]
        result = StartScriptCommand(
            script_body="", isolation=ScriptIsolationLevel.NoIsolation,
            files=tuple(ScriptFile(str(n), s) for n, s in enumerate(streams)),
        )
        before = len(os.listdir("/proc/self/fd"))
        data = envelope(ResponseMessage(asked.id, None, result))
        for stream in streams[:-1]:  # the last one is still to come
            data += stream_header(stream.id, 16) + b"x" * 16 + stream_trailer(16)
        wire.send(data)
        held = len(os.listdir("/proc/self/fd")) - before
        wire.connection.abort()
        self.assertLess(held, 32, "descriptors held by one answer")
        failure = self.failureResultOf(pending.outcome)
        self.assertIn("declares 300 data streams, more than 256", failure.getErrorMessage())
