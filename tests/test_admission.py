"""
The listener's budgets, as bookkeeping alone: who is evicted to make room
for whom, and when a newcomer is refused.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from tentacle.admission import (
    MAX_CONNECTIONS,
    MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_ADDRESS,
    Admission,
    AdmissionLimits,
    source_of,
)


def budget(**limits: int | None) -> Admission[str]:
    return Admission(AdmissionLimits(**limits))  # type: ignore[arg-type]


class SourceTests(SynchronousTestCase):
    def test_addresses(self) -> None:
        self.assertEqual(source_of("10.0.0.1"), "10.0.0.1")
        self.assertEqual(source_of("::ffff:10.0.0.1"), "10.0.0.1", "IPv4 through a dual-stack socket")
        self.assertEqual(source_of("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_of("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64", "one /64, one address")
        self.assertEqual(source_of("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(source_of("unix"), "unix")


class AdmissionTests(SynchronousTestCase):
    def test_flood_from_one_address_only_evicts_its_own(self) -> None:
        admission = budget(max_unauthenticated_per_address=3)
        admission.admit("server", "10.0.0.1")
        for n in range(3):
            self.assertEqual(admission.admit(f"flood{n}", "10.0.0.9").evict, ())
        decision = admission.admit("flood3", "10.0.0.9")
        self.assertTrue(decision.admitted)
        [eviction] = decision.evict
        self.assertEqual(
            (eviction.connection, eviction.source, eviction.reason, eviction.limit),
            ("flood0", "10.0.0.9", MAX_UNAUTHENTICATED_PER_ADDRESS, 3),
        )
        self.assertEqual((admission.unauthenticated_from("10.0.0.9"), admission.unauthenticated), (3, 4))

    def test_full_budget_evicts_the_oldest_of_the_most_crowded_address(self) -> None:
        """
        A flood from a few addresses fills the budget; a trusted server's
        connection, from an address holding one, is never the one evicted.
        """
        admission = budget(max_unauthenticated=6)
        for n in range(3):
            admission.admit(f"a{n}", "10.0.0.1")
        admission.admit("server", "10.0.0.5")
        admission.admit("b0", "10.0.0.2")
        admission.admit("b1", "10.0.0.2")
        evicted = []
        for n in range(40):
            decision = admission.admit(f"c{n}", "10.0.0.3")
            self.assertTrue(decision.admitted)
            evicted += [(e.connection, e.reason) for e in decision.evict]
        self.assertEqual(admission.unauthenticated, 6)
        self.assertNotIn("server", [c for c, _ in evicted])
        self.assertEqual({reason for _, reason in evicted}, {MAX_UNAUTHENTICATED})
        # The most crowded address's oldest went first; then the crowds in turn.
        self.assertEqual([c for c, _ in evicted[:3]], ["a0", "b0", "a1"])

    def test_when_no_address_holds_more_than_one_the_oldest_goes(self) -> None:
        admission = budget(max_unauthenticated=3)
        for n in range(3):
            admission.admit(f"c{n}", f"10.0.0.{n}")
        [eviction] = admission.admit("new", "10.0.0.99").evict
        self.assertEqual(eviction.connection, "c0")

    def test_authenticated_connections_leave_the_budget(self) -> None:
        admission = budget(max_unauthenticated=2, max_unauthenticated_per_address=2)
        for n in range(2):
            admission.admit(f"server{n}", "10.0.0.1")
            admission.authenticate(f"server{n}")
        self.assertEqual((admission.unauthenticated, admission.open), (0, 2))
        for n in range(2):
            self.assertEqual(admission.admit(f"next{n}", "10.0.0.1").evict, ())
        self.assertEqual(admission.authenticated, frozenset({"server0", "server1"}))

    def test_total_cap_evicts_the_unauthenticated_and_refuses_only_when_all_are_authenticated(self) -> None:
        admission = budget(max_connections=3, max_unauthenticated=3)
        admission.admit("server", "10.0.0.1")
        admission.authenticate("server")
        admission.admit("x", "10.0.0.2")
        admission.admit("y", "10.0.0.3")
        decision = admission.admit("z", "10.0.0.4")
        self.assertTrue(decision.admitted)
        self.assertEqual([(e.connection, e.reason) for e in decision.evict], [("x", MAX_CONNECTIONS)])
        for c in ("y", "z"):
            admission.authenticate(c)
        decision = admission.admit("late", "10.0.0.5")
        self.assertEqual((decision.admitted, decision.evict), (False, ()))
        self.assertEqual(admission.open, 3)
        admission.forget("y")
        self.assertTrue(admission.admit("late", "10.0.0.5").admitted)

    def test_forget_is_idempotent(self) -> None:
        admission = budget()
        admission.admit("c", "10.0.0.1")
        admission.forget("c")
        admission.forget("c")
        admission.authenticate("c")
        self.assertEqual((admission.open, admission.unauthenticated, admission.authenticated), (0, 0, frozenset()))

    def test_random_traffic_keeps_every_limit(self) -> None:
        """
        Arrivals, authentications and departures at random: the counts
        stay within the limits and agree with a plain recount.
        """
        limits = AdmissionLimits(max_connections=40, max_unauthenticated=25, max_unauthenticated_per_address=6)
        admission: Admission[int] = Admission(limits)
        rng = random.Random(13)
        alive: dict[int, tuple[str, bool]] = {}
        seen: set[str] = set()
        refused = 0
        for n in range(20_000):
            # Floods, then calmer spells where servers authenticate.
            arrive, authenticate = [(0.8, 0.9), (0.5, 0.95)][(n // 1000) % 2]
            roll = rng.random()
            if roll < arrive or not alive:
                # One busy address among quieter ones.
                source = "10.0.0.1" if rng.random() < 0.4 else f"10.0.0.{rng.randrange(12)}"
                decision = admission.admit(n, source)
                for e in decision.evict:
                    self.assertEqual(alive.pop(e.connection), (e.source, False), "only the unauthenticated")
                    seen.add(e.reason)
                if decision.admitted:
                    alive[n] = (source, False)
                else:
                    refused += 1
                    self.assertTrue(all(authenticated for _, authenticated in alive.values()))
            elif roll < authenticate:
                c = rng.choice(list(alive))
                admission.authenticate(c)
                alive[c] = (alive[c][0], True)
            else:
                c = rng.choice(list(alive))
                admission.forget(c)
                del alive[c]
            waiting = [s for s, authenticated in alive.values() if not authenticated]
            self.assertEqual(admission.open, len(alive))
            self.assertEqual(admission.unauthenticated, len(waiting))
            self.assertLessEqual(len(alive), 40)
            self.assertLessEqual(len(waiting), 25)
            for source in set(waiting):
                self.assertEqual(admission.unauthenticated_from(source), waiting.count(source))
                self.assertLessEqual(waiting.count(source), 6)
        self.assertEqual(seen, {MAX_CONNECTIONS, MAX_UNAUTHENTICATED, MAX_UNAUTHENTICATED_PER_ADDRESS})
        self.assertGreater(refused, 0)
