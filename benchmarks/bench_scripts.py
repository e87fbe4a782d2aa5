"""
Scripts on loopback, as users run them: 200 concurrent C{sleep 1} scripts
and the first log line of C{echo hello}, each through
L{TentacleClient.run_script}, against bare Twisted C{posix_spawn} measured
in the same run; the raw wire figures and C{tentacle-client run} beside
them.

Child processes, so that this process (the client) shares a GIL with none:

  - C{agent} (C{scripts_server.py agent}): a real agent (L{TentacleService})
    with Tentacle's own services, as deployed, plus a trivial
    C{IBenchService.Echo};
  - C{bare} (C{scripts_server.py bare}): a bare Twisted program that spawns
    C{/bin/bash -c SCRIPT} with C{reactor.spawnProcess} and no working
    folder, so Twisted uses C{posix_spawnp}: one program start per script,
    as the agent's (whose C{posix_spawn} also makes the script a session);
    it times the processes itself;
  - C{pipe.py serve}, for the C{tentacle-client run} row's baseline.

B{Concurrent scripts}, one sample per kind per round, the order turning:

  - C{client}: 200 C{TentacleClient.run_script("sleep 1")} at once on one
    client (default settings: StartScript waits up to 5 s for the script,
    then GetStatus at once, then every 300 ms x 1.15 up to 5 s while
    nothing new arrives; CompleteScript at the end).  Timed from the first
    call until the last returned.  The goal's figure.
  - C{bare-spawnp}: the bare program spawns the same 200 at once; timed
    from the first C{spawnProcess} to the last C{processEnded}.  The goal's
    baseline.
  - C{wire}: the raw wire, blocking C{ssl}: C{--connections} (8) threads
    send StartScript (no wait) as fast as they can, then poll GetStatus
    every C{--poll} (10 ms) until all are Complete.

B{First log line of C{echo hello}}, C{--rounds} rounds of C{--count}
samples per kind, the kinds taking turns:

  - C{client-first-line}: C{TentacleClient.run_script("echo hello",
    on_log=...)}, timed from the call until C{on_log} sees the first line.
  - C{client-rt}: one pooled C{GetCapabilities} through the same client.
  - C{spawn-first-byte}, C{spawn-exit}: the bare program spawns
    C{/bin/bash -c "echo hello"} (posix_spawnp) and times its
    first stdout byte and C{processEnded}.
  - raw wire: C{wire-wait} (StartScript waiting up to 10 s, until its
    answer), C{wire-poll} (StartScript without a wait, then GetStatus back
    to back until the line comes), C{wire-rt} (a pooled C{Echo("x")}).

The goal's ratio, per round: C{client-first-line} / (C{spawn-first-byte}
+ C{client-rt}).

B{The command}: C{tentacle-client run -c "echo hello" 127.0.0.1:PORT},
whole (start-up included), C{--cli-count} per round, against a bare
Twisted mTLS client command (C{pipe.py put} of an empty file: start-up,
TLS, one exchange) plus C{spawn-exit}.

    python benchmarks/bench_scripts.py [--rounds 3] [--scripts 200] [--count 30] [--pin none]

C{--only concurrent first-line command} measures only those parts (and
prints only their rows), C{--kinds client bare-spawnp wire} only those
kinds of the concurrent part; C{--max-connecting N} sets the client's
C{max_connecting}.  With C{TENTACLE_BENCH_PROFILE=FILE} the agent runs
under cProfile (see C{scripts_server.py}).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Awaitable, Callable

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

CALL = ("ICapabilitiesServiceV2", "GetCapabilities")
PARTS = ("concurrent", "first-line", "command")
KINDS = ("client", "bare-spawnp", "wire")

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


# --- through TentacleClient --------------------------------------------------------------------


async def client_many(library: Any, n: int, body: str) -> float:
    """
    C{n} C{run_script(body)} at once; the seconds until the last returned.
    """
    from twisted.internet.defer import Deferred, gatherResults

    started = time.perf_counter()
    codes = await gatherResults(
        [Deferred.fromCoroutine(library.run_script(body)) for _ in range(n)], consumeErrors=True
    )
    elapsed = time.perf_counter() - started
    if any(code != 0 for code in codes):
        raise AssertionError(f"scripts failed: exit codes {sorted(set(codes))}")
    return elapsed


async def client_first_line(library: Any) -> float:
    seen: list[float] = []
    lines: list[str] = []

    def on_log(line: Any) -> None:
        if not seen:
            seen.append(time.perf_counter())
        lines.append(line.text)

    started = time.perf_counter()
    code = await library.run_script("echo hello", on_log=on_log)
    if code != 0 or lines != ["hello"]:
        raise AssertionError(f"echo hello: exit code {code}, log {lines!r}")
    return seen[0] - started


async def client_rt(library: Any) -> float:
    started = time.perf_counter()
    await library.call(*CALL)
    return time.perf_counter() - started


def command_seconds(command: list[str], expect: str | None = None) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or (expect is not None and expect not in done.stdout):
        raise AssertionError(f"{command[0]} exited {done.returncode}: {done.stdout[-500:]}{done.stderr[-2000:]}")
    return elapsed


# --- the measurements --------------------------------------------------------------------------


async def measure(reactor: Any, args: Any, folder: Path) -> dict[str, Any]:
    client_cpu, server_cpu, where = common.placement(args.pin, "agent, bare spawner and their scripts")
    common.pin_self(client_cpu)
    print(f"# placement: {where}; load average at start {common.loadavg()}", flush=True)
    sleep_body = f"sleep {args.sleep:g}"
    workdir = folder / "bare"
    workdir.mkdir()
    pipe_folder = folder / "pipe"
    pipe_folder.mkdir()
    empty = folder / "empty"
    empty.write_bytes(b"")
    certs = Certificates(folder)
    home = folder / "home"
    home.mkdir()
    agent = common.start_child(
        common.server_command("scripts_server.py", "agent", certs.agent_pem, certs.server.thumbprint, home),
        server_cpu,
    )
    bare: Bare | None = None
    pipe = None
    clients: list[HalibutClient] = []
    library = None
    try:
        [port] = common.read_ready(agent, "port", 1)
        bare = spawner = Bare(workdir, server_cpu)
        pipe = common.start_child(common.server_command("pipe.py", "serve", certs.agent_pem, pipe_folder), server_cpu)
        [pipe_port] = common.read_ready(pipe, "port", 1)
        clients = [HalibutClient(port, certs.context) for _ in range(args.connections)]
        for client in clients:
            halibut_rt(client)
        options = {} if args.max_connecting is None else {"max_connecting": args.max_connecting}
        library = common.tentacle_client(reactor, port, certs, **options)

        # -- concurrent scripts --
        print(
            f"# concurrent: {args.scripts} x NoIsolation '{sleep_body}', {args.rounds} rounds; TentacleClient "
            f"(default settings); raw wire over {args.connections} connections polling every {args.poll * 1e3:g} ms",
            flush=True,
        )
        # Warm up every side (imports, caches, the workspace folder) on a small batch.
        await client_many(library, min(20, args.scripts), "true")
        agent_many(clients, min(20, args.scripts), "true", args.poll)
        spawner.many(min(20, args.scripts), "nocwd", "true")

        async def run_client() -> tuple[float, float]:
            return float("nan"), await client_many(library, args.scripts, sleep_body)

        async def run_sync(f: Callable[[], tuple[float, float]]) -> tuple[float, float]:
            return f()

        runs: dict[str, Callable[[], Awaitable[tuple[float, float]]]] = {
            "client": run_client,
            "bare-spawnp": lambda: run_sync(lambda: spawner.many(args.scripts, "nocwd", sleep_body)),
            "wire": lambda: run_sync(lambda: agent_many(clients, args.scripts, sleep_body, args.poll)),
        }
        server_pid = {"client": agent.pid, "wire": agent.pid, "bare-spawnp": spawner.child.pid}
        many: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        order = [k for k in order if k in args.kinds]
        for r in range(args.rounds if "concurrent" in args.only else 0):
            for kind in order[r % len(order):] + order[: r % len(order)]:
                await common.sleep(reactor, 0.3)  # let the last round's processes be reaped everywhere
                server_before, client_before = common.cpu_seconds(server_pid[kind]), time.process_time()
                started, ended = await runs[kind]()
                server_time = common.cpu_seconds(server_pid[kind]) - server_before
                client_time = time.process_time() - client_before
                many[kind].append(ended)
                all_started = "" if started != started else f"started all in {started:.3f} s, "
                print(
                    f"#   round {r + 1} {kind:12s} {all_started}all done in {ended:.3f} s; "
                    f"CPU: server {server_time:.2f} s, client {client_time:.2f} s",
                    flush=True,
                )
        work = home / "Work"
        left = list(work.iterdir()) if work.exists() else []
        if left:
            raise AssertionError(f"{len(left)} workspaces were left behind")

        # -- first log line --
        raw = clients[0]

        async def sync(f: Callable[[], Any]) -> Any:
            return f()

        kinds: dict[str, Callable[[], Awaitable[Any]]] = {
            "client-first-line": lambda: client_first_line(library),
            "client-rt": lambda: client_rt(library),
            "spawn": lambda: sync(lambda: spawner.one("nocwd", "echo hello")),
            "wire-wait": lambda: sync(lambda: echo_wait(raw)),
            "wire-poll": lambda: sync(lambda: echo_poll(raw)),
            "wire-rt": lambda: sync(lambda: halibut_rt(raw)),
        }
        names = {"spawn": ("spawn-first-byte", "spawn-exit")}
        latency: list[dict[str, list[float]]] = []
        order = list(kinds)
        for r in range(args.rounds + 1 if "first-line" in args.only else 0):  # round 0 warms up
            samples: dict[str, list[float]] = {}
            for i in range(args.warmup if r == 0 else args.count):
                for kind in order[i % len(order):] + order[: i % len(order)]:
                    value = await kinds[kind]()
                    for name, v in zip(names.get(kind, (kind,)), value if isinstance(value, tuple) else (value,)):
                        samples.setdefault(name, []).append(v)
            if r:
                latency.append(samples)
                print(
                    f"#   first line round {r}: client {statistics.median(samples['client-first-line']) * 1e3:.1f} ms, "
                    f"spawn first byte {statistics.median(samples['spawn-first-byte']) * 1e3:.1f} ms, "
                    f"client round trip {statistics.median(samples['client-rt']) * 1e3:.2f} ms",
                    flush=True,
                )

        # -- the command --
        cli = [*common.tentacle_client_command(), *common.cli_identity(certs), "run", "-c", "echo hello",
               f"127.0.0.1:{port}"]
        pipe_put = common.server_command(
            "pipe.py", "put", pipe_port, certs.server_cert, certs.server_key, empty, "empty"
        )
        command: dict[str, list[float]] = {"cli": [], "pipe": [], "spawn-exit": []}
        if "command" in args.only:
            command_seconds(cli, "hello")
        for r in range(args.rounds if "command" in args.only else 0):
            cli_s, pipe_s, spawn_s = [], [], []
            for _ in range(args.cli_count):
                cli_s.append(command_seconds(cli, "hello"))
                pipe_s.append(command_seconds(pipe_put))
                spawn_s.append(spawner.one("nocwd", "echo hello")[1])
            command["cli"].append(statistics.median(cli_s))
            command["pipe"].append(statistics.median(pipe_s))
            command["spawn-exit"].append(statistics.median(spawn_s))
        await library.close()
        library = None
    finally:
        if library is not None:
            await library.close()
        for client in clients:
            try:
                client.end()
            except OSError:
                pass
        if pipe is not None:
            common.stop_child(pipe)
        if bare is not None:
            common.stop_child(bare.child)
        common.stop_child(agent)
    return {"where": where, "many": many, "latency": latency, "command": command}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each test")
    parser.add_argument("--scripts", type=int, default=200, help="concurrent scripts per round")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each concurrent script sleeps")
    parser.add_argument("--connections", type=int, default=8, help="raw-wire client connections (threads)")
    parser.add_argument("--poll", type=float, default=0.01, help="raw wire: seconds between polls of a running script")
    parser.add_argument("--count", type=int, default=30, help="first-log-line samples per kind per round")
    parser.add_argument("--warmup", type=int, default=5, help="first-log-line warm-up samples per kind")
    parser.add_argument("--cli-count", type=int, default=5, help="tentacle-client run commands per round")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measure only these parts (the rows of the others are left out)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                        help="concurrent scripts: run only these kinds")
    parser.add_argument("--max-connecting", type=int, default=None,
                        help="TentacleClient's max_connecting (default: the library's)")
    common.add_pin_option(parser, default="none")
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    common.quiet_logging()
    print(common.header("bench_scripts"), flush=True)
    clock = time.perf_counter()

    async def run(reactor: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
            return await measure(reactor, args, Path(tmp))

    out = common.react(run)
    many, latency, command = out["many"], out["latency"], out["command"]
    print(f"# measured in {time.perf_counter() - clock:.1f} s; load average at the end {common.loadavg()}\n")
    print(f"{args.scripts} concurrent 'sleep {args.sleep:g}' scripts, first start to last done "
          f"(median and range over {args.rounds} rounds)")
    for kind, values in many.items():
        if not values:
            continue
        print(f"  {kind:12s} {statistics.median(values):6.3f} s  ({min(values):.3f}..{max(values):.3f})")
    print()
    print(f"'echo hello', first log line ({args.rounds} rounds x {args.count} samples per kind)")
    every: dict[str, list[float]] = {}
    for samples in latency:
        for k, v in samples.items():
            every.setdefault(k, []).extend(v)
    for kind, values in every.items():
        ordered = sorted(values)
        print(f"  {kind:18s} median {ms(statistics.median(values))}   p90 {ms(percentile(ordered, 0.9))}")
    print()

    def per_round(kind: str) -> list[float]:
        return [statistics.median(samples[kind]) * 1e3 for samples in latency]

    floor_client = [a + b for a, b in zip(per_round("spawn-first-byte"), per_round("client-rt"))]
    floor_wait = [a + b for a, b in zip(per_round("spawn-exit"), per_round("wire-rt"))]
    floor_poll = [a + b for a, b in zip(per_round("spawn-first-byte"), per_round("wire-rt"))]
    floor_command = [(p + s) * 1e3 for p, s in zip(command["pipe"], command["spawn-exit"])]
    def row(name: str, ours: list[float], base: list[float], *rest: Any, **options: Any) -> Any:
        # Only the rows of the parts measured (--only, --kinds).
        return common.row(name, ours, base, *rest, **options) if ours and base else None

    rows = [
        row(f"{args.scripts} x 'sleep {args.sleep:g}' via TentacleClient.run_script, start to all done "
                   f"(vs {args.scripts} bare posix_spawn)", many["client"], many["bare-spawnp"], "s", "lower",
                   key="scripts", fmt="{:.3f}"),
        row(f"{args.scripts} x 'sleep {args.sleep:g}', raw wire, {args.connections} connections polling "
                   f"every {args.poll * 1e3:g} ms (vs {args.scripts} bare posix_spawn)",
                   many["wire"], many["bare-spawnp"], "s", "lower", fmt="{:.3f}"),
        row("'echo hello' first log line via TentacleClient.run_script "
                   "(vs bare posix_spawn first byte + 1 pooled TentacleClient round trip)",
                   per_round("client-first-line"), floor_client, "ms", "lower", key="first_line", fmt="{:.2f}"),
        row("'echo hello' StartScript waiting for the end, raw wire (vs bare spawn to exit + 1 raw round trip)",
                   per_round("wire-wait"), floor_wait, "ms", "lower", fmt="{:.2f}"),
        row("'echo hello' StartScript then GetStatus until the line, raw wire "
                   "(vs bare first byte + 1 raw round trip)", per_round("wire-poll"), floor_poll, "ms", "lower",
                   fmt="{:.2f}"),
        row("`tentacle-client run -c 'echo hello'`, whole command "
                   "(vs bare Twisted mTLS client command with one exchange + bare spawn to exit)",
                   [c * 1e3 for c in command["cli"]], floor_command, "ms", "lower", fmt="{:.0f}"),
    ]
    rows = [r for r in rows if r is not None]
    for r in rows:
        print(common.describe_row(r))
    common.write_json(args.json, {
        "scripts": args.scripts,
        "sleep": args.sleep,
        "placement": out["where"],
        "concurrent": {k: statistics.median(v) for k, v in many.items() if v},
        "first_line": {k: statistics.median(v) for k, v in every.items()},
        "command": command,
        "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
