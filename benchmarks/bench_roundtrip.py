"""
Pooled request round-trip latency on loopback: C{GetCapabilities} through
L{TentacleClient}, as users make the call, against a bare Twisted TLS echo
of the request's size measured in the same run; the raw wire figures
beside them.

A child process (C{benchmarks/roundtrip_server.py}) runs, in one reactor,
a real agent with Tentacle's services and a bare Twisted TLS echo server
with the same TLS policy (L{AgentTLSOptions}) and certificate.  This
process is the client (its own GIL).  Each kind uses ONE long-lived
connection:

  - C{client}: C{TentacleClient.call("ICapabilitiesServiceV2",
    "GetCapabilities")} on its pooled connection: building the request,
    NEXT -> PROCEED, the request -> the response, decoded, as a user's
    call costs.
  - C{twisted-echo}: a bare Twisted mutual-TLS client in the same reactor
    (C{TCP4ClientEndpoint} + TLS, the client options L{TentacleClient}
    uses): the request's wire size in bytes -> the same bytes back.  The
    goal's baseline (a Twisted client against a Twisted server, like ours).
  - C{wire}: the raw wire, on a blocking C{ssl} socket: NEXT -> PROCEED,
    then a pre-encoded GetCapabilities request -> the whole response
    (inflated to find its end, decoded and checked after the clock stops).
  - C{tls-echo}: the same echo as C{twisted-echo}, on a blocking C{ssl}
    socket.
  - C{tls-echo-2}: a 6-byte echo then the request-size echo: the two
    exchanges of a pooled call with no protocol work (blocking C{ssl}).

Rounds interleave the kinds; each round's median is one sample of the
kind, and each ratio's median and spread are over the rounds' ratios.

By default (C{--pin split}) the client is pinned to one CPU and the server
to another: loopback latency depends on whether a wake-up crosses CPUs.

    python benchmarks/bench_roundtrip.py [--rounds 5] [--count 2000] [--pin split]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import common
from common import BareTLSClient, Certificates, Connection, HalibutClient, percentile

CALL = ("ICapabilitiesServiceV2", "GetCapabilities")


async def measure(reactor: Any, args: Any, folder: Path) -> dict[str, Any]:
    from tentacle.client.api import build_request
    from tentacle.halibut.deflate import compress
    from tentacle.halibut.serializer import encode_message

    certs = Certificates(folder)
    client_cpu, server_cpu, where = common.placement(args.pin)
    common.pin_self(client_cpu)
    child = common.start_child(
        common.server_command("roundtrip_server.py", certs.agent_pem, certs.server.thumbprint), server_cpu
    )
    library = None
    twisted_echo = None
    try:
        agent_port, echo_port = common.read_ready(child, "ports", 2)
        library = common.tentacle_client(reactor, agent_port, certs)
        wire_client = HalibutClient(agent_port, certs.context, timeout=30)
        echo = Connection(echo_port, certs.context, timeout=30)
        twisted_echo = await BareTLSClient.connect(reactor, echo_port, common.client_tls(certs.server))
        request_size = len(compress(encode_message(build_request(*CALL))[0]))
        payload = random.Random(3).randbytes(request_size)
        capabilities, _ = await library.call(*CALL)
        print(f"# GetCapabilities: request {request_size} B on the wire; the agent offers "
              f"{', '.join(capabilities.supported_capabilities)}")
        print(f"# placement: {where}; {args.rounds} rounds x {args.count} round trips per kind")
        cipher = wire_client.sock.cipher()
        print(f"# wire connection: {wire_client.sock.version()} {cipher[0] if cipher else '?'}")

        async def client_block(n: int) -> list[float]:
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                result, _ = await library.call(*CALL)
                samples.append(time.perf_counter() - t0)
                if not result.supported_capabilities:
                    raise AssertionError("GetCapabilities answered nothing")
            return samples

        async def twisted_echo_block(n: int) -> list[float]:
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                back = await twisted_echo.exchange(payload)
                samples.append(time.perf_counter() - t0)
                if back != payload:
                    raise AssertionError("echo mismatch")
            return samples

        async def wire_block(n: int) -> list[float]:
            wires = [common.wire(common.request(*CALL)) for _ in range(n)]
            samples, answers = [], []
            for request_wire in wires:
                t0 = time.perf_counter()
                answers.append(wire_client.round_trip(request_wire))
                samples.append(time.perf_counter() - t0)
            for answer in answers:
                if not common.result(answer).supported_capabilities:
                    raise AssertionError("GetCapabilities answered nothing")
            return samples

        async def echo_block(n: int) -> list[float]:
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                echo.sock.sendall(payload)
                back = echo.read_exactly(len(payload))
                samples.append(time.perf_counter() - t0)
                if back != payload:
                    raise AssertionError("echo mismatch")
            return samples

        async def echo2_block(n: int) -> list[float]:
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                echo.sock.sendall(b"NEXT\r\n")
                control = echo.read_exactly(6)
                echo.sock.sendall(payload)
                back = echo.read_exactly(len(payload))
                samples.append(time.perf_counter() - t0)
                if back != payload or control != b"NEXT\r\n":
                    raise AssertionError("echo mismatch")
            return samples

        kinds: dict[str, Callable[[int], Awaitable[list[float]]]] = {
            "client": client_block,
            "twisted-echo": twisted_echo_block,
            "wire": wire_block,
            "tls-echo": echo_block,
            "tls-echo-2": echo2_block,
        }
        for run in kinds.values():
            await run(args.warmup)
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        rounds: dict[str, list[list[float]]] = {k: [] for k in kinds}
        order = list(kinds)
        started = time.perf_counter()
        for r in range(args.rounds):
            for kind in order[r % len(order):] + order[: r % len(order)]:
                gc.collect()
                block = await kinds[kind](args.count)
                samples[kind] += block
                rounds[kind].append(block)
        elapsed = time.perf_counter() - started
        wire_client.end()
        echo.close()
        await twisted_echo.close()
        twisted_echo = None
        await library.close()
        library = None
    finally:
        if twisted_echo is not None:
            twisted_echo.protocol.transport.abortConnection()
        if library is not None:
            await library.close()
        common.stop_child(child, timeout=10)
    return {"samples": samples, "rounds": rounds, "where": where, "elapsed": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="round trips per kind per round")
    parser.add_argument("--warmup", type=int, default=300)
    common.add_pin_option(parser)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    common.quiet_logging()
    print(common.header("bench_roundtrip"), flush=True)

    async def run(reactor: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
            return await measure(reactor, args, Path(tmp))

    out = common.react(run)
    samples, rounds = out["samples"], out["rounds"]
    print(f"# measured in {out['elapsed']:.1f} s; load average at the end {common.loadavg()}\n")
    print(f"{'kind':13s} {'median':>9s} {'p90':>9s} {'p99':>9s}   per-round medians")
    figures: dict[str, dict[str, float]] = {}
    p50 = {k: [statistics.median(b) * 1e6 for b in v] for k, v in rounds.items()}
    p99 = {k: [percentile(sorted(b), 0.99) * 1e6 for b in v] for k, v in rounds.items()}
    for kind, values in samples.items():
        ordered = sorted(values)
        figures[kind] = {
            "median": statistics.median(values),
            "p90": percentile(ordered, 0.9),
            "p99": percentile(ordered, 0.99),
            "samples": len(values),
        }
        print(
            f"{kind:13s} {figures[kind]['median'] * 1e6:7.1f} us {figures[kind]['p90'] * 1e6:7.1f} us "
            f"{figures[kind]['p99'] * 1e6:7.1f} us   {min(p50[kind]):.1f}..{max(p50[kind]):.1f} us"
        )
    print()

    def us_row(name: str, ours: str, base: str, stat: dict[str, list[float]], key: str | None = None) -> dict[str, Any]:
        return common.row(name, stat[ours], stat[base], "µs", "lower", key=key)

    rows = [
        us_row("pooled GetCapabilities p50 via TentacleClient (vs bare Twisted TLS echo)",
               "client", "twisted-echo", p50, "roundtrip"),
        us_row("pooled GetCapabilities p99 via TentacleClient (vs bare Twisted TLS echo)", "client", "twisted-echo", p99),
        us_row("pooled GetCapabilities p50 via TentacleClient (vs blocking-ssl TLS echo)", "client", "tls-echo", p50),
        us_row("pooled GetCapabilities p50, raw wire (vs blocking-ssl TLS echo)", "wire", "tls-echo", p50),
        us_row("pooled GetCapabilities p50, raw wire (vs two-exchange blocking-ssl echo)", "wire", "tls-echo-2", p50),
        us_row("bare Twisted TLS echo p50 (vs blocking-ssl TLS echo): the client stack alone",
               "twisted-echo", "tls-echo", p50),
    ]
    for r in rows:
        print(common.describe_row(r))
    common.write_json(args.json, {"placement": out["where"], "kinds": figures, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
