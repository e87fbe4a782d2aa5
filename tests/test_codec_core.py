"""
Tests for the compiled core of the codec (L{tentacle.halibut.accel},
C{tentacle/halibut/_codec.c}): it gives exactly what the pure-Python code
gives, or declines; it takes the fast path on real traffic; and the package
installs without it.

The rest of the codec's tests run on both cores (L{tests.codec_cores}).
"""

from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import (
    CONTRACT_TYPES,
    ProcessOutput,
    ProcessOutputSource,
    ProcessState,
    ScriptIsolationLevel,
    ScriptStatusResponseV2,
    ScriptTicket,
    StartScriptCommandV2,
    tentacle_registry,
)
from tentacle.halibut import accel, bson, serializer
from tentacle.halibut.bson import Int64
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.errors import CodecError, CodecLimits
from tentacle.halibut.serializer import (
    INT32,
    OBJECT,
    STRING,
    DataStream,
    RequestMessage,
    ResponseMessage,
    ServerError,
    TypeRegistry,
    dotnet_type,
    wire,
)
from tests.codec_cores import CHECKOUT, OnCompiledCore, build, built_module, compiled_core
from tests.fuzz_targets import bson_message
from tests.test_bson import JSONNET_MESSAGE, documents
from tests.test_contracts import instances_of
from tests.test_serializer import _messages, _trees

REGISTRY = tentacle_registry()
VECTORS = FilePath(__file__).sibling("vectors")
LIMITS = CodecLimits()
UTC = timezone.utc
ACTIVITY = uuid.UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301")
DIFFERENTIAL = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def typed(tree: Any) -> Any:
    """
    C{tree} with every value's exact type (and a datetime's tzinfo object)
    made part of what compares equal, so C{Int64(1)} differs from C{1} and
    C{True}, and key order counts.
    """
    if isinstance(tree, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in tree.items()])
    if isinstance(tree, (list, tuple)):
        return (type(tree).__name__, [typed(v) for v in tree])
    if isinstance(tree, datetime):
        return ("datetime", tree, id(tree.tzinfo))
    if isinstance(tree, float) and tree != tree:
        return ("float", "nan")
    return (type(tree).__qualname__, tree)


