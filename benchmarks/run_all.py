"""
Every benchmark, one after the other, then two tables: every figure of
ours beside the baseline measured in the same run, and their ratio; and
the goals table (issue 15), one row per goal, with the ratio's median and
spread over the rounds and whether the goal is met.

Each benchmark runs as its own process (they pin themselves to CPUs), with
C{--json} to hand its figures back; its own report is printed as it goes.
Meanwhile a watcher samples, once a second, the CPU time of every process
outside this run's own process tree, so that the summary can say whether
anything else was loading the machine (a process that starts and ends
between two samples is not seen).

Run from the repository root::

    python benchmarks/run_all.py            # the defaults: about 15 minutes here
    python benchmarks/run_all.py --quick    # fewer rounds, 256 MiB transfers: a few minutes

Run it with the interpreter the package is installed in (C{pip install -e
.} builds the codec's compiled core in place); the first lines say which
codec core the run uses and where C{tentacle} was imported from.
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
from typing import Any, Callable

import common

#: Each benchmark and its arguments: always, and in quick mode.
BENCHMARKS: list[tuple[str, list[str], list[str]]] = [
    ("bench_codec.py", [], ["--rounds", "3", "--budget", "0.2"]),
    ("bench_roundtrip.py", [], ["--rounds", "3", "--count", "500", "--warmup", "100"]),
    ("bench_connections.py", [], ["--rounds", "3", "--count", "200", "--active", "300"]),
    ("bench_transfer.py", [], ["--rounds", "3", "--mib", "256"]),
    ("bench_upload_commit.py", [], ["--rounds", "3", "--mib", "512"]),
    ("bench_scripts.py", [], ["--rounds", "3", "--count", "10", "--cli-count", "2"]),
    ("bench_stall.py", [], ["--rounds", "3", "--reads", "5"]),
    ("bench_script_log.py", [], ["--rounds", "3", "--samples", "10"]),
    ("bench_polling.py", [], ["--rounds", "2", "--count", "200", "--idle", "100", "--mib", "256"]),
]

#: The goals table: the key of a benchmark's row, the metric as the issue
#: words it, the goal, and the test (on the ratio, or on our own figure
#: for an absolute goal).
GOALS: list[tuple[str, str, str, Callable[[float], bool], str]] = [
    ("upload", "1 GiB `tentacle-client upload` / bare Twisted mTLS pipe, whole command", "≥ 0.6",
     lambda x: x >= 0.6, "ratio"),
    ("download", "1 GiB `tentacle-client download` / bare pipe", "≥ 0.7", lambda x: x >= 0.7, "ratio"),
    ("roundtrip", "pooled GetCapabilities p50 via `TentacleClient` / bare TLS echo", "≤ 3",
     lambda x: x <= 3, "ratio"),
    ("connection", "new connection + identity + 1 request: agent CPU per connection / bare handshake", "≤ 1.25",
     lambda x: x <= 1.25, "ratio"),
    ("scripts", "200 × `sleep 1` start to all done / 200 bare `posix_spawn`", "≤ 1.2", lambda x: x <= 1.2, "ratio"),
    ("first_line", "`echo hello` first log line via `TentacleClient` / (bare spawn first byte + 1 round trip)",
     "≤ 1.5", lambda x: x <= 1.5, "ratio"),
    ("idle_rss", "idle agent RSS / bare Twisted TLS listener", "≤ 1.1", lambda x: x <= 1.1, "ratio"),
    ("connection_rss", "RSS per idle authenticated connection / bare", "≤ 1.1", lambda x: x <= 1.1, "ratio"),
    ("many_idle", "active-connection p50 with 500 idle connections / with none", "≤ 1.2",
     lambda x: x <= 1.2, "ratio"),
    ("codec_start", "codec encode+decode (StartScript) / stdlib `json`", "≥ 1.0", lambda x: x >= 1.0, "ratio"),
    ("codec_status", "codec encode+decode (100-line status) / stdlib `json`", "≥ 1.0", lambda x: x >= 1.0, "ratio"),
    ("stall", "longest reactor stall while serving a 5,000-line GetStatus page", "≤ 10 ms",
     lambda x: x <= 10, "ours"),
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
                spread=f"ratio {ratio['min']:.2f}–{ratio['max']:.2f} (n={len(row['rounds']['ours'])})",
                ratio=ratio["median"],
            )
        page = codec.get("page", {}).get(codec.get("implementation", "compiled"))
        if page:
            step, whole = page["longest_step_ms"], page["one_go_ms"]
            add(
                f"codec: {page['lines']:,}-line status page, longest step on the reactor "
                f"(encode, then {page['slice_bytes'] // 1024} KiB compress slices; vs all in one go)",
                step["median"], whole["median"], "ms", "lower", "{:.2f}",
                spread=f"{step['min']:.2f}–{step['max']:.2f} ms",
            )
    for script in ("bench_roundtrip.py", "bench_connections.py", "bench_transfer.py", "bench_scripts.py",
                   "bench_stall.py"):
        for r in figures.get(script, {}).get("rows", []):
            fmt = r["fmt"]
            out.append((
                r["name"], f"{fmt.format(r['ours'])} {r['unit']}", f"{fmt.format(r['base'])} {r['unit']}",
                r["ratio"], r["better"], goal_of(r.get("key")),
                f"ratio {r['min']:.2f}–{r['max']:.2f} (n={r['rounds']})",
            ))
    uc = figures.get("bench_upload_commit.py")
    if uc:
        tail = uc["tail_s"]
        add(
            f"upload, {uc['mib']} MiB: last byte sent to answer (vs the same agent, fsync only at the end)",
            tail["upload"] * 1e3, tail["upload-nowb"] * 1e3, "ms", "lower",
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
            goal="≤ 1.5", spread=f"ratio {rt['ratio_spread'].replace('..', '–')}", ratio=rt["ratio_median"],
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


def goal_of(key: str | None) -> str:
    for k, _, goal, _, _ in GOALS:
        if k == key:
            return goal
    return ""


def goal_rows(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """
    The rows the goals table reads, by key: the benchmarks' own, and the
    codec's made from its figures.
    """
    found: dict[str, dict[str, Any]] = {}
    for data in figures.values():
        for r in data.get("rows", []) if isinstance(data, dict) else []:
            if r.get("key"):
                found[r["key"]] = r
    codec = figures.get("bench_codec.py")
    for r in codec["ops/s"] if codec else []:
        if r["phase"] != "encode+decode" or r.get("implementation", "compiled") == "python":
            continue
        key = {"start-script": "codec_start", "status-100": "codec_status"}.get(r["message"])
        if key:
            found[key] = {
                "ours": r["ours"], "base": r["json"], "unit": "ops/s", "fmt": "{:.0f}",
                "ratio": r["ratio"]["median"], "min": r["ratio"]["min"], "max": r["ratio"]["max"],
                "rounds": len(r["rounds"]["ours"]), "ours_rounds": r["rounds"]["ours"],
            }
    return found


def goals_table(figures: dict[str, Any]) -> tuple[str, int, int]:
    """
    The goals table (markdown), and how many goals were measured and met.
    """
    found = goal_rows(figures)
    header = ("metric", "goal", "ours", "baseline", "ratio", "spread over rounds", "met")
    body = []
    measured = met = 0
    for key, metric, goal, test, on in GOALS:
        r = found.get(key)
        if r is None:
            body.append((metric, goal, "–", "–", "–", "not measured in this run", "–"))
            continue
        fmt = r["fmt"]
        if on == "ours":
            values = r["ours_rounds"]
            spread = f"ours {fmt.format(min(values))}–{fmt.format(max(values))} {r['unit']} (n={r['rounds']})"
            ok = test(r["ours"])
        else:
            spread = f"{r['min']:.2f}–{r['max']:.2f} (n={r['rounds']})"
            ok = test(r["ratio"])
        measured += 1
        met += ok
        transfer = figures.get("bench_transfer.py", {})
        if key in ("upload", "download") and transfer.get("mib", 1024) != 1024:
            metric = metric.replace("1 GiB", f"{transfer['mib']} MiB")
        body.append((
            metric, goal, f"{fmt.format(r['ours'])} {r['unit']}", f"{fmt.format(r['base'])} {r['unit']}",
            f"{r['ratio']:.2f}", spread, "yes" if ok else "**no**",
        ))
    return markdown(header, body, (False, False, True, True, True, False, False)), measured, met


def markdown(header: tuple[str, ...], body: list[tuple[str, ...]], right: tuple[bool, ...]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def table(lines: list[Row]) -> str:
    header = ("benchmark", "goal", "ours", "baseline", "ratio", "spread over rounds", "better")
    body = [
        (name, goal, ours, base, f"{ratio:.2f}", spread, better)
        for name, ours, base, ratio, better, goal, spread in lines
    ]
    return markdown(header, body, (False, False, True, True, True, False, False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller transfers (a few minutes)")
    parser.add_argument("--only", action="append", metavar="NAME", help="run only this benchmark (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure and the table to FILE")
    args = parser.parse_args(argv)

    print(f"# run_all ({'quick' if args.quick else 'full'}): {common.machine()}")
    print(f"# started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average {common.loadavg()}")
    print(f"# code: {code_version()}")
    core = common.codec_core()
    print(f"# codec: {core}; tentacle imported from {common.tentacle_location()} by {sys.executable}", flush=True)
    if core != "compiled core":
        print("# WARNING: the codec runs on pure Python; build the compiled core with "
              "`pip install -e .` in this interpreter's environment", flush=True)
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
    goals, measured, met = goals_table(figures)
    print(f"\n## Goals (issue 15): {met} of {measured} measured goals met "
          f"({'quick' if args.quick else 'full'} run, {time.strftime('%Y-%m-%d')}, {common.machine()})\n")
    print(goals)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"figures": figures, "table": lines, "goals": goals}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
