"""
A restartable deadline on an injected clock: the one timer pattern the
listener and every Halibut connection need.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """
    Calls C{on_expiry} once, C{seconds} after the last L{arm}, unless
    L{pause}d or L{cancel}led first.

    A connection arms a deadline for every unit it reads and lets it go
    when the unit arrives, thousands of times a second on a busy
    connection, nearly always long before it is due.  So the timer is
    moved lazily: arming only notes the new due time while the timer
    already set would go off no later, and pausing only forgets the due
    time; a timer that goes off early sets itself again for what is left,
    and one that finds nothing due does nothing.  In the steady state a
    request costs no timer at all.  Only arming for sooner than the timer
    set replaces it.

    @ivar due: when the deadline expires (by C{clock.seconds()}), or
        C{None} while it is not armed.
    """

    def __init__(self, clock: IReactorTime, on_expiry: Callable[[], None]) -> None:
        self._clock = clock
        self._on_expiry = on_expiry
        self._call: IDelayedCall | None = None
        self.due: float | None = None

    @property
    def armed(self) -> bool:
        return self.due is not None

    def arm(self, seconds: float) -> None:
        """
        Expire C{seconds} from now (replacing any earlier arming).
        """
        due = self._clock.seconds() + seconds
        self.due = due
        call = self._call
        if call is not None:
            if call.getTime() <= due:
                return  # it goes off in time, and sets itself again for the rest
            call.cancel()
        self._call = self._clock.callLater(seconds, self._expire)

    def pause(self) -> None:
        """
        Stop the deadline, cheaply: the timer stays set (and goes off
        harmlessly) for the next L{arm} to reuse.  Use L{cancel} when the
        owner is done with the deadline for good.
        """
        self.due = None

    def cancel(self) -> None:
        """
        Stop the deadline and drop its timer, so the clock holds no
        reference to the owner.
        """
        self.due = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _expire(self) -> None:
        self._call = None
        due = self.due
        if due is None:
            return
        now = self._clock.seconds()
        if now < due:
            self._call = self._clock.callLater(due - now, self._expire)
            return
        self.due = None
        self._on_expiry()