def outcome(function: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", function(*args)
    except Exception as e:  # the pure code's error is what both must give
        return "error", e


def vectors() -> list[tuple[str, bytes]]:
    return [(p.basename(), p.getContent()) for p in sorted(VECTORS.globChildren("*.bson"))]


class DifferentialTests(OnCompiledCore):
    """
    The core's answer is the pure-Python answer, or no answer.
    """

    def setUp(self) -> None:
        super().setUp()
        self.core = compiled_core()

    def decodeBoth(self, data: bytes, limits: CodecLimits = LIMITS) -> None:
        wanted = outcome(bson.decode_document_python, data, limits)
        got = self.core.decode_document(
            data, limits.max_message_bytes, limits.max_depth, limits.max_string_bytes
        )
        if wanted[0] == "error":
            self.assertIsInstance(wanted[1], CodecError)
            self.assertIsNone(got)
        else:
            # Whatever the pure code accepts, the core decodes too.
            self.assertEqual(typed(got), typed(wanted[1]))

    def encodeBoth(self, doc: Any, must_handle: bool = False) -> None:
        wanted = outcome(bson.encode_document_python, doc)
        got = self.core.encode_document(doc, LIMITS.max_depth)
        if wanted[0] == "error":
            self.assertIsNone(got, f"the pure code raised {wanted[1]!r}")
        elif got is not None or must_handle:
            self.assertEqual(got, wanted[1])

    @DIFFERENTIAL
    @given(documents)
    def test_encode_documents(self, doc: dict[str, Any]) -> None:
        self.encodeBoth(doc, must_handle=True)

    @DIFFERENTIAL
    @given(
        st.dictionaries(
            st.text(max_size=3) | st.integers(0, 3),
            st.one_of(
                st.sampled_from(list(ProcessOutputSource)),
                st.integers().map(lambda n: n * 2**40),
                st.datetimes(timezones=st.none() | st.timezones()),
                st.datetimes(datetime(1900, 1, 1), datetime(2100, 1, 1)).map(
                    lambda d: d.replace(tzinfo=UTC)
                ),
                st.text(st.characters(codec="utf-16", categories=["Cs", "Lu"]), max_size=3),
                st.floats(),
                st.binary(max_size=4).map(bytearray),
                st.lists(st.integers(), max_size=3).map(tuple),
                st.timedeltas(),
                st.just(OrderedDict(a=1)),
                st.sets(st.integers(), max_size=2),
                st.just(TimeSpan(5)),
                st.just(type("S", (str,), {})("sub")),
            ),
            max_size=3,
        )
    )
    def test_encode_odd_values(self, doc: dict[Any, Any]) -> None:
        self.encodeBoth(doc)

    def test_encode_known_cases(self) -> None:
        before_epoch = datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC)
        plus2 = timezone(timedelta(hours=2))
        deep: dict[str, Any] = {}
        inner = deep
        for _ in range(64):
            inner["x"] = inner = {}
        loop: list[Any] = []
        loop.append(loop)
        for doc in [
            {"d": before_epoch},
            {"d": datetime(1, 1, 1, tzinfo=UTC)},
            {"d": datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)},
            {"d": datetime(1970, 1, 1, 2, 0, 1, tzinfo=plus2)},
            {"i": 2**63 - 1, "j": -(2**63), "k": 2**31, "l": -(2**31) - 1},
            {"g": uuid.UUID(int=0), "h": uuid.UUID(int=2**128 - 1)},
            {"a\x00b": 1},
            {"big": 2**63},
            {"s": "\ud800"},
            {"k\u00e9y": "\U0001f600"},
            deep,
            {"loop": loop},
        ]:
            self.encodeBoth(doc)
        self.assertEqual(self.core.encode_document(bson.decode_document_python(JSONNET_MESSAGE), 64),
                         JSONNET_MESSAGE)

    @DIFFERENTIAL
    @given(st.binary(max_size=300))
    def test_decode_arbitrary_bytes(self, data: bytes) -> None:
        self.decodeBoth(data)
        self.decodeBoth(struct.pack("<i", len(data) + 4) + data)

    @DIFFERENTIAL
    @given(documents, st.data())
    def test_decode_mutated_documents(self, doc: dict[str, Any], data: st.DataObject) -> None:
        encoded = bytearray(bson.encode_document_python(doc))
        for _ in range(data.draw(st.integers(0, 3))):
            index = data.draw(st.integers(0, len(encoded) - 1))
            encoded[index] = data.draw(st.integers(0, 255))
        limits = data.draw(
            st.sampled_from([LIMITS, CodecLimits(max_depth=3, max_string_bytes=4, max_message_bytes=200)])
        )
        self.decodeBoth(bytes(encoded), limits)

    def test_decode_vectors(self) -> None:
        for name, data in vectors() + [("jsonnet", JSONNET_MESSAGE)]:
            with self.subTest(name):
                self.decodeBoth(data)
                self.decodeBoth(bytearray(data))
                self.decodeBoth(memoryview(data))

    def test_decode_odd_binaries_and_datetimes(self) -> None:
        def doc(element: bytes) -> bytes:
            return struct.pack("<i", len(element) + 5) + element + b"\x00"

        for millis in [-1, 0, 2**62, -(2**63), 2**63 - 1, -62135596800000, -62135596800001,
                       253402300799999, 253402300800000]:
            self.decodeBoth(doc(b"\x09d\x00" + struct.pack("<q", millis)))
        for subtype, payload in [(3, bytes(16)), (3, b"ab"), (4, b"ab"), (2, b"\x02\x00\x00\x00hi"),
                                 (2, b"\x09\x00\x00\x00hi"), (0x80, b"!"), (4, bytes(range(16)))]:
            self.decodeBoth(doc(b"\x05b\x00" + struct.pack("<iB", len(payload), subtype) + payload))

    @DIFFERENTIAL
    @given(message=_messages)
    def test_messages(self, message: Any) -> None:
        wanted = serializer.encode_message_python(message)
        got = self.core.encode_message(message, 64)
        self.assertEqual(got, wanted)
        tree = bson.decode_document_python(wanted[0])
        decoded = self.core.decode_envelope(tree, REGISTRY._exact, None, True)
        self.assertEqual(decoded, serializer.decode_envelope_python(tree, REGISTRY))

    @settings(max_examples=10, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def test_contracts(self, data: st.DataObject) -> None:
        for cls in CONTRACT_TYPES:
            value = data.draw(instances_of(cls))
            message = ResponseMessage("r", result=value)
            wanted = serializer.encode_message_python(message)
            self.assertEqual(self.core.encode_message(message, 64), wanted)
            tree = bson.decode_document_python(wanted[0])
            got = self.core.decode_envelope(tree, REGISTRY._exact, ResponseMessage, True)
            self.assertIsNotNone(got, cls.__name__)
            self.assertEqual(got, serializer.decode_envelope_python(tree, REGISTRY, ResponseMessage))

    @DIFFERENTIAL
    @given(
        st.one_of(
            st.integers(-(2**63), 2**63 - 1).map(lambda ticks: TimeSpan(ticks).format()),
            st.from_regex(
                r"\s?-?([0-9]{1,9}\.)?[0-9]{1,3}:[0-9]{1,3}(:[0-9]{1,3}(\.[0-9]{1,8})?)?\s?",
                fullmatch=True,
            ),
            st.text("0123456789-.: ", max_size=14),
        )
    )
    def test_timespan_text(self, text: str) -> None:
        command = StartScriptCommandV2(script_ticket=ScriptTicket("t"), script_body="b", task_id="t",
                                       isolation=ScriptIsolationLevel.NoIsolation)
        request = RequestMessage("r", ACTIVITY, "IScriptServiceV2", "StartScript", (command,))
        tree = bson.decode_document_python(serializer.encode_message_python(request)[0])
        tree["Message"]["params"][0]["ScriptIsolationMutexTimeout"] = text
        tree["Message"]["params"][0]["DurationToWaitForScriptToFinish"] = text
        wanted = outcome(serializer.decode_envelope_python, tree, REGISTRY)
        got = self.core.decode_envelope(tree, REGISTRY._exact, None, True)
        if wanted[0] == "error":
            self.assertIsNone(got)
        else:
            self.assertEqual(got, wanted[1])
            if text == text.strip():
                self.assertIsNotNone(got, text)

    def test_timespan_days_beyond_the_range(self) -> None:
        """
        30,000,000 days are more ticks than 64 bits hold: refused as out of
        range, as the Python codec does, not wrapped round to 6.5e5 days
        (found by the differential test above).
        """
        command = StartScriptCommandV2(script_ticket=ScriptTicket("t"), script_body="b", task_id="t",
                                       isolation=ScriptIsolationLevel.NoIsolation)
        request = RequestMessage("r", ACTIVITY, "IScriptServiceV2", "StartScript", (command,))
        tree = bson.decode_document_python(serializer.encode_message_python(request)[0])
        for text in ("30000000.0:0", "-30000000.0:0", "10675200.0:0"):
            tree["Message"]["params"][0]["DurationToWaitForScriptToFinish"] = text
            wanted = outcome(serializer.decode_envelope_python, tree, REGISTRY)
            got = self.core.decode_envelope(tree, REGISTRY._exact, None, True)
            if wanted[0] == "error":
                self.assertIsNone(got, text)
            else:
                self.assertEqual(got, wanted[1], text)

    @DIFFERENTIAL
    @given(tree=_trees)
    def test_hostile_trees(self, tree: Any) -> None:
        for envelope in (
            {"Message": tree},
            {"Message": {"$type": serializer.dotnet_type_of(RequestMessage).name, "params": [tree]}},
            {"Message": {"$type": serializer.dotnet_type_of(ResponseMessage).name, "id": "x",
                         "result": tree}},
        ):
            for expected in (None, RequestMessage, ResponseMessage):
                wanted = outcome(serializer.decode_envelope_python, envelope, REGISTRY, expected)
                got = self.core.decode_envelope(envelope, REGISTRY._exact, expected, True)
                if wanted[0] == "error":
                    self.assertIsInstance(wanted[1], CodecError)
                    self.assertIsNone(got)
                elif got is not None:
                    self.assertEqual(got, wanted[1])

    def test_vectors_take_the_fast_path(self) -> None:
        """
        Every vector that decodes is decoded, and re-encoded, by the core
        itself: it does not decline real traffic.
        """
        taken = 0
        for name, data in vectors():
            tree = self.core.decode_document(data, LIMITS.max_message_bytes, 64, LIMITS.max_string_bytes)
            self.assertIsNotNone(tree, name)
            wanted = outcome(serializer.decode_envelope_python, tree, REGISTRY)
            got = self.core.decode_envelope(tree, REGISTRY._exact, None, True)
            if wanted[0] == "error":
                self.assertIsNone(got, name)
                continue
            self.assertEqual(got, wanted[1], name)
            encoded = self.core.encode_message(got[0], 64)
            self.assertEqual(encoded, serializer.encode_message_python(got[0]), name)
            taken += 1
        self.assertGreaterEqual(taken, 30)

    def test_lenient_reading_is_left_to_python(self) -> None:
        """
        Members in another case, a Guid as a string, an enum by name, a
        legacy $type spelling: the core declines and Python reads them.
        """
        ticket = {"TaskId": "T-1"}
        request_type = serializer.dotnet_type_of(RequestMessage).name
        status = "Octopus.Shared.Contracts.ScriptStatusRequest, Octopus.Shared"
        cases = [
            {"$type": status, "ticket": ticket, "LastLogSequence": 1},
            {"$type": status + ", Version=1.0.0.0", "Ticket": ticket, "LastLogSequence": 1},
            {"$type": status, "Ticket": {"taskid": "T-1"}, "LastLogSequence": 1},
        ]
        for param in cases:
            tree = {"Message": {"$type": request_type, "id": "r", "activityId": ACTIVITY,
                                "endpoint": None, "service": "s", "method": "m", "params": [param]}}
            self.assertIsNone(self.core.decode_envelope(tree, REGISTRY._exact, None, True))
            message, _ = serializer.decode_envelope(tree, REGISTRY)
            self.assertIsInstance(message, RequestMessage)
        guid_as_text = {"Message": {"$type": request_type, "id": "r", "activityId": str(ACTIVITY),
                                    "service": "s", "method": "m", "params": []}}
        self.assertIsNone(self.core.decode_envelope(guid_as_text, REGISTRY._exact, None, True))
        message, _ = serializer.decode_envelope(guid_as_text, REGISTRY)
        self.assertEqual(message, RequestMessage("r", ACTIVITY, "s", "m"))
        error = {"$type": serializer.dotnet_type_of(ServerError).name, "message": "m"}
        no_details = {"Message": {"id": "r", "error": error, "result": None}}
        self.assertIsNone(self.core.decode_envelope(no_details, REGISTRY._exact, ResponseMessage, True))
        self.assertEqual(serializer.decode_envelope(no_details, REGISTRY, ResponseMessage)[0],
                         ResponseMessage("r", ServerError("m")))
        by_name = {"$type": serializer.dotnet_type_of(ScriptStatusResponseV2).name,
                   "Ticket": ticket, "Logs": [], "NextLogSequence": 1, "State": "Running", "ExitCode": 0}
        tree = {"Message": {"id": "r", "error": None, "result": by_name}}
        self.assertIsNone(self.core.decode_envelope(tree, REGISTRY._exact, ResponseMessage, True))
        message, _ = serializer.decode_envelope(tree, REGISTRY, ResponseMessage)
        assert isinstance(message, ResponseMessage)
        self.assertEqual(message.result.state, ProcessState.Running)

    @DIFFERENTIAL
    @given(st.binary(max_size=400))
    def test_fuzz_target(self, data: bytes) -> None:
        """
        The BSON fuzz target on the compiled core: only CodecError escapes.
        """
        bson_message(data)


class ConstructionTests(OnCompiledCore):
    """
    Objects built slot by slot are what their class would build.
    """

    def test_contracts_are_built_by_slots(self) -> None:
        for cls in CONTRACT_TYPES + (RequestMessage, ResponseMessage, DataStream):
            plan = serializer._plan_for(cls)
            assert plan is not None
            self.assertEqual(plan[3][0], serializer._SLOTS, cls.__name__)

    def test_validators_run(self) -> None:
        line = {"Source": 0, "Occurred": "not a datetime", "Text": "x"}
        self.assertFalse(attrs.validators.get_disabled())
        result = {"$type": serializer.dotnet_type_of(ScriptStatusResponseV2).name,
                  "Ticket": {"TaskId": "t"}, "Logs": [line], "NextLogSequence": Int64(1),
                  "State": 1, "ExitCode": 0}
        tree = {"Message": {"$type": serializer.dotnet_type_of(ResponseMessage).name, "id": "r",
                            "error": None, "result": result}}
        self.assertRaises(CodecError, serializer.decode_envelope, tree, REGISTRY)
        line["Occurred"] = datetime(2024, 1, 1, tzinfo=UTC)
        message, _ = serializer.decode_envelope(tree, REGISTRY)
        assert isinstance(message, ResponseMessage)
        self.assertEqual(message.result.logs, (ProcessOutput(ProcessOutputSource.StdOut,
                                                             line["Occurred"], "x"),))
        self.assertEqual(message.result.state, ProcessState.Running)
        self.assertIsInstance(message.result.logs, tuple)

    def test_validator_rejection_comes_from_python(self) -> None:
        @dotnet_type("Test.Positive, Test")
        @attrs.frozen
        class Positive:
            n: int = attrs.field(metadata=wire("n", INT32))

            @n.validator
            def _check(self, attribute: Any, value: int) -> None:
                if value <= 0:
                    raise ValueError("must be positive")

        registry = TypeRegistry([Positive])
        plan = serializer._plan_for(Positive)
        assert plan is not None
        self.assertEqual(plan[3][0], serializer._SLOTS)

        def tree(n: int) -> dict[str, Any]:
            return {"Message": {"$type": serializer.dotnet_type_of(ResponseMessage).name, "id": "r",
                                "error": None, "result": {"$type": "Test.Positive, Test", "n": n}}}

        self.assertEqual(serializer.decode_envelope(tree(3), registry)[0],
                         ResponseMessage("r", result=Positive(3)))
        error = self.assertRaises(CodecError, serializer.decode_envelope, tree(-1), registry)
        self.assertIn("must be positive", str(error))
        attrs.validators.set_disabled(True)
        try:
            message, _ = serializer.decode_envelope(tree(-1), registry)
        finally:
            attrs.validators.set_disabled(False)
        assert isinstance(message, ResponseMessage)
        self.assertEqual(message.result.n, -1)

    def test_other_classes_are_called(self) -> None:
        calls: list[str] = []

        @dotnet_type("Test.Hooked, Test")
        @attrs.frozen
        class Hooked:
            s: str = attrs.field(metadata=wire("s", STRING))

            def __attrs_post_init__(self) -> None:
                calls.append(self.s)

        @dotnet_type("Test.Unfrozen, Test")
        @attrs.define
        class Unfrozen:
            # A converter gives it an attrs __setattr__, which __init__ avoids.
            s: str = attrs.field(converter=str, metadata=wire("s", STRING))

        @dotnet_type("Test.Plain, Test")
        class Plain:
            pass

        for cls in (Hooked, Unfrozen):
            plan = serializer._plan_for(cls)
            assert plan is not None
            self.assertEqual(plan[3][0], serializer._CALL, cls.__name__)
        self.assertIsNone(serializer._plan_for(Plain))
        registry = TypeRegistry([Hooked, Unfrozen])
        for name, cls in (("Test.Hooked, Test", Hooked), ("Test.Unfrozen, Test", Unfrozen)):
            tree = {"Message": {"$type": serializer.dotnet_type_of(ResponseMessage).name, "id": "r",
                                "error": None, "result": {"$type": name, "s": "v"}}}
            got = compiled_core().decode_envelope(tree, registry._exact, None, True)
            self.assertEqual(got, (ResponseMessage("r", result=cls("v")), []))
        self.assertEqual(calls, ["v", "v"])
        self.assertRaises(TypeError, serializer.encode_message, ResponseMessage("r", result=Plain()))

    def test_int_enum_in_object_slot(self) -> None:
        class Colour(IntEnum):
            red = 1

        message = RequestMessage("r", uuid.UUID(int=5), "s", "m", (Colour.red, 2**40, Int64(3)))
        self.assertEqual(serializer.encode_message(message), serializer.encode_message_python(message))
        self.assertIsNotNone(compiled_core().encode_message(message, 64))


class LeakTests(OnCompiledCore):
    """
    Neither the fast path nor a declined call keeps memory or references.
    """

    def test_no_growth(self) -> None:
        core = compiled_core()
        status = ResponseMessage("r", result=ScriptStatusResponseV2(
            ticket=ScriptTicket("t"),
            logs=[ProcessOutput(ProcessOutputSource.StdOut, datetime(2024, 1, 1, tzinfo=UTC), f"line {i}")
                  for i in range(20)],
            next_log_sequence=20, state=ProcessState.Running, exit_code=0))
        data, _ = core.encode_message(status, 64)
        broken = data[:-3] + b"\x07\x00\x00"
        odd = {"k\u00e9y" * 20: [uuid.UUID(int=7), Int64(3), b"\x00", 1.5, None, True, "x" * 50]}
        # Objects only the codec touches (classes would count their live
        # instances, which other tests' caches may hold on to).
        shared = [UTC, REGISTRY._exact, serializer._plans[ProcessOutput], status, odd,
                  bson.decode_document(data)["Message"]["result"]["Logs"][0], "Text"]
        text_key = next(iter(bson.decode_document(data)["Message"]["result"]["Logs"][0]))

        def work() -> None:
            for _ in range(200):
                encoded, _ = serializer.encode_message(status)
                tree = bson.decode_document(encoded)
                serializer.decode_envelope(tree, REGISTRY)
                bson.decode_document(bson.encode_document(odd))
                self.assertIsNone(core.decode_document(broken, 2**20, 64, 2**20))
                self.assertIsNone(core.encode_message(ResponseMessage("r", result=object()), 64))
                self.assertIsNone(core.decode_envelope({"Message": {"$type": "nope"}}, {}, None, True))

        work()
        references = [sys.getrefcount(o) for o in shared + [text_key]]
        # Only what the codec's frames allocate (the compiled core's own
        # allocations are charged to the Python frame that called it): a
        # thread left by another test must not count.
        ours = [tracemalloc.Filter(True, "*/tentacle/halibut/*"), tracemalloc.Filter(True, __file__)]

        def traced() -> int:
            return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(ours).statistics("filename"))

        tracemalloc.start()
        try:
            work()
            # A full collection also empties the interpreter's free lists.
            gc.collect()
            before = traced()
            for _ in range(20):
                work()
            gc.collect()
            grown = traced() - before
        finally:
            tracemalloc.stop()
        # 4,000 rounds of seven calls: a leak of one small object per call
        # would be 128 KiB or more; the interpreter's own pools move by a
        # few tens of KiB.
        self.assertLess(grown, 64 * 1024)
        after = [sys.getrefcount(o) for o in shared + [text_key]]
        # Every datetime anywhere holds UTC (a log event made meanwhile by
        # another test's leftover thread, say): a reference leaked per call
        # would add thousands, such passers-by a few dozen.
        self.assertLess(abs(after[0] - references[0]), 1000)
        self.assertEqual(after[1:], references[1:])


