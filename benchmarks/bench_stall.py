"""
The longest stall of the agent's reactor while it serves a 5,000-line
GetStatus page, measured in a real agent with a watchdog, against the
same watchdog while the agent serves trivial calls.

The agent is C{scripts_server.py agent} (a L{TentacleService} with
Tentacle's own services), in its own process.  Its watchdog is a timer due
every millisecond in the agent's reactor; the longest it ran late is the
longest time the reactor did something else without a break (building,
encoding and compressing a page, say).  It runs only while a measurement
does (C{watch} ... C{stall} on the agent's standard input).

First a script prints C{--lines} (5,000) lines of about 90 characters and
ends (StartScript waits for it).  Then, C{--rounds} rounds, the kinds
taking turns, each with the watchdog on for C{--reads} calls:

  - C{client}: C{GetStatus(ticket, 0)} through L{TentacleClient}: the whole
    log from the start, one page of 5,000 lines.  The goal's figure.
  - C{trivial}: C{GetCapabilities} through the same client.  The
    baseline: how late the timer runs when the reactor has nothing big to
    do (timer granularity and scheduling on this machine).
  - C{wire}: the same GetStatus on the raw wire (blocking C{ssl}, request
    encoded before, response decoded after).

Each round's figure is the longest lateness seen during its calls; the
medians and spreads are over the rounds.  The goal is absolute: at most
10 ms.  On a busy machine the lateness also counts time the agent waited
for a CPU; so the watchdog also notes the most CPU time the reactor thread
used between two ticks, which only the agent's own work fills.

    python benchmarks/bench_stall.py [--rounds 5] [--reads 10] [--lines 5000] [--pin split]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import common
from common import Certificates, HalibutClient

LINE = "2026-11-30 10:00:00.123 INFO  Deploying Acme.Web 1.2.{n}: copying wwwroot/assets/bundle-{n}.js to /var/www"


def ask(child: Any, command: str) -> str:
    child.stdin.write(command + "\n")
    child.stdin.flush()
    answer = str(child.stdout.readline()).strip()
    if not answer:
        raise RuntimeError("the agent stopped")
    return answer


async def measure(reactor: Any, args: Any, folder: Path) -> dict[str, Any]:
    from tentacle.contracts import (
        CompleteScriptCommandV2,
        ProcessState,
        ScriptIsolationLevel,
        ScriptStatusRequestV2,
        ScriptTicket,
        StartScriptCommandV2,
    )
    from tentacle.halibut.dotnet import TimeSpan

    certs = Certificates(folder)
    home = folder / "home"
    home.mkdir()
    client_cpu, server_cpu, where = common.placement(args.pin, "agent")
    common.pin_self(client_cpu)
    agent = common.start_child(
        common.server_command("scripts_server.py", "agent", certs.agent_pem, certs.server.thumbprint, home),
        server_cpu,
    )
    library = None
    raw = None
    try:
        [port] = common.read_ready(agent, "port", 1)
        library = common.tentacle_client(reactor, port, certs)
        raw = HalibutClient(port, certs.context, timeout=60)
        ticket = ScriptTicket(uuid.uuid4().hex)
        body = f'for n in $(seq 1 {args.lines}); do echo "{LINE}"; done'
        status, _ = await library.call(
            "IScriptServiceV2", "StartScript",
            StartScriptCommandV2(
                script_ticket=ticket, script_body=body, task_id="ServerTasks-1",
                duration_to_wait_for_script_to_finish=TimeSpan.from_timedelta(timedelta(seconds=60)),
                isolation=ScriptIsolationLevel.NoIsolation, script_isolation_mutex_timeout=TimeSpan(0),
                isolation_mutex_name=None, scripts={}, files=(), arguments=(),
            ),
        )
        if status.state is not ProcessState.Complete or status.exit_code != 0:
            raise AssertionError(f"the script did not end well: {status.state} {status.exit_code}")
        page_request = ScriptStatusRequestV2(ticket, 0)
        page, _ = await library.call("IScriptServiceV2", "GetStatus", page_request)
        lines = len(page.logs)
        size = sum(len(e.text) for e in page.logs)
        print(f"# the page: {lines} lines, {size / 1024:.0f} KiB of text; placement: {where}", flush=True)
        if lines < min(args.lines, 5000):
            raise AssertionError(f"the page has {lines} lines, not {args.lines}")

        async def client_page() -> None:
            answer, _ = await library.call("IScriptServiceV2", "GetStatus", page_request)
            if len(answer.logs) != lines:
                raise AssertionError("a shorter page")

        async def trivial() -> None:
            await library.call("ICapabilitiesServiceV2", "GetCapabilities")

        async def wire_page() -> None:
            payload = raw.round_trip(wire)
            if len(common.result(payload).logs) != lines:
                raise AssertionError("a shorter page")

        kinds = {"client": client_page, "trivial": trivial, "wire": wire_page}
        stalls: dict[str, list[float]] = {k: [] for k in kinds}
        busy: dict[str, list[float]] = {k: [] for k in kinds}
        call_ms: dict[str, list[float]] = {k: [] for k in kinds}
        order = list(kinds)
        for r in range(args.rounds + 1):  # round 0 warms up
            for kind in order[r % 3:] + order[: r % 3]:
                wire = common.wire(common.request("IScriptServiceV2", "GetStatus", page_request))
                if ask(agent, "watch") != "watching":
                    raise RuntimeError("the agent's watchdog did not start")
                times = []
                for _ in range(args.reads):
                    t0 = time.perf_counter()
                    await kinds[kind]()
                    times.append(time.perf_counter() - t0)
                await common.sleep(reactor, 0.05)  # whatever the agent does after answering
                worst, ticks, cpu = ask(agent, "stall").split()
                if r:
                    stalls[kind].append(float(worst) * 1e3)
                    busy[kind].append(float(cpu) * 1e3)
                    call_ms[kind].append(statistics.median(times) * 1e3)
                    print(
                        f"#   round {r} {kind:8s} longest stall {float(worst) * 1e3:6.2f} ms over {ticks} ticks "
                        f"(most reactor CPU between ticks {float(cpu) * 1e3:.2f} ms); "
                        f"call {statistics.median(times) * 1e3:.1f} ms",
                        flush=True,
                    )
        await library.call("IScriptServiceV2", "CompleteScript", CompleteScriptCommandV2(ticket))
        raw.end()
        raw = None
        await library.close()
        library = None
    finally:
        if raw is not None:
            raw.close()
        if library is not None:
            await library.close()
        common.stop_child(agent)
    return {"where": where, "lines": lines, "stall_ms": stalls, "busy_ms": busy, "call_ms": call_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reads", type=int, default=10, help="calls per kind per round, the watchdog on")
    parser.add_argument("--lines", type=int, default=5000, help="lines the script prints")
    common.add_pin_option(parser)
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    common.quiet_logging()
    print(common.header("bench_stall"), flush=True)

    async def run(reactor: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="tentacle-bench-") as tmp:
            return await measure(reactor, args, Path(tmp))

    out = common.react(run)
    stalls, busy, call_ms = out["stall_ms"], out["busy_ms"], out["call_ms"]
    print(f"# load average at the end {common.loadavg()}\n")
    print(f"{'kind':8s} {'longest stall':>14s} {'rounds':>16s} {'busiest tick':>13s} {'call (median)':>14s}")
    for kind, values in stalls.items():
        print(
            f"{kind:8s} {statistics.median(values):11.2f} ms  {min(values):6.2f}..{max(values):6.2f} ms "
            f"{statistics.median(busy[kind]):10.2f} ms {statistics.median(call_ms[kind]):11.1f} ms"
        )
    lines = out["lines"]
    rows = [
        common.row(f"longest agent reactor stall while serving a {lines:,}-line GetStatus page via TentacleClient "
                   "(vs while serving GetCapabilities)", stalls["client"], stalls["trivial"], "ms", "lower",
                   key="stall", fmt="{:.2f}"),
        common.row(f"most reactor-thread CPU between two watchdog ticks, {lines:,}-line page via TentacleClient "
                   "(vs GetCapabilities)", busy["client"], busy["trivial"], "ms", "lower", fmt="{:.2f}"),
        common.row("longest agent reactor stall, the same page on the raw wire (vs GetCapabilities)",
                   stalls["wire"], stalls["trivial"], "ms", "lower", fmt="{:.2f}"),
        common.row(f"GetStatus of a {lines:,}-line page via TentacleClient, whole call (vs GetCapabilities)",
                   call_ms["client"], call_ms["trivial"], "ms", "lower", fmt="{:.2f}"),
    ]
    for r in rows:
        print(common.describe_row(r))
    common.write_json(args.json, {"placement": out["where"], "lines": lines, "stall_ms": stalls, "busy_ms": busy,
                                  "call_ms": call_ms, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
