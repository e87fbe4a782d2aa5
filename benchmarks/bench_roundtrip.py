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

Rounds interleave the three; medians and p90 are over all samples.

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
import os
import platform
import random
import socket
import ssl
import statistics
import string
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import twisted

from tentacle.contracts import tentacle_registry
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, decode_message, encode_message
from tentacle.identity import Identity

SERVER_SCRIPT = Path(__file__).with_name("roundtrip_server.py")
IDENTITY_LINE = b"MX-SERVER 1.0\r\n\r\n"


class Connection:
    """
    A blocking TLS client socket with the reads both clients need.
    """

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = context.wrap_socket(raw)
        self.buffer = b""

    def recv(self) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.recv()
        self.buffer = data[n:] + self.buffer
        return data[:n]

    def close(self) -> None:
        self.sock.close()


class HalibutClient(Connection):
    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(port, context)
        self.sock.sendall(b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n")
        if self.read_exactly(len(IDENTITY_LINE)) != IDENTITY_LINE:
            raise AssertionError("the agent did not answer MX-SERVER")
        self.fresh = True
        self.registry = tentacle_registry()

    def round_trip(self, wire: bytes) -> bytes:
        """
        NEXT/PROCEED (except on the first call), send a pre-encoded request,
        and return the response's BSON once its DEFLATE stream has ended.
        """
        sock = self.sock
        if not self.fresh:
            sock.sendall(b"NEXT\r\n")
            if self.read_exactly(9) != b"PROCEED\r\n":
                raise AssertionError("the agent did not answer PROCEED")
        self.fresh = False
        sock.sendall(wire)
        inflater = Inflater()
        payload = None
        while payload is None:
            payload = inflater.feed(self.recv())
        if inflater.unused:
            raise AssertionError("unexpected bytes after the response")
        return payload

    def check(self, payload: bytes, request: RequestMessage, text: str) -> None:
        response, streams = decode_message(payload, self.registry, expected=ResponseMessage)
        assert isinstance(response, ResponseMessage) and not streams
        if response.error is not None or response.id != request.id or response.result != text:
            raise AssertionError(f"wrong response: {response!r:.300}")


def make_request(text: str) -> tuple[RequestMessage, bytes]:
    call = uuid.uuid4()
    request = RequestMessage(
        id=f"IBenchService::Echo[1] / {call}",
        activity_id=call,
        service="IBenchService",
        method="Echo",
        params=(text,),
    )
    data, _ = encode_message(request)
    return request, compress(data)


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
        f"{os.cpu_count()} CPU(s), {cpu}; Python {platform.python_version()}, "
        f"Twisted {twisted.__version__}, {ssl.OPENSSL_VERSION}"
    )


def placement(pin: str) -> tuple[int | None, int | None, str]:
    """
    The CPUs for the client and the server, and how to describe them.
    """
    if pin == "none" or not hasattr(os, "sched_getaffinity"):
        return None, None, "not pinned"
    allowed = sorted(os.sched_getaffinity(0))
    if pin == "split" and len(allowed) >= 2:
        return allowed[0], allowed[1], f"client on CPU {allowed[0]}, server on CPU {allowed[1]}"
    return allowed[0], allowed[0], f"client and server both on CPU {allowed[0]}"


def start_server(
    folder: Path, agent: Identity, server: Identity, cpu: int | None
) -> tuple[subprocess.Popen[str], int, int]:
    pem = folder / "agent.pem"
    pem.write_bytes(agent.certificate_pem() + agent.private_key_pem())
    command = [sys.executable, str(SERVER_SCRIPT), str(pem), server.thumbprint]
    if cpu is not None:
        command.append(str(cpu))
    child = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline().split()
    if len(line) != 3 or line[0] != "ports":
        child.kill()
        raise RuntimeError(f"the server did not start (said {line!r})")
    return child, int(line[1]), int(line[2])


def stop_server(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None
    child.stdin.close()
    try:
        child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def client_context(folder: Path, server: Identity) -> ssl.SSLContext:
    """
    Like C{tests.support.client_context}: present the server's certificate,
    do not check the agent's (its thumbprint would be checked by Octopus).
    """
    cert, key = folder / "server.crt", folder / "server.key"
    cert.write_bytes(server.certificate_pem())
    key.write_bytes(server.private_key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(cert), str(key))
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--count", type=int, default=3000, help="round trips per kind per round")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--text-bytes", type=int, default=1024, help="size of the echoed string")
    parser.add_argument(
        "--pin", choices=("split", "same", "none"), default="split",
        help="client and server on two CPUs (default), on one, or wherever the scheduler likes",
    )
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = placement(args.pin)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})

    rng = random.Random(3)
    text = "".join(rng.choice(string.ascii_letters + string.digits + " ") for _ in range(args.text_bytes))

    with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
        folder = Path(tmp)
        agent_identity, server_identity = Identity.generate("agent"), Identity.generate("server")
        context = client_context(folder, server_identity)
        child, agent_port, echo_port = start_server(
            folder, agent_identity, server_identity, server_cpu
        )
        try:
            halibut = HalibutClient(agent_port, context)
            echo = Connection(echo_port, context)
            first, wire = make_request(text)
            halibut.check(halibut.round_trip(wire), first, text)
            payload = bytes(rng.getrandbits(8) for _ in range(len(wire)))
            response_size = len(compress(encode_message(ResponseMessage(first.id, None, text))[0]))
            print(f"# bench_roundtrip: {machine()}")
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
                    halibut.check(response, request, text)
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
            halibut.sock.sendall(b"END\r\n")
            halibut.close()
            echo.close()
        finally:
            stop_server(child)

    medians = {k: statistics.median(v) for k, v in samples.items()}
    print(f"# measured in {elapsed:.1f} s\n")
    print(f"{'kind':11s} {'median':>9s} {'p90':>9s}   per-round medians")
    for kind, values in samples.items():
        ordered = sorted(values)
        rounds = round_medians[kind]
        print(
            f"{kind:11s} {medians[kind] * 1e6:7.1f} us {percentile(ordered, 0.9) * 1e6:7.1f} us   "
            f"{min(rounds) * 1e6:.1f}..{max(rounds) * 1e6:.1f} us"
        )
    print()
    print(f"halibut / tls-echo   (median) {medians['halibut'] / medians['tls-echo']:.2f}")
    print(f"halibut / tls-echo-2 (median) {medians['halibut'] / medians['tls-echo-2']:.2f}")
    print(
        f"halibut - tls-echo-2 (median) {(medians['halibut'] - medians['tls-echo-2']) * 1e6:.1f} us "
        "of protocol work per call"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
