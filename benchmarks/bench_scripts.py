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
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import twisted

from tentacle.contracts import (
    CompleteScriptCommandV2,
    ProcessState,
    ScriptIsolationLevel,
    ScriptStatusRequestV2,
    ScriptStatusResponseV2,
    ScriptTicket,
    StartScriptCommandV2,
    tentacle_registry,
)
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, decode_message, encode_message
from tentacle.identity import Identity

SERVER_SCRIPT = Path(__file__).with_name("scripts_server.py")
IDENTITY_LINE = b"MX-SERVER 1.0\r\n\r\n"
REGISTRY = tentacle_registry()


# --- the client ----------------------------------------------------------------


def request(service: str, method: str, *params: object) -> RequestMessage:
    call = uuid.uuid4()
    return RequestMessage(
        id=f"{service}::{method}[1] / {call}",
        activity_id=call,
        service=service,
        method=method,
        params=params,
    )


def wire(message: RequestMessage) -> bytes:
    data, streams = encode_message(message)
    assert not streams
    return compress(data)


class HalibutClient:
    """
    One pooled connection to the agent, on a blocking TLS socket.
    """

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock = context.wrap_socket(raw)
        self.buffer = b""
        self.sock.sendall(b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n")
        if self.read_exactly(len(IDENTITY_LINE)) != IDENTITY_LINE:
            raise AssertionError("the agent did not answer MX-SERVER")
        self.fresh = True

    def recv(self) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the agent closed the connection")
        return data

    def read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.recv()
        self.buffer = data[n:] + self.buffer
        return data[:n]

    def round_trip(self, request_wire: bytes) -> bytes:
        """
        NEXT/PROCEED (except on the first call), a pre-encoded request, and
        the response's BSON once its DEFLATE stream has ended.
        """
        if not self.fresh:
            self.sock.sendall(b"NEXT\r\n")
            if self.read_exactly(9) != b"PROCEED\r\n":
                raise AssertionError("the agent did not answer PROCEED")
        self.fresh = False
        self.sock.sendall(request_wire)
        inflater = Inflater()
        payload = None
        while payload is None:
            payload = inflater.feed(self.recv())
        if inflater.unused:
            raise AssertionError("unexpected bytes after the response")
        return payload

    def call(self, request_wire: bytes) -> Any:
        return result(self.round_trip(request_wire))

    def close(self) -> None:
        try:
            self.sock.sendall(b"END\r\n")
        finally:
            self.sock.close()


def result(payload: bytes) -> Any:
    response, streams = decode_message(payload, REGISTRY, expected=ResponseMessage)
    assert isinstance(response, ResponseMessage) and not streams
    if response.error is not None:
        raise AssertionError(f"the call failed: {response.error.message}")
    return response.result


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


def start_child(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def stop_child(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    try:
        child.stdin.close()
    except OSError:
        pass
    try:
        child.wait(15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


class Bare:
    """
    The bare Twisted spawner, driven one command a line.
    """

    def __init__(self, workdir: Path, cpu: int | None) -> None:
        command = [sys.executable, str(SERVER_SCRIPT), "bare", str(workdir)]
        if cpu is not None:
            command.append(str(cpu))
        self.child = start_child(command)
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


def start_agent(
    folder: Path, agent: Identity, server: Identity, cpu: int | None
) -> tuple[subprocess.Popen[str], int]:
    pem = folder / "agent.pem"
    pem.write_bytes(agent.certificate_pem() + agent.private_key_pem())
    home = folder / "home"
    home.mkdir()
    command = [sys.executable, str(SERVER_SCRIPT), "agent", str(pem), server.thumbprint, str(home)]
    if cpu is not None:
        command.append(str(cpu))
    child = start_child(command)
    assert child.stdout is not None
    line = child.stdout.readline().split()
    if len(line) != 2 or line[0] != "port":
        child.kill()
        raise RuntimeError(f"the agent did not start (said {line!r})")
    return child, int(line[1])


def client_context(folder: Path, server: Identity) -> ssl.SSLContext:
    cert, key = folder / "server.crt", folder / "server.key"
    cert.write_bytes(server.certificate_pem())
    key.write_bytes(server.private_key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(cert), str(key))
    return context


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


def percentile(sorted_samples: list[float], q: float) -> float:
    index = min(len(sorted_samples) - 1, max(0, round(q * (len(sorted_samples) - 1))))
    return sorted_samples[index]


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} CPU(s), {cpu}; Linux {platform.release()}; "
        f"Python {platform.python_version()}, Twisted {twisted.__version__}"
    )


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def cpu_seconds(pid: int) -> float:
    """
    The CPU time (user + system) process C{pid} has used itself, without
    that of its reaped children.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def placement(pin: str) -> tuple[int | None, int | None, str]:
    """
    The CPUs for the client and for the two servers (whose scripts inherit
    theirs), and how to describe them.
    """
    if pin == "none" or not hasattr(os, "sched_getaffinity"):
        return None, None, "not pinned"
    allowed = sorted(os.sched_getaffinity(0))
    if pin == "split" and len(allowed) >= 2:
        return (
            allowed[0], allowed[1],
            f"client on CPU {allowed[0]}; agent, bare spawner and their scripts on CPU {allowed[1]}",
        )
    return allowed[0], allowed[0], f"everything on CPU {allowed[0]}"


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
    parser.add_argument(
        "--pin", choices=("split", "same", "none"), default="none",
        help="leave placement to the scheduler (default); client on one CPU and the servers "
        "(and so their scripts) on another; or everything on one CPU",
    )
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = placement(args.pin)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    sleep_body = f"sleep {args.sleep:g}"

    print(f"# bench_scripts: {machine()}")
    print(f"# placement: {where}; load average at start {loadavg()}")
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
        folder = Path(tmp)
        workdir = folder / "bare"
        workdir.mkdir()
        agent_identity, server_identity = Identity.generate("agent"), Identity.generate("server")
        context = client_context(folder, server_identity)
        agent, port = start_agent(folder, agent_identity, server_identity, server_cpu)
        bare: Bare | None = None
        clients: list[HalibutClient] = []
        try:
            bare = spawner = Bare(workdir, server_cpu)
            clients = [HalibutClient(port, context) for _ in range(args.connections)]
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
                    server_before, client_before = cpu_seconds(server_pid[kind]), time.process_time()
                    started, ended = runs[kind]()
                    server_time = cpu_seconds(server_pid[kind]) - server_before
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
                    client.close()
                except OSError:
                    pass
            if bare is not None:
                stop_child(bare.child)
            stop_child(agent)
    elapsed = time.perf_counter() - clock

    print(f"# measured in {elapsed:.1f} s; load average at the end {loadavg()}\n")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
