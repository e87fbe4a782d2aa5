"""
The server halves of C{bench_scripts.py}, each run by it as a child process
so that the client and the process being measured do not share a GIL.

C{agent} mode runs a real agent (L{TentacleService}, home HOME) on
127.0.0.1 with Tentacle's own services (scripts V1 and V2, file transfer,
capabilities), as deployed, plus C{IBenchService.Echo(string) -> string}.
It trusts one server thumbprint, prints C{"port <n>"} once it listens, and
stops when its standard input closes.  Meanwhile it answers two commands
on its standard input, for C{bench_stall.py}:

  - C{watch}: start a stall watchdog, a timer due every millisecond in the
    agent's reactor that notes how late it runs; answers C{watching};
  - C{stall}: stop it; answers C{"<longest lateness> <ticks> <most CPU>"}
    (seconds; how many times it ran; the most CPU time the reactor thread
    used between two ticks, in seconds).

::

    python benchmarks/scripts_server.py agent IDENTITY.pem TRUSTED_THUMBPRINT HOME

With C{TENTACLE_BENCH_PROFILE=FILE} in its environment, the agent runs
under cProfile and writes the statistics to FILE when it stops (wall
time; the reactor thread's CPU time with C{TENTACLE_BENCH_PROFILE_CLOCK=thread}).

C{bare} mode is the baseline: a bare Twisted program that spawns processes
with C{spawnProcess}, one program start each (C{/bin/bash}, with an
environment, as the agent's scripts; the agent's also get a session of their
own, made in the same C{posix_spawn} call), with a L{ProcessProtocol} that
only notes when output arrives and when the process ends. It prints C{"ready"}, then reads
one command a line from its standard input and answers each with one line:

  - C{many <n> <cwd|nocwd> <script>}: spawn n C{/bin/bash -c <script>}
    at once; answer C{"<spawned> <ended>"}, the seconds from the first spawn
    until the last C{spawnProcess} returned and until the last
    C{processEnded}.
  - C{one <cwd|nocwd> <script>}: spawn one; answer C{"<first> <ended>"}, the
    seconds from the spawn until the first byte of stdout and until
    C{processEnded}.

C{cwd} passes WORKDIR as the working directory, as the agent passes each
script's workspace; Twisted then forks. C{nocwd} passes none, and Twisted
uses C{posix_spawnp}, as the agent does (its scripts change folder
themselves). It stops when its standard input closes::

    python benchmarks/scripts_server.py bare WORKDIR

The parent may pin either to a CPU; the processes it spawns inherit the
affinity.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from common import bench_service, quiet_logging, say, start_agent, stop_on_eof


class Watchdog:
    """
    A timer due every C{interval} seconds in this reactor: how late it ran
    at worst is the longest the reactor was kept from its timers.  It also
    notes the most CPU time the reactor thread used between two ticks, which
    tells the reactor's own work from time the machine gave to others.
    """

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.call: Any = None
        self.worst = 0.0
        self.worst_cpu = 0.0
        self.ticks = 0
        self.due = 0.0
        self.cpu_mark = 0.0

    def start(self) -> None:
        self.worst, self.worst_cpu, self.ticks = 0.0, 0.0, 0
        self._next()

    def _next(self) -> None:
        self.due = time.perf_counter() + self.interval
        self.cpu_mark = time.thread_time()
        self.call = reactor.callLater(self.interval, self._tick)  # type: ignore[attr-defined]

    def _note(self) -> None:
        self.worst = max(self.worst, time.perf_counter() - self.due)
        self.worst_cpu = max(self.worst_cpu, time.thread_time() - self.cpu_mark)

    def _tick(self) -> None:
        self._note()
        self.ticks += 1
        self._next()

    def stop(self) -> tuple[float, int, float]:
        if self.call is not None and self.call.active():
            self.call.cancel()
            self._note()  # the pending tick may be late already
        self.call = None
        return self.worst, self.ticks, self.worst_cpu


def agent(identity_path: str, trusted: str, home: str) -> None:
    quiet_logging()
    service, port = start_agent(identity_path, trusted, Path(home), None)
    service.dispatcher.register(*bench_service())
    runner = service.scripts

    def cancel_all() -> Any:
        # Nothing should be running at the end; if the client failed half
        # way, do not leave scripts behind.
        for script in list(runner._scripts.values()):
            if not script.complete:
                runner.cancel(script.launch.ticket)

    reactor.addSystemEventTrigger("before", "shutdown", cancel_all)
    watchdog = Watchdog()

    def command(line: str) -> None:
        if line == "watch":
            watchdog.start()
            say("watching")
        elif line == "stall":
            worst, ticks, cpu = watchdog.stop()
            say(f"{worst:.6f} {ticks} {cpu:.6f}")

    say(f"port {port}")
    stop_on_eof(command)
    profile_to = os.environ.get("TENTACLE_BENCH_PROFILE")
    if not profile_to:
        reactor.run()
        return
    import cProfile

    # TENTACLE_BENCH_PROFILE_CLOCK=thread: the reactor thread's CPU time
    # (waits, such as posix_spawn's for the child's exec, do not count).
    clock = time.thread_time if os.environ.get("TENTACLE_BENCH_PROFILE_CLOCK") == "thread" else time.perf_counter
    profiler = cProfile.Profile(clock)
    profiler.runcall(reactor.run)
    profiler.dump_stats(profile_to)


class Watch(ProcessProtocol):
    """
    Notes the first stdout byte and the end of one process.
    """

    def __init__(self, on_first: Callable[[], None], on_ended: Callable[[], None]) -> None:
        self.on_first = on_first
        self.on_ended = on_ended
        self.seen = False

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1 and not self.seen:
            self.seen = True
            self.on_first()

    def processEnded(self, reason: Failure) -> None:
        self.on_ended()


def bare(workdir: str) -> None:
    quiet_logging()
    env = dict(os.environ)

    def spawn(protocol: ProcessProtocol, where: str, script: str) -> None:
        # One program start, as the agent's scripts (whose session
        # posix_spawn makes in the same call, which Twisted's own
        # spawnProcess cannot ask for; the bare baseline goes without).
        reactor.spawnProcess(
            protocol,
            "/bin/bash",
            ["/bin/bash", "-c", script],
            env=env,
            path=workdir if where == "cwd" else None,
            usePTY=False,
        )

    def many(n: int, where: str, script: str) -> None:
        left = [n]
        ended = [0.0]

        def one_ended() -> None:
            left[0] -= 1
            if left[0] == 0:
                ended[0] = time.perf_counter() - started
                say(f"{spawned:.6f} {ended[0]:.6f}")

        started = time.perf_counter()
        for _ in range(n):
            spawn(Watch(lambda: None, one_ended), where, script)
        spawned = time.perf_counter() - started

    def one(where: str, script: str) -> None:
        times: dict[str, float] = {}

        def first() -> None:
            times["first"] = time.perf_counter() - started

        def ended() -> None:
            end = time.perf_counter() - started
            say(f"{times.get('first', -1.0):.6f} {end:.6f}")

        started = time.perf_counter()
        spawn(Watch(first, ended), where, script)

    def command(line: str) -> None:
        words = shlex.split(line)
        if not words:
            return
        if words[0] == "many":
            many(int(words[1]), words[2], words[3])
        elif words[0] == "one":
            one(words[1], words[2])
        else:
            say(f"error unknown command {line!r}")

    stop_on_eof(command)
    reactor.callWhenRunning(say, "ready")
    reactor.run()


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        agent(*sys.argv[2:5])
    elif sys.argv[1:2] == ["bare"]:
        bare(*sys.argv[2:3])
    else:
        raise SystemExit(__doc__)
