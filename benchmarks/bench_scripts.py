"""
Scripts through C{IScriptServiceV2} on loopback: 200 concurrent C{sleep 1}
scripts, and the latency from StartScript to the first log line of
C{echo hello}, each against bare Twisted process spawning measured in the
same run.

Two child processes (C{benchmarks/scripts_server.py}) do the serving, so
that this process, the client, shares a GIL with neither:

  - C{agent}: a real agent (L{TentacleService}) whose dispatcher serves
    C{IScriptServiceV2} (L{ScriptServiceV2} over a L{ScriptRunner}) and a
    trivial C{IBenchService.Echo};
  - C{bare}: a bare Twisted program that spawns C{setsid -- /bin/bash -c
    SCRIPT} with C{reactor.spawnProcess}, as the agent spawns a script, and
    times it itself.

The client uses blocking C{ssl} sockets and pooled Halibut calls
(C{NEXT}/C{PROCEED}) as Octopus Server makes them. Requests are encoded
before the clock starts.

Concurrent scripts, one sample per round, rounds interleaved:

  - C{agent}: N (200) NoIsolation C{sleep 1} scripts, started as fast as
    C{--connections} (8) threads, each with its own pooled connection, can
    send StartScript. Each thread then polls GetStatus for its scripts in
    the order it started them, sleeping C{--poll} seconds between polls
    while one is still Running, until every one is Complete. Timed from the
    first StartScript sent to the last Complete seen.
  - C{bare}: the same N processes, C{setsid -- /bin/bash -c "sleep 1"}, each
    with the same environment and a working directory (so Twisted forks,
    as it does for the agent, which passes each script's workspace). Timed
    in the bare program from the first C{spawnProcess} to the last
    C{processEnded}.
  - C{bare-spawnp}: the same without a working directory, so Twisted uses
    C{posix_spawnp} instead of forking.

First log line, one sample per kind in turn, C{--count} (50) of each:

  - C{agent-poll}: StartScript for C{echo hello} without
    DurationToWaitForScriptToFinish, then GetStatus from LastLogSequence 0
    back to back, until the answer carries the line. Timed from sending
    StartScript until that answer is read.
  - C{agent-wait}: StartScript for C{echo hello} with
    DurationToWaitForScriptToFinish of 10 s; the agent answers when the
    script has finished, with the line. Timed from sending StartScript until
    the answer is read.
  - C{spawn-first-byte} and C{spawn-exit}: the bare program spawns
    C{setsid -- /bin/bash -c "echo hello"} (with a working directory, as
    the agent) and times the first stdout byte and C{processEnded}.
  - C{halibut-rt}: a pooled call of C{IBenchService.Echo("x")} on the same
    connection as the scripts: the price of one Halibut call.

Each script is CompleteScript'd once it is done, outside the clock.

Run from the repository root::

    python benchmarks/bench_scripts.py [--rounds 5] [--scripts 200] [--count 50] [--pin none]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Callable

import common
from common import Certificates, HalibutClient, percentile, request, result, wire
from tentacle.contracts import (
    CompleteScriptCommandV2,
    ProcessState,
    ScriptIsolationLevel,
    ScriptStatusRequestV2,
    ScriptStatusResponseV2,
    ScriptTicket,
    StartScriptCommandV2,
)
from tentacle.halibut.dotnet import TimeSpan

# --- the client ----------------------------------------------------------------


def start_command(body: str, wait: float | None = None) -> StartScriptCommandV2:
    return StartScriptCommandV2(
        script_ticket=ScriptTicket(uuid.uuid4().hex),
        script_body=body,
        task_id="ServerTasks-1",
        duration_to_wait_for_script_to_finish=(
            None if wait is None else TimeSpan.from_timedelta(timedelta(seconds=wait))
        ),
        isolation=ScriptIsolationLevel.NoIsolation,
        script_isolation_mutex_timeout=TimeSpan(0),
        isolation_mutex_name=None,
        scripts={},
        files=(),
        arguments=(),
    )


def start_wire(command: StartScriptCommandV2) -> bytes:
    return wire(request("IScriptServiceV2", "StartScript", command))


def status_wire(ticket: ScriptTicket, after: int = 0) -> bytes:
    return wire(request("IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(ticket, after)))


def complete_wire(ticket: ScriptTicket) -> bytes:
    return wire(request("IScriptServiceV2", "CompleteScript", CompleteScriptCommandV2(ticket)))


def finish(client: HalibutClient, ticket: ScriptTicket, after: int) -> ScriptStatusResponseV2:
    """
    Outside the clock: poll until Complete, then CompleteScript.
    """
    deadline = time.monotonic() + 60
    while True:
        status: ScriptStatusResponseV2 = client.call(status_wire(ticket, after))
        after = status.next_log_sequence
        if status.state is ProcessState.Complete:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"script {ticket.task_id} did not finish in 60 s")
        time.sleep(0.005)
    client.call(complete_wire(ticket))
    return status


# --- the child processes -----------------------------------------------------------


class Bare:
    """
    The bare Twisted spawner, driven one command a line.
    """

    def __init__(self, workdir: Path, cpu: int | None) -> None:
        self.child = common.start_child(common.server_command("scripts_server.py", "bare", workdir), cpu)
        if self.readline() != "ready":
            raise RuntimeError("the bare spawner did not start")

    def readline(self) -> str:
        assert self.child.stdout is not None
        line = self.child.stdout.readline()
        if not line:
            raise RuntimeError("the bare spawner stopped")
        return line.strip()

    def ask(self, line: str) -> tuple[float, float]:
        assert self.child.stdin is not None
        self.child.stdin.write(line + "\n")
        self.child.stdin.flush()
        answer = self.readline().split()
        if len(answer) != 2:
            raise RuntimeError(f"the bare spawner said {answer!r}")
        return float(answer[0]), float(answer[1])

    def many(self, n: int, where: str, script: str) -> tuple[float, float]:
        return self.ask(f"many {n} {where} '{script}'")

    def one(self, where: str, script: str) -> tuple[float, float]:
        return self.ask(f"one {where} '{script}'")


# --- the measurements -------------------------------------------------------------------


def agent_many(
    clients: list[HalibutClient], n: int, body: str, poll: float
) -> tuple[float, float]:
    """
    Start n scripts over all connections at once and poll until all are
    Complete; the seconds from the first StartScript until the last
    StartScript answer and until the last Complete.
    """
    commands = [start_command(body) for _ in range(n)]
    starts = [start_wire(c) for c in commands]
    polls = [status_wire(c.script_ticket) for c in commands]
    k = len(clients)
    first_sent = [0.0] * k
    all_started = [0.0] * k
    completed = [0.0] * n
    exit_codes = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(k)

    def worker(t: int) -> None:
        client = clients[t]
        mine = range(t, n, k)
        try:
            barrier.wait()
            first_sent[t] = time.perf_counter()
            for i in mine:
                started: ScriptStatusResponseV2 = client.call(starts[i])
                if started.ticket != commands[i].script_ticket:
                    raise AssertionError("StartScript answered for another ticket")
            all_started[t] = time.perf_counter()
            for i in mine:
                while True:
                    status: ScriptStatusResponseV2 = client.call(polls[i])
                    if status.state is ProcessState.Complete:
                        completed[i] = time.perf_counter()
                        exit_codes[i] = status.exit_code  # type: ignore[call-overload]
                        break
                    time.sleep(poll)
            for i in mine:
                client.call(complete_wire(commands[i].script_ticket))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(k)]
    gc.collect()
    gc.disable()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        gc.enable()
    if errors:
        raise errors[0]
    if any(code != 0 for code in exit_codes):
        raise AssertionError(f"scripts failed: exit codes {sorted(set(map(str, exit_codes)))}")
    begin = min(first_sent)
    return max(all_started) - begin, max(completed) - begin


def echo_poll(client: HalibutClient) -> float:
    command = start_command("echo hello")
    start, poll = start_wire(command), status_wire(command.script_ticket)
    t0 = time.perf_counter()
    payload = client.round_trip(start)
    while b"hello" not in payload:
        payload = client.round_trip(poll)
    elapsed = time.perf_counter() - t0
    status: ScriptStatusResponseV2 = result(payload)
    if [e.text for e in status.logs] != ["hello"]:
        raise AssertionError(f"unexpected log {status.logs!r}")
    final = finish(client, command.script_ticket, status.next_log_sequence)
    if final.exit_code != 0:
        raise AssertionError(f"echo hello exited with {final.exit_code}")
    return elapsed


def echo_wait(client: HalibutClient) -> float:
    command = start_command("echo hello", wait=10)
    start = start_wire(command)
    t0 = time.perf_counter()
    payload = client.round_trip(start)
    elapsed = time.perf_counter() - t0
    status: ScriptStatusResponseV2 = result(payload)
    if [e.text for e in status.logs] != ["hello"] or status.state is not ProcessState.Complete:
        raise AssertionError(f"StartScript did not wait for the script: {status!r}")
    finish(client, command.script_ticket, status.next_log_sequence)
    return elapsed


def halibut_rt(client: HalibutClient) -> float:
    echo = wire(request("IBenchService", "Echo", "x"))
    t0 = time.perf_counter()
    payload = client.round_trip(echo)
    elapsed = time.perf_counter() - t0
    if result(payload) != "x":
        raise AssertionError("Echo answered something else")
    return elapsed


# --- reporting ---------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the concurrent test")
    parser.add_argument("--scripts", type=int, default=200, help="concurrent scripts per round")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each concurrent script sleeps")
    parser.add_argument("--connections", type=int, default=8, help="client connections (threads)")
    parser.add_argument("--poll", type=float, default=0.01, help="seconds between polls of a running script")
    parser.add_argument("--count", type=int, default=50, help="first-log-line samples per kind")
    parser.add_argument("--warmup", type=int, default=5, help="first-log-line warm-up samples per kind")
    common.add_pin_option(parser, default="none")
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = common.placement(args.pin, "agent, bare spawner and their scripts")
    common.pin_self(client_cpu)
    sleep_body = f"sleep {args.sleep:g}"

    print(f"# bench_scripts: {common.machine()}")
    print(f"# placement: {where}; load average at start {common.loadavg()}")
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
        folder = Path(tmp)
        workdir = folder / "bare"
        workdir.mkdir()
        certs = Certificates(folder)
        home = folder / "home"
        home.mkdir()
        agent = common.start_child(
            common.server_command("scripts_server.py", "agent", certs.agent_pem, certs.server.thumbprint, home),
            server_cpu,
        )
        bare: Bare | None = None
        clients: list[HalibutClient] = []
        try:
            [port] = common.read_ready(agent, "port", 1)
            bare = spawner = Bare(workdir, server_cpu)
            clients = [HalibutClient(port, certs.context) for _ in range(args.connections)]
            for client in clients:
                halibut_rt(client)

            # -- concurrent scripts --
            print(
                f"# concurrent: {args.scripts} x NoIsolation '{sleep_body}', {args.rounds} rounds; "
                f"agent over {args.connections} connections, polling every {args.poll * 1e3:g} ms"
            )
            # Warm up both sides (imports, caches, the workspace folder) on a small batch.
            agent_many(clients, min(20, args.scripts), "true", args.poll)
            spawner.many(min(20, args.scripts), "cwd", "true")
            many: dict[str, list[float]] = {"agent": [], "bare": [], "bare-spawnp": []}
            spawned: dict[str, list[float]] = {k: [] for k in many}
            runs: dict[str, Callable[[], tuple[float, float]]] = {
                "agent": lambda: agent_many(clients, args.scripts, sleep_body, args.poll),
                "bare": lambda: spawner.many(args.scripts, "cwd", sleep_body),
                "bare-spawnp": lambda: spawner.many(args.scripts, "nocwd", sleep_body),
            }
            server_pid = {"agent": agent.pid, "bare": spawner.child.pid, "bare-spawnp": spawner.child.pid}
            order = list(runs)
            for r in range(args.rounds):
                for kind in order[r % 3:] + order[:r % 3]:
                    time.sleep(0.3)  # let the last round's processes be reaped everywhere
                    server_before, client_before = common.cpu_seconds(server_pid[kind]), time.process_time()
                    started, ended = runs[kind]()
                    server_time = common.cpu_seconds(server_pid[kind]) - server_before
                    client_time = time.process_time() - client_before
                    spawned[kind].append(started)
                    many[kind].append(ended)
                    print(
                        f"#   round {r + 1} {kind:12s} started all in {started:.3f} s, all done in "
                        f"{ended:.3f} s; CPU: server {server_time:.2f} s, client {client_time:.2f} s"
                    )
            left = list((folder / "home" / "Work").iterdir()) if (folder / "home" / "Work").exists() else []
            if left:
                raise AssertionError(f"{len(left)} workspaces were left behind")

            # -- first log line --
            client = clients[0]
            kinds: dict[str, Callable[[], tuple[float, ...]]] = {
                "agent-poll": lambda: (echo_poll(client),),
                "agent-wait": lambda: (echo_wait(client),),
                "spawn": lambda: spawner.one("cwd", "echo hello"),
                "halibut-rt": lambda: (halibut_rt(client),),
            }
            names = {"spawn": ("spawn-first-byte", "spawn-exit")}
            latency: dict[str, list[float]] = {}
            order = list(kinds)
            for i in range(args.warmup + args.count):
                for kind in order[i % 4:] + order[:i % 4]:
                    sample = kinds[kind]()
                    if i >= args.warmup:
                        for name, value in zip(names.get(kind, (kind,)), sample):
                            latency.setdefault(name, []).append(value)
        finally:
            for client in clients:
                try:
                    client.end()
                except OSError:
                    pass
            if bare is not None:
                common.stop_child(bare.child)
            common.stop_child(agent)
    elapsed = time.perf_counter() - clock

    print(f"# measured in {elapsed:.1f} s; load average at the end {common.loadavg()}\n")
    print(f"{args.scripts} concurrent '{sleep_body}' scripts, first start to last done "
          f"(median and range over {args.rounds} rounds)")
    med = {k: statistics.median(v) for k, v in many.items()}
    for kind, values in many.items():
        print(
            f"  {kind:12s} {med[kind]:6.3f} s  ({min(values):.3f}..{max(values):.3f}); "
            f"all started after {statistics.median(spawned[kind]):.3f} s"
        )
    print(f"  agent / bare         (median) {med['agent'] / med['bare']:.3f}")
    print(f"  agent / bare-spawnp  (median) {med['agent'] / med['bare-spawnp']:.3f}")
    print(
        f"  agent - bare         (median) {(med['agent'] - med['bare']) * 1e3:.0f} ms; "
        f"beyond the {args.sleep:g} s sleep: agent {(med['agent'] - args.sleep) * 1e3:.0f} ms, "
        f"bare {(med['bare'] - args.sleep) * 1e3:.0f} ms, "
        f"bare-spawnp {(med['bare-spawnp'] - args.sleep) * 1e3:.0f} ms"
    )
    print()
    print(f"StartScript -> first log line of 'echo hello' ({args.count} samples each, one at a time)")
    lat = {k: statistics.median(v) for k, v in latency.items()}
    for kind in ("agent-poll", "agent-wait", "spawn-first-byte", "spawn-exit", "halibut-rt"):
        ordered = sorted(latency[kind])
        print(f"  {kind:16s} median {ms(lat[kind])}   p90 {ms(percentile(ordered, 0.9))}")
    floor_poll = lat["spawn-first-byte"] + 2 * lat["halibut-rt"]
    floor_wait = lat["spawn-exit"] + lat["halibut-rt"]
    print(f"  agent-poll / spawn-first-byte           (median) {lat['agent-poll'] / lat['spawn-first-byte']:.2f}")
    print(f"  agent-poll / (spawn-first-byte + 2 rt)  (median) {lat['agent-poll'] / floor_poll:.2f}")
    print(f"  agent-wait / spawn-exit                 (median) {lat['agent-wait'] / lat['spawn-exit']:.2f}")
    print(f"  agent-wait / (spawn-exit + 1 rt)        (median) {lat['agent-wait'] / floor_wait:.2f}")
    print(f"  agent-poll / halibut-rt                 (median) {lat['agent-poll'] / lat['halibut-rt']:.1f}")
    common.write_json(args.json, {
        "scripts": args.scripts,
        "sleep": args.sleep,
        "placement": where,
        "concurrent": med,
        "first_line": lat,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
