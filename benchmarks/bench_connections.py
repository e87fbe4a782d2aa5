"""
New connections per second, and the agent's memory (idle, and per idle
authenticated connection), each against a bare Twisted mutual-TLS server
measured in the same run.

Two child processes serve on 127.0.0.1, both with the same certificate and
TLS policy (L{AgentTLSOptions}, which asks for the client's certificate):

  - C{agent}: the agent as it is deployed, C{python -m tentacle --home HOME
    run} (twistd, Tentacle's default services, info-level log to a file),
    HOME holding its certificate and a configuration that trusts the
    client's certificate;
  - C{bare}: C{benchmarks/bare_server.py}, a bare Twisted TLS echo server
    that loads nothing of Tentacle but the TLS policy and the identity.

This process is the client, on blocking C{ssl} sockets that present a
client certificate, so every connection is mutual TLS; no session is ever
resumed. By default (C{--pin split}) it is pinned to one CPU and both
servers to another.

Memory, first, while both children are fresh:

  - idle RSS: C{VmRSS} from C{/proc/<pid>/status} a second after the
    server starts listening, before any connection;
  - then C{--warmup} connections are opened and closed, C{VmRSS} is read,
    C{--idle} (200) connections are opened one after the other and kept
    open, and after a second C{VmRSS} is read again. The difference over N
    is the RSS per idle connection. An agent connection has done its TLS
    handshake, the MX preamble and identity lines, and one call
    (C{ICapabilitiesServiceV2.GetCapabilities}, the first call Octopus
    Server makes), so it waits for C{NEXT} as a pooled connection does. A
    bare connection has done its handshake and echoed one byte.

Then the rate, C{--rounds} rounds, agent and bare interleaved, one sample
each per round: C{--count} new connections made by C{--concurrency}
threads (the handshakes and socket waits run without the GIL), timed from
the first connect to the last close:

  - C{agent}: TCP connect, TLS handshake, MX preamble and identity, one
    pre-encoded C{GetCapabilities} call and its whole response, END, close;
  - C{bare}: TCP connect, TLS handshake, one byte echoed (so that the
    server has finished its side of the handshake), close.

The rate is count / seconds; the median over the rounds is reported, with
the server's CPU time per connection (from C{/proc/<pid>/stat}) and how
busy the client was (its CPU seconds over the wall-clock seconds; near 1.0
the client, not the server, sets the pace).

Run from the repository root::

    python benchmarks/bench_connections.py [--rounds 5] [--count 500] [--concurrency 8] [--idle 200] [--pin split]
"""

from __future__ import annotations

import argparse
import itertools
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common
from common import Certificates, Connection, HalibutClient, MiB
from tentacle.config import ConfigFile, TentacleConfig
from tentacle.identity import IdentityStore

#: What the agent logs once it listens.
LISTENING = "Tentacle listening on port"
#: In every GetCapabilities answer of an agent with Tentacle's services.
CAPABILITY = b"IScriptServiceV2"


