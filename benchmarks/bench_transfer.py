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
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import common
from common import Certificates, Connection, HalibutClient, MiB
from tentacle.contracts import DataStream, UploadResult
from tentacle.halibut.deflate import compress
from tentacle.halibut.serializer import encode_message
from tentacle.halibut.streams import HEADER_SIZE, TRAILER_SIZE, stream_header, stream_trailer

SEND_BLOCK = bytes(range(256)) * 1024  # 256 KiB
REMOTE_PATH = "bench/1GiB.bin"


class TransferClient(HalibutClient):
    """
    One request per connection: an upload or a download.
    """

    def read_response(self) -> tuple[Any, list[Any]]:
        return common.response(self.read_payload(followed=True))

    def upload(self, length: int) -> UploadResult:
        stream = DataStream.fresh(length)
        self.sock.sendall(compress(encode_message(request("UploadFile", REMOTE_PATH, stream))[0]))
        self.sock.sendall(stream_header(stream.id, length))
        self.send_bytes(length, SEND_BLOCK)
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


def request(method: str, *params: object) -> Any:
    return common.request("IFileTransferService", method, *params)


def expected_sha1(length: int) -> str:
    digest = hashlib.sha1()
    remaining = length
    while remaining >= len(SEND_BLOCK):
        digest.update(SEND_BLOCK)
        remaining -= len(SEND_BLOCK)
    digest.update(SEND_BLOCK[:remaining])
    return digest.hexdigest()


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mib", type=int, default=1024, help="transfer size in MiB")
    common.add_pin_option(parser, choices=("split", "none"))
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = common.placement(args.pin)
    common.pin_self(client_cpu)
    length = args.mib * MiB
    sha1 = expected_sha1(length)

    with tempfile.TemporaryDirectory(prefix="tentacle-bench-transfer-") as tmp:
        folder = Path(tmp).absolute()
        certs = Certificates(folder)
        home = folder / "home"
        home.mkdir()
        child = common.start_child(
            common.server_command("transfer_server.py", certs.agent_pem, certs.server.thumbprint, home),
            server_cpu,
        )
        try:
            agent_port, bare_port = common.read_ready(child, "ports", 2)
            rss_before = common.proc_status(child.pid, "VmRSS")
            results: dict[str, list[float]] = {
                "upload": [], "put": [], "store": [], "download": [], "get": []
            }

            def upload() -> None:
                client = TransferClient(agent_port, certs.context)
                result = client.upload(length)
                client.close()
                if (result.hash, result.length) != (sha1, length):
                    raise AssertionError(f"wrong upload result {result}")

            def to_bare(verb: str, answer: bytes) -> Callable[[], None]:
                """
                C{verb} n, n bytes, and the bare server's answer.
                """

                def send() -> None:
                    client = Connection(bare_port, certs.context)
                    client.sock.sendall(f"{verb} {length}\n".encode())
                    client.send_bytes(length, SEND_BLOCK)
                    got = client.read_exactly(len(answer))
                    if got != answer:
                        raise AssertionError(f"the bare server answered {got!r}")
                    client.close()

                return send

            put = to_bare("PUT", b"OK\n")
            store = to_bare("STORE", f"OK {sha1}\n".encode())

            def download() -> None:
                client = TransferClient(agent_port, certs.context)
                if client.download() != length:
                    raise AssertionError("wrong download length")
                client.close()

            def get() -> None:
                client = Connection(bare_port, certs.context)
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
            peak = common.proc_status(child.pid, "VmHWM")
        finally:
            common.stop_child(child, timeout=10)

    def rate(name: str) -> float:
        return length / statistics.median(results[name]) / 1e6

    print(f"# bench_transfer: {args.mib} MiB, {args.rounds} rounds, {where}; {common.machine()}")
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
    common.write_json(args.json, {
        "mib": args.mib,
        "placement": where,
        "MB/s": {name: rate(name) for name in results},
        "rss_before": rss_before,
        "rss_peak": peak,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
