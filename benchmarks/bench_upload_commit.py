"""
How long an upload's answer takes once its last byte is sent: the time the
agent needs to make it durable (the final fsync and rename), which Octopus
Server allows five minutes for (its first-byte response timeout), whatever
the upload's size.

The agent hands each batch to the disk as it is written and never lets
more than C{WRITEBACK_WINDOW} wait in the page cache, so its final fsync
is short.  Two baselines are measured in the same run on the same disk:
the same agent with that switched off (C{TENTACLE_BENCH_WRITEBACK=off}:
one fsync at the end, as before), and the bare C{STORE} server of
C{transfer_server.py} (the same hashing and 1 MiB batch writes, one fsync
at the end, no Halibut).

Per round, each on a fresh connection and interleaved: an C{UploadFile}
of N MiB through each agent, and a C{STORE} of N MiB to the bare server.
Timed for each:

  - C{tail}: from the moment the last payload byte was handed to the
    socket until the answer arrived (the commit, plus a socket buffer's
    worth of transfer);
  - C{total}: from the first byte of the request to the answer.

Each file is removed after its transfer, and the kernel is asked to write
back everything dirty (C{sync}) before the next, so none starts behind
another's writes and no upload replaces an existing file (on this
machine's ext4, mounted with C{discard}, replacing a 2 GiB file adds
0.25-0.5 s to the rename, with or without write-back).

    python benchmarks/bench_upload_commit.py [--rounds 3] [--mib 2048] [--pin split]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
from bench_transfer import REMOTE_PATH, SEND_BLOCK, TransferClient, pattern_sha1, request
from common import Certificates, Connection, MiB
from tentacle.contracts import DataStream, UploadResult
from tentacle.halibut.deflate import compress
from tentacle.halibut.serializer import encode_message
from tentacle.halibut.streams import stream_header, stream_trailer


def upload(port: int, certs: Certificates, length: int, sha1: str) -> tuple[float, float]:
    client = TransferClient(port, certs.context)
    stream = DataStream.fresh(length)
    start = time.perf_counter()
    client.sock.sendall(compress(encode_message(request("UploadFile", REMOTE_PATH, stream))[0]))
    client.sock.sendall(stream_header(stream.id, length))
    client.send_bytes(length, SEND_BLOCK)
    client.sock.sendall(stream_trailer(length))
    sent = time.perf_counter()
    response, _ = client.read_response()
    done = time.perf_counter()
    client.close()
    result = response.result
    if response.error is not None or not isinstance(result, UploadResult) or result.hash != sha1:
        raise AssertionError(f"the upload failed: {response.error or result}")
    return done - sent, done - start


def store(port: int, certs: Certificates, length: int, sha1: str) -> tuple[float, float]:
    client = Connection(port, certs.context)
    start = time.perf_counter()
    client.sock.sendall(f"STORE {length}\n".encode())
    client.send_bytes(length, SEND_BLOCK)
    sent = time.perf_counter()
    answer = f"OK {sha1}\n".encode()
    got = client.read_exactly(len(answer))
    done = time.perf_counter()
    client.close()
    if got != answer:
        raise AssertionError(f"the bare server answered {got!r}")
    return done - sent, done - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=2048, help="upload size in MiB")
    common.add_pin_option(parser, choices=("split", "none"))
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    client_cpu, server_cpu, where = common.placement(args.pin)
    common.pin_self(client_cpu)
    length = args.mib * MiB
    sha1 = pattern_sha1(length)
    kinds = ("upload", "upload-nowb", "store")
    tails: dict[str, list[float]] = {kind: [] for kind in kinds}
    totals: dict[str, list[float]] = {kind: [] for kind in kinds}

    with tempfile.TemporaryDirectory(prefix="tentacle-bench-commit-", dir=Path.cwd()) as tmp:
        folder = Path(tmp).absolute()
        certs = Certificates(folder)
        home = folder / "home"
        home.mkdir()
        plain_home = folder / "home-nowb"
        plain_home.mkdir()
        child = common.start_child(
            common.server_command("transfer_server.py", certs.agent_pem, certs.server.thumbprint, home),
            server_cpu,
        )
        plain = common.start_child(
            common.server_command("transfer_server.py", certs.agent_pem, certs.server.thumbprint, plain_home),
            server_cpu,
            env={**os.environ, "TENTACLE_BENCH_WRITEBACK": "off"},
        )
        try:
            agent_port, bare_port = common.read_ready(child, "ports", 2)
            plain_port, _ = common.read_ready(plain, "ports", 2)
            for round_number in range(args.rounds):
                for name, action, port in (
                    ("upload", upload, agent_port),
                    ("upload-nowb", upload, plain_port),
                    ("store", store, bare_port),
                ):
                    tail, total = action(port, certs, length, sha1)
                    for stored in (home / REMOTE_PATH, plain_home / REMOTE_PATH, home / "bare-store.bin"):
                        stored.unlink(missing_ok=True)
                    os.sync()
                    tails[name].append(tail)
                    totals[name].append(total)
                    print(
                        f"round {round_number + 1} {name:7} tail {tail * 1000:8.1f} ms, "
                        f"total {total:6.2f} s ({length / total / 1e6:6.1f} MB/s)",
                        file=sys.stderr,
                    )
        finally:
            common.stop_child(child, timeout=30)
            common.stop_child(plain, timeout=30)

    def median(samples: list[float]) -> float:
        return statistics.median(samples)

    print(f"# bench_upload_commit: {args.mib} MiB, {args.rounds} rounds, {where}; {common.machine()}")
    print(f"# working folder on {os.statvfs('.').f_bsize}-byte blocks; load {common.loadavg()}")
    print(f"{'kind':12} {'median tail ms':>15} {'tails ms':>30} {'median total s':>15} {'totals s':>24}")
    for name in tails:
        rounds = ", ".join(f"{t * 1000:.0f}" for t in tails[name])
        whole = ", ".join(f"{t:.1f}" for t in totals[name])
        print(f"{name:12} {median(tails[name]) * 1000:15.1f} {rounds:>30} {median(totals[name]):15.2f} {whole:>24}")
    for baseline in ("upload-nowb", "store"):
        print(f"tail: upload / {baseline:12} = {median(tails['upload']) / median(tails[baseline]):.3f}")
        print(f"total: upload / {baseline:11} = {median(totals['upload']) / median(totals[baseline]):.3f}")
    common.write_json(args.json, {
        "mib": args.mib,
        "placement": where,
        "tail_s": {name: median(v) for name, v in tails.items()},
        "total_s": {name: median(v) for name, v in totals.items()},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
