"""
Defects found in review of the polling side (hostile-reviewer tests): each
test here failed on the code as it was.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.roles import ServerOfSubscriber
from tentacle.hub.queues import PollingQueues
from tests.support import LogCapture
from tests.test_polling_roles import SUBSCRIPTION, Wire
from tests.wire_client import request


class CancelInFlightTests(SynchronousTestCase):
    """
    Cancelling a request a polling connection has taken drops that
    connection; the caller must still see L{CancelledError}, not the broken
    connection (which a client takes for a network failure and sends the
    request again: the cancel would be lost).
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.clock = Clock()
        self.queues = PollingQueues(self.clock)
        self.wire = Wire(ServerOfSubscriber(self.queues, SUBSCRIPTION), self.clock)

    def test_cancel_in_flight_is_a_cancel(self) -> None:
        pending = self.queues.queue(SUBSCRIPTION).put(request("IThingService", "Echo", "x"))
        self.assertTrue(self.wire.take(), "the request was sent")
        pending.outcome.cancel()
        self.assertTrue(self.wire.closed, "the connection carrying it is dropped")
        self.failureResultOf(pending.outcome, CancelledError)

    def test_a_client_cancelling_a_polled_call_is_not_retried(self) -> None:
        """
        Through a polling server in this process: cancelling a call that is
        on an agent's connection ends the call; it is not sent again.
        """
        from twisted.internet.defer import Deferred

        from tentacle.client.api import Target, TentacleClient
        from tentacle.hub.polling_server import PollingServer
        from tests.support import identity

        server = PollingServer(identity("hub"), [], self.clock)
        wire = Wire(ServerOfSubscriber(server.queues, SUBSCRIPTION), self.clock)
        client = TentacleClient(Target.polling(SUBSCRIPTION), identity("server"), self.clock, hub=server)
        call = Deferred.fromCoroutine(client.call_idempotent("ICapabilitiesServiceV2", "GetCapabilities"))
        self.assertTrue(wire.take(), "the agent's connection took the request")
        call.cancel()
        self.failureResultOf(call, CancelledError)
        self.clock.advance(10)
        self.assertEqual(len(server.queues.queue(SUBSCRIPTION)), 0, "nothing was queued again")


class DialDeadlineTests(SynchronousTestCase):
    """
    A dialled connection whose TLS handshake never completes (a peer, or a
    middlebox, that takes the TCP connection and says nothing) must not
    hold its dialler for ever: Halibut's timeouts apply during the
    handshake too (TimeoutsApplyDuringHandShake).
    """

    def test_a_handshake_that_never_completes_is_dropped(self) -> None:
        from twisted.internet.testing import StringTransport

        from tentacle.contracts import tentacle_registry
        from tentacle.dialer import ConnectionFailed, Pin, PinnedConnection
        from tentacle.halibut.connection import ExchangeSettings

        clock = Clock()

        async def role(connection: Any) -> None:
            raise AssertionError("the role must not start")

        connection = PinnedConnection(
            Pin("A" * 40), role, clock, tentacle_registry(), ExchangeSettings(heartbeat_timeout=60.0)
        )
        transport = StringTransport()
        connection.makeConnection(transport)  # TCP is up; TLS is under way
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting, "a silent handshake is given up on")
        connection.connectionLost()
        self.failureResultOf(connection.pinned, ConnectionFailed)
        self.assertEqual(clock.getDelayedCalls(), [])


    def test_cancelling_a_dial_drops_the_connection(self) -> None:
        """
        A caller that gives up on a dial while TLS is under way (a client's
        call cancelled, a retry window closing) must not leave the
        connection behind: when the handshake then completed, the pin's
        Deferred was fired a second time (AlreadyCalledError inside the TLS
        protocol) and the connection stayed open, owned by nobody.
        """
        from OpenSSL import crypto
        from twisted.internet.defer import CancelledError
        from twisted.internet.testing import StringTransport

        from tentacle.contracts import tentacle_registry
        from tentacle.dialer import Pin, PinnedConnection
        from tentacle.halibut.connection import ExchangeSettings
        from tests.support import identity

        class TLSTransport(StringTransport):
            def getPeerCertificate(self) -> Any:
                return crypto.X509.from_cryptography(identity("agent").certificate)

            def getHandle(self) -> None:
                return None

        started: list[bool] = []

        async def role(connection: Any) -> None:
            started.append(True)

        connection = PinnedConnection(
            Pin(identity("agent").thumbprint), role, Clock(), tentacle_registry(), ExchangeSettings()
        )
        transport = TLSTransport()
        connection.makeConnection(transport)
        connection.pinned.cancel()
        self.failureResultOf(connection.pinned, CancelledError)
        self.assertTrue(transport.disconnecting, "the abandoned connection is dropped")
        connection.handshakeCompleted()  # as if the handshake had been in flight
        self.assertEqual(started, [])


