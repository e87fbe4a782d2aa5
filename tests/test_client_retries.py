"""
Which failed calls the client sends again, and when: Octopus Server's rules
(C{RpcCallRetryHandler}, C{ExceptionReturnedByHalibutProxyExtensionMethod}),
on a fake clock.

The agent here is a scripted polling server in this process (the client's
C{hub=} seam): each request takes the next scripted outcome.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tentacle.client.api import RemoteError, RpcRetryPolicy, Target, TentacleClient, retried
from tentacle.client.connection import AgentRefused, ConnectionFailed, RequestFailed, UnexpectedCertificate
from tentacle.contracts import CapabilitiesResponseV2, ProcessState, ScriptStatusResponse, ScriptTicket
from tentacle.dialer import ConnectionRefused, HostNotFound, ProxyRefused
from tentacle.halibut.connection import ConnectionClosed
from tentacle.halibut.failures import invocation_failure, method_not_found, service_not_found
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, ServerError
from tentacle.hub.queues import NotCollected
from tests.support import SUBSCRIPTION, LogCapture, identity

#: What Octopus Server cannot classify: sent again.
UNKNOWN = ServerError("The agent is busy", "The agent is busy")
#: A service method that threw: final.
INVOKED = invocation_failure(IsADirectoryError("/etc is a folder, not a file"))

Outcome = Any  # a result, a ServerError, an Exception, or a Deferred


class ScriptedHub:
    """
    A polling server in this process whose agent answers each request with
    the next scripted outcome (the last one repeats).
    """

    def __init__(self, clock: Clock, *outcomes: Outcome, by_method: Mapping[str, list[Outcome]] | None = None) -> None:
        self.clock = clock
        self.outcomes = list(outcomes)
        self.by_method = {k: list(v) for k, v in (by_method or {}).items()}
        self.requests: list[tuple[float, RequestMessage]] = []
        self.pending: list[Deferred[Any]] = []

    def times(self, method: str | None = None) -> list[float]:
        return [t for t, r in self.requests if method is None or r.method == method]

    def send(
        self,
        subscription: str,
        request: RequestMessage,
        payloads: Mapping[Any, Any] | None = None,
        pin: Callable[[Any], bool] | None = None,
    ) -> Deferred[tuple[ResponseMessage, list[Any]]]:
        self.requests.append((self.clock.seconds(), request))
        queue = self.by_method.get(request.method, self.outcomes)
        outcome = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(outcome, Deferred):
            self.pending.append(outcome)
            return outcome
        if isinstance(outcome, Exception):
            return fail(outcome)
        if isinstance(outcome, ServerError):
            return succeed((ResponseMessage(request.id, outcome), []))
        return succeed((ResponseMessage(request.id, None, outcome), []))


def hung() -> Deferred[Any]:
    return Deferred()


class RetryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.logs = LogCapture.install(self)

    def client(self, hub: ScriptedHub, **options: Any) -> TentacleClient:
        return TentacleClient(Target.polling(SUBSCRIPTION), identity("server"), self.clock, hub=hub, **options)

    def drive(self, call: Any, until: float = 400.0) -> Deferred[Any]:
        """
        Start the call, then let fake time pass a second at a time.
        """
        d = Deferred.fromCoroutine(call)
        while not d.called and self.clock.seconds() < until:
            self.clock.advance(1)
        return d

    def test_final_error_is_not_retried(self) -> None:
        hub = ScriptedHub(self.clock, INVOKED)
        failure = self.failureResultOf(self.drive(self.client(hub).capabilities()), RemoteError)
        self.assertEqual(str(failure.value), "/etc is a folder, not a file", "the agent's own message")
        self.assertEqual(hub.times(), [0.0])
        self.assertEqual(self.logs.matching(event="call_retried"), [])

    def test_unknown_service_and_method_are_not_retried(self) -> None:
        for error in (service_not_found("IThings"), method_not_found("Tests.IThings", "Do")):
            hub = ScriptedHub(self.clock, error)
            self.failureResultOf(self.drive(self.client(hub).call_idempotent("IThings", "Do")), RemoteError)
            self.assertEqual(len(hub.requests), 1, error.message)

    def test_unknown_error_is_retried_with_the_servers_backoff(self) -> None:
        hub = ScriptedHub(self.clock, UNKNOWN)
        failure = self.failureResultOf(self.drive(self.client(hub).capabilities()), RemoteError)
        self.assertEqual(failure.value.error, UNKNOWN)
        # min(n, 10) s before the n-th retry, while more than a second of
        # the 150 s window would be left after the wait.
        self.assertEqual(
            hub.times(),
            [0, 1, 3, 6, 10, 15, 21, 28, 36, 45, 55, 65, 75, 85, 95, 105, 115, 125, 135, 145],
        )
        self.assertEqual(len(self.logs.matching(event="call_retried")), 19)

    def test_retried_until_it_works(self) -> None:
        hub = ScriptedHub(self.clock, UNKNOWN, NotCollected("not collected"), CapabilitiesResponseV2(("IScriptServiceV2",)))
        result = self.successResultOf(self.drive(self.client(hub).capabilities()))
        self.assertEqual(result, ["IScriptServiceV2"])
        self.assertEqual(hub.times(), [0, 1, 3])

    def test_broken_connection_is_retried(self) -> None:
        hub = ScriptedHub(self.clock, ConnectionClosed("reset"), "done")
        result, _ = self.successResultOf(self.drive(self.client(hub).call_idempotent("IThings", "Do")))
        self.assertEqual(result, "done")
        self.assertEqual(hub.times(), [0, 1])

    def test_refused_connection_is_not_retried(self) -> None:
        for error in (ConnectionRefused("refused"), HostNotFound("no such host"), AgentRefused("distrusted")):
            hub = ScriptedHub(self.clock, error)
            self.failureResultOf(self.drive(self.client(hub).call_idempotent("IThings", "Do")), type(error))
            self.assertEqual(len(hub.requests), 1, str(error))

    def test_a_retry_still_running_when_the_window_closes_is_cut_off(self) -> None:
        """
        The call then fails with the error that caused the retries.
        """
        hub = ScriptedHub(self.clock, UNKNOWN, hung())
        d = self.drive(self.client(hub).call_idempotent("IThings", "Do"))
        failure = self.failureResultOf(d, RemoteError)
        self.assertEqual(failure.value.error, UNKNOWN)
        self.assertEqual(hub.times(), [0, 1])
        self.assertEqual(self.clock.seconds(), 150.0)
        self.assertTrue(hub.pending[0].called, "the retry was cancelled")

    def test_a_transfer_retry_may_outlast_the_window(self) -> None:
        late: Deferred[Any] = Deferred()
        hub = ScriptedHub(self.clock, UNKNOWN, late)
        d = self.drive(self.client(hub).call_idempotent("IThings", "Do", long_running=True), until=200)
        self.assertNoResult(d)
        late.callback((ResponseMessage("x", None, "stored"), []))
        self.assertEqual(self.successResultOf(d)[0], "stored")

    def test_the_first_attempt_is_never_cut_off(self) -> None:
        slow: Deferred[Any] = Deferred()
        hub = ScriptedHub(self.clock, slow)
        d = self.drive(self.client(hub).call_idempotent("IThings", "Do"), until=300)
        self.assertNoResult(d)
        slow.callback((ResponseMessage("x", None, "late"), []))
        self.assertEqual(self.successResultOf(d)[0], "late")

    def test_cancelled_while_waiting_to_retry(self) -> None:
        hub = ScriptedHub(self.clock, UNKNOWN)
        d = Deferred.fromCoroutine(self.client(hub).call_idempotent("IThings", "Do"))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(hub.requests), 1)

    def test_no_rpc_retries(self) -> None:
        hub = ScriptedHub(self.clock, UNKNOWN)
        self.failureResultOf(self.drive(self.client(hub, rpc_retry=None).capabilities()), RemoteError)
        self.assertEqual(len(hub.requests), 1)

    def test_own_window_and_backoff(self) -> None:
        hub = ScriptedHub(self.clock, UNKNOWN)
        policy = RpcRetryPolicy(window=10.0, backoff=lambda n: 2.0, min_remaining=0.0)
        self.failureResultOf(self.drive(self.client(hub, rpc_retry=policy).capabilities()), RemoteError)
        self.assertEqual(hub.times(), [0, 2, 4, 6, 8])

    def test_v1_start_script_is_never_sent_twice(self) -> None:
        hub = ScriptedHub(
            self.clock,
            by_method={
                "GetCapabilities": [CapabilitiesResponseV2(("IScriptService", "IFileTransferService"))],
                "StartScript": [UNKNOWN],
            },
        )
        self.failureResultOf(self.drive(self.client(hub).run_script("echo hi")), RemoteError)
        self.assertEqual(len(hub.times("StartScript")), 1)
        self.assertEqual(hub.requests[-1][1].service, "IScriptService")

    def test_v1_status_is_retried(self) -> None:
        ticket = ScriptTicket("t")
        done = ScriptStatusResponse(ticket=ticket, logs=(), next_log_sequence=0, state=ProcessState.Complete, exit_code=0)
        hub = ScriptedHub(
            self.clock,
            by_method={
                "GetCapabilities": [CapabilitiesResponseV2(("IScriptService",))],
                "StartScript": [ticket],
                "GetStatus": [ConnectionClosed("reset"), done],
                "CompleteScript": [done],
            },
        )
        self.assertEqual(self.successResultOf(self.drive(self.client(hub).run_script("exit 0"))), 0)
        self.assertEqual(hub.times("GetStatus"), [0, 1])


class RetriedTests(SynchronousTestCase):
    """
    L{retried}: what Octopus Server would send again.
    """

    def test_remote_errors_as_the_server_classifies_them(self) -> None:
        self.assertTrue(retried(RemoteError(UNKNOWN)))
        self.assertFalse(retried(RemoteError(INVOKED)))
        self.assertFalse(retried(RemoteError(service_not_found("X"))))

    def test_connection_failures(self) -> None:
        self.assertTrue(retried(RequestFailed("reset mid-call")))
        self.assertTrue(retried(ConnectionFailed("timed out")))
        self.assertTrue(retried(NotCollected("no agent took it")))
        for final in (
            ConnectionRefused("refused"), HostNotFound("x"), ProxyRefused("407"),
            UnexpectedCertificate("impostor"), AgentRefused("distrusted"),
        ):
            self.assertFalse(retried(final), type(final).__name__)

    def test_other_errors(self) -> None:
        self.assertFalse(retried(ValueError("a bug")))
