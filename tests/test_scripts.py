"""
The script runner's parts that need no process: the concurrency slots,
whose limit a running agent can change.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from tentacle.services.scripts import Slots


class SlotsTests(SynchronousTestCase):
    def test_no_limit(self) -> None:
        slots = Slots(None)
        self.assertTrue(all(slots.acquire().called for _ in range(100)))

    def test_first_come_first_served(self) -> None:
        slots = Slots(1)
        first, second, third = slots.acquire(), slots.acquire(), slots.acquire()
        self.assertEqual([first.called, second.called, third.called], [True, False, False])
        slots.release()
        self.assertEqual([second.called, third.called], [True, False])

    def test_raising_the_limit_admits_the_waiting_at_once(self) -> None:
        slots = Slots(1)
        waiting = [slots.acquire() for _ in range(4)]
        slots.limit = 3
        self.assertEqual([d.called for d in waiting], [True, True, True, False])
        slots.limit = None
        self.assertTrue(waiting[3].called)

    def test_lowering_the_limit_lets_running_scripts_finish(self) -> None:
        slots = Slots(3)
        running = [slots.acquire() for _ in range(3)]
        slots.limit = 1
        late = slots.acquire()
        self.assertTrue(all(d.called for d in running))
        slots.release()
        slots.release()
        self.assertFalse(late.called, "two still hold slots against a limit of one")
        slots.release()
        self.assertTrue(late.called)

    def test_cancelling_gives_up_the_place(self) -> None:
        slots = Slots(1)
        slots.acquire()
        given_up, next_one = slots.acquire(), slots.acquire()
        given_up.cancel()
        self.failureResultOf(given_up, CancelledError)
        slots.release()
        self.assertTrue(next_one.called)
