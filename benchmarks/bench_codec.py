"""
Codec throughput: full wire encode+decode of two typical Halibut messages,
against stdlib C{json} of the same data measured in the same run; and the
time to encode one big status page, which the agent does on its reactor.

Messages:

  - C{start-script}: a C{RequestMessage} calling
    C{IScriptServiceV2.StartScript} with a C{StartScriptCommandV2} (a bash
    script body of a few KB, arguments, full isolation, a mutex name, two
    TimeSpans, a task id and a ticket), built the way
    C{tests/wire_client.request()} builds requests.
  - C{status-100}: a C{ResponseMessage} whose result is a
    C{ScriptStatusResponseV2} with 100 C{ProcessOutput} log lines.

One operation, ours::

    encode_message -> deflate.compress -> deflate.decompress (Inflater)
                   -> decode_message(tentacle_registry(), expected=...)

One operation, baseline (the same tree as plain dicts/lists: GUIDs and
datetimes as strings, as Json.NET's JSON writer renders them)::

    json.dumps -> str.encode -> zlib raw-DEFLATE compress
               -> zlib raw-DEFLATE decompress -> bytes.decode -> json.loads

Both sides use the same zlib level and window, so the ratio isolates
BSON + the typed object layer against C{json}'s C encoder/decoder producing
plain dicts. Encode-only and decode-only halves are reported too. Ours and
the baseline alternate round by round; each round's ratio pairs the two
measurements taken side by side, and the summary gives the median ratio and
the lowest and highest round.

The codec runs on its compiled core when it is built (see
C{tentacle.halibut.accel}); the pure-Python fallback is measured as well, on
the same messages, for reference.

The page: a C{ScriptStatusResponseV2} of 5,000 log lines (about 700 KB of
BSON), timed as C{encode_message} and C{compress} in one go, and as the
longest single step when compressing with C{compress_slices} (64 KiB of
input a step): what one turn of the reactor would take.

Run from the repository root::

    python benchmarks/bench_codec.py [--rounds 7] [--budget 0.4]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import common
from tentacle.contracts import (
    ProcessOutput,
    ProcessOutputSource,
    ProcessState,
    ScriptIsolationLevel,
    ScriptStatusResponseV2,
    ScriptTicket,
    StartScriptCommandV2,
    tentacle_registry,
)
from tentacle.halibut import accel
from tentacle.halibut.deflate import SLICE_BYTES, compress, compress_slices, decompress
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.serializer import (
    RequestMessage,
    ResponseMessage,
    decode_message,
    encode_envelope,
    encode_message,
)

# --- the messages -------------------------------------------------------------

SCRIPT_BODY = r"""#!/bin/bash
# Octopus-style deployment script: unpack, configure, swap, health-check.
set -euo pipefail

APP_NAME="$(get_octopusvariable "Octopus.Action.Package.PackageId")"
APP_VERSION="$(get_octopusvariable "Octopus.Action.Package.PackageVersion")"
ENVIRONMENT="$(get_octopusvariable "Octopus.Environment.Name")"
INSTALL_ROOT="/opt/apps/${APP_NAME}"
RELEASE_DIR="${INSTALL_ROOT}/releases/${APP_VERSION}"
CURRENT_LINK="${INSTALL_ROOT}/current"
HEALTH_URL="http://127.0.0.1:8080/health"
MAX_ATTEMPTS=30

log() {
    echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] $*"
}

fail() {
    fail_step "$*"
    exit 1
}

log "Deploying ${APP_NAME} ${APP_VERSION} to ${ENVIRONMENT}"
mkdir -p "${RELEASE_DIR}" || fail "could not create ${RELEASE_DIR}"

if [[ -d "${RELEASE_DIR}/bin" ]]; then
    log "Release directory already populated; re-using it"
else
    log "Extracting package into ${RELEASE_DIR}"
    tar -xzf "$(get_octopusvariable "Octopus.Action.Package.InstallationDirectoryPath")/package.tar.gz" \
        -C "${RELEASE_DIR}" --strip-components=1
fi

log "Writing configuration"
cat > "${RELEASE_DIR}/appsettings.${ENVIRONMENT}.json" <<EOF
{
  "ConnectionStrings": {
    "Default": "$(get_octopusvariable "Database.ConnectionString")"
  },
  "Logging": { "LogLevel": { "Default": "Information", "Microsoft": "Warning" } },
  "FeatureFlags": { "NewCheckout": $(get_octopusvariable "Feature.NewCheckout"), "Telemetry": true },
  "Urls": "http://0.0.0.0:8080"
}
EOF

