"""
The script runner's parts that need no real process: the concurrency
slots, whose limit a running agent can change, and V2 StartScript's wait.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import ProcessState, ScriptExitCodes, ScriptStatusResponseV2
from tentacle.halibut.dotnet import TimeSpan
from tentacle.services.scripts import OUTPUT_GRACE, ScriptRunner, ScriptServiceV2, Slots, _launch
from tests.e2e.test_scripts import v2_command
from tests.test_process import FakeProcessReactor


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


class StartScriptWaitTests(SynchronousTestCase):
    """
    V2 StartScript's wait (DurationToWaitForScriptToFinish) on a fake clock
    with fake processes: the answer goes the moment the script ends, not
    at a poll tick; a script that logs something and runs on is answered
    L{OUTPUT_GRACE} after its first line.
    """

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        home = Path(self.mktemp()).absolute()
        home.mkdir()
        self.runner = ScriptRunner(self.reactor, home, home / "Applications", environment={})
        self.service = ScriptServiceV2(self.runner)

    def start(self, wait: float) -> Deferred[ScriptStatusResponseV2]:
        command = v2_command(
            "ignored: the process is a fake",
            duration_to_wait_for_script_to_finish=TimeSpan.from_timedelta(timedelta(seconds=wait)),
        )
        return Deferred.fromCoroutine(self.service.start_script(command, context=None))  # type: ignore[arg-type]

    def test_answered_the_moment_the_script_ends(self) -> None:
        answer = self.start(wait=5)
        [process] = self.reactor.processes
        self.reactor.advance(0.123)
        self.assertNoResult(answer)
        process.exit(3)
        status = self.successResultOf(answer)
        self.assertEqual((status.state, status.exit_code), (ProcessState.Complete, 3))
        self.assertEqual(self.reactor.getDelayedCalls(), [], "no timer is left behind")

    def test_a_quick_script_with_output_is_done_in_one_call(self) -> None:
        answer = self.start(wait=5)
        [process] = self.reactor.processes
        process.output(1, b"hello\n")
        self.reactor.advance(OUTPUT_GRACE / 2)
        self.assertNoResult(answer)
        process.exit(0)
        status = self.successResultOf(answer)
        self.assertEqual(status.state, ProcessState.Complete)
        self.assertEqual([line.text for line in status.logs], ["hello"])

    def test_first_lines_come_back_after_the_grace(self) -> None:
        answer = self.start(wait=5)
        [process] = self.reactor.processes
        self.reactor.advance(2)
        process.output(1, b"first\n")
        self.reactor.advance(OUTPUT_GRACE - 0.001)
        self.assertNoResult(answer)
        self.reactor.advance(0.001)
        status = self.successResultOf(answer)
        self.assertEqual(status.state, ProcessState.Running)
        self.assertEqual(([line.text for line in status.logs], status.next_log_sequence), (["first"], 1))
        process.exit(0)

    def test_a_silent_script_is_answered_when_the_wait_ends(self) -> None:
        answer = self.start(wait=1)
        [process] = self.reactor.processes
        self.reactor.advance(0.999)
        self.assertNoResult(answer)
        self.reactor.advance(0.001)
        self.assertEqual(self.successResultOf(answer).state, ProcessState.Running)
        process.exit(0)

    def test_the_wait_never_passes_the_duration(self) -> None:
        answer = self.start(wait=1)
        [process] = self.reactor.processes
        self.reactor.advance(0.9)
        process.output(2, b"late\n")
        self.reactor.advance(0.1)
        self.assertEqual([line.text for line in self.successResultOf(answer).logs], ["late"])
        process.exit(0)

    def test_a_script_that_cannot_be_written_fails_without_running(self) -> None:
        command = v2_command("echo never")
        root = self.runner.store.workspace(command.script_ticket.task_id).root
        (root / "Bootstrap.sh").mkdir(parents=True)  # nothing can be written there
        self.runner.start(_launch(command, command.script_ticket), None)  # type: ignore[arg-type]
        status = self.successResultOf(
            Deferred.fromCoroutine(self.runner.status(command.script_ticket, 0, ScriptExitCodes.UNKNOWN_SCRIPT))
        )
        self.assertEqual((status.state, status.exit_code), (ProcessState.Complete, ScriptExitCodes.FATAL))
        [line] = status.logs
        self.assertIn("The script could not be written", line.text)
        self.assertEqual(self.reactor.processes, [], "never started")

    def test_the_state_file_says_pending_until_the_final_state(self) -> None:
        """
        Two state writes per script: Pending before it starts, then the
        final one, which records when it started.  No Running write.
        """
        answer = self.start(wait=5)
        [script] = self.runner._scripts.values()
        [process] = self.reactor.processes
        self.assertEqual(script.state.state, ProcessState.Running)
        saved = script.workspace.load_state()
        assert saved is not None
        self.assertEqual((saved.state, saved.started), (ProcessState.Pending, None))
        process.exit(0)
        self.successResultOf(answer)
        final = script.workspace.load_state()
        assert final is not None
        self.assertEqual(final.state, ProcessState.Complete)
        self.assertEqual(final.started, script.state.started)
        self.assertIsNotNone(final.started)
