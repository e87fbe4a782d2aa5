"""
A polling server's pending requests: one FIFO per subscription, served by
every connection of that subscription (an agent opens 1..512).

A request no connection collects within the collect timeout (2 min, as
Halibut) fails with Halibut's "did not collect the request within the
allowed time"; cancelling a request still queued takes it off the queue;
cancelling one in flight drops the connection carrying it (there is no
cancel on the wire).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer

from tentacle.dialer import ConnectionFailed, DialError
from tentacle.halibut.rpc import IRequestSource, PayloadOpener, PendingRequest
from tentacle.halibut.serializer import RequestMessage

#: Halibut's PollingRequestQueueTimeout.
DEFAULT_COLLECT_TIMEOUT = 120.0


class NotCollected(ConnectionFailed):
    """
    No polling connection took the request within the collect timeout: the
    agent never saw it, so it is safe to send again.
    """


class WrongAgent(DialError):
    """
    The agent that took the request presented a certificate other than the
    pinned one; the request was not sent to it.
    """


def _timespan(seconds: float) -> str:
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class PendingRequestQueue:
    """
    The requests waiting for one subscription, oldest first, and the
    connections waiting for them.
    """

    def __init__(
        self,
        subscription: str,
        clock: IReactorTime,
        collect_timeout: float,
        on_collected: Callable[[float], None] | None = None,
        on_idle: Callable[[PendingRequestQueue], None] | None = None,
    ) -> None:
        """
        @param on_collected: told each request's wait from queueing to
            collection, in seconds (for metrics).
        @param on_idle: told when the queue holds nothing and nobody waits
            on it, so it can be dropped (any name may be asked for).
        """
        self.subscription = subscription
        self._clock = clock
        self._collect_timeout = collect_timeout
        self._on_collected = on_collected
        self._on_idle = on_idle
        self._pending: collections.deque[tuple[PendingRequest, IDelayedCall, float]] = collections.deque()
        self._takers: collections.deque[tuple[Deferred[PendingRequest | None], Any]] = collections.deque()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def waiting_connections(self) -> int:
        return len(self._takers)

    def put(
        self,
        request: RequestMessage,
        payloads: Mapping[Any, PayloadOpener] | None = None,
        accepts: Callable[[Any], bool] | None = None,
    ) -> PendingRequest:
        """
        Queue a request; its C{outcome} fires with the response and its
        streams, or fails (L{NotCollected}, a broken connection, or
        L{CancelledError} when cancelled).

        @param accepts: whether a connection's peer may take it (a pin).
        """
        pending = PendingRequest(request, payloads or {}, Deferred(lambda d: self._cancel(pending)), accepts)
        timer = self._clock.callLater(self._collect_timeout, self._expire, pending)
        self._pending.append((pending, timer, self._clock.seconds()))
        self._hand_out()
        return pending

    def take(self, wait: float, peer: Any = None) -> Deferred[PendingRequest | None]:
        """
        The oldest request, taken off the queue; or C{None} after C{wait}
        seconds with none.  Cancelling the wait leaves the queue as it was.
        """
        taker: Deferred[PendingRequest | None] = Deferred(self._withdraw)
        timer = self._clock.callLater(wait, self._keep_alive, taker)
        taker.addBoth(_cancel_timer, timer)
        self._takers.append((taker, peer))
        self._hand_out()
        return taker

    def _hand_out(self) -> None:
        while self._pending and self._takers:
            taker, peer = self._takers.popleft()
            pending, timer, queued = self._pending.popleft()
            timer.cancel()
            if pending.accepts is not None and not pending.accepts(peer):
                self._takers.appendleft((taker, peer))
                pending.outcome.errback(
                    WrongAgent(
                        f"the agent polling as {self.subscription} presented "
                        f"{getattr(peer, 'thumbprint', peer)}, not the pinned certificate"
                    )
                )
                continue
            waited = self._clock.seconds() - queued
            if self._on_collected is not None:
                self._on_collected(waited)
            taker.callback(pending)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._pending and not self._takers and self._on_idle is not None:
            self._on_idle(self)

    def _keep_alive(self, taker: Deferred[PendingRequest | None]) -> None:
        if self._forget(taker):
            taker.callback(None)

    def _withdraw(self, taker: Deferred[PendingRequest | None]) -> None:
        self._forget(taker)

    def _forget(self, taker: Deferred[PendingRequest | None]) -> bool:
        for entry in self._takers:
            if entry[0] is taker:
                self._takers.remove(entry)
                self._check_idle()
                return True
        return False

    def _expire(self, pending: PendingRequest) -> None:
        for entry in self._pending:
            if entry[0] is pending:
                self._pending.remove(entry)
                break
        self._check_idle()
        pending.outcome.errback(
            NotCollected(
                "A request was sent to a polling endpoint, but the polling endpoint did not collect "
                f"the request within the allowed time ({_timespan(self._collect_timeout)}), "
                "so the request timed out."
            )
        )

    def _cancel(self, pending: PendingRequest) -> None:
        for entry in self._pending:
            if entry[0] is pending:
                self._pending.remove(entry)
                entry[1].cancel()
                self._check_idle()
                return
        if pending.connection is not None:
            # In flight: there is no cancel on the wire; dropping the
            # connection is how Halibut cancels it.  The caller hears of the
            # cancel first, not of the connection it broke (which a client
            # would take for a network failure, and send the call again).
            if not pending.outcome.called:
                pending.outcome.errback(CancelledError())
            pending.connection.abort()


def _cancel_timer(result: object, timer: IDelayedCall) -> object:
    if timer.active():
        timer.cancel()
    return result


@implementer(IRequestSource)
class PollingQueues:
    """
    Every subscription's queue, made on first use.
    """

    def __init__(
        self,
        clock: IReactorTime,
        collect_timeout: float = DEFAULT_COLLECT_TIMEOUT,
        on_collected: Callable[[float], None] | None = None,
    ) -> None:
        self._clock = clock
        self._collect_timeout = collect_timeout
        self._on_collected = on_collected
        self._queues: dict[str, PendingRequestQueue] = {}

    def queue(self, subscription: str) -> PendingRequestQueue:
        queue = self._queues.get(subscription)
        if queue is None:
            queue = self._queues[subscription] = PendingRequestQueue(
                subscription, self._clock, self._collect_timeout, self._on_collected, self._drop
            )
        return queue

    def _drop(self, queue: PendingRequestQueue) -> None:
        if self._queues.get(queue.subscription) is queue:
            del self._queues[queue.subscription]

    def queues(self) -> dict[str, PendingRequestQueue]:
        return dict(self._queues)

    def next_request(self, subscription: str, wait: float, peer: Any = None) -> Deferred[PendingRequest | None]:
        return self.queue(subscription).take(wait, peer)


__all__ = ["DEFAULT_COLLECT_TIMEOUT", "NotCollected", "PendingRequestQueue", "PollingQueues", "WrongAgent"]
