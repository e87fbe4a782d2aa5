"""
A script's log: storing millions of short lines, and answering the last
page of a big log after an agent restart, each against plain file work on
the same bytes measured in the same run.

Storing (one sample per round): the output of C{yes '' | head -n N}, fed as
8 KiB pipe reads (what Twisted hands the agent):

  - C{ours}: the agent's line splitter (C{_Lines}) into
    L{tentacle.workspace.ScriptLog.append_lines}, then a flush: decoding,
    JSON lines with their time stamps, the sparse index and its file;
  - C{write}: writing the same final bytes straight to a file, in as many
    writes as there were reads.  The ratio is the price of turning output
    into log lines.

The last page after a restart (C{--samples} of each, interleaved), on the
page cache as an agent restart finds it:

  - C{ours}: a new C{ScriptLog} on the file, C{index_existing()} (reads
    the saved index C{Output.idx}, scans the log's tail), then
    C{read_page} of the last 10 lines: what the first GetStatus after a
    restart does, off the reactor thread;
  - C{ours-no-index}: the same with no saved index (a log an older agent
    wrote): the whole log is scanned once;
  - C{tail}: open, seek to 4 KiB before the end, read, split, and
    C{json.loads} the last 10 lines: the least any reader can do;
  - C{count}: read the whole file in 1 MiB pieces counting newlines: the
    least a scan can do.

Run from the repository root::

    python benchmarks/bench_script_log.py [--rounds 5] [--lines 5000000] [--samples 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import common
from tentacle.contracts import ProcessOutputSource
from tentacle.workers.process import _Lines
from tentacle.workspace import ScriptLog

READ = 8192


def store(path: Path, lines: int) -> ScriptLog:
    path.unlink(missing_ok=True)
    path.with_suffix(".idx").unlink(missing_ok=True)
    log = ScriptLog(path)
    splitter = _Lines(ProcessOutputSource.StdOut, log.append_lines)
    data = b"\n" * READ
    for _ in range(lines // READ):
        splitter.feed(data, datetime.now(timezone.utc))
    splitter.feed(b"\n" * (lines % READ), datetime.now(timezone.utc))
    log.close()
    return log


def write_plain(source: Path, target: Path, writes: int) -> None:
    data = source.read_bytes()
    piece = -(-len(data) // writes)
    with target.open("wb") as f:
        for start in range(0, len(data), piece):
            f.write(data[start : start + piece])


def last_page(path: Path) -> int:
    log = ScriptLog(path)
    log.index_existing()
    page = log.read_page(len(log) - 10, 5000, 1 << 20)
    assert len(page.entries) == 10
    return page.bytes_read


def tail(path: Path) -> None:
    with path.open("rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
        lines = f.read().splitlines()[-10:]
    assert len([json.loads(line) for line in lines]) == 10


def count(path: Path) -> None:
    newlines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            newlines += chunk.count(b"\n")
    assert newlines


def timed(work: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lines", type=int, default=5_000_000)
    parser.add_argument("--samples", type=int, default=20)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    print(f"# bench_script_log: {common.machine()}")
    with tempfile.TemporaryDirectory(prefix="tentacle-bench-log-") as tmp:
        path = Path(tmp) / "Output.log"
        plain = Path(tmp) / "plain.log"
        writes = -(-args.lines // READ)
        stored: dict[str, list[float]] = {"ours": [], "write": []}
        for _ in range(args.rounds):
            stored["ours"].append(timed(lambda: store(path, args.lines)))
            stored["write"].append(timed(lambda: write_plain(path, plain, writes)))
            plain.unlink()
        size = path.stat().st_size
        log = ScriptLog(path)
        log.index_existing()
        index_entries = log.index_size
        print(f"\n{args.lines:,} empty lines: {size / common.MiB:.0f} MiB of log, {index_entries} index entries "
              f"({index_entries * 16:,} bytes of index in memory)")
        for kind, samples in stored.items():
            s = summary(samples)
            print(f"  store {kind:6s} median {s['median']:.3f} s  (rounds {s['min']:.3f}..{s['max']:.3f})")
        store_ratio = statistics.median(stored["ours"]) / statistics.median(stored["write"])
        print(f"  ours / write = {store_ratio:.2f}; {statistics.median(stored['ours']) / args.lines * 1e9:.0f} ns a line")

        index = path.with_suffix(".idx")
        saved = index.read_bytes()
        page: dict[str, list[float]] = {"ours": [], "ours-no-index": [], "tail": [], "count": []}
        bytes_read = 0
        for _ in range(args.samples):
            page["ours"].append(timed(lambda: last_page(path)))
            bytes_read = last_page(path)
            index.unlink()
            page["ours-no-index"].append(timed(lambda: last_page(path)))
            index.write_bytes(saved)
            page["tail"].append(timed(lambda: tail(path)))
            page["count"].append(timed(lambda: count(path)))
        print(f"\nthe last page of 10 lines after a restart ({args.samples} samples; the page read {bytes_read:,} bytes):")
        for kind, samples in page.items():
            s = summary(samples)
            print(f"  {kind:14s} median {s['median'] * 1e3:8.2f} ms  (samples {s['min'] * 1e3:.2f}..{s['max'] * 1e3:.2f})")
        medians = {kind: statistics.median(samples) for kind, samples in page.items()}
        print(f"  ours / tail = {medians['ours'] / medians['tail']:.1f}; "
              f"ours-no-index / count = {medians['ours-no-index'] / medians['count']:.2f}")
    common.write_json(args.json, {
        "lines": args.lines,
        "log_bytes": size,
        "index_entries": index_entries,
        "store_seconds": {kind: summary(samples) for kind, samples in stored.items()},
        "last_page_seconds": {kind: summary(samples) for kind, samples in page.items()},
        "last_page_bytes_read": bytes_read,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