log "Running database migrations"
if ! "${RELEASE_DIR}/bin/migrate" --environment "${ENVIRONMENT}" --timeout 300; then
    fail "database migration failed"
fi

log "Stopping service ${APP_NAME}"
sudo systemctl stop "${APP_NAME}.service" || log "service was not running"

log "Switching ${CURRENT_LINK} -> ${RELEASE_DIR}"
ln -sfn "${RELEASE_DIR}" "${CURRENT_LINK}.tmp"
mv -Tf "${CURRENT_LINK}.tmp" "${CURRENT_LINK}"

log "Starting service ${APP_NAME}"
sudo systemctl start "${APP_NAME}.service"

for attempt in $(seq 1 "${MAX_ATTEMPTS}"); do
    status="$(curl -s -o /dev/null -w '%{http_code}' "${HEALTH_URL}" || true)"
    if [[ "${status}" == "200" ]]; then
        log "Health check passed after ${attempt} attempt(s)"
        break
    fi
    if [[ "${attempt}" -eq "${MAX_ATTEMPTS}" ]]; then
        sudo journalctl -u "${APP_NAME}.service" -n 50 --no-pager || true
        fail "health check did not pass after ${MAX_ATTEMPTS} attempts (last status ${status})"
    fi
    log "Waiting for ${APP_NAME} to become healthy (attempt ${attempt}, status ${status})"
    sleep 2
done

log "Pruning old releases (keeping 5)"
ls -1dt "${INSTALL_ROOT}/releases/"*/ | tail -n +6 | xargs -r rm -rf

