"""
Tests for L{tentacle.workers.isolation}: who may hold a named mutex, in
which order waiters get it, and how waiting ends.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tentacle.workers.isolation import IsolationMutexes, IsolationTimeout, Lease

NAME = "RunningScript"


class IsolationMutexesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.mutexes = IsolationMutexes(self.clock)

    def acquire(
        self, owner: str, exclusive: bool, timeout: float | None = None, name: str = NAME
    ) -> Deferred[Lease]:
        return self.mutexes.acquire(name, exclusive, owner, timeout)

    def granted(self, d: Deferred[Lease]) -> Lease:
        lease = self.successResultOf(d)
        self.assertIsInstance(lease, Lease)
        return lease

    def test_exclusive_blocks_exclusive(self) -> None:
        first = self.granted(self.acquire("T-1", True))
        second = self.acquire("T-2", True)
        self.assertNoResult(second)
        first.release()
        self.assertEqual(self.granted(second).owner, "T-2")
        self.assertEqual(self.mutexes.holders(NAME), ["T-2"])

    def test_shared_overlaps_shared(self) -> None:
        self.granted(self.acquire("T-1", False))
        self.granted(self.acquire("T-2", False))
        self.assertEqual(self.mutexes.holders(NAME), ["T-1", "T-2"])

    def test_writer_waits_for_all_readers(self) -> None:
        one = self.granted(self.acquire("T-1", False))
        two = self.granted(self.acquire("T-2", False))
        writer = self.acquire("T-3", True)
        one.release()
        self.assertNoResult(writer)
        two.release()
        self.assertEqual(self.granted(writer).owner, "T-3")

    def test_writer_blocks_readers(self) -> None:
        writer = self.granted(self.acquire("T-1", True))
        reader = self.acquire("T-2", False)
        self.assertNoResult(reader)
        writer.release()
        self.granted(reader)

    def test_waiting_writer_blocks_later_readers(self) -> None:
        """
        A reader that could share with the current readers still queues
        behind a waiting writer, so readers cannot starve it.
        """
        first = self.granted(self.acquire("T-1", False))
        writer = self.acquire("T-2", True)
        late_reader = self.acquire("T-3", False)
        self.assertNoResult(writer)
        self.assertNoResult(late_reader)
        first.release()
        lease = self.granted(writer)
        self.assertNoResult(late_reader)
        lease.release()
        self.granted(late_reader)

    def test_fifo_order(self) -> None:
        holder = self.granted(self.acquire("T-0", True))
        waiting = [self.acquire(f"T-{i}", True) for i in range(1, 5)]
        for i, d in enumerate(waiting, start=1):
            holder.release()
            holder = self.granted(d)
            self.assertEqual(holder.owner, f"T-{i}")
            for later in waiting[i:]:
                self.assertNoResult(later)

    def test_fifo_order_releasing_in_turn(self) -> None:
        order: list[str] = []

        def got(lease: Lease) -> None:
            order.append(lease.owner)
            lease.release()

        holder = self.granted(self.acquire("T-0", True))
        for i in range(1, 5):
            self.acquire(f"T-{i}", i % 2 == 0).addCallback(got)
        holder.release()
        self.assertEqual(order, ["T-1", "T-2", "T-3", "T-4"])
        self.assertEqual(self.mutexes.holders(NAME), [])

    def test_readers_granted_together_up_to_next_writer(self) -> None:
        writer = self.granted(self.acquire("T-0", True))
        r1 = self.acquire("T-1", False)
        r2 = self.acquire("T-2", False)
        w = self.acquire("T-3", True)
        r3 = self.acquire("T-4", False)
        writer.release()
        self.granted(r1)
        self.granted(r2)
        self.assertNoResult(w)
        self.assertNoResult(r3)
        self.assertEqual(self.mutexes.holders(NAME), ["T-1", "T-2"])

    def test_on_wait_reports_holders(self) -> None:
        self.granted(self.acquire("ServerTasks-1", False))
        self.granted(self.acquire("ServerTasks-2", False))
        told: list[str] = []
        self.mutexes.acquire(NAME, True, "ServerTasks-3", None, told.append)
        self.assertEqual(told, ["ServerTasks-1, ServerTasks-2"])

    def test_on_wait_failure_logged(self) -> None:
        holder = self.granted(self.acquire("T-1", True))

        def broken(holders: str) -> None:
            raise ValueError(holders)

        d = self.mutexes.acquire(NAME, True, "T-2", None, broken)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        holder.release()
        self.granted(d)

    def test_on_wait_not_called_when_granted_at_once(self) -> None:
        told: list[str] = []
        self.granted(self.mutexes.acquire(NAME, True, "T-1", None, told.append))
        self.assertEqual(told, [])

    def test_timeout(self) -> None:
        self.granted(self.acquire("T-1", True))
        d = self.acquire("T-2", True, timeout=30)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        failure = self.failureResultOf(d, IsolationTimeout)
        self.assertIn("T-1", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_timeout_waits_for_ever(self) -> None:
        holder = self.granted(self.acquire("T-1", True))
        d = self.acquire("T-2", True, timeout=None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10**9)
        self.assertNoResult(d)
        holder.release()
        self.granted(d)

    def test_grant_cancels_timeout(self) -> None:
        holder = self.granted(self.acquire("T-1", True))
        d = self.acquire("T-2", True, timeout=30)
        holder.release()
        self.granted(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timed_out_writer_lets_readers_behind_it_in(self) -> None:
        self.granted(self.acquire("T-1", False))
        writer = self.acquire("T-2", True, timeout=5)
        reader = self.acquire("T-3", False)
        self.assertNoResult(reader)
        self.clock.advance(5)
        self.failureResultOf(writer, IsolationTimeout)
        self.granted(reader)
        self.assertEqual(self.mutexes.holders(NAME), ["T-1", "T-3"])

    def test_cancel_while_waiting(self) -> None:
        holder = self.granted(self.acquire("T-1", True))
        d = self.acquire("T-2", True, timeout=30)
        after = self.acquire("T-3", True)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        holder.release()
        # The cancelled waiter was removed: the next one gets the mutex.
        self.assertEqual(self.granted(after).owner, "T-3")

    def test_cancelled_writer_lets_readers_behind_it_in(self) -> None:
        self.granted(self.acquire("T-1", False))
        writer = self.acquire("T-2", True)
        reader = self.acquire("T-3", False)
        writer.cancel()
        self.failureResultOf(writer, CancelledError)
        self.granted(reader)

    def test_release_idempotent(self) -> None:
        first = self.granted(self.acquire("T-1", False))
        self.granted(self.acquire("T-2", False))
        writer = self.acquire("T-3", True)
        first.release()
        first.release()
        self.assertNoResult(writer)
        self.assertEqual(self.mutexes.holders(NAME), ["T-2"])

    def test_release_of_old_lease_does_not_touch_new_holder(self) -> None:
        first = self.granted(self.acquire("T-1", True))
        first.release()
        second = self.granted(self.acquire("T-2", True))
        first.release()
        self.assertEqual(self.mutexes.holders(NAME), ["T-2"])
        second.release()
        self.assertEqual(self.mutexes.holders(NAME), [])

    def test_names_independent(self) -> None:
        self.granted(self.acquire("T-1", True, name="A"))
        self.granted(self.acquire("T-2", True, name="B"))
        self.assertEqual(self.mutexes.holders("A"), ["T-1"])
        self.assertEqual(self.mutexes.holders("B"), ["T-2"])

    def test_names_compared_as_given(self) -> None:
        self.granted(self.acquire("T-1", True, name="RunningScript"))
        self.granted(self.acquire("T-2", True, name="runningscript"))

    def test_unused_names_forgotten(self) -> None:
        """
        A name nobody holds or waits for leaves nothing behind.
        """
        lease = self.granted(self.acquire("T-1", True, name="one-off"))
        waiting = self.acquire("T-2", True, name="one-off", timeout=1)
        self.clock.advance(1)
        self.failureResultOf(waiting, IsolationTimeout)
        lease.release()
        self.assertEqual(self.mutexes._mutexes, {})

    def test_callback_may_reacquire(self) -> None:
        """
        A waiter whose callback releases and asks again goes to the back of
        the queue, behind those already waiting.
        """
        holder = self.granted(self.acquire("T-0", True))
        order: list[str] = []
        again: list[Deferred[Lease]] = []

        def got(lease: Lease) -> None:
            order.append(lease.owner)
            lease.release()
            if len(again) == 0:
                again.append(self.acquire("T-1-again", True))

        self.acquire("T-1", True).addCallback(got)
        second = self.acquire("T-2", True)
        holder.release()
        self.assertEqual(order, ["T-1"])
        self.assertEqual(self.granted(second).owner, "T-2")
        self.assertNoResult(again[0])
