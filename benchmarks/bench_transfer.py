"""
File transfer throughput on loopback: a 1 GiB upload and download through
the agent's C{IFileTransferService}, each against a bare Twisted mutual-TLS
socket moving the same bytes in the same run (the ceiling).

A child process (C{benchmarks/transfer_server.py}) runs, in one reactor, a
real agent with Tentacle's services and a bare Twisted TLS server with the
same TLS policy (L{AgentTLSOptions}) and certificate.  This process is the
client, on blocking C{ssl} sockets presenting a client certificate, so
client and agent never share a GIL.  Both kinds send and receive with the
same client code: 256 KiB C{sendall}s of one pre-built block, and
C{recv_into} a 1 MiB buffer.

Timed, per transfer, each on a fresh connection:

  - C{upload}: C{UploadFile("bench/1GiB.bin", DataStream)} from the first
    byte of the request until the C{UploadResult} is read; the agent writes
    the file beside its destination, hashes it (SHA-1), fsyncs and renames
    it before answering.  The returned hash and length are checked.
  - C{put}: C{PUT <n>} then n bytes, until the bare server's C{OK}; the
    bytes are read and dropped.  The issue's ceiling for uploads.
  - C{store}: C{STORE <n>} then n bytes: the bare server hashes (SHA-1),
    writes a new file in 1 MiB batches, fsyncs and renames it, as the agent
    does, with no Halibut.
    Not a ceiling but a reference: C{upload / store} is the price of the
    protocol layers, C{store / put} that of hashing and the disk.
  - C{download}: C{DownloadFile("bench/1GiB.bin")} from the request until
    the stream's trailer is read (file from the page cache, 64 KiB chunks
    through a pull producer).
  - C{get}: C{GET <n>} until n bytes are read (64 KiB chunks from memory,
    pull producer).

Rounds interleave the five; medians are over the rounds.

As in C{bench_roundtrip.py}, by default (C{--pin split}) the client is
pinned to one CPU and the server process to another, so the scheduler does
not move them between rounds; C{--pin none} leaves placement to it.

Run from the repository root::

    python benchmarks/bench_transfer.py [--rounds 5] [--mib 1024] [--pin split]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import twisted

from tentacle.contracts import DataStream, UploadResult, tentacle_registry
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.serializer import RequestMessage, ResponseMessage, decode_message, encode_message
from tentacle.halibut.streams import HEADER_SIZE, TRAILER_SIZE, stream_header, stream_trailer
from tentacle.identity import Identity

SERVER_SCRIPT = Path(__file__).with_name("transfer_server.py")
IDENTITY_LINE = b"MX-SERVER 1.0\r\n\r\n"
SEND_BLOCK = bytes(range(256)) * 1024  # 256 KiB
MiB = 1024 * 1024
REMOTE_PATH = "bench/1GiB.bin"


class Connection:
    """
    A blocking TLS client socket with exact reads and a bulk sink.
    """

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock = context.wrap_socket(raw)
        self.buffer = b""
        self.scratch = bytearray(MiB)

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

    def drain(self, n: int) -> None:
        """
        Read and drop exactly C{n} bytes.
        """
        taken = min(n, len(self.buffer))
        self.buffer = self.buffer[taken:]
        n -= taken
        view = memoryview(self.scratch)
        while n:
            got = self.sock.recv_into(view, min(n, len(view)))
            if not got:
                raise ConnectionError("the server closed the connection")
            n -= got

    def send_bytes(self, n: int) -> None:
        block = SEND_BLOCK
        while n >= len(block):
            self.sock.sendall(block)
            n -= len(block)
        if n:
            self.sock.sendall(block[:n])

    def close(self) -> None:
        self.sock.close()


class HalibutClient(Connection):
    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        super().__init__(port, context)
        self.sock.sendall(b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n")
        if self.read_exactly(len(IDENTITY_LINE)) != IDENTITY_LINE:
            raise AssertionError("the agent did not answer MX-SERVER")
        self.registry = tentacle_registry()

    def read_response(self) -> tuple[ResponseMessage, list[DataStream]]:
        inflater = Inflater()
        payload = None
        while payload is None:
            payload = inflater.feed(self.recv())
        self.buffer = inflater.unused + self.buffer
        response, streams = decode_message(payload, self.registry, expected=ResponseMessage)
        assert isinstance(response, ResponseMessage)
        return response, list(streams)

    def upload(self, length: int) -> UploadResult:
        stream = DataStream.fresh(length)
        self.sock.sendall(compress(encode_message(request("UploadFile", REMOTE_PATH, stream))[0]))
        self.sock.sendall(stream_header(stream.id, length))
        self.send_bytes(length)
        self.sock.sendall(stream_trailer(length))
        response, _ = self.read_response()
        if response.error is not None or not isinstance(response.result, UploadResult):
            raise AssertionError(f"the upload failed: {response.error}")
        return response.result

    def download(self) -> int:
        self.sock.sendall(compress(encode_message(request("DownloadFile", REMOTE_PATH))[0]))
        response, streams = self.read_response()
        if response.error is not None or len(streams) != 1:
            raise AssertionError(f"the download failed: {response.error}")
        length = streams[0].length
        self.read_exactly(HEADER_SIZE)
        self.drain(length)
        self.read_exactly(TRAILER_SIZE)
        return length


def request(method: str, *params: object) -> RequestMessage:
    call = uuid.uuid4()
    return RequestMessage(
        id=f"IFileTransferService::{method}[1] / {call}",
        activity_id=call,
        service="IFileTransferService",
        method=method,
        params=params,
    )


def expected_sha1(length: int) -> str:
    digest = hashlib.sha1()
    remaining = length
    while remaining >= len(SEND_BLOCK):
        digest.update(SEND_BLOCK)
        remaining -= len(SEND_BLOCK)
    digest.update(SEND_BLOCK[:remaining])
    return digest.hexdigest()


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


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def placement(pin: str) -> tuple[int | None, int | None, str]:
    """
    The CPUs for the client and the server, and how to describe them.
    """
    if pin == "none" or not hasattr(os, "sched_getaffinity"):
        return None, None, "not pinned"
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None, "not pinned (one CPU)"
    return allowed[0], allowed[1], f"client on CPU {allowed[0]}, server on CPU {allowed[1]}"


def start_server(
    folder: Path, agent: Identity, server: Identity, cpu: int | None
) -> tuple[subprocess.Popen[str], int, int]:
    pem = folder / "agent.pem"
    pem.write_bytes(agent.certificate_pem() + agent.private_key_pem())
    home = folder / "home"
    home.mkdir()
    child = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), str(pem), server.thumbprint, str(home)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if cpu is not None:
        # Before it starts listening, so its thread pool inherits the CPU too.
        os.sched_setaffinity(child.pid, {cpu})
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
    cert, key = folder / "server.crt", folder / "server.key"
    cert.write_bytes(server.certificate_pem())
    key.write_bytes(server.private_key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(cert), str(key))
    return context


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=1024, help="transfer size in MiB")
    parser.add_argument("--pin", choices=("split", "none"), default="split")
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = placement(args.pin)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    length = args.mib * MiB
    sha1 = expected_sha1(length)

    with tempfile.TemporaryDirectory(prefix="tentacle-bench-transfer-") as tmp:
        folder = Path(tmp).absolute()
        agent_identity, server_identity = Identity.generate("agent"), Identity.generate("server")
        context = client_context(folder, server_identity)
        child, agent_port, bare_port = start_server(
            folder, agent_identity, server_identity, server_cpu
        )
        try:
            rss_before = proc_status(child.pid, "VmRSS")
            results: dict[str, list[float]] = {
                "upload": [], "put": [], "store": [], "download": [], "get": []
            }

            def upload() -> None:
                client = HalibutClient(agent_port, context)
                result = client.upload(length)
                client.close()
                if (result.hash, result.length) != (sha1, length):
                    raise AssertionError(f"wrong upload result {result}")

            def put() -> None:
                client = Connection(bare_port, context)
                client.sock.sendall(f"PUT {length}\n".encode())
                client.send_bytes(length)
                if client.read_exactly(3) != b"OK\n":
                    raise AssertionError("the bare server did not answer OK")
                client.close()

            def store() -> None:
                client = Connection(bare_port, context)
                client.sock.sendall(f"STORE {length}\n".encode())
                client.send_bytes(length)
                expected = f"OK {sha1}\n".encode()
                answer = client.read_exactly(len(expected))
                if answer != expected:
                    raise AssertionError(f"the bare server answered {answer!r}")
                client.close()

            def download() -> None:
                client = HalibutClient(agent_port, context)
                if client.download() != length:
                    raise AssertionError("wrong download length")
                client.close()

            def get() -> None:
                client = Connection(bare_port, context)
                client.sock.sendall(f"GET {length}\n".encode())
                client.drain(length)
                client.close()

            for round_number in range(args.rounds):
                for name, action in (
                    ("upload", upload),
                    ("put", put),
                    ("store", store),
                    ("download", download),
                    ("get", get),
                ):
                    seconds = timed(action)
                    results[name].append(seconds)
                    print(
                        f"round {round_number + 1} {name:8} {length / seconds / 1e6:8.1f} MB/s",
                        file=sys.stderr,
                    )
            peak = proc_status(child.pid, "VmHWM")
        finally:
            stop_server(child)

    def rate(name: str) -> float:
        return length / statistics.median(results[name]) / 1e6

    print(f"# bench_transfer: {args.mib} MiB, {args.rounds} rounds, {where}; {machine()}")
    print(f"{'kind':10} {'median MB/s':>12} {'per-round MB/s':>24}")
    for name in results:
        rounds = ", ".join(f"{length / s / 1e6:.0f}" for s in results[name])
        print(f"{name:10} {rate(name):12.1f} {rounds:>24}")
    print(f"upload / put (ceiling)   = {rate('upload') / rate('put'):.3f}")
    print(f"upload / store           = {rate('upload') / rate('store'):.3f}")
    print(f"download / get (ceiling) = {rate('download') / rate('get'):.3f}")
    print(
        f"server process RSS: {rss_before / MiB:.1f} MiB before, "
        f"peak {peak / MiB:.1f} MiB (growth {(peak - rss_before) / MiB:.1f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
