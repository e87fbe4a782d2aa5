"""
New connections, idle memory, and a busy connection beside many idle ones:
the agent as deployed (C{python -m tentacle run}) driven through
L{TentacleClient}, each against a bare Twisted mutual-TLS server measured
in the same run; the raw-wire figures beside them.

Servers, each its own child process on 127.0.0.1, pinned to one CPU (with
C{--pin split}; this process and its client children on the other), with
the same certificate and TLS policy (L{AgentTLSOptions}, which asks for the
client's certificate):

  - C{agent}: C{python -m tentacle --home HOME run} (twistd, Tentacle's
    default services, info-level log to a file), trusting our certificate;
  - C{bare}: C{benchmarks/bare_server.py}, a bare Twisted TLS echo server
    that loads nothing of Tentacle but the TLS policy and the identity.

B{Memory}, C{--memory-rounds} (3) rounds, each on a fresh agent and a fresh
bare server:

  - idle RSS: C{VmRSS} a second after the server listens, before any
    connection;
  - a child (C{client_worker.py}) opens and closes C{--warmup} (5)
    connections; C{VmRSS} is read; another child opens C{--idle} (200)
    connections and holds them; after a second C{VmRSS} is read again.  The
    difference over N is the RSS per idle connection.  An agent connection
    is a L{TentacleClient}'s pooled connection after one call
    (C{GetCapabilities}, the first call Octopus Server makes), waiting for
    C{NEXT}; a bare one is a bare Twisted mTLS connection that echoed a byte.

B{New connections}, C{--rounds} (5) rounds on one fresh agent and bare
server, the kinds interleaved; in each, C{--count} (500) connections, at
most C{--concurrency} (8) at once, timed from the first connect to the last
close; the server's CPU time is read from C{/proc} after a short settle:

  - C{client}: L{TentacleClient} (no pooling: C{max_idle=0}) in this
    process: TCP, TLS, the pin check, MX identity lines, one
    C{GetCapabilities}, C{END}, close;
  - C{bare-twisted}: a bare Twisted mTLS client in this process: TCP, TLS,
    one byte echoed (so the server finished its side of the handshake),
    close.  The goal's baseline;
  - C{wire} and C{bare}: the same two on blocking C{ssl} sockets from
    C{--concurrency} threads (the raw figures: a pre-encoded request, the
    response read to its end).

B{A busy connection beside idle ones}, C{--rounds} rounds: C{--active}
(1000) pooled C{GetCapabilities} calls through one L{TentacleClient},
timed one by one, with no other connection open, and with C{--many-idle}
(500) idle authenticated connections held by a child (as above); the p50
of each, the order turning from round to round.

    python benchmarks/bench_connections.py [--rounds 5] [--count 500] [--idle 200] [--many-idle 500] [--pin split]
    python benchmarks/bench_connections.py --memory-only [--memory-rounds 3]
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
CALL = ("ICapabilitiesServiceV2", "GetCapabilities")


# --- the servers ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(folder: Path, certs: Certificates, cpu: int | None) -> tuple[subprocess.Popen[str], int]:
    """
    The real agent, C{tentacle run}, in a home of its own; its log goes to
    a file.
    """
    home = Path(tempfile.mkdtemp(prefix="agent-home-", dir=folder))
    IdentityStore(home).save(certs.agent)
    port = free_port()
    ConfigFile(home).save(
        TentacleConfig(
            home=home, port=port, listen_address="127.0.0.1", trusted_thumbprints=(certs.server.thumbprint,)
        )
    )
    log = home / "agent.log"
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


async def twisted_burst(reactor: Any, kind: str, pid: int, port: int, certs: Certificates, count: int,
                        concurrency: int) -> tuple[float, float, float]:
    """
    C{count} new connections from this process's reactor, C{concurrency}
    at once: L{TentacleClient} calls (C{kind} C{client}) or bare Twisted
    mTLS echoes of a byte (C{bare-twisted}).  As L{burst}.
    """
    from twisted.internet.defer import Deferred, gatherResults

    tls = common.client_tls(certs.server)
    client = common.tentacle_client(reactor, port, certs, max_idle=0)
    numbers = itertools.count()

    async def one_client() -> None:
        result, _ = await client.call(*CALL)
        if "IScriptServiceV2" not in result.supported_capabilities:
            raise AssertionError("GetCapabilities did not list IScriptServiceV2")

    async def one_bare() -> None:
        connection = await common.BareTLSClient.connect(reactor, port, tls)
        if await connection.exchange(b"x") != b"x":
            raise AssertionError("the bare server did not echo")
        await connection.close()

    one = one_client if kind == "client" else one_bare

    async def worker() -> None:
        while next(numbers) < count:
            await one()

    server_before, client_before = common.cpu_seconds(pid), time.process_time()
    started = time.perf_counter()
    await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(concurrency)], consumeErrors=True)
    elapsed = time.perf_counter() - started
    await common.sleep(reactor, 0.3)  # let the last connections' teardown be counted
    return elapsed, common.cpu_seconds(pid) - server_before, time.process_time() - client_before


def settled_burst(kind: Agent | Bare, count: int, concurrency: int) -> tuple[float, float, float]:
    """
    L{burst}, with the same settle as L{twisted_burst} before the server's
    CPU time is read.
    """
    server_before = common.cpu_seconds(kind.pid)
    elapsed, _, client = burst(kind, count, concurrency)
    time.sleep(0.3)
    return elapsed, common.cpu_seconds(kind.pid) - server_before, client


class Holder:
    """
    A C{client_worker.py} child holding N idle connections.
    """

    def __init__(self, kind: str, port: int, certs: Certificates, count: int) -> None:
        identity = [str(certs.server_cert), str(certs.server_key)]
        args = ["agent", port, certs.agent.thumbprint, *identity, count] if kind == "agent" else \
            ["bare", port, *identity, count]
        self.child = common.start_child(common.server_command("client_worker.py", *args))
        [held] = common.read_ready(self.child, "ready", 1)
        if held != count:
            self.stop()
            raise RuntimeError(f"only {held} of {count} connections opened")

    def stop(self) -> None:
        common.stop_child(self.child, timeout=30)


def memory_round(folder: Path, certs: Certificates, server_cpu: int | None, idle: int,
                 warmup: int) -> dict[str, dict[str, float]]:
    """
    A fresh agent and bare server: RSS idle, then before and with C{idle}
    idle connections (bytes).
    """
    agent, agent_port = start_agent(folder, certs, server_cpu)
    bare = common.start_child(common.server_command("bare_server.py", certs.agent_pem), server_cpu)
    out = {}
    try:
        [bare_port] = common.read_ready(bare, "port", 1)
        for name, pid, port in (("agent", agent.pid, agent_port), ("bare", bare.pid, bare_port)):
            time.sleep(1.0)
            fresh = common.proc_status(pid, "VmRSS")
            Holder(name, port, certs, warmup).stop()
            time.sleep(0.5)
            before = common.proc_status(pid, "VmRSS")
            holder = Holder(name, port, certs, idle)
            time.sleep(1.0)
            after = common.proc_status(pid, "VmRSS")
            holder.stop()
            out[name] = {
                "idle_rss": fresh, "rss_before": before, "rss_with_idle": after,
                "per_connection": (after - before) / idle,
            }
    finally:
        common.stop_child(bare)
        common.stop_child(agent, terminate=True)
    return out


async def active_p50(reactor: Any, client: Any, count: int) -> float:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        await client.call(*CALL)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def measure(reactor: Any, args: Any, folder: Path) -> dict[str, Any]:
    certs = Certificates(folder)
    client_cpu, server_cpu, where = common.placement(args.pin, "agent and bare server")
    common.pin_self(client_cpu)
    print(f"# placement: {where}; load average at start {common.loadavg()}", flush=True)

    # -- memory, on fresh servers --
    memory = []
    for r in range(args.memory_rounds):
        m = await common.in_thread(memory_round, folder, certs, server_cpu, args.idle, args.warmup)
        memory.append(m)
        print(
            f"#   memory round {r + 1}: idle RSS agent {m['agent']['idle_rss'] / MiB:.1f} MiB, bare "
            f"{m['bare']['idle_rss'] / MiB:.1f} MiB; per idle connection agent "
            f"{m['agent']['per_connection'] / 1024:.1f} KiB, bare {m['bare']['per_connection'] / 1024:.1f} KiB",
            flush=True,
        )

    if args.memory_only:
        return {"where": where, "tls": None, "memory": memory, "rate": None, "active": None,
                "agent_rss_after": None}

    agent_child, agent_port = start_agent(folder, certs, server_cpu)
    bare_child = common.start_child(common.server_command("bare_server.py", certs.agent_pem), server_cpu)
    library = None
    try:
        [bare_port] = common.read_ready(bare_child, "port", 1)
        raw = {
            "wire": Agent("agent", agent_child.pid, agent_port, certs.context),
            "bare": Bare("bare", bare_child.pid, bare_port, certs.context),
        }
        twisted = {"client": (agent_child.pid, agent_port), "bare-twisted": (bare_child.pid, bare_port)}
        probe = HalibutClient(agent_port, certs.context, timeout=30)
        cipher = probe.sock.cipher()
        tls = f"{probe.sock.version()} {cipher[0] if cipher else '?'}"
        probe.end()

        async def burst_of(kind: str, count: int) -> tuple[float, float, float]:
            if kind in raw:
                return settled_burst(raw[kind], count, args.concurrency)
            pid, port = twisted[kind]
            return await twisted_burst(reactor, kind, pid, port, certs, count, args.concurrency)

        # -- new connections --
        print(
            f"# new connections: {args.rounds} rounds x {args.count} per kind, {args.concurrency} in flight; {tls}",
            flush=True,
        )
        order = ["client", "bare-twisted", "wire", "bare"]
        for kind in order:
            await burst_of(kind, min(100, args.count))  # warm-up
        rate: dict[str, list[tuple[float, float, float]]] = {k: [] for k in order}
        for r in range(args.rounds):
            for kind in order[r % 4:] + order[: r % 4]:
                elapsed, server, client_cpu_s = await burst_of(kind, args.count)
                rate[kind].append((elapsed, server, client_cpu_s))
                print(
                    f"#   round {r + 1} {kind:12s} {args.count / elapsed:7.1f} conn/s; CPU per connection: "
                    f"server {server / args.count * 1e3:.2f} ms, client {client_cpu_s / args.count * 1e3:.2f} ms; "
                    f"client busy {client_cpu_s / elapsed:.2f}",
                    flush=True,
                )

        # -- a busy connection beside idle ones --
        print(f"# a busy connection: {args.rounds} rounds x {args.active} pooled GetCapabilities, "
              f"with 0 and with {args.many_idle} idle connections", flush=True)
        library = common.tentacle_client(reactor, agent_port, certs)
        await active_p50(reactor, library, 200)  # warm-up
        active: dict[str, list[float]] = {"none": [], "many": []}
        for r in range(args.rounds):
            for setting in (("none", "many") if r % 2 == 0 else ("many", "none")):
                holder = None
                if setting == "many":
                    holder = await common.in_thread(Holder, "agent", agent_port, certs, args.many_idle)
                    await common.sleep(reactor, 1.0)
                try:
                    p50 = await active_p50(reactor, library, args.active)
                finally:
                    if holder is not None:
                        await common.in_thread(holder.stop)
                        await common.sleep(reactor, 1.0)
                active[setting].append(p50)
                print(f"#   round {r + 1} {setting:4s} idle: p50 {p50 * 1e6:.0f} us", flush=True)
        await library.close()
        library = None
        agent_rss_after = common.proc_status(agent_child.pid, "VmRSS")
    finally:
        if library is not None:
            await library.close()
        common.stop_child(bare_child)
        common.stop_child(agent_child, terminate=True)
    return {
        "where": where, "tls": tls, "memory": memory, "rate": rate, "active": active,
        "agent_rss_after": agent_rss_after,
    }


def print_memory(args: Any, memory: list[dict[str, dict[str, float]]]) -> None:
    print(f"Memory ({args.idle} idle connections held, after {args.warmup} opened and closed)")
    for r, m in enumerate(memory):
        for name in ("agent", "bare"):
            x = m[name]
            print(
                f"  round {r + 1} {name:5s} idle {x['idle_rss'] / MiB:6.1f} MiB; {x['rss_before'] / MiB:6.1f} -> "
                f"{x['rss_with_idle'] / MiB:6.1f} MiB: {x['per_connection'] / 1024:5.1f} KiB per connection"
            )


def memory_rows(args: Any, memory: list[dict[str, dict[str, float]]]) -> list[Any]:
    return [
        common.row("idle agent RSS, `tentacle run` (vs bare Twisted TLS listener)",
                   [m["agent"]["idle_rss"] / MiB for m in memory], [m["bare"]["idle_rss"] / MiB for m in memory],
                   "MiB", "lower", key="idle_rss"),
        common.row(f"RSS per idle authenticated TentacleClient connection, {args.idle} held (vs bare TLS)",
                   [m["agent"]["per_connection"] / 1024 for m in memory],
                   [m["bare"]["per_connection"] / 1024 for m in memory], "KiB", "lower", key="connection_rss"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--memory-rounds", type=int, default=3, help="fresh agent and bare server pairs for memory")
    parser.add_argument("--count", type=int, default=500, help="new connections per kind per round")
    parser.add_argument("--concurrency", type=int, default=8, help="connections in flight")
    parser.add_argument("--idle", type=int, default=200, help="idle connections held for the memory figure")
    parser.add_argument("--warmup", type=int, default=5, help="connections opened and closed before memory is read")
    parser.add_argument("--many-idle", type=int, default=500, help="idle connections beside the busy one")
    parser.add_argument("--active", type=int, default=1000, help="calls timed on the busy connection per round")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure memory only: no new-connection or busy-connection figures")
    common.add_pin_option(parser)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    common.quiet_logging()
    print(common.header("bench_connections"), flush=True)

    async def run(reactor: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tentacle-bench-connections-") as tmp:
            return await measure(reactor, args, Path(tmp))

    out = common.react(run)
    rate, memory, active = out["rate"], out["memory"], out["active"]
    n = args.count
    print(f"# load average at the end {common.loadavg()}\n")
    if args.memory_only:
        print_memory(args, memory)
        for r in memory_rows(args, memory):
            print(common.describe_row(r))
        common.write_json(args.json, {"placement": out["where"], "idle": args.idle, "memory": memory,
                                      "rows": memory_rows(args, memory)})
        return 0
    print(f"New connections ({out['tls']}; median over {args.rounds} rounds)")
    for kind, samples in rate.items():
        print(
            f"  {kind:12s} {statistics.median(n / s[0] for s in samples):7.1f} conn/s; server CPU "
            f"{statistics.median(s[1] / n * 1e3 for s in samples):.2f} ms per connection; client busy "
            f"{statistics.median(s[2] / s[0] for s in samples):.2f}"
        )
    cpu = {k: [s[1] / n * 1e3 for s in v] for k, v in rate.items()}
    per_second = {k: [n / s[0] for s in v] for k, v in rate.items()}
    print_memory(args, memory)
    print(f"  agent RSS after the connection tests: {out['agent_rss_after'] / MiB:.1f} MiB")
    rows = [
        common.row("new connection + identity + 1 request via TentacleClient: agent CPU per connection "
                   "(vs bare Twisted mTLS handshake)", cpu["client"], cpu["bare-twisted"], "ms", "lower",
                   key="connection", fmt="{:.2f}"),
        common.row(f"new connections per second via TentacleClient, {args.concurrency} in flight "
                   "(vs bare Twisted mTLS handshakes)", per_second["client"], per_second["bare-twisted"],
                   "conn/s", "higher", fmt="{:.0f}"),
        common.row("new connection + identity + 1 request, raw wire: agent CPU per connection "
                   "(vs bare mTLS handshake, blocking ssl)", cpu["wire"], cpu["bare"], "ms", "lower", fmt="{:.2f}"),
        common.row(f"new connections per second, raw wire, {args.concurrency} threads (vs bare, blocking ssl)",
                   per_second["wire"], per_second["bare"], "conn/s", "higher", fmt="{:.0f}"),
        *memory_rows(args, memory),
        common.row(f"busy connection p50 via TentacleClient with {args.many_idle} idle connections (vs with none)",
                   [x * 1e6 for x in active["many"]], [x * 1e6 for x in active["none"]], "µs", "lower",
                   key="many_idle", fmt="{:.0f}"),
    ]
    for r in rows:
        print(common.describe_row(r))
    common.write_json(args.json, {
        "placement": out["where"],
        "concurrency": args.concurrency,
        "idle": args.idle,
        "many_idle": args.many_idle,
        "memory": memory,
        "rate": rate,
        "active": active,
        "agent_rss_after": out["agent_rss_after"],
        "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