set_octopusvariable "DeployedVersion" "${APP_VERSION}"
new_octopusartifact "${RELEASE_DIR}/appsettings.${ENVIRONMENT}.json" "appsettings.json"
log "Deployment of ${APP_NAME} ${APP_VERSION} complete"
"""

_LOG_TEMPLATES = (
    (ProcessOutputSource.StdOut, "[{ts}] Extracting package into /opt/apps/Acme.Web/releases/2024.3.{n} (file {n} of 100)"),
    (ProcessOutputSource.StdOut, "[{ts}] Applying migration 2024031{d}_{n:04d}_AddCustomerLoyaltyTier ... done in {n}3 ms"),
    (ProcessOutputSource.Debug, "Octopus.Action[Deploy Acme.Web].Output.Step{n} = 'Deployed Acme.Web 2024.3.{n} to Production'"),
    (ProcessOutputSource.StdErr, "warning: npm WARN deprecated inflight@1.0.6: This module is not supported, and leaks memory ({n})"),
    (ProcessOutputSource.StdOut, "[{ts}] Waiting for Acme.Web to become healthy (attempt {d}, status 503)"),
)


def start_script_request() -> RequestMessage:
    ticket = ScriptTicket(f"ServerTasks-{uuid.uuid4().hex[:20].upper()}")
    command = StartScriptCommandV2(
        script_ticket=ticket,
        script_body=SCRIPT_BODY,
        task_id="ServerTasks-1234567",
        duration_to_wait_for_script_to_finish=timedelta(seconds=2),
        isolation=ScriptIsolationLevel.FullIsolation,
        script_isolation_mutex_timeout=TimeSpan(2**63 - 1),  # TimeSpan.MaxValue: wait for ever
        isolation_mutex_name="RunningScript-Acme.Web-Production",
        arguments=(
            "-Environment", "Production",
            "-Tenant", "Acme Corporation",
            "-Verbose",
            "-ReleaseNotes", "Loyalty tiers; checkout fixes; dependency updates",
        ),
    )
    return common.request("IScriptServiceV2", "StartScript", command)


def status_response(lines: int = 100) -> ResponseMessage:
    start = datetime(2024, 3, 14, 9, 26, 53, 589000, tzinfo=timezone.utc)
    logs = []
    for n in range(lines):
        source, template = _LOG_TEMPLATES[n % len(_LOG_TEMPLATES)]
        occurred = start + timedelta(milliseconds=37 * n)
        text = template.format(ts=occurred.strftime("%H:%M:%S.%f")[:-3], n=n, d=n % 10)
        logs.append(ProcessOutput(source, occurred, text))
    result = ScriptStatusResponseV2(
        ticket=ScriptTicket(f"ServerTasks-{uuid.uuid4().hex[:20].upper()}"),
        logs=logs,
        next_log_sequence=4711 + lines,
        state=ProcessState.Running,
        exit_code=0,
    )
    call = uuid.uuid4()
    return ResponseMessage(id=f"IScriptServiceV2::GetStatus[2] / {call}", result=result)


def plain(tree: Any) -> Any:
    """
    The envelope tree as JSON-ready data: what Json.NET's JSON writer would
    carry for it (GUIDs and DateTimeOffsets as strings, longs as numbers).
    """
    if isinstance(tree, dict):
        return {k: plain(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [plain(v) for v in tree]
    if isinstance(tree, uuid.UUID):
        return str(tree)
    if isinstance(tree, datetime):
        return tree.isoformat(timespec="milliseconds")
    if isinstance(tree, bool) or tree is None or isinstance(tree, str):
        return tree
    if isinstance(tree, int):
        return int(tree)
    raise TypeError(f"unexpected {type(tree).__name__} in the tree")


# --- the operations -----------------------------------------------------------

_LEVEL = zlib.Z_DEFAULT_COMPRESSION
_RAW = -15


def ours(message: RequestMessage | ResponseMessage) -> dict[str, Callable[[], Any]]:
    registry = tentacle_registry()
    expected = type(message)
    wire, _ = encode_message(message)
    wire = compress(wire)

    def encode() -> bytes:
        data, _ = encode_message(message)
        return compress(data)

    def decode(data: bytes = wire) -> Any:
        payload, _ = decompress(data)
        decoded, _ = decode_message(payload, registry, expected=expected)
        return decoded

    def both() -> Any:
        return decode(encode())

    assert decode() == message, "our codec does not round-trip the message"
    return {"encode+decode": both, "encode": encode, "decode": decode}


def baseline(message: RequestMessage | ResponseMessage) -> dict[str, Callable[[], Any]]:
    tree, _ = encode_envelope(message)
    data = plain(tree)

    def encode() -> bytes:
        c = zlib.compressobj(_LEVEL, zlib.DEFLATED, _RAW)
        return c.compress(json.dumps(data).encode("utf-8")) + c.flush(zlib.Z_FINISH)

    wire = encode()

    def decode(blob: bytes = wire) -> Any:
        return json.loads(zlib.decompress(blob, _RAW).decode("utf-8"))

    def both() -> Any:
        return decode(encode())

    assert decode() == data, "the json baseline does not round-trip"
    return {"encode+decode": both, "encode": encode, "decode": decode}


# --- timing -------------------------------------------------------------------


def calibrate(op: Callable[[], Any], budget: float) -> int:
    """
    How many calls of C{op} take about C{budget} seconds.
    """
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            op()
        elapsed = time.perf_counter() - t0
        if elapsed >= budget / 4:
            return max(1, int(n * budget / elapsed))
        n *= 2


def timed(op: Callable[[], Any], n: int) -> float:
    """
    Operations per second over C{n} calls.
    """
    gc.collect()
    t0 = time.perf_counter()
    for _ in range(n):
        op()
    return n / (time.perf_counter() - t0)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def compare(
    mine: Callable[[], Any], theirs: Callable[[], Any], rounds: int, budget: float
) -> dict[str, Any]:
    """
    Ours and the baseline, alternating round by round.
    """
    n_ours = calibrate(mine, budget)
    n_base = calibrate(theirs, budget)
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(timed(mine, n_ours))
        b.append(timed(theirs, n_base))
    return {
        "ours": statistics.median(a),
        "json": statistics.median(b),
        "ratio": spread([x / y for x, y in zip(a, b)]),
        "rounds": {"ours": a, "json": b},
    }


def page_steps(message: ResponseMessage, slice_bytes: int) -> dict[str, float]:
    """
    One encoding of the page, timed step by step, in milliseconds.
    """
    gc.collect()
    t0 = time.perf_counter()
    data, _ = encode_message(message)
    t1 = time.perf_counter()
    compress(data)
    t2 = time.perf_counter()
    longest = 0.0
    pieces = compress_slices(data, slice_bytes)
    while True:
        s0 = time.perf_counter()
        try:
            next(pieces)
        except StopIteration:
            break
        longest = max(longest, time.perf_counter() - s0)
    encode = (t1 - t0) * 1e3
    return {
        "encode_ms": encode,
        "compress_ms": (t2 - t1) * 1e3,
        "one_go_ms": (t2 - t0) * 1e3,
        "longest_slice_ms": longest * 1e3,
        "longest_step_ms": max(encode, longest * 1e3),
    }


def measure_page(lines: int, rounds: int, slice_bytes: int) -> dict[str, Any]:
    message = status_response(lines)
    data, _ = encode_message(message)
    samples = [page_steps(message, slice_bytes) for _ in range(rounds)]
    figures: dict[str, Any] = {
        "lines": lines,
        "bson_bytes": len(data),
        "slice_bytes": slice_bytes,
        "steps": len(list(compress_slices(data, slice_bytes))),
    }
    for key in samples[0]:
        figures[key] = spread([sample[key] for sample in samples])
    return figures


def fmt(figure: dict[str, float], unit: str = "", digits: int = 3) -> str:
    return (
        f"{figure['median']:.{digits}f}{unit} "
        f"(rounds {figure['min']:.{digits}f}..{figure['max']:.{digits}f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per measurement")
    parser.add_argument("--page-lines", type=int, default=5000)
    parser.add_argument("--no-python", action="store_true", help="skip the pure-Python reference")
    common.add_json_option(parser)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("at least 3 rounds, for a median and a spread")

    compiled = accel.core
    print(f"# bench_codec: {common.machine()}")
    print(f"# codec: {accel.reason}")
    print(f"# {args.rounds} rounds of ~{args.budget:g} s per measurement; ours and baseline interleaved")
    messages: dict[str, RequestMessage | ResponseMessage] = {
        "start-script": start_script_request(),
        "status-100": status_response(100),
    }
    cores: list[tuple[str, Any]] = [(accel.implementation(), compiled)]
    if compiled is not None and not args.no_python:
        cores.append(("python", None))
    results: list[dict[str, Any]] = []
    for name, message in messages.items():
        bson_size = len(encode_message(message)[0])
        wire_size = len(compress(encode_message(message)[0]))
        json_size = len(json.dumps(plain(encode_envelope(message)[0])).encode())
        json_wire = len(baseline(message)["encode"]())
        print(
            f"\n{name}: BSON {bson_size} B -> {wire_size} B deflated; "
            f"JSON {json_size} B -> {json_wire} B deflated"
        )
        theirs = baseline(message)
        for implementation, core in cores:
            accel.use(core)
            mine = ours(message)
            phases = ("encode+decode", "encode", "decode") if core is compiled else ("encode+decode",)
            for phase in phases:
                figures = compare(mine[phase], theirs[phase], args.rounds, args.budget)
                figures.update(message=name, phase=phase, implementation=implementation)
                results.append(figures)
                a, b = figures["rounds"]["ours"], figures["rounds"]["json"]
                print(
                    f"  {implementation:8s} {phase:14s} ours {figures['ours']:9.0f} ops/s "
                    f"(rounds {min(a):.0f}..{max(a):.0f})   json {figures['json']:9.0f} ops/s "
                    f"(rounds {min(b):.0f}..{max(b):.0f})   ours/json {fmt(figures['ratio'])}"
                )
        accel.use(compiled)

    print(f"\nstatus page of {args.page_lines} lines (milliseconds; median, lowest..highest round):")
    pages: dict[str, Any] = {}
    for implementation, core in cores:
        accel.use(core)
        page = pages[implementation] = measure_page(args.page_lines, args.rounds, SLICE_BYTES)
        print(
            f"  {implementation:8s} {page['bson_bytes']} B of BSON; encode_message "
            f"{fmt(page['encode_ms'], ' ms', 2)}, compress {fmt(page['compress_ms'], ' ms', 2)}, "
            f"in one go {fmt(page['one_go_ms'], ' ms', 2)}"
        )
        print(
            f"  {'':8s} compress_slices of {page['slice_bytes'] // 1024} KiB: {page['steps']} steps, "
            f"longest {fmt(page['longest_slice_ms'], ' ms', 2)}; "
            f"longest step in all {fmt(page['longest_step_ms'], ' ms', 2)}"
        )
    accel.use(compiled)

    print("\nsummary (median ops/s; ratio = ours / json baseline per round: median (lowest..highest)):")
    for row in results:
        print(
            f"  {row['implementation']:8s} {row['message']:13s} {row['phase']:14s} "
            f"{row['ours']:9.0f} vs {row['json']:9.0f}   ratio {fmt(row['ratio'])}"
        )
    common.write_json(args.json, {
        "implementation": accel.implementation(),
        "reason": accel.reason,
        "ops/s": results,
        "page": pages,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
