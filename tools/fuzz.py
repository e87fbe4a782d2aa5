"""
Coverage-guided fuzzing of the agent's readers with atheris (libFuzzer).

    python tools/fuzz.py                       # every target, 60 s each
    python tools/fuzz.py --seconds 600 bson    # one target, longer
    python tools/fuzz.py --write-seeds         # regenerate tests/fuzz_corpus/

Targets are in C{tests/fuzz_targets.py}.  Each run starts from the
committed seeds in C{tests/fuzz_corpus/<target>/}; inputs it finds are
kept in C{--work} (a temp folder by default), never in the seeds.  A crash
or a hang (an input taking more than 5 s) fails the run, and libFuzzer
writes the input to C{crash-*} or C{timeout-*} in the work folder; copy it
into the target's seed folder so the test suite replays it for good.

Prints one line per target: C{<target>: <runs> runs, ok} (or the failure).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(CHECKOUT))


def _fuzz_one(target: str, arguments: list[str]) -> None:
    """
    Child process: instrument the package, then hand over to libFuzzer
    (which exits the process when done).
    """
    import atheris

    with atheris.instrument_imports(include=["tentacle"]):
        import tentacle.halibut.bson  # noqa: F401
        import tentacle.halibut.deflate  # noqa: F401
        import tentacle.halibut.serializer  # noqa: F401
        import tentacle.halibut.streams  # noqa: F401
        import tentacle.halibut.handshake  # noqa: F401
    from tests.fuzz_targets import TARGETS

    atheris.Setup([sys.argv[0], *arguments], TARGETS[target])
    atheris.Fuzz()


def run(target: str, seconds: float, work: Path) -> tuple[bool, int, str]:
    """
    Fuzz one target in a child process.

    @return: whether it passed, how many inputs it tried, and its last words.
    """
    from tests.fuzz_targets import CORPUS

    found = work / target
    found.mkdir(parents=True, exist_ok=True)
    arguments = [
        str(found),
        str(CORPUS / target),
        f"-max_total_time={int(seconds)}",
        "-timeout=5",
        "-rss_limit_mb=1024",
        "-max_len=4096",
        f"-artifact_prefix={work}/{target}-",
        "-print_final_stats=1",
    ]
    result = subprocess.run(
        [sys.executable, __file__, "--child", target, "--", *arguments],
        capture_output=True,
        text=True,
        cwd=CHECKOUT,
    )
    output = result.stdout + result.stderr
    runs = re.search(r"Done (\d+) runs", output) or re.search(r"stat::number_of_executed_units:\s*(\d+)", output)
    count = int(runs.group(1)) if runs else 0
    tail = "\n".join(output.strip().splitlines()[-15:])
    return result.returncode == 0, count, tail


def write_seeds() -> None:
    """
    The committed seed corpus: real traffic for each reader, plus the
    edge cases worth starting from.
    """
    import uuid

    from tentacle.contracts import ScriptStatusRequestV2, ScriptTicket
    from tentacle.halibut.deflate import compress
    from tentacle.halibut.serializer import DataStream, encode_message
    from tentacle.halibut.streams import stream_header, stream_trailer
    from tests.fuzz_targets import CORPUS
    from tests.wire_client import request

    status = encode_message(
        request("IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(ScriptTicket("a1b2"), 7))
    )[0]
    upload_ref = DataStream(uuid.UUID(int=1), 5)
    upload = encode_message(request("IFileTransferService", "UploadFile", "pkg/a.zip", upload_ref))[0]
    capabilities = encode_message(request("ICapabilitiesServiceV2", "GetCapabilities"))[0]
    seeds: dict[str, dict[str, bytes]] = {
        "preamble": {
            "mx": b"\x00\x00MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n",
            "mx-split": b"\x00\x03MX\r\n\r\nrest",
            "get": b"\x07\x00GET / HTTP/1.1\r\nHost: agent\r\nAccept: */*\r\n\r\n",
            "bare-newlines": b"\x01\x01MX\n\n",
            "carriage-returns": b"\x00\x00MX\r\r\r\n\r\r\n",
            "long": b"\x10\x00" + b"A" * 300 + b"\r\n\r\n",
        },
        "identity": {
            "client": b"\x00\x00MX-CLIENT 1.0\r\n\r\n",
            "client-and-message": b"\x02\x05MX-CLIENT 1.0\r\n\r\n" + compress(capabilities),
            "subscriber": b"\x00\x00MX-SUBSCRIBER 1.0 poll://x/\r\n\r\n",
            "lf-only": b"\x00\x00MX-CLIENT 1.0\n\n",
            "long": b"\x00\x00MX-CLIENT " + b"9" * 1100,
        },
        "bson": {
            "get-status": status,
            "upload": upload,
            "capabilities": capabilities,
            "empty": b"\x05\x00\x00\x00\x00",
            "deep": b"".join([b"\x03a\x00"] * 3),
        },
        "deflate": {
            "message": b"\x05\x00\x01\x20" + capabilities[:32] + b"NEXT\r\n",
            "raw-request": b"\x40\x00\x00" + compress(status),
            "split-1": b"\x00\x00\x01\x10" + status[:16] + b"\x00" * 30,
            "stored-block": b"\x03\x00\x00\x01\x00\xfe\xffA",
        },
        "streams": {
            "one": b"\x10\x00\x01\x01hello world",
            "three": b"\x00\x00\x01\x03" + bytes(range(60)),
            "declared": b"\x08\x00\x00\x01\x05" + stream_header(uuid.UUID(int=1), 5) + b"hello" + stream_trailer(5),
            "wrong-trailer": b"\x08\x00\x00\x01\x05" + stream_header(uuid.UUID(int=1), 5) + b"hello" + stream_trailer(4),
        },
    }
    for target, files in seeds.items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / f"seed-{name}").write_bytes(data)
    print(f"wrote {sum(len(f) for f in seeds.values())} seeds to {CORPUS}")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        _fuzz_one(argv[1], argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", help="targets to fuzz (default: all)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per target (default 60)")
    parser.add_argument("--work", type=Path, help="where found inputs and crashes go")
    parser.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once (default 1)")
    parser.add_argument("--write-seeds", action="store_true")
    args = parser.parse_args(argv)
    if args.write_seeds:
        write_seeds()
        return 0
    from tests.fuzz_targets import TARGETS

    targets = args.targets or list(TARGETS)
    work = args.work or Path(tempfile.mkdtemp(prefix="tentacle-fuzz-"))
    failed = False
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = pool.map(lambda t: (t, *run(t, args.seconds, work)), targets)
        for target, ok, runs, tail in outcomes:
            print(f"{target}: {runs} runs, {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                failed = True
                print(tail, file=sys.stderr)
    if failed:
        print(f"crash or hang inputs are in {work}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