class SelectionTests(SynchronousTestCase):
    """
    Which core runs, and a stale or broken build.
    """

    def test_use(self) -> None:
        core = compiled_core()
        previous = accel.use(None)
        try:
            self.assertEqual(accel.implementation(), "python")
            accel.use(core)
            self.assertEqual(accel.implementation(), "compiled")
            self.assertEqual(accel.reason, "compiled core")
        finally:
            accel.use(previous)

    def test_stale_build_is_ignored(self) -> None:
        core = compiled_core()
        self.assertIsNone(accel.mismatch(core))
        with tempfile.TemporaryDirectory() as folder:
            changed = Path(folder, "_codec.c")
            changed.write_bytes(Path(CHECKOUT, "tentacle", "halibut", "_codec.c").read_bytes() + b"\n")
            self.assertIn("older _codec.c", accel.mismatch(core, changed) or "")
            missing = Path(folder, "absent.c")
            self.assertIsNone(accel.mismatch(core, missing))

    def test_environment_turns_it_off(self) -> None:
        code = "from tentacle.halibut import accel; print(accel.implementation(), accel.reason)"
        result = subprocess.run(
            [sys.executable, "-c", code],
            cwd=CHECKOUT,
            env={**os.environ, "TENTACLE_CODEC": "python"},
            capture_output=True,
            text=True,
            check=True,
        )
        self.assertEqual(result.stdout.strip(), "python pure Python: TENTACLE_CODEC=python")


class BuildTests(SynchronousTestCase):
    """
    C{setup.py} builds the core where it can, and falls back cleanly where
    it cannot.
    """

    def test_compiler_failure_builds_nothing_and_succeeds(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            result = build(Path(folder), CC="false", LDSHARED="false")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn("_codec", result.stderr)
            self.assertIsNone(built_module(Path(folder)))

    def test_turned_off_at_build_time(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            result = build(Path(folder), TENTACLE_CODEC="python")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIsNone(built_module(Path(folder)))

    def test_built_core_matches_its_source(self) -> None:
        core: ModuleType = compiled_core()
        self.assertEqual(len(core.SOURCE_SHA256), 64)
        self.assertIsNone(accel.mismatch(core))
