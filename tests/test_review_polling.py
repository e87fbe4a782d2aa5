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
