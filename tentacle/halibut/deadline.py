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
    L{cancel}led first.  Re-arming an active deadline moves it, so progress
    can push it back cheaply.
    """

    def __init__(self, clock: IReactorTime, on_expiry: Callable[[], None]) -> None:
        self._clock = clock
        self._on_expiry = on_expiry
        self._call: IDelayedCall | None = None

    def arm(self, seconds: float) -> None:
        if self._call is not None and self._call.active():
            self._call.reset(seconds)
        else:
            self._call = self._clock.callLater(seconds, self._expire)

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _expire(self) -> None:
        self._call = None
        self._on_expiry()
