"""
Script isolation: named reader/writer mutexes, one registry per agent.

Tentacle lets a script ask to run alone on the machine (FullIsolation, the
writer side) or alongside other such scripts (NoIsolation, the reader side)
under a mutex name, "RunningScript" unless the task names another.  The
locks live in the agent process only; they are not OS mutexes.

Waiters are served strictly in arrival order.  A writer that is waiting
therefore holds back every reader that came after it, so a stream of
overlapping readers cannot starve it.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, ClassVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


class IsolationTimeout(Exception):
    """
    The mutex was not granted within the timeout the script asked for.
    """


@attrs.define(eq=False)
class Lease:
    """
    A granted hold on a named mutex, until L{release}.
    """

    name: str
    owner: str
    exclusive: bool
    _mutexes: IsolationMutexes = attrs.field(repr=False)
    _released: bool = attrs.field(init=False, default=False, repr=False)

    def release(self) -> None:
        """
        Let the next waiters in.  Releasing twice does nothing, so a finally
        block and a cancel path may both call it.
        """
        if self._released:
            return
        self._released = True
        self._mutexes._release(self)


@attrs.define(eq=False)
class _Waiter:
    owner: str
    exclusive: bool
    deferred: Deferred[Lease]
    timer: IDelayedCall | None = None


@attrs.define(eq=False)
class _Mutex:
    held: list[Lease] = attrs.field(factory=list)
    waiting: deque[_Waiter] = attrs.field(factory=deque)

    def grantable(self, exclusive: bool) -> bool:
        if exclusive:
            return not self.held
        return not any(lease.exclusive for lease in self.held)


@attrs.define(eq=False)
class IsolationMutexes:
    """
    The named mutexes of one agent.  Names are compared exactly as given.

    @param clock: schedules acquisition timeouts.
    """

    log: ClassVar[Logger] = Logger()

    _clock: IReactorTime
    _mutexes: dict[str, _Mutex] = attrs.field(init=False, factory=dict)

    def acquire(
        self,
        name: str,
        exclusive: bool,
        owner: str,
        timeout: float | None,
        on_wait: Callable[[str], None] | None = None,
    ) -> Deferred[Lease]:
        """
        Hold the mutex C{name}: alone if C{exclusive}, else shared with other
        non-exclusive holders.

        @param owner: who asks (a task id), shown to those who wait for it.
        @param timeout: seconds to wait at most; C{None} waits for ever.
        @param on_wait: when the mutex cannot be had at once, called once,
            before waiting, with the owners holding it (comma separated).
        @return: fires with the L{Lease}, or fails with L{IsolationTimeout}.
            Cancelling it gives up the place in the queue at once.
        """
        mutex = self._mutexes.setdefault(name, _Mutex())
        if not mutex.waiting and mutex.grantable(exclusive):
            return succeed(self._grant(name, mutex, owner, exclusive))

        blockers = [lease.owner for lease in mutex.held] or [w.owner for w in mutex.waiting]
        holders = ", ".join(blockers)

        def cancelled(d: Deferred[Lease]) -> None:
            self._withdraw(name, waiter)

        waiter = _Waiter(owner, exclusive, Deferred(cancelled))
        mutex.waiting.append(waiter)
        self.log.info(
            "{owner} waits for the {name} mutex held by {holders}",
            owner=owner,
            name=name,
            holders=holders,
            exclusive=exclusive,
        )
        if timeout is not None:
            waiter.timer = self._clock.callLater(
                max(timeout, 0), self._expire, name, waiter, timeout
            )
        if on_wait is not None:
            try:
                on_wait(holders)
            except Exception:
                # The waiter is queued already; the caller must still get
                # its Deferred, or the place in the queue would leak.
                self.log.failure("on_wait callback failed for {owner}", owner=owner)
        return waiter.deferred

    def holders(self, name: str) -> list[str]:
        """
        The owners holding C{name} now, in the order they were granted it.
        """
        mutex = self._mutexes.get(name)
        return [] if mutex is None else [lease.owner for lease in mutex.held]

    def _grant(self, name: str, mutex: _Mutex, owner: str, exclusive: bool) -> Lease:
        lease = Lease(name, owner, exclusive, self)
        mutex.held.append(lease)
        self.log.debug(
            "{owner} holds the {name} mutex", owner=owner, name=name, exclusive=exclusive
        )
        return lease

    def _release(self, lease: Lease) -> None:
        mutex = self._mutexes.get(lease.name)
        if mutex is None or lease not in mutex.held:
            return
        mutex.held.remove(lease)
        self.log.debug("{owner} released the {name} mutex", owner=lease.owner, name=lease.name)
        self._wake(lease.name)

    def _withdraw(self, name: str, waiter: _Waiter) -> None:
        """
        Take a waiter out of the queue: a writer at its head may have been
        all that held back the readers behind it.
        """
        mutex = self._mutexes.get(name)
        if mutex is None or waiter not in mutex.waiting:
            return
        mutex.waiting.remove(waiter)
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        waiter.timer = None
        self._wake(name)

    def _expire(self, name: str, waiter: _Waiter, timeout: float) -> None:
        waiter.timer = None
        holders = ", ".join(self.holders(name))
        self._withdraw(name, waiter)
        self.log.info(
            "{owner} gave up waiting for the {name} mutex after {timeout} s",
            owner=waiter.owner,
            name=name,
            timeout=timeout,
            holders=holders,
        )
        waiter.deferred.errback(
            IsolationTimeout(
                f"Timed out after {timeout} s waiting for the {name!r} mutex"
                f" held by {holders or 'nobody'}"
            )
        )

    def _wake(self, name: str) -> None:
        """
        Grant the mutex to waiters from the head of the queue for as long as
        they fit; the first that does not fit stops everyone behind it.
        """
        mutex = self._mutexes.get(name)
        if mutex is None:
            return
        granted: list[tuple[_Waiter, Lease]] = []
        while mutex.waiting and mutex.grantable(mutex.waiting[0].exclusive):
            waiter = mutex.waiting.popleft()
            if waiter.timer is not None and waiter.timer.active():
                waiter.timer.cancel()
            waiter.timer = None
            granted.append((waiter, self._grant(name, mutex, waiter.owner, waiter.exclusive)))
        if not mutex.held and not mutex.waiting:
            del self._mutexes[name]
        # State is settled before any callback runs, so one that releases or
        # acquires again at once sees a consistent registry.
        for waiter, lease in granted:
            waiter.deferred.callback(lease)
