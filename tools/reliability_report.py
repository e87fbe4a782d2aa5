"""
Regenerate C{docs/reliability.md}: run the reliability tests and tabulate
the figures they record (C{tests/figures.py}).

    python tools/reliability_report.py                    # atheris 10 s a target, floods 60 s
    python tools/reliability_report.py --fuzz-seconds 60  # a longer campaign

It fails, and leaves the document alone, if any of those tests fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parent.parent
DOCUMENT = CHECKOUT / "docs" / "reliability.md"
MODULES = [
    "tests.e2e.test_network_faults",
    "tests.e2e.test_crashes",
    "tests.e2e.test_hostile_input",
    "tests.e2e.test_hostile_floods",
    "tests.e2e.test_hostile_output",
    "tests.e2e.test_hostile_local",
    "tests.e2e.test_hostile_transfers",
    "tests.test_hostile_packages",
    "tests.e2e.test_tls_policy",
    "tests.e2e.test_stream_lengths",
    "tests.e2e.test_polling",
    "tests.e2e.test_polling_scale",
    "tests.test_fuzz",
]
AREAS = {
    "network": (
        "Network faults",
        "The client library drives a real agent through `tests/fault_forwarder.py`, "
        "which kills (TCP reset), pauses (black-holes), delays or shapes the connection "
        "at exact moments.",
    ),
    "crash": (
        "Crashes",
        "The agent runs in a child process and is killed with SIGKILL, then started "
        "again on the same home and port.",
    ),
    "hostile": ("Hostile peers", "Attacks on the listener, before and after authentication."),
    "tls": ("TLS policy", "`openssl s_client` and pyOpenSSL probes against a real agent."),
    "polling": (
        "Polling",
        "Agents that dial a polling server (`tests/e2e/test_polling*.py`): many at once, and the "
        "server restarted under them.",
    ),
    "fuzz": (
        "Fuzzing",
        "Targets in `tests/fuzz_targets.py`, from the seeds in `tests/fuzz_corpus/`. "
        "A crash is any exception but the reader's own error; a hang is an input that "
        "takes over 5 s (atheris) or 2 s (hypothesis).",
    ),
}


#: What the suite found, and the test that keeps each fixed.
DEFECTS = [
    ("The client retried nothing once a request was sent, so a reset during "
     "StartScript, GetStatus, CancelScript or CompleteScript, or mid-transfer, failed "
     "the whole run", "`run_script`, `upload` and `download` resend the calls that are "
     "safe to repeat (`call_idempotent`); never V1 StartScript",
     "`test_start_script_answer_lost` and the other network-fault tests"),
    ("A pooled connection the agent had closed (a restart, an idle timeout) was handed "
     "out again: the next call failed with `RuntimeError`", "the pool skips it",
     "`test_pooled_connection_reset_while_idle`, `test_sigkill_during_a_running_script`"),
    ("The client's response timeout ran from the start of the request, so an upload "
     "taking longer than it to send was cut off, and a stalled send was never noticed",
     "it starts once the request is sent; while streams go out the heartbeat watches "
     "that they drain", "`test_upload_slower_than_the_response_timeout`"),
    ("A server that stopped taking a download held the agent's connection and file open "
     "for ever: no timer ran while the agent sent", "the heartbeat covers sending too",
     "`test_paused_during_a_download`"),
    ("`max-connections` counted connections that had not authenticated: 1,000 silent sockets, "
     "reopened as they were closed, made the agent reset every new connection at accept, the "
     "trusted server's included", "a budget of their own for unauthenticated connections that evicts "
     "the oldest of the most crowded address, a share per address, a first-byte deadline; evicted "
     "sockets released at once, at most 32 accepts a turn, backlog 4096",
     "`test_1500_silent_sockets_reopened_never_lock_the_trusted_server_out` and the other floods"),
    ("Each data stream of a request kept up to 1 MiB in memory, with no total: 150 script files "
     "of 0.6 MB in one StartScript added 87 MiB to the agent", "a 4 MiB budget for the streams of "
     "one message (request or response) together; the rest spool to anonymous temp files",
     "`test_150_script_files_of_600_kb_hold_at_most_the_request_budget_in_memory`"),
    ("Twisted's listen backlog of 50: under a burst of connections, a trusted server's "
     "connection waited out a SYN retry (over a second)", "backlog 1024",
     "`test_stalled_connections_are_cut_off_and_the_server_still_served`"),
    ("The identity-line limit (1 KiB) held when the line came in pieces but not when it "
     "came in one read (found by atheris)", "checked on the whole line either way",
     "`IdentityReaderTests`, seed `tests/fuzz_corpus/identity/crash-line-over-limit-in-one-read`"),
    ("A script's log kept 8 bytes of memory per line for ever (5 M empty lines: +38.8 MB, 68 s of "
     "CPU), and after a restart every GetStatus re-read the whole log on the reactor thread",
     "a sparse index (one offset per 4,096 lines or MiB) saved beside the log, lines stored a read "
     "at a time, big pages and the rebuild in a thread; optional `script-output-limit`",
     "`test_five_million_lines_in_flat_memory`, `test_big_log_after_a_restart_is_indexed_once_off_the_reactor_thread`"),
    ("Home, `Work/` and workspaces were 0755, scripts, `Output.log` and the deploy variables file "
     "0644: another local user read a deployment's password", "folders 0700 and files 0600 "
     "whatever the umask; umask 077 for `tentacle run`", "`test_another_local_user_cannot_read_a_deployments_secrets`"),
    ("A zip symlink entry was read whole: a 1 MB package took 7.36 GB of memory; and nothing "
     "limited what a package expands to", "at most 4 KiB of a link; limits on bytes, entries and "
     "ratio checked before data is written", "`test_zip_symlink_entry_of_a_gigabyte_reads_at_most_4_kib`, "
     "`test_two_megabyte_zip_expanding_to_two_gigabytes_is_refused_before_writing`"),
    ("Links planted in `<apps>/<id>/` were followed: the lock file was created through one, and "
     "removing a leftover that was a link changed the modes of the folder it pointed to",
     "`O_NOFOLLOW` and `lstat` checks; a link is unlinked, never entered", "`PlantedSymlinkTests`"),
    ("A download could follow a symlink swapped in after the allowed-roots check (56 of 3,000 "
     "flips leaked the file outside), and a link changing while it was resolved raised an "
     "unexpected error", "opened with `O_NOFOLLOW`; a resolution error is a clear refusal",
     "`test_download_of_a_name_swapped_for_a_symlink_never_leaves_the_roots`"),
    ("A `/sys` file (size 4096, holding a few bytes) broke the connection mid-stream",
     "files up to 64 KiB are read whole and sent as they read", "`test_sys_and_proc_files_do_not_abort_the_connection`"),
    ("Cancel missed processes that left the script's process group (`setsid`, a double fork)",
     "every script's processes carry an environment cookie, and a cancel signals them too",
     "`test_cancel_reaches_a_setsid_grandchild`, `test_cancel_reaches_a_double_forked_daemon`"),
]


def run_tests(figures: Path, fuzz_seconds: float, flood_seconds: float) -> tuple[int, str]:
    env = dict(os.environ)
    env["TENTACLE_RELIABILITY_FIGURES"] = str(figures)
    env["TENTACLE_FUZZ_SECONDS"] = str(int(fuzz_seconds))
    env["TENTACLE_FLOOD_SECONDS"] = str(flood_seconds)
    env["PYTHONPATH"] = str(CHECKOUT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="tentacle-reliability-") as temp:
        # Made 0700; the tests that run an agent as another user (nobody)
        # open the folders up to trial's own, and this one is above it.
        os.chmod(temp, 0o755)
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "--temp-directory", str(Path(temp) / "trial"), *MODULES],
            cwd=CHECKOUT, env=env, capture_output=True, text=True,
        )
    return result.returncode, result.stdout + result.stderr


def _figures(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in figures.items()) or "-"


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render(records: list[dict[str, Any]], summary: str, fuzz_seconds: float) -> str:
    by_area: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in records:
        by_area[entry["area"]].append(entry)
    totals = {
        "faults injected and survived": sum(
            e["figures"].get("faults", 0) + e["figures"].get("restarts", 0) for e in records
        ),
        "retries that recovered a call": sum(e["figures"].get("retries", 0) for e in records),
        "fuzz inputs tried": sum(e["figures"].get("inputs", 0) for e in by_area["fuzz"]),
        "fuzz crashes and hangs": sum(e["figures"].get("crashes", 0) for e in by_area["fuzz"]),
        "hostile inputs refused": sum(e["figures"].get("inputs", 0) for e in by_area["hostile"])
        + sum(e["figures"].get("refused", 0) for e in by_area["hostile"]),
        "stalled connections held at once": max(
            (e["figures"].get("connections_held", 0) for e in records), default=0
        ),
        "unauthenticated connections evicted for newer ones": sum(
            e["figures"].get("evicted", 0) for e in records
        ),
        "log lines or complete files lost": sum(e["figures"].get("lines_lost", 0) for e in records),
    }
    lines = [
        "# Reliability",
        "",
        "What the reliability suite injects into the agent and the client, and what",
        "came out. Every row is a test that passed; the figures are the ones that run",
        "recorded. Regenerate this page with:",
        "",
        "    python tools/reliability_report.py [--fuzz-seconds N]",
        "",
        "The same tests run in CI with the README's test command (atheris for 2 s a",
        "target there); the long fuzz campaign is `python tools/fuzz.py --seconds 600`.",
        "",
        f"Last run: {summary}; atheris {int(fuzz_seconds)} s a target; "
        f"Python {platform.python_version()} on {platform.machine()}.",
        "",
        "## Totals",
        "",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {value:,} |" for name, value in totals.items()]
    lines += [
        "",
        "## Defects found and fixed",
        "",
        "| defect | fix | kept by |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {_escape(d)} | {_escape(f)} | {_escape(t)} |" for d, f, t in DEFECTS]
    for area, (title, blurb) in AREAS.items():
        entries = by_area.get(area, [])
        if not entries:
            continue
        lines += ["", f"## {title}", "", blurb, "", "| test | injects | result | figures |", "| --- | --- | --- | --- |"]
        for e in entries:
            name = e["test"].rsplit(".", 1)[-1]
            lines.append(
                f"| `{name}` | {_escape(e['injects'])} | {_escape(e['result'])} | {_figures(e['figures'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz-seconds", type=float, default=10.0, help="atheris time per target (default 10)")
    parser.add_argument(
        "--flood-seconds", type=float, default=60.0,
        help="how long each connection flood runs while the trusted server calls (default 60; CI runs 10)",
    )
    parser.add_argument("--output", type=Path, default=DOCUMENT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temp:
        figures = Path(temp) / "figures.jsonl"
        code, output = run_tests(figures, args.fuzz_seconds, args.flood_seconds)
        records = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    closing = re.findall(r"^(?:PASSED|FAILED) \(.*\)$", output, re.M)
    ran = re.findall(r"^Ran (\d+) tests in ([\d.]+)s$", output, re.M)
    if code != 0:
        print(output[-5000:], file=sys.stderr)
        print("reliability tests failed; docs not updated", file=sys.stderr)
        return 1
    summary = f"{ran[-1][0]} tests in {float(ran[-1][1]):.0f} s, {closing[-1]}" if ran and closing else "passed"
    args.output.write_text(render(records, summary, args.fuzz_seconds))
    print(f"wrote {args.output} ({len(records)} rows; {summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