class PollingServiceApplyTests(SynchronousTestCase):
    """
    C{PollingService.apply} with entries a hand-edited C{tentacle.json}
    may hold.
    """

    def test_two_subscriptions_on_one_server(self) -> None:
        """
        Two entries for the same address (two subscriptions, or two
        thumbprints while a certificate is replaced) are both polled;
        the configuration is valid, so applying it must not raise.
        """
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import Logger

        from tentacle.config import PolledServer
        from tentacle.contracts import tentacle_registry
        from tentacle.dispatch import Dispatcher
        from tentacle.halibut.connection import ExchangeSettings
        from tentacle.polling import PollingService
        from tests.support import identity

        reactor = MemoryReactorClock()
        service = PollingService(
            identity("agent"), lambda server, address: Dispatcher(), reactor, tentacle_registry(),
            ExchangeSettings(), Logger(), lambda server: server.connections,
        )
        first = PolledServer("octopus.example.com", "A" * 40, "poll://aaaaaaaaaaaaaaaaaaaa/")
        second = PolledServer("octopus.example.com", "A" * 40, "poll://bbbbbbbbbbbbbbbbbbbb/")
        service.apply((first, second))
        self.assertEqual(sorted(c for _, _, c in service.status()), [1, 1])


class PollingLoopTests(SynchronousTestCase):
    """
    A polling connection's loop must outlive any one failed attempt.
    """

    def test_a_host_name_the_proxy_request_cannot_carry(self) -> None:
        """
        A non-ASCII (IDN) server name, which the configuration accepts,
        through a proxy: the CONNECT line could not be encoded, the error
        escaped the loop, and that connection never dialled again (nor
        said why, but for an unhandled-error trace at garbage collection).
        """
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import Logger

        from tentacle.config import PolledServer
        from tentacle.contracts import tentacle_registry
        from tentacle.dispatch import Dispatcher
        from tentacle.halibut.connection import ExchangeSettings
        from tentacle.polling import PollingConnection
        from tests.support import identity

        reactor = MemoryReactorClock()
        server = PolledServer(
            "b\u00fccher.example", "A" * 40, "poll://aaaaaaaaaaaaaaaaaaaa/", proxy="http://127.0.0.1:3128"
        )
        connection = PollingConnection(
            server, 1, identity("agent"), lambda s, a: Dispatcher(), reactor, tentacle_registry(),
            ExchangeSettings(), Logger(),
        )
        connection.startService()
        self.addCleanup(connection.stopService)
        self.assertEqual(len(reactor.tcpClients), 1, "it dialled the proxy")
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 3128))

    def test_the_loop_outlives_an_unexpected_error(self) -> None:
        """
        A name that cannot be written even in IDNA (a 64-character label):
        each attempt fails, is logged, and the connection tries again later.
        """
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import Logger

        from tentacle.config import PolledServer
        from tentacle.contracts import tentacle_registry
        from tentacle.dispatch import Dispatcher
        from tentacle.halibut.connection import ExchangeSettings
        from tentacle.polling import PollingConnection
        from tests.support import identity

        logs = LogCapture.install(self)
        reactor = MemoryReactorClock()
        server = PolledServer(
            "\u00fc" * 64 + ".example", "A" * 40, "poll://aaaaaaaaaaaaaaaaaaaa/", proxy="http://127.0.0.1:3128"
        )
        connection = PollingConnection(
            server, 1, identity("agent"), lambda s, a: Dispatcher(), reactor, tentacle_registry(),
            ExchangeSettings(), Logger(),
        )
        connection.startService()
        self.addCleanup(connection.stopService)
        reactor.advance(10)
        failures = [e for e in logs.events if "log_failure" in e]
        self.assertEqual(len(failures), 2, "tried, then tried again")
        self.flushLoggedErrors(UnicodeError)
