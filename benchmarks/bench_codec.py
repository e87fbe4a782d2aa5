"""
Codec throughput: full wire encode+decode of two typical Halibut messages,
against stdlib C{json} of the same data measured in the same run.

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
plain dicts. Encode-only and decode-only halves are reported too.

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
from tentacle.halibut.deflate import compress, decompress
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.4, help="seconds per measurement")
    common.add_json_option(parser)
    args = parser.parse_args(argv)

    print(f"# bench_codec: {common.machine()}")
    print(f"# {args.rounds} rounds of ~{args.budget:g} s per measurement; ours and baseline interleaved")
    messages: dict[str, RequestMessage | ResponseMessage] = {
        "start-script": start_script_request(),
        "status-100": status_response(100),
    }
    results: list[tuple[str, str, float, float]] = []
    for name, message in messages.items():
        bson_size = len(encode_message(message)[0])
        wire_size = len(compress(encode_message(message)[0]))
        json_size = len(json.dumps(plain(encode_envelope(message)[0])).encode())
        json_wire = len(baseline(message)["encode"]())
        print(
            f"\n{name}: BSON {bson_size} B -> {wire_size} B deflated; "
            f"JSON {json_size} B -> {json_wire} B deflated"
        )
        mine, theirs = ours(message), baseline(message)
        for phase in ("encode+decode", "encode", "decode"):
            n_ours = calibrate(mine[phase], args.budget)
            n_base = calibrate(theirs[phase], args.budget)
            a: list[float] = []
            b: list[float] = []
            for _ in range(args.rounds):
                a.append(timed(mine[phase], n_ours))
                b.append(timed(theirs[phase], n_base))
            med_a, med_b = statistics.median(a), statistics.median(b)
            results.append((name, phase, med_a, med_b))
            print(
                f"  {phase:14s} ours {med_a:9.0f} ops/s  (rounds {min(a):.0f}..{max(a):.0f})   "
                f"json {med_b:9.0f} ops/s  (rounds {min(b):.0f}..{max(b):.0f})   "
                f"ours/json {med_a / med_b:.3f}"
            )
    print("\nsummary (median ops/s; ratio = ours / json baseline, higher is better):")
    for name, phase, med_a, med_b in results:
        print(f"  {name:13s} {phase:14s} {med_a:9.0f} vs {med_b:9.0f}   ratio {med_a / med_b:.3f}")
    common.write_json(args.json, {
        "ops/s": [
            {"message": name, "phase": phase, "ours": med_a, "json": med_b}
            for name, phase, med_a, med_b in results
        ]
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
