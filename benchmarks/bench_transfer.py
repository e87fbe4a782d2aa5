"""
File transfer on loopback, as users run it: C{tentacle-client upload} and
C{download} of a 1 GiB file, each command timed whole (a child process,
start-up included), against a bare Twisted mutual-TLS pipe (C{pipe.py}: a
client process and a separate server process) moving the same file, in
the same run.  Beside them, L{TentacleClient} in this process, the pipe
with the agent's hashing and fsyncs, and the raw wire figures.

Children, on loopback: the agent (C{transfer_server.py}: a L{TentacleService}
with Tentacle's services, and a raw bare TLS server for the raw rows), and
the pipe's server (C{pipe.py serve}, its own process).  With C{--pin split}
(the default) the servers run on one CPU and this process, with every
client command it starts, on the other.

Timed, each on a fresh connection (rounds interleave them; the order
turns from round to round):

  - C{cli-upload}: C{tentacle-client upload 127.0.0.1:PORT LOCAL REMOTE},
    from start to exit.  The client hashes the file, sends it; the agent
    hashes, writes, fsyncs and renames it; the client checks the hash.
  - C{pipe-upload}: C{python pipe.py put ...}, from start to exit: the same
    file read and sent by a bare Twisted mTLS client, written to a new file
    by the bare server and renamed; no hash, no fsync.  The ceiling.
  - C{pipe-upload-durable}: the same with SHA-1 on both sides, fsync, rename
    and a folder fsync, as the agent's commit.  A reference.
  - C{client-upload}: L{TentacleClient.upload} in this process (no
    start-up), pooled connection; C{pipe-upload-in-process}: the pipe's
    client (L{pipe.transfer}) in this process, its baseline.
  - C{cli-download}, C{pipe-download}, C{pipe-download-durable},
    C{client-download}, C{pipe-download-in-process}: the same the other way (C{tentacle-client download
    127.0.0.1:PORT REMOTE LOCAL}; the file comes from the server's page
    cache, just uploaded; the client writes a temp file and renames it,
    after SHA-1 and fsync for the CLI and the durable pipe).
  - raw wire (C{--no-raw} skips them), a blocking C{ssl} client sending
    pre-built blocks: C{upload} (UploadFile), C{put} (bytes dropped by the
    raw server), C{store} (the raw server hashes, writes, fsyncs, renames),
    C{download} (DownloadFile, bytes dropped by the client), C{get}.

The goal rows: cli-upload / pipe-upload and cli-download / pipe-download
(ratios of rates, per round; median and spread over the rounds).

Every file lives in a temp folder, removed at the end; downloaded copies
are removed after each transfer.

    python benchmarks/bench_transfer.py [--rounds 3] [--mib 1024] [--pin split] [--no-raw]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
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
RAW_PATH = "bench/raw.bin"
REMOTE_PATH = "bench/file.bin"
PIPE_NAME = "file.bin"


class TransferClient(HalibutClient):
    """
    The raw wire: one request per connection, an upload or a download.
    """

    def read_response(self) -> tuple[Any, list[Any]]:
        return common.response(self.read_payload(followed=True))

    def upload(self, length: int) -> UploadResult:
        stream = DataStream.fresh(length)
        self.sock.sendall(compress(encode_message(request("UploadFile", RAW_PATH, stream))[0]))
        self.sock.sendall(stream_header(stream.id, length))
        self.send_bytes(length, SEND_BLOCK)
        self.sock.sendall(stream_trailer(length))
        response, _ = self.read_response()
        if response.error is not None or not isinstance(response.result, UploadResult):
            raise AssertionError(f"the upload failed: {response.error}")
        return response.result

    def download(self) -> int:
        self.sock.sendall(compress(encode_message(request("DownloadFile", RAW_PATH))[0]))
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


def pattern_sha1(length: int) -> str:
    digest = hashlib.sha1()
    remaining = length
    while remaining >= len(SEND_BLOCK):
        digest.update(SEND_BLOCK)
        remaining -= len(SEND_BLOCK)
    digest.update(SEND_BLOCK[:remaining])
    return digest.hexdigest()


def make_source(path: Path, mib: int) -> str:
    """
    C{mib} MiB of random bytes (1 MiB repeated); their SHA-1.
    """
    block = os.urandom(MiB)
    digest = hashlib.sha1()
    with path.open("wb") as f:
        for _ in range(mib):
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def run_command(command: list[str], expect: str | None = None) -> float:
    """
    Run a client command to its end; the wall-clock seconds from start to
    exit.  It must exit 0 (and print C{expect}, when given).
    """
    started = time.perf_counter()
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or (expect is not None and expect.lower() not in done.stdout.lower()):
        raise AssertionError(
            f"{' '.join(command[:3])}... exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return elapsed


async def measure(reactor: Any, args: Any, folder: Path) -> dict[str, Any]:
    length = args.mib * MiB
    certs = Certificates(folder)
    home = folder / "home"
    home.mkdir()
    pipe_folder = folder / "pipe"
    pipe_folder.mkdir()
    source = folder / "source.bin"
    source_sha1 = make_source(source, args.mib)
    raw_sha1 = pattern_sha1(length)
    local = folder / "downloads" / "file.bin"
    local.parent.mkdir()
    client_cpu, server_cpu, where = common.placement(args.pin, "agent and pipe server")
    common.pin_self(client_cpu)

    agent = common.start_child(
        common.server_command("transfer_server.py", certs.agent_pem, certs.server.thumbprint, home), server_cpu
    )
    pipe = None
    library = None
    try:
        agent_port, raw_port = common.read_ready(agent, "ports", 2)
        pipe = common.start_child(common.server_command("pipe.py", "serve", certs.agent_pem, pipe_folder), server_cpu)
        [pipe_port] = common.read_ready(pipe, "port", 1)
        cli = [*common.tentacle_client_command(), *common.cli_identity(certs)]
        target = f"127.0.0.1:{agent_port}"
        pipe_client = common.server_command("pipe.py")
        pipe_id = [str(pipe_port), str(certs.server_cert), str(certs.server_key)]
        library = common.tentacle_client(reactor, agent_port, certs)
        rss_before = common.proc_status(agent.pid, "VmRSS")

        def fetched(expect_sha1: str | None) -> None:
            if local.stat().st_size != length:
                raise AssertionError(f"downloaded {local.stat().st_size} bytes, not {length}")
            if expect_sha1 is not None:
                digest = hashlib.sha1()
                with local.open("rb") as f:
                    while chunk := f.read(MiB):
                        digest.update(chunk)
                if digest.hexdigest() != expect_sha1:
                    raise AssertionError("the downloaded copy differs")
            local.unlink()

        async def client_upload() -> float:
            started = time.perf_counter()
            result = await library.upload(source, REMOTE_PATH)
            elapsed = time.perf_counter() - started
            if (result.length, result.hash.lower()) != (length, source_sha1):
                raise AssertionError(f"wrong upload result {result}")
            return elapsed

        import pipe as bare_pipe

        pipe_tls = bare_pipe.client_options(str(certs.server_cert), str(certs.server_key))

        async def pipe_in_process(kind: str) -> float:
            started = time.perf_counter()
            if kind == "put":
                await bare_pipe.transfer(reactor, "put", pipe_port, pipe_tls, str(source), PIPE_NAME, False)
            else:
                await bare_pipe.transfer(reactor, "get", pipe_port, pipe_tls, PIPE_NAME, str(local), False)
            elapsed = time.perf_counter() - started
            if kind == "get":
                fetched(None)
            return elapsed

        async def client_download() -> float:
            started = time.perf_counter()
            got, sha1 = await library.download(REMOTE_PATH, local)
            elapsed = time.perf_counter() - started
            if (got, sha1) != (length, source_sha1):
                raise AssertionError("the library's download differs")
            fetched(None)
            return elapsed

        def cli_download() -> float:
            seconds = run_command([*cli, "download", target, REMOTE_PATH, str(local)], f"SHA-1 {source_sha1}")
            fetched(None)
            return seconds

        def pipe_download(*flags: str) -> Callable[[], float]:
            def go() -> float:
                seconds = run_command([*pipe_client, "get", *pipe_id, PIPE_NAME, str(local), *flags])
                fetched(source_sha1 if args.check else None)
                return seconds

            return go

        def raw_upload() -> float:
            started = time.perf_counter()
            client = TransferClient(agent_port, certs.context)
            result = client.upload(length)
            client.close()
            elapsed = time.perf_counter() - started
            if (result.hash, result.length) != (raw_sha1, length):
                raise AssertionError(f"wrong upload result {result}")
            return elapsed

        def to_raw(verb: str, answer: bytes) -> Callable[[], float]:
            def send() -> float:
                started = time.perf_counter()
                client = Connection(raw_port, certs.context)
                client.sock.sendall(f"{verb} {length}\n".encode())
                client.send_bytes(length, SEND_BLOCK)
                got = client.read_exactly(len(answer))
                client.close()
                elapsed = time.perf_counter() - started
                if got != answer:
                    raise AssertionError(f"the raw server answered {got!r}")
                return elapsed

            return send

        def raw_download() -> float:
            started = time.perf_counter()
            client = TransferClient(agent_port, certs.context)
            got = client.download()
            client.close()
            if got != length:
                raise AssertionError("wrong download length")
            return time.perf_counter() - started

        def raw_get() -> float:
            started = time.perf_counter()
            client = Connection(raw_port, certs.context)
            client.sock.sendall(f"GET {length}\n".encode())
            client.drain(length)
            client.close()
            return time.perf_counter() - started

        sync: dict[str, Callable[[], float]] = {
            "cli-upload": lambda: run_command(
                [*cli, "upload", target, str(source), REMOTE_PATH], f"SHA-1 {source_sha1}, verified"
            ),
            "pipe-upload": lambda: run_command([*pipe_client, "put", *pipe_id, str(source), PIPE_NAME]),
            "pipe-upload-durable": lambda: run_command(
                [*pipe_client, "put", *pipe_id, str(source), PIPE_NAME, "--durable"]
            ),
            "cli-download": cli_download,
            "pipe-download": pipe_download(),
            "pipe-download-durable": pipe_download("--durable"),
        }
        asynchronous: dict[str, Callable[[], Any]] = {
            "client-upload": client_upload,
            "client-download": client_download,
            "pipe-upload-in-process": lambda: pipe_in_process("put"),
            "pipe-download-in-process": lambda: pipe_in_process("get"),
        }
        uploads = ["cli-upload", "pipe-upload", "pipe-upload-durable", "client-upload", "pipe-upload-in-process"]
        downloads = [
            "cli-download", "pipe-download", "pipe-download-durable", "client-download", "pipe-download-in-process"
        ]
        if not args.no_raw:
            sync.update({
                "upload": raw_upload,
                "put": to_raw("PUT", b"OK\n"),
                "store": to_raw("STORE", f"OK {raw_sha1}\n".encode()),
                "download": raw_download,
                "get": raw_get,
            })
            uploads += ["upload", "put", "store"]
            downloads += ["download", "get"]

        async def one(kind: str) -> float:
            if kind in asynchronous:
                return await asynchronous[kind]()
            return sync[kind]()

        # Warm-up: the page cache holds the source, each server has the file.
        for kind in ("cli-upload", "pipe-upload", *(["upload"] if not args.no_raw else [])):
            await one(kind)
        seconds: dict[str, list[float]] = {k: [] for k in uploads + downloads}
        for r in range(args.rounds):
            for group in (uploads, downloads):
                turned = group[r % len(group):] + group[: r % len(group)]
                for kind in turned:
                    elapsed = await one(kind)
                    seconds[kind].append(elapsed)
                    print(f"#   round {r + 1} {kind:22s} {length / elapsed / 1e6:8.1f} MB/s", file=sys.stderr)
        peak = common.proc_status(agent.pid, "VmHWM")
        await library.close()
        library = None
    finally:
        if library is not None:
            await library.close()
        if pipe is not None:
            common.stop_child(pipe, timeout=10)
        common.stop_child(agent, timeout=10)
    return {"seconds": seconds, "length": length, "where": where, "rss_before": rss_before, "rss_peak": peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mib", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-wire kinds")
    parser.add_argument("--check", action="store_true", help="also hash each pipe download (outside the clock)")
    common.add_pin_option(parser, choices=("split", "none"))
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    common.quiet_logging()
    print(common.header("bench_transfer"), flush=True)

    async def run(reactor: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tentacle-bench-transfer-") as tmp:
            return await measure(reactor, args, Path(tmp).absolute())

    out = common.react(run)
    seconds, length = out["seconds"], out["length"]
    rates = {k: [length / s / 1e6 for s in v] for k, v in seconds.items()}
    print(f"# {args.mib} MiB, {args.rounds} rounds, {out['where']}; load average at the end {common.loadavg()}")
    print(f"{'kind':24} {'median MB/s':>12}   per-round MB/s")
    for kind, values in rates.items():
        print(f"{kind:24} {statistics.median(values):12.1f}   {', '.join(f'{v:.0f}' for v in values)}")
    size = f"{args.mib} MiB" if args.mib % 1024 else f"{args.mib // 1024} GiB"

    def rate_row(name: str, ours: str, base: str, key: str | None = None) -> dict[str, Any]:
        return common.row(name, rates[ours], rates[base], "MB/s", "higher", key=key, fmt="{:.0f}")

    rows = [
        rate_row(f"{size} `tentacle-client upload`, whole command (vs bare Twisted mTLS pipe, whole command)",
                 "cli-upload", "pipe-upload", "upload"),
        rate_row(f"{size} `tentacle-client download`, whole command (vs bare Twisted mTLS pipe)",
                 "cli-download", "pipe-download", "download"),
        rate_row(f"{size} `tentacle-client upload` (vs the pipe with SHA-1 + fsync + rename)",
                 "cli-upload", "pipe-upload-durable"),
        rate_row(f"{size} `tentacle-client download` (vs the pipe with SHA-1 + fsync + rename)",
                 "cli-download", "pipe-download-durable"),
        rate_row(f"{size} TentacleClient.upload (vs the pipe's client, both in this process)",
                 "client-upload", "pipe-upload-in-process"),
        rate_row(f"{size} TentacleClient.download (vs the pipe's client, both in this process)",
                 "client-download", "pipe-download-in-process"),
    ]
    if not args.no_raw:
        rows += [
            rate_row(f"{size} raw-wire UploadFile (vs raw socket, bytes dropped)", "upload", "put"),
            rate_row(f"{size} raw-wire UploadFile (vs raw socket + SHA-1 + fsync)", "upload", "store"),
            rate_row(f"{size} raw-wire DownloadFile (vs raw socket from memory)", "download", "get"),
        ]
    for r in rows:
        print(common.describe_row(r))
    print(
        f"agent process RSS: {out['rss_before'] / MiB:.1f} MiB before, peak {out['rss_peak'] / MiB:.1f} MiB "
        f"(growth {(out['rss_peak'] - out['rss_before']) / MiB:.1f} MiB)"
    )
    common.write_json(args.json, {
        "mib": args.mib,
        "placement": out["where"],
        "MB/s": {k: statistics.median(v) for k, v in rates.items()},
        "rates": rates,
        "rss_before": out["rss_before"],
        "rss_peak": out["rss_peak"],
        "rows": rows,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
