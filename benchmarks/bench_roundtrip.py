"""
Pooled request round-trip latency on loopback, against a raw TLS echo of a
similar-size payload measured in the same run.

A child process (C{benchmarks/roundtrip_server.py}) runs, in one reactor,
a real agent serving C{IBenchService.Echo(string) -> string} and a bare
Twisted TLS echo server with the same TLS policy (L{AgentTLSOptions}) and
the same certificate. This process is the client, on blocking C{ssl}
sockets, so client and agent never share a GIL.

Timed, per sample, each on ONE long-lived connection:

  - C{halibut}: C{NEXT} -> C{PROCEED}, then the request (DEFLATE'd BSON,
    encoded before the clock starts) -> the whole response (inflated, to
    find its end; it is decoded and checked after the clock stops). This
    is a pooled Halibut call as Octopus Server makes it: two exchanges.
  - C{tls-echo}: the request's wire size in bytes -> the same bytes back.
  - C{tls-echo-2}: a 6-byte echo then the request-size echo: the same two
    exchanges as C{halibut}, with no protocol work at all.

Rounds interleave the three; medians, p90 and p99 are over all samples.

Loopback latency depends on where the scheduler puts the two processes
(a wake-up on another CPU costs more than one on the same CPU), and left
alone it may move them between rounds. So by default (C{--pin split}) the
client is pinned to one CPU and the server to another, which is also the
closer model of a server and an agent on different machines. C{--pin same}
puts both on one CPU; C{--pin none} leaves placement to the scheduler.

Run from the repository root::

    python benchmarks/bench_roundtrip.py [--rounds 7] [--count 3000] [--text-bytes 1024] [--pin split]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import common
from common import Certificates, Connection, HalibutClient, percentile
from tentacle.halibut.deflate import compress
from tentacle.halibut.serializer import ResponseMessage, encode_message


def make_request(text: str) -> tuple[Any, bytes]:
    message = common.request("IBenchService", "Echo", text)
    return message, common.wire(message)


def check(payload: bytes, request: Any, text: str) -> None:
    response, streams = common.response(payload)
    if streams or response.error is not None or response.id != request.id or response.result != text:
        raise AssertionError(f"wrong response: {response!r:.300}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=3000, help="round trips per kind per round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--text-bytes", type=int, default=1024, help="size of the echoed string")
    common.add_pin_option(parser)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = common.placement(args.pin)
    common.pin_self(client_cpu)

    rng = random.Random(3)
    text = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(args.text_bytes))

    with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
        certs = Certificates(Path(tmp))
        child = common.start_child(
            common.server_command("roundtrip_server.py", certs.agent_pem, certs.server.thumbprint), server_cpu
        )
        try:
            agent_port, echo_port = common.read_ready(child, "ports", 2)
            halibut = HalibutClient(agent_port, certs.context, timeout=30)
            echo = Connection(echo_port, certs.context, timeout=30)
            first, wire = make_request(text)
            check(halibut.round_trip(wire), first, text)
            payload = bytes(rng.getrandbits(8) for _ in range(len(wire)))
            response_size = len(compress(encode_message(ResponseMessage(first.id, None, text))[0]))
            print(f"# bench_roundtrip: {common.machine()}")
            print(
                f"# Echo({args.text_bytes}-char string): request {len(wire)} B, response "
                f"{response_size} B on the wire; echo payload {len(payload)} B; "
                f"{args.rounds} rounds x {args.count} round trips per kind, one connection each"
            )
            print(f"# placement: {where}")
            for name, conn in (("agent", halibut), ("echo", echo)):
                cipher = conn.sock.cipher()
                print(f"# {name} connection: {conn.sock.version()} {cipher[0] if cipher else '?'}")

            def halibut_block(n: int) -> list[float]:
                requests = [make_request(text) for _ in range(n)]
                samples = []
                gc.collect()
                for request, request_wire in requests:
                    t0 = time.perf_counter()
                    response = halibut.round_trip(request_wire)
                    samples.append(time.perf_counter() - t0)
                    check(response, request, text)
                return samples

            def echo_block(n: int) -> list[float]:
                samples = []
                gc.collect()
                for _ in range(n):
                    t0 = time.perf_counter()
                    echo.sock.sendall(payload)
                    back = echo.read_exactly(len(payload))
                    samples.append(time.perf_counter() - t0)
                    if back != payload:
                        raise AssertionError("echo mismatch")
                return samples

            def echo2_block(n: int) -> list[float]:
                samples = []
                gc.collect()
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

            kinds: dict[str, Callable[[int], list[float]]] = {
                "halibut": halibut_block,
                "tls-echo": echo_block,
                "tls-echo-2": echo2_block,
            }
            for run in kinds.values():
                run(args.warmup)
            samples: dict[str, list[float]] = {k: [] for k in kinds}
            round_medians: dict[str, list[float]] = {k: [] for k in kinds}
            started = time.perf_counter()
            for _ in range(args.rounds):
                for kind, run in kinds.items():
                    block = run(args.count)
                    samples[kind] += block
                    round_medians[kind].append(statistics.median(block))
            elapsed = time.perf_counter() - started
            halibut.end()
            echo.close()
        finally:
            common.stop_child(child, timeout=10)

    medians = {k: statistics.median(v) for k, v in samples.items()}
    print(f"# measured in {elapsed:.1f} s\n")
    print(f"{'kind':11s} {'median':>9s} {'p90':>9s} {'p99':>9s}   per-round medians")
    figures: dict[str, dict[str, float]] = {}
    for kind, values in samples.items():
        ordered = sorted(values)
        rounds = round_medians[kind]
        figures[kind] = {
            "median": medians[kind],
            "p90": percentile(ordered, 0.9),
            "p99": percentile(ordered, 0.99),
            "samples": len(values),
        }
        print(
            f"{kind:11s} {medians[kind] * 1e6:7.1f} us {figures[kind]['p90'] * 1e6:7.1f} us "
            f"{figures[kind]['p99'] * 1e6:7.1f} us   "
            f"{min(rounds) * 1e6:.1f}..{max(rounds) * 1e6:.1f} us"
        )
    print()
    print(f"halibut / tls-echo   (median) {medians['halibut'] / medians['tls-echo']:.2f}")
    print(f"halibut / tls-echo-2 (median) {medians['halibut'] / medians['tls-echo-2']:.2f}")
    print(
        f"halibut - tls-echo-2 (median) {(medians['halibut'] - medians['tls-echo-2']) * 1e6:.1f} us "
        "of protocol work per call"
    )
    print(f"halibut / tls-echo   (p99)    {figures['halibut']['p99'] / figures['tls-echo']['p99']:.2f}")
    common.write_json(args.json, {"placement": where, "kinds": figures})
    return 0


if __name__ == "__main__":
    sys.exit(main())