# --- the servers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(folder: Path, certs: Certificates, cpu: int | None) -> tuple[subprocess.Popen[str], int]:
    """
    The real agent, C{tentacle run}, in its own home; its log goes to a file.
    """
    home = folder / "agent-home"
    IdentityStore(home).save(certs.agent)
    port = free_port()
    ConfigFile(home).save(
        TentacleConfig(
            home=home, port=port, listen_address="127.0.0.1", trusted_thumbprints=(certs.server.thumbprint,)
        )
    )
    log = folder / "agent.log"
    with log.open("w") as out:
        child = common.start_child(
            [sys.executable, "-m", "tentacle", "--home", str(home), "run"],
            cpu,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while LISTENING not in log.read_text():
        if child.poll() is not None or time.monotonic() > deadline:
            common.stop_child(child, terminate=True)
            raise RuntimeError(f"the agent did not start; its log:\n{log.read_text()[-2000:]}")
        time.sleep(0.02)
    return child, port


# --- the connections ---------------------------------------------------------------------


class Kind:
    """
    How to open one connection of a kind (ready and idle once it returns)
    and how to close it.
    """

    def __init__(self, name: str, pid: int, port: int, context: Any) -> None:
        self.name, self.pid, self.port, self.context = name, pid, port, context

    def prepare(self, n: int) -> None:
        """
        Make ready for C{n} connections, before the clock starts.
        """

    def open(self, i: int) -> Connection:
        raise NotImplementedError

    def close(self, connection: Connection) -> None:
        connection.close()


class Agent(Kind):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.wires: list[bytes] = []

    def prepare(self, n: int) -> None:
        """
        C{n} GetCapabilities requests, encoded before the clock starts.
        """
        self.wires = [
            common.wire(common.request("ICapabilitiesServiceV2", "GetCapabilities")) for _ in range(n)
        ]

    def open(self, i: int) -> Connection:
        client = HalibutClient(self.port, self.context, timeout=30)
        if CAPABILITY not in client.round_trip(self.wires[i]):
            raise AssertionError("GetCapabilities did not list IScriptServiceV2")
        return client

    def close(self, connection: Connection) -> None:
        assert isinstance(connection, HalibutClient)
        connection.end()


class Bare(Kind):
    def open(self, i: int) -> Connection:
        connection = Connection(self.port, self.context, timeout=30)
        connection.sock.sendall(b"x")
        if connection.read_exactly(1) != b"x":
            raise AssertionError("the bare server did not echo")
        return connection


def burst(kind: Agent | Bare, count: int, concurrency: int) -> tuple[float, float, float]:
    """
    C{count} new connections, opened and closed by C{concurrency} threads;
    the seconds from the first connect to the last close, and the CPU
    seconds the server and the client used meanwhile.
    """
    kind.prepare(count)
    numbers = itertools.count()
    errors: list[BaseException] = []
    barrier = threading.Barrier(concurrency + 1)

    def worker() -> None:
        try:
            barrier.wait()
            while (i := next(numbers)) < count:
                kind.close(kind.open(i))
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    server_before, client_before = common.cpu_seconds(kind.pid), time.process_time()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    server = common.cpu_seconds(kind.pid) - server_before
    client = time.process_time() - client_before
    if errors:
        raise errors[0]
    return elapsed, server, client


def memory(kind: Agent | Bare, idle: int, warmup: int) -> dict[str, float]:
    """
    RSS idle, then with C{idle} idle connections open (bytes).
    """
    time.sleep(1.0)
    fresh = common.proc_status(kind.pid, "VmRSS")
    kind.prepare(max(idle, warmup))
    for i in range(warmup):
        kind.close(kind.open(i))
    time.sleep(0.5)
    before = common.proc_status(kind.pid, "VmRSS")
    held = [kind.open(i) for i in range(idle)]
    time.sleep(1.0)
    after = common.proc_status(kind.pid, "VmRSS")
    for connection in held:
        kind.close(connection)
    return {
        "idle_rss": fresh,
        "rss_before": before,
        "rss_with_idle": after,
        "per_connection": (after - before) / idle,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=500, help="new connections per kind per round")
    parser.add_argument("--concurrency", type=int, default=8, help="connections in flight (client threads)")
    parser.add_argument("--idle", type=int, default=200, help="idle connections held for the memory figure")
    parser.add_argument("--warmup", type=int, default=5, help="connections opened and closed before memory is read")
    common.add_pin_option(parser)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = common.placement(args.pin, "agent and bare server")
    common.pin_self(client_cpu)

    print(f"# bench_connections: {common.machine()}")
    print(f"# placement: {where}; load average at start {common.loadavg()}")
    with tempfile.TemporaryDirectory(prefix="tentacle-bench-connections-") as tmp:
        folder = Path(tmp)
        certs = Certificates(folder)
        agent_child, agent_port = start_agent(folder, certs, server_cpu)
        bare_child = common.start_child(common.server_command("bare_server.py", certs.agent_pem), server_cpu)
        try:
            [bare_port] = common.read_ready(bare_child, "port", 1)
            kinds: dict[str, Agent | Bare] = {
                "agent": Agent("agent", agent_child.pid, agent_port, certs.context),
                "bare": Bare("bare", bare_child.pid, bare_port, certs.context),
            }
            # -- memory, while both are fresh --
            mem = {name: memory(kind, args.idle, args.warmup) for name, kind in kinds.items()}

            probe = HalibutClient(agent_port, certs.context, timeout=30)
            capabilities = common.wire(common.request("ICapabilitiesServiceV2", "GetCapabilities"))
            offered = common.result(probe.round_trip(capabilities)).supported_capabilities
            cipher = probe.sock.cipher()
            tls = f"{probe.sock.version()} {cipher[0] if cipher else '?'}"
            probe.end()

            # -- the rate --
            print(
                f"# rate: {args.rounds} rounds x {args.count} new connections per kind, "
                f"{args.concurrency} in flight; agent offers {', '.join(offered)}"
            )
            for kind in kinds.values():
                burst(kind, min(100, args.count), args.concurrency)  # warm-up
            samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in kinds}
            order = list(kinds)
            for r in range(args.rounds):
                for name in order[r % 2:] + order[:r % 2]:
                    elapsed, server, client_cpu_s = burst(kinds[name], args.count, args.concurrency)
                    samples[name].append((elapsed, server, client_cpu_s))
                    print(
                        f"#   round {r + 1} {name:5s} {args.count / elapsed:7.1f} conn/s; CPU per "
                        f"connection: server {server / args.count * 1e3:.2f} ms, client "
                        f"{client_cpu_s / args.count * 1e3:.2f} ms; client busy {client_cpu_s / elapsed:.2f}"
                    )
            agent_rss_after = common.proc_status(agent_child.pid, "VmRSS")
        finally:
            common.stop_child(bare_child)
            common.stop_child(agent_child, terminate=True)

    print(f"# load average at the end {common.loadavg()}\n")
    rate = {n: statistics.median(args.count / s[0] for s in v) for n, v in samples.items()}
    server_ms = {n: statistics.median(s[1] / args.count * 1e3 for s in v) for n, v in samples.items()}
    busy = {n: statistics.median(s[2] / s[0] for s in v) for n, v in samples.items()}
    print(f"New connections per second (median over {args.rounds} rounds; {tls})")
    for name in kinds:
        rates = [args.count / s[0] for s in samples[name]]
        print(
            f"  {name:5s} {rate[name]:7.1f} conn/s  ({min(rates):.1f}..{max(rates):.1f}); "
            f"server CPU {server_ms[name]:.2f} ms per connection; client busy {busy[name]:.2f}"
        )
    print(f"  agent / bare (rate, median)                     {rate['agent'] / rate['bare']:.3f}")
    for name in kinds:
        if busy[name] > 0.9:
            print(
                f"  (the client was busy {busy[name]:.2f} of the time for {name}: it may have set the pace; "
                "the server CPU per connection does not depend on it)"
            )
    print(f"  agent / bare (server CPU per connection, median) {server_ms['agent'] / server_ms['bare']:.2f}")
    print()
    print(f"Memory (VmRSS; {args.idle} idle connections held, after {args.warmup} opened and closed)")
    for name, m in mem.items():
        print(
            f"  {name:5s} idle {m['idle_rss'] / MiB:6.1f} MiB; {m['rss_before'] / MiB:6.1f} MiB -> "
            f"{m['rss_with_idle'] / MiB:6.1f} MiB with {args.idle} idle: "
            f"{m['per_connection'] / 1024:5.1f} KiB per connection"
        )
    print(f"  agent / bare (idle RSS)            {mem['agent']['idle_rss'] / mem['bare']['idle_rss']:.2f}")
    print(
        f"  agent / bare (RSS per connection)  "
        f"{mem['agent']['per_connection'] / mem['bare']['per_connection']:.2f}"
    )
    print(f"  agent RSS after the rate test: {agent_rss_after / MiB:.1f} MiB")
    common.write_json(args.json, {
        "placement": where,
        "concurrency": args.concurrency,
        "idle": args.idle,
        "rate": rate,
        "server_ms_per_connection": server_ms,
        "client_busy": busy,
        "memory": mem,
        "agent_rss_after": agent_rss_after,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
