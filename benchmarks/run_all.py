"""
Every benchmark, one after the other, then one table: each figure of ours
beside the baseline measured in the same run, and their ratio.

Each benchmark runs as its own process (they pin themselves to CPUs), with
C{--json} to hand its figures back; its own report is printed as it goes.
Meanwhile a watcher samples, once a second, the CPU time of every process
outside this run's own process tree, so that the summary can say whether
anything else was loading the machine (a process that starts and ends
between two samples is not seen).

Run from the repository root::

    python benchmarks/run_all.py            # the defaults: a few minutes
    python benchmarks/run_all.py --quick    # fewer rounds: about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common

#: Each benchmark and its arguments: always, and in quick mode.
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("bench_codec.py", [], ["--rounds", "3", "--budget", "0.2"]),
    ("bench_roundtrip.py", [], ["--rounds", "3", "--count", "1000"]),
    ("bench_connections.py", [], ["--rounds", "3", "--count", "300"]),
    ("bench_transfer.py", [], ["--rounds", "3", "--mib", "256"]),
    ("bench_upload_commit.py", [], ["--rounds", "3", "--mib", "512"]),
    ("bench_scripts.py", ["--scripts", "100"], ["--rounds", "3", "--count", "20"]),
    ("bench_script_log.py", [], ["--rounds", "3", "--samples", "10"]),
    ("bench_polling.py", [], ["--rounds", "2", "--count", "200", "--idle", "100", "--mib", "256"]),
]


def code_version() -> str:
    """
    The commit, and whether the package's files differ from it.
    """
    repo = common.HERE.parent

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), *args], capture_output=True, text=True
        )

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "not a git checkout"
        changed = git("diff", "--quiet", "HEAD", "--", "tentacle").returncode != 0
        untracked = bool(git("ls-files", "--others", "--exclude-standard", "--", "tentacle").stdout.strip())
    except OSError:
        return "unknown (no git)"
    dirty = " with uncommitted changes in tentacle/" if changed or untracked else ""
    return f"commit {head.stdout.strip()}{dirty}"


# --- what else runs -------------------------------------------------------------------


def processes() -> dict[int, tuple[int, str, int]]:
    """
    Every process: its parent, its name and the CPU ticks it has used.
    """
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        table[int(entry)] = (int(fields[1]), name, int(fields[11]) + int(fields[12]))
    return table


class Watcher:
    """
    Samples the CPU use of the processes outside this run, once a second.
    """

    def __init__(self) -> None:
        self.tick = os.sysconf("SC_CLK_TCK")
        self.stopping = threading.Event()
        self.peaks: dict[str, tuple[float, str, float]] = {}
        self.current: str | None = None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def ours(self, table: dict[int, tuple[int, str, int]]) -> set[int]:
        mine = {os.getpid()}
        grew = True
        while grew:
            grew = False
            for pid, (ppid, _, _) in table.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    grew = True
        return mine

    def run(self) -> None:
        last, then = processes(), time.monotonic()
        while not self.stopping.wait(1.0):
            table, now = processes(), time.monotonic()
            mine = self.ours(table)
            span = (now - then) * self.tick
            others = {
                pid: (ticks - last[pid][2] if pid in last else ticks) / span * 100
                for pid, (_, _, ticks) in table.items()
                if pid not in mine
            }
            last, then = table, now
            if self.current is None or not others:
                continue
            top = max(others, key=lambda pid: others[pid])
            total = sum(others.values())
            peak_one, name, peak_total = self.peaks.get(self.current, (0.0, "-", 0.0))
            if others[top] > peak_one:
                peak_one, name = others[top], f"{table[top][1]} ({top})"
            self.peaks[self.current] = (peak_one, name, max(peak_total, total))

    def describe(self, benchmark: str) -> str:
        peak_one, name, peak_total = self.peaks.get(benchmark, (0.0, "-", 0.0))
        return f"others peaked at {peak_total:.0f}% of a CPU in all; busiest {name} at {peak_one:.0f}%"


# --- the table -----------------------------------------------------------------------------


Row = tuple[str, str, str, float, str, str, str]


def rows(figures: dict[str, Any]) -> list[Row]:
    """
    (benchmark, ours, baseline, ours / baseline, which way is better, goal,
    spread over the rounds), the last two where the benchmark gives them.
    """
    out: list[Row] = []

    def add(
        name: str, ours: float, base: float, unit: str, better: str, fmt: str = "{:.1f}",
        goal: str = "", spread: str = "", ratio: float | None = None,
    ) -> None:
        out.append((
            name, f"{fmt.format(ours)} {unit}", f"{fmt.format(base)} {unit}",
            ours / base if ratio is None else ratio, better, goal, spread,
        ))

    codec = figures.get("bench_codec.py")
    if codec:
        for row in codec["ops/s"]:
            if row["phase"] != "encode+decode":
                continue
            compiled = row.get("implementation", "compiled") != "python"
            ratio = row["ratio"]
            add(
                f"codec: {row['message']} encode+decode, "
                f"{'ours' if compiled else 'pure-Python fallback'} (vs stdlib json)",
                row["ours"], row["json"], "ops/s", "higher", "{:.0f}",
                goal="≥ 1.0" if compiled else "",
                spread=f"ratio {ratio['min']:.2f}–{ratio['max']:.2f}",
                ratio=ratio["median"],
            )
        page = codec.get("page", {}).get(codec.get("implementation", "compiled"))
        if page:
            step, whole = page["longest_step_ms"], page["one_go_ms"]
            add(
                f"codec: {page['lines']:,}-line status page, longest step on the reactor "
                f"(encode, then {page['slice_bytes'] // 1024} KiB compress slices; vs all in one go)",
                step["median"], whole["median"], "ms", "lower", "{:.2f}",
                goal="≤ 10 ms",
                spread=f"{step['min']:.2f}–{step['max']:.2f} ms",
            )
    rt = figures.get("bench_roundtrip.py")
    if rt:
        k = rt["kinds"]
        for stat in ("median", "p99"):
            add(
                f"pooled request round trip, {stat} (vs TLS echo)",
                k["halibut"][stat] * 1e6, k["tls-echo"][stat] * 1e6, "µs", "lower",
            )
        add(
            "pooled request round trip, median (vs two-exchange TLS echo)",
            k["halibut"]["median"] * 1e6, k["tls-echo-2"]["median"] * 1e6, "µs", "lower",
        )
    cn = figures.get("bench_connections.py")
    if cn:
        add(
            f"new connections per second, {cn['concurrency']} in flight (vs bare mutual-TLS handshake)",
            cn["rate"]["agent"], cn["rate"]["bare"], "conn/s", "higher", "{:.0f}",
        )
        add(
            "server CPU per new connection (vs bare mutual-TLS handshake)",
            cn["server_ms_per_connection"]["agent"], cn["server_ms_per_connection"]["bare"], "ms", "lower", "{:.2f}",
        )
        mem = cn["memory"]
        add(
            "agent idle RSS (vs bare Twisted TLS server)",
            mem["agent"]["idle_rss"] / common.MiB, mem["bare"]["idle_rss"] / common.MiB, "MiB", "lower",
        )
        add(
            f"RSS per idle authenticated connection, {cn['idle']} held (vs bare TLS)",
            mem["agent"]["per_connection"] / 1024, mem["bare"]["per_connection"] / 1024, "KiB", "lower",
        )
    tr = figures.get("bench_transfer.py")
    if tr:
        rate = tr["MB/s"]
        add(f"upload, {tr['mib']} MiB (vs raw mutual-TLS ceiling)", rate["upload"], rate["put"], "MB/s", "higher", "{:.0f}")
        add(f"download, {tr['mib']} MiB (vs raw mutual-TLS ceiling)", rate["download"], rate["get"], "MB/s", "higher", "{:.0f}")
    uc = figures.get("bench_upload_commit.py")
    if uc:
        tail = uc["tail_s"]
        add(
            f"upload, {uc['mib']} MiB: last byte sent to answer (vs the same agent, fsync only at the end)",
            tail["upload"] * 1e3, tail["upload-nowb"] * 1e3, "ms", "lower",
        )
    sc = figures.get("bench_scripts.py")
    if sc:
        conc = sc["concurrent"]
        add(
            f"{sc['scripts']} concurrent 'sleep {sc['sleep']:g}' scripts, first start to last done (vs bare spawns)",
            conc["agent"], conc["bare"], "s", "lower", "{:.3f}",
        )
        first = sc["first_line"]
        add(
            "StartScript 'echo hello' waiting for its end (vs bare spawn to exit)",
            first["agent-wait"] * 1e3, first["spawn-exit"] * 1e3, "ms", "lower",
        )
    lg = figures.get("bench_script_log.py")
    if lg:
        stored = lg["store_seconds"]
        add(
            f"store {lg['lines'] / 1e6:g} M empty output lines (vs writing the same bytes)",
            stored["ours"]["median"], stored["write"]["median"], "s", "lower", "{:.3f}",
        )
        page = lg["last_page_seconds"]
        add(
            f"last page of a {lg['lines'] / 1e6:g} M-line log after a restart (vs tail of the file)",
            page["ours"]["median"] * 1e3, page["tail"]["median"] * 1e3, "ms", "lower", "{:.2f}",
        )
        add(
            "the same with no saved index (vs counting the file's newlines)",
            page["ours-no-index"]["median"] * 1e3, page["count"]["median"] * 1e3, "ms", "lower",
        )
    pl = figures.get("bench_polling.py")
    if pl:
        rt = pl["round_trip"]
        add(
            "polling request round trip p50 via TentacleClient (vs the same agent listening)",
            rt["polling_p50_us"], rt["listening_p50_us"], "µs", "lower", "{:.0f}",
        )
        mem = pl["memory"]
        add(
            f"hub RSS per idle subscription, {mem['subscriptions']} held (vs bare TLS per idle connection)",
            mem["hub_kib_per_subscription"], mem["bare_kib_per_connection"], "KiB", "lower",
        )
        up = pl["upload"]
        add(
            "upload through the hub via TentacleClient (vs direct to the agent)",
            up["hub_mib_s"], up["direct_mib_s"], "MiB/s", "higher", "{:.0f}",
        )
    return out


def table(lines: list[Row]) -> str:
    header = ("benchmark", "goal", "ours", "baseline", "ratio", "spread over rounds", "better")
    body = [
        (name, goal, ours, base, f"{ratio:.2f}", spread, better)
        for name, ours, base, ratio, better, goal, spread in lines
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    right = (False, False, True, True, True, False, False)

    def line(cells: tuple[str, ...]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller transfers (about a minute)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure and the table to FILE")
    args = parser.parse_args(argv)

    print(f"# run_all ({'quick' if args.quick else 'full'}): {common.machine()}")
    print(f"# code: {code_version()}", flush=True)
    watcher = Watcher()
    watcher.thread.start()
    figures: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tentacle-bench-all-") as tmp:
        for script, always, quick in BENCHMARKS:
            if args.only and script.removesuffix(".py") not in args.only and script not in args.only:
                continue
            out = Path(tmp) / f"{script}.json"
            command = common.server_command(script, *always, *(quick if args.quick else []), "--json", out)
            print(f"\n## {' '.join([Path(command[1]).name, *command[2:-2]])}", flush=True)
            watcher.current = script
            started = time.perf_counter()
            subprocess.run(command, check=True)
            seconds[script] = time.perf_counter() - started
            watcher.current = None
            figures[script] = json.loads(out.read_text())
    elapsed = time.perf_counter() - clock
    watcher.stopping.set()

    lines = rows(figures)
    print(f"\n# all benchmarks in {elapsed:.0f} s; load average at the end {common.loadavg()}")
    for script in figures:
        print(f"#   {script:22s} {seconds[script]:5.0f} s; {watcher.describe(script)}")
    print("# ratio = ours / baseline; medians unless the row says otherwise\n")
    print(table(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"figures": figures, "table": lines}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
