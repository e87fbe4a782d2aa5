"""
Fuzzing the readers a peer's bytes reach (targets in C{tests/fuzz_targets.py}):
the committed corpus replayed, hypothesis's generated inputs, and a short
coverage-guided atheris run.  The long campaign is C{python tools/fuzz.py}.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.codec_cores import on_both_cores
from tests.figures import record
from tests.fuzz_targets import CORPUS, TARGETS

CHECKOUT = Path(__file__).resolve().parent.parent
EXAMPLES = 400
#: Generous: a per-input deadline catches hangs, not slow CI machines.
FUZZ = settings(
    max_examples=EXAMPLES, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)


class Counted:
    """
    A target that counts its inputs, for the figures.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.target: Callable[[bytes], None] = TARGETS[name]
        self.inputs = 0

    def __call__(self, data: bytes) -> None:
        self.inputs += 1
        self.target(data)


#: Inputs shaped like each reader's real traffic, for hypothesis to mutate.
_reads = st.binary(min_size=2, max_size=2)
_shaped = {
    "preamble": st.builds(
        lambda r, lines, end: r + b"\r\n".join(lines) + end,
        _reads,
        st.lists(st.sampled_from([b"MX", b"GET / HTTP/1.1", b"Host: x", b"", b"\r", b"A" * 100]), max_size=6),
        st.sampled_from([b"\r\n\r\n", b"\n\n", b"", b"\r\n\r\nMX-CLIENT 1.0\r\n\r\n"]),
    ),
    "identity": st.builds(
        lambda r, kind, version, end, rest: r + kind + b" " + version + end + rest,
        _reads,
        st.sampled_from([b"MX-CLIENT", b"MX-SERVER", b"MX-SUBSCRIBER", b"", b"MX-CLIENT\x00"]),
        st.binary(max_size=12),
        st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n", b"\r\n \r\n"]),
        st.binary(max_size=40),
    ),
    "deflate": st.builds(
        lambda r, message, following: r + b"\x01" + bytes([len(message)]) + message + following,
        _reads,
        st.binary(max_size=255),
        st.binary(max_size=64),
    ),
    "streams": st.builds(lambda r, mode, body: r + mode + body, _reads, st.sampled_from([b"\x00", b"\x01"]),
                         st.binary(max_size=300)),
    "bson": st.builds(lambda raw: raw, st.sampled_from(sorted((CORPUS / "bson").iterdir())).map(
        lambda p: p.read_bytes()
    )).flatmap(
        lambda seed: st.builds(
            lambda cut, junk: seed[:cut] + junk + seed[cut + len(junk) :],
            st.integers(0, len(seed)),
            st.binary(max_size=8),
        )
    ),
}


#: What each target establishes besides "no crash, no hang".
CHECKED = {
    "preamble": "only its own error escapes; the same outcome however the bytes are split",
    "identity": "only its own error escapes; the same outcome however the bytes are split",
    "bson": "only CodecError escapes, from the BSON reader or the request layer over it",
    "deflate": "only CodecError escapes; a message and what follows it survive any split",
    "streams": "only CodecError escapes; frames, payloads and what follows survive any split",
}


class CorpusTests(SynchronousTestCase):
    def test_every_seed_and_past_finding_replays_cleanly(self) -> None:
        replayed = 0
        for name, target in TARGETS.items():
            files = sorted((CORPUS / name).iterdir())
            self.assertTrue(files, f"no seeds for {name}")
            for path in files:
                target(path.read_bytes())
                replayed += 1
        self.assertGreaterEqual(replayed, 20)


class HypothesisFuzzTests(SynchronousTestCase):
    """
    Each target under arbitrary bytes and under shaped ones; any exception
    but the reader's own is a failure, and hypothesis shrinks it.
    """

    def fuzz(self, name: str) -> None:
        counted = Counted(name)

        @FUZZ
        @given(st.one_of(st.binary(max_size=600), _shaped[name]))
        def run(data: bytes) -> None:
            counted(data)

        run()
        record(self, "fuzz", f"{name}: hypothesis, arbitrary and shaped bytes", CHECKED[name],
               inputs=counted.inputs, crashes=0)

    def test_preamble(self) -> None:
        self.fuzz("preamble")

    def test_identity(self) -> None:
        self.fuzz("identity")

    def test_bson(self) -> None:
        self.fuzz("bson")

    def test_deflate(self) -> None:
        self.fuzz("deflate")

    def test_streams(self) -> None:
        self.fuzz("streams")


class AtherisTests(TestCase):
    """
    A short coverage-guided run of every target, as CI's share of the campaign.
    """

    async def test_bounded_campaign(self) -> None:
        if importlib.util.find_spec("atheris") is None:
            raise SkipTest("atheris is not installed (pip install atheris); hypothesis still ran")
        seconds = os.environ.get("TENTACLE_FUZZ_SECONDS", "2")
        work = Path(self.mktemp()).absolute()
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [str(CHECKOUT / "tools" / "fuzz.py"), "--seconds", seconds, "--jobs", "2", "--work", str(work)],
            env=dict(os.environ),
            path=str(CHECKOUT),
        )
        text = out.decode()
        self.assertEqual(code, 0, text + err.decode())
        runs = {m[0]: int(m[1]) for m in re.findall(r"^(\w+): (\d+) runs, ok$", text, re.M)}
        self.assertEqual(sorted(runs), sorted(TARGETS))
        for name, count in runs.items():
            self.assertGreater(count, 0, name)
            record(self, "fuzz", f"{name}: atheris (libFuzzer), {seconds} s coverage-guided",
                   CHECKED[name], inputs=count, crashes=0)


on_both_cores(globals(), "CorpusTests")
