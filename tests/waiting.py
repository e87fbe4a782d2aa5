"""
Waiting in tests without sleeping: on a Deferred, with a bound so that a
regression fails the test instead of hanging it, or on a condition that
has no event of its own (a file's size, another process's descriptors).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater


async def within(seconds: float, d: Deferred[Any], what: str) -> Any:
    """
    The result of C{d}; an C{AssertionError} naming C{what} if it has not
    fired within C{seconds}.
    """
    timer = reactor.callLater(seconds, d.cancel)
    try:
        return await d
    except CancelledError:
        raise AssertionError(f"{what}: not within {seconds} s") from None
    finally:
        if timer.active():
            timer.cancel()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0, step: float = 0.02) -> float:
    """
    Check C{condition} every C{step} seconds until it holds; how long that took.

    @raise AssertionError: it did not hold within C{timeout}.
    """
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(reactor, step, lambda: None)
    return time.monotonic() - started
