"""
Tests for L{tentacle.halibut.serializer}: where C{"$type"} goes, what a
peer may and may not send, and the envelope.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import (
    CompleteScriptCommandV2,
    ProcessState,
    ScriptFile,
    ScriptIsolationLevel,
    ScriptStatusRequest,
    ScriptStatusResponse,
    ScriptTicket,
    ScriptType,
    StartScriptCommand,
    UploadResult,
    tentacle_registry,
)
from tentacle.halibut import bson
from tentacle.halibut.errors import CodecError, CodecLimits
from tentacle.halibut.serializer import (
    OBJECT,
    STRING,
    DataStream,
    ListOf,
    RequestMessage,
    ResponseMessage,
    ServerError,
    TypeRegistry,
    UnknownTypeError,
    decode_envelope,
    decode_message,
    dotnet_type,
    encode_envelope,
    encode_message,
    from_tree,
    to_tree,
    wire,
)
from tests.codec_cores import on_both_cores

REGISTRY = tentacle_registry()
EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REQUEST_TYPE = "Halibut.Transport.Protocol.RequestMessage, Halibut"
RESPONSE_TYPE = "Halibut.Transport.Protocol.ResponseMessage, Halibut"
TICKET_TYPE = "Octopus.Shared.Contracts.ScriptTicket, Octopus.Shared"
STATUS_REQUEST_TYPE = "Octopus.Shared.Contracts.ScriptStatusRequest, Octopus.Shared"
ACTIVITY = uuid.UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301")


def request_tree(*params: Any, **extra: Any) -> dict[str, Any]:
    return {
        "Message": {
            "$type": REQUEST_TYPE,
            "id": "r1",
            "activityId": ACTIVITY,
            "endpoint": None,
            "service": "IScriptService",
            "method": "GetStatus",
            "params": list(params),
            **extra,
        }
    }


def response_tree(result: Any, **extra: Any) -> dict[str, Any]:
    return {"Message": {"$type": RESPONSE_TYPE, "id": "r1", "error": None, "result": result, **extra}}


def status_request_tree(**overrides: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "$type": STATUS_REQUEST_TYPE,
        "Ticket": {"TaskId": "T-1"},
        "LastLogSequence": bson.Int64(7),
    }
    tree.update(overrides)
    return tree


def decode(tree: dict[str, Any], **kwargs: Any) -> Any:
    """
    Through real BSON, as a peer's bytes would arrive.
    """
    return decode_message(bson.encode_document(tree), REGISTRY, **kwargs)


def single_param(tree: dict[str, Any]) -> Any:
    message, _ = decode(tree)
    assert isinstance(message, RequestMessage)
    (param,) = message.params
    return param


class TypeNameWritingTests(SynchronousTestCase):
    """
    C{"$type"} exactly where Json.NET's C{TypeNameHandling.Auto} writes it.
    """

    def test_object_slots_typed(self) -> None:
        """
        Message, complex params and the result carry C{$type}; properties
        declared as their concrete class do not.
        """
        request = RequestMessage(
            "r1", ACTIVITY, "IScriptService", "GetStatus", (ScriptStatusRequest(ScriptTicket("T"), 1),)
        )
        tree, _ = encode_envelope(request)
        self.assertEqual(
            tree,
            {
                "Message": {
                    "$type": REQUEST_TYPE,
                    "id": "r1",
                    "activityId": ACTIVITY,
                    "endpoint": None,
                    "service": "IScriptService",
                    "method": "GetStatus",
                    "params": [
                        {"$type": STATUS_REQUEST_TYPE, "Ticket": {"TaskId": "T"}, "LastLogSequence": 1}
                    ],
                }
            },
        )
        self.assertIsInstance(tree["Message"]["params"][0]["LastLogSequence"], bson.Int64)

    def test_primitives_untyped(self) -> None:
        """
        Strings, numbers, Guids and None in object slots are written bare.
        """
        tree, _ = to_tree(["a", 1, bson.Int64(2), True, ACTIVITY, None], ListOf(OBJECT))
        self.assertEqual(tree, ["a", 1, 2, True, ACTIVITY, None])
        self.assertIsInstance(tree[2], bson.Int64)

    def test_data_stream_typed_only_in_object_slots(self) -> None:
        stream = DataStream(ACTIVITY, 3)
        as_result, _ = to_tree(stream)
        self.assertEqual(as_result, {"$type": "Halibut.DataStream, Halibut", "id": ACTIVITY, "length": 3})
        as_file, streams = to_tree(ScriptFile("f", stream))
        self.assertEqual(as_file["Contents"], {"id": ACTIVITY, "length": 3})
        self.assertEqual(streams, [stream])

    def test_enum_keyed_dictionary(self) -> None:
        """
        C{Dictionary<ScriptType, string>} is keyed by member name, in
        insertion order.
        """
        command = StartScriptCommand(
            script_body="",
            isolation=ScriptIsolationLevel.NoIsolation,
            scripts={ScriptType.Bash: "b", ScriptType.PowerShell: "p"},
        )
        tree, _ = to_tree(command)
        self.assertEqual(list(tree["Scripts"].items()), [("Bash", "b"), ("PowerShell", "p")])

    def test_null_envelope(self) -> None:
        data, streams = encode_message(None)
        self.assertEqual(bson.decode_document(data), {"Message": None})
        self.assertEqual(decode_message(data, REGISTRY), (None, []))
        self.assertEqual(streams, [])

    def test_encode_errors_are_ours(self) -> None:
        """
        Values that do not fit their .NET type are programming errors, not
        L{CodecError}s.
        """
        too_big = ScriptStatusResponse(
            ticket=ScriptTicket("t"), logs=(), next_log_sequence=0, state=ProcessState.Running,
            exit_code=2**31,
        )
        self.assertRaises(ValueError, encode_message, ResponseMessage("r", result=too_big))
        wrong = UploadResult("p", "h", "3")  # type: ignore[arg-type]
        self.assertRaises(TypeError, encode_message, ResponseMessage("r", result=wrong))
        self.assertRaises(TypeError, encode_message, ResponseMessage("r", result=[1, 2]))
        self.assertRaises(TypeError, encode_message, ResponseMessage("r", result=object()))
        self.assertRaises(TypeError, encode_message, "not a message")


@dotnet_type("Octopus.Shared.Contracts.ScriptTicket, Octopus.Shared")
@attrs.frozen
class Impostor:
    task_id: str = attrs.field(metadata=wire("TaskId", STRING))


class TypeAllowListTests(SynchronousTestCase):
    """
    Only registered types are ever built from a peer's C{"$type"}.
    """

    def test_unknown_param_type(self) -> None:
        tree = request_tree({"$type": "System.Diagnostics.Process, System", "StartInfo": {}})
        self.assertRaises(UnknownTypeError, decode, tree)

    def test_unknown_type_is_codec_error(self) -> None:
        self.assertTrue(issubclass(UnknownTypeError, CodecError))

    def test_unknown_result_type(self) -> None:
        tree = response_tree({"$type": "Octopus.Tentacle.Contracts.Evil, Octopus.Tentacle.Contracts"})
        self.assertRaises(UnknownTypeError, decode, tree)

    def test_unknown_message_type(self) -> None:
        tree = request_tree()
        tree["Message"]["$type"] = "System.Object, mscorlib"
        self.assertRaises(UnknownTypeError, decode, tree)

    def test_contract_as_message_rejected(self) -> None:
        self.assertRaises(UnknownTypeError, decode, {"Message": {"$type": TICKET_TYPE, "TaskId": "x"}})

    def test_message_inside_params_rejected(self) -> None:
        inner = request_tree()["Message"]
        self.assertRaises(UnknownTypeError, decode, request_tree(inner))

    def test_wrong_type_for_declared_property(self) -> None:
        """
        A C{$type} on a concretely declared property must name that class.
        """
        tree = request_tree(status_request_tree(Ticket={"$type": STATUS_REQUEST_TYPE, "TaskId": "x"}))
        self.assertRaises(UnknownTypeError, decode, tree)
        same = request_tree(status_request_tree(Ticket={"$type": TICKET_TYPE, "TaskId": "x"}))
        self.assertEqual(single_param(same).ticket, ScriptTicket("x"))

    def test_untyped_object_rejected(self) -> None:
        """
        Json.NET would hand the service a C{JObject}; we refuse instead.
        """
        self.assertRaises(UnknownTypeError, decode, request_tree({"TaskId": "x"}))
        self.assertRaises(UnknownTypeError, decode, request_tree(["x"]))

    def test_non_string_type_rejected(self) -> None:
        self.assertRaises(UnknownTypeError, decode, request_tree({"$type": 5}))

    def test_type_on_dictionary_rejected(self) -> None:
        command, _ = to_tree(
            StartScriptCommand(script_body="", isolation=ScriptIsolationLevel.NoIsolation)
        )
        command["Scripts"] = {"$type": "System.Object, mscorlib"}
        self.assertRaises(UnknownTypeError, decode, request_tree(command))

    def test_registry_only_allows_what_was_registered(self) -> None:
        bare = TypeRegistry()
        tree = bson.encode_document(request_tree(status_request_tree()))
        self.assertRaises(UnknownTypeError, decode_message, tree, bare)
        bare.register(ScriptStatusRequest)
        message, _ = decode_message(tree, bare)
        assert isinstance(message, RequestMessage)
        self.assertEqual(message.params, (ScriptStatusRequest(ScriptTicket("T-1"), 7),))

    def test_registry_refuses_name_clash(self) -> None:
        registry = TypeRegistry()
        registry.register(ScriptTicket)
        registry.register(ScriptTicket)  # idempotent
        self.assertIn(ScriptTicket, registry)
        self.assertRaises(ValueError, registry.register, Impostor)
        self.assertRaises(TypeError, registry.register, int)


class LenientReadingTests(SynchronousTestCase):
    """
    What Json.NET tolerates in well-formed input, we tolerate too.
    """

    def test_unknown_fields_ignored(self) -> None:
        tree = request_tree(
            status_request_tree(Extra={"$type": "Whatever, Anywhere"}, Ticket={"TaskId": "T-1", "X": 1}),
            endpoint={"BaseUri": "https://x/", "Proxy": {"$type": "Not.Registered, Nowhere"}},
            somethingNew=[1, 2, 3],
        )
        message, _ = decode(tree)
        assert isinstance(message, RequestMessage)
        self.assertEqual(message.params, (ScriptStatusRequest(ScriptTicket("T-1"), 7),))
        # The endpoint is carried verbatim and never interpreted.
        self.assertEqual(message.endpoint["Proxy"], {"$type": "Not.Registered, Nowhere"})

    def test_missing_message_type_with_expected_kind(self) -> None:
        """
        Halibut reads C{MessageEnvelope<T>}, so C{$type} on the message is
        optional when the reader knows what it expects.
        """
        tree = response_tree(None)
        del tree["Message"]["$type"]
        self.assertRaises(UnknownTypeError, decode, tree)
        message, _ = decode(tree, expected=ResponseMessage)
        self.assertEqual(message, ResponseMessage("r1"))
        self.assertRaises(UnknownTypeError, decode, response_tree(None), expected=RequestMessage)

    def test_missing_message(self) -> None:
        self.assertEqual(decode_envelope({}, REGISTRY), (None, []))

    def test_missing_optional_members_take_defaults(self) -> None:
        """
        An older server that does not send later members gets .NET's
        initial values.
        """
        command = {
            "$type": "Octopus.Shared.Contracts.StartScriptCommand, Octopus.Shared",
            "ScriptBody": "echo",
            "Isolation": 1,
        }
        param = single_param(request_tree(command))
        self.assertEqual(param.scripts, {})
        self.assertEqual(param.files, ())
        self.assertEqual(param.task_id, None)
        self.assertEqual(param.script_isolation_mutex_timeout.ticks, 0)

    def test_missing_required_member(self) -> None:
        tree = request_tree(status_request_tree())
        del tree["Message"]["params"][0]["LastLogSequence"]
        self.assertRaises(CodecError, decode, tree)

    def test_property_names_fall_back_to_ignoring_case(self) -> None:
        param = single_param(
            request_tree({"$type": STATUS_REQUEST_TYPE, "ticket": {"taskid": "a"}, "lastlogsequence": 3})
        )
        self.assertEqual(param, ScriptStatusRequest(ScriptTicket("a"), 3))

    def test_enum_by_name_or_number(self) -> None:
        command = {"$type": "Octopus.Shared.Contracts.StartScriptCommand, Octopus.Shared",
                   "ScriptBody": "", "Isolation": "fullisolation", "Scripts": {"bash": "x", "0": "y"}}
        param = single_param(request_tree(command))
        self.assertEqual(int(param.isolation), 1)
        self.assertEqual(param.scripts, {ScriptType.Bash: "x", ScriptType.PowerShell: "y"})

    def test_int64_member_accepts_int32(self) -> None:
        self.assertEqual(single_param(request_tree(status_request_tree(LastLogSequence=7))).last_log_sequence, 7)

    def test_guid_from_string(self) -> None:
        tree = request_tree()
        tree["Message"]["activityId"] = str(ACTIVITY)
        message, _ = decode(tree)
        self.assertEqual(message.activity_id, ACTIVITY)

    def test_null_params(self) -> None:
        """
        Halibut's C{ServiceInvoker} treats null params as none.
        """
        tree = request_tree()
        tree["Message"]["params"] = None
        message, _ = decode(tree)
        self.assertEqual(message.params, ())

    def test_primitive_params_kept_exactly(self) -> None:
        """
        Bare values in object slots come back as the BSON decoder gives
        them, so a C{long} stays an L{bson.Int64} and re-encodes as one.
        """
        when = datetime(2020, 1, 1, tzinfo=timezone.utc)
        tree = request_tree("s", bson.Int64(1), 2, 1.5, False, ACTIVITY, when, b"\x01", None)
        message, _ = decode(tree)
        self.assertEqual(message.params, ("s", 1, 2, 1.5, False, ACTIVITY, when, b"\x01", None))
        self.assertIsInstance(message.params[1], bson.Int64)
        self.assertEqual(encode_message(message)[0], bson.encode_document(tree))


class StrictReadingTests(SynchronousTestCase):
    """
    Values that cannot be the declared .NET type are L{CodecError}s.
    """

    def assertRejected(self, **overrides: Any) -> None:
        self.assertRaises(CodecError, decode, request_tree(status_request_tree(**overrides)))

    def test_null_where_not_nullable(self) -> None:
        self.assertRejected(Ticket=None)
        self.assertRejected(LastLogSequence=None)
        self.assertRejected(Ticket={"TaskId": None})

    def test_wrong_kinds(self) -> None:
        self.assertRejected(LastLogSequence="7")
        self.assertRejected(LastLogSequence=True)
        self.assertRejected(Ticket=["x"])
        self.assertRejected(Ticket={"TaskId": 5})

    def test_out_of_range(self) -> None:
        response = {
            "$type": "Octopus.Shared.Contracts.ScriptStatusResponse, Octopus.Shared",
            "Ticket": {"TaskId": "t"}, "Logs": [], "NextLogSequence": bson.Int64(0),
            "State": 0, "ExitCode": bson.Int64(2**31),
        }
        self.assertRaises(CodecError, decode, response_tree(response))
        response["ExitCode"] = 0
        response["State"] = 3
        self.assertRaises(CodecError, decode, response_tree(response))
        response["State"] = "Finished"
        self.assertRaises(CodecError, decode, response_tree(response))

    def test_bad_timespan(self) -> None:
        command = {"$type": "Octopus.Shared.Contracts.StartScriptCommand, Octopus.Shared",
                   "ScriptBody": "", "Isolation": 0, "ScriptIsolationMutexTimeout": "ten minutes"}
        self.assertRaises(CodecError, decode, request_tree(command))

    def test_bad_guid(self) -> None:
        tree = request_tree()
        tree["Message"]["activityId"] = "not-a-guid"
        self.assertRaises(CodecError, decode, tree)

    def test_error_without_message(self) -> None:
        tree = response_tree(None, error={"details": "x"})
        self.assertRaises(CodecError, decode, tree)

    def test_message_not_a_document(self) -> None:
        self.assertRaises(CodecError, decode, {"Message": "hello"})

    def test_limits_apply(self) -> None:
        data, _ = encode_message(RequestMessage("r", ACTIVITY, "s", "m", ("x" * 100,)))
        self.assertRaises(CodecError, decode_message, data, REGISTRY, CodecLimits(max_string_bytes=50))


class DataStreamOrderTests(SynchronousTestCase):
    def test_order_across_params(self) -> None:
        """
        Streams are listed in serialization order: params left to right,
        files in order within a command.
        """
        a, b, c = (DataStream(uuid.UUID(int=i), i) for i in (1, 2, 3))
        command = StartScriptCommand(
            script_body="",
            isolation=ScriptIsolationLevel.NoIsolation,
            files=(ScriptFile("a", a), ScriptFile("b", b)),
        )
        message = RequestMessage("r", ACTIVITY, "IProbe", "M", (command, "x", c))
        data, written = encode_message(message)
        decoded, read = decode_message(data, REGISTRY)
        self.assertEqual(written, [a, b, c])
        self.assertEqual(read, [a, b, c])
        self.assertEqual(decoded, message)


# --- properties ---------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8"), max_size=10)
_primitives = st.one_of(
    st.none(), _text, st.booleans(), st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1).map(bson.Int64), st.floats(allow_nan=False), st.uuids(),
    st.binary(max_size=8),
)
_objects = st.one_of(
    _primitives,
    st.builds(ScriptTicket, _text),
    st.builds(DataStream, st.uuids(), st.integers(0, 2**63 - 1)),
    st.builds(ScriptStatusRequest, st.builds(ScriptTicket, _text), st.integers(-(2**63), 2**63 - 1)),
    st.builds(CompleteScriptCommandV2, st.builds(ScriptTicket, _text)),
)
_messages = st.one_of(
    st.builds(RequestMessage, _text, st.uuids(), _text, _text, st.lists(_objects, max_size=4)),
    st.builds(
        ResponseMessage,
        _text,
        st.none() | st.builds(ServerError, _text, st.none() | _text, st.none() | _text),
        _objects,
    ),
    st.none(),
)

# Arbitrary trees of what the BSON decoder can produce.
_trees = st.recursive(
    _primitives | st.sampled_from([REQUEST_TYPE, RESPONSE_TYPE, TICKET_TYPE, "$type", "Ticket"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(
        st.sampled_from(["$type", "id", "params", "result", "error", "Ticket", "TaskId", "message", "x"]),
        children,
        max_size=4,
    ),
    max_leaves=12,
)


class PropertyTests(SynchronousTestCase):
    @EXAMPLES
    @given(message=_messages)
    def test_envelope_round_trip(self, message: RequestMessage | ResponseMessage | None) -> None:
        data, written = encode_message(message)
        decoded, read = decode_message(data, REGISTRY)
        self.assertEqual(decoded, message)
        self.assertEqual(read, written)
        self.assertEqual(encode_message(decoded)[0], data)

    @EXAMPLES
    @given(tree=_trees)
    def test_hostile_trees_only_codec_errors(self, tree: Any) -> None:
        """
        Whatever a peer sends, decoding fails only with L{CodecError}.
        """
        for envelope in ({"Message": tree}, {"Message": {"$type": REQUEST_TYPE, "params": [tree]}},
                         {"Message": {"$type": RESPONSE_TYPE, "id": "x", "result": tree}}):
            try:
                decode_envelope(envelope, REGISTRY)
            except CodecError:
                pass
            try:
                from_tree(tree, REGISTRY)
            except CodecError:
                pass

    @EXAMPLES
    @given(data=st.data())
    def test_corrupted_vectors_only_codec_errors(self, data: st.DataObject) -> None:
        """
        Flipping bytes of a real message never escapes as anything but
        L{CodecError}.
        """
        vectors = sorted(FilePath(__file__).sibling("vectors").globChildren("*.bson"))
        raw = bytearray(data.draw(st.sampled_from(vectors)).getContent())
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        try:
            decode_message(bytes(raw), REGISTRY)
        except CodecError:
            pass


on_both_cores(
    globals(),
    "TypeNameWritingTests",
    "TypeAllowListTests",
    "LenientReadingTests",
    "StrictReadingTests",
    "DataStreamOrderTests",
    "PropertyTests",
)
