"""
Tests for L{tentacle.contracts}: names, the service table, and that every
contract type survives a trip through the wire format.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from enum import IntEnum
from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tentacle import contracts
from tentacle.contracts import (
    CAPABILITIES_SERVICE_V2,
    CONTRACT_TYPES,
    FILE_TRANSFER_SERVICE,
    SCRIPT_SERVICE,
    SCRIPT_SERVICE_V2,
    SERVICES,
    CapabilitiesResponseV2,
    DataStream,
    ProcessOutput,
    ProcessOutputSource,
    ScriptStatusRequest,
    ScriptTicket,
    StartScriptCommand,
    StartScriptCommandV2,
    TimeSpan,
    UploadResult,
    tentacle_registry,
)
from tentacle.halibut import serializer
from tentacle.halibut.serializer import (
    BOOLEAN,
    DATETIMEOFFSET,
    GUID,
    INT32,
    INT64,
    OBJECT,
    STRING,
    TIMESPAN,
    Complex,
    EnumKeyedDict,
    EnumOf,
    ListOf,
    Nullable,
    RequestMessage,
    ResponseMessage,
    WireType,
    decode_message,
    dotnet_type_of,
    encode_message,
    fields_of,
)
from tests.codec_cores import on_both_cores

REGISTRY = tentacle_registry()
EXAMPLES = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# --- strategies derived from the wire schemas --------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=12)
offsets = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
# Whole milliseconds, as BSON keeps; a year of margin so any offset stays in range.
instants = st.builds(
    lambda d, tz: d.replace(microsecond=d.microsecond // 1000 * 1000, tzinfo=tz),
    st.datetimes(datetime(2, 1, 1), datetime(9998, 12, 31)),
    offsets,
)


def strategy_for(wire_type: WireType) -> st.SearchStrategy[Any]:
    """
    Arbitrary Python values of a declared wire type.
    """
    simple: dict[WireType, st.SearchStrategy[Any]] = {
        STRING: text,
        BOOLEAN: st.booleans(),
        INT32: st.integers(-(2**31), 2**31 - 1),
        INT64: st.integers(-(2**63), 2**63 - 1),
        GUID: st.uuids(),
        TIMESPAN: st.integers(-(2**63), 2**63 - 1).map(TimeSpan),
        DATETIMEOFFSET: instants,
    }
    if wire_type in simple:
        return simple[wire_type]
    if isinstance(wire_type, EnumOf):
        return st.sampled_from(list(wire_type.cls))
    if isinstance(wire_type, Nullable):
        return st.none() | strategy_for(wire_type.inner)
    if isinstance(wire_type, ListOf):
        return st.lists(strategy_for(wire_type.item), max_size=3).map(tuple)
    if isinstance(wire_type, EnumKeyedDict):
        return st.dictionaries(
            st.sampled_from(list(wire_type.key)), strategy_for(wire_type.value), max_size=2
        )
    if isinstance(wire_type, Complex):
        return instances_of(wire_type.cls)
    if wire_type is OBJECT:
        return st.none() | text | st.sampled_from(CONTRACT_TYPES).flatmap(instances_of)
    raise AssertionError(f"no strategy for {wire_type!r}")


def instances_of(cls: type) -> st.SearchStrategy[Any]:
    """
    Arbitrary instances of a contract class, built by keyword.
    """
    return st.fixed_dictionaries(
        {field.attribute: _deferred(field.type) for field in fields_of(cls)}
    ).map(lambda kwargs: cls(**kwargs))


def _deferred(wire_type: WireType) -> st.SearchStrategy[Any]:
    """
    Resolved lazily, as contract classes refer to each other.
    """
    return st.deferred(lambda: strategy_for(wire_type))


def round_trip(value: Any) -> Any:
    """
    C{value} as a call's result: object -> BSON bytes -> object.
    """
    data, _ = encode_message(ResponseMessage("id", result=value))
    message, _ = decode_message(data, REGISTRY)
    assert isinstance(message, ResponseMessage)
    return message.result


def _round_trip_test(cls: type) -> Callable[[SynchronousTestCase], None]:
    @EXAMPLES
    @given(value=instances_of(cls))
    def test(self: SynchronousTestCase, value: Any) -> None:
        decoded = round_trip(value)
        self.assertEqual(decoded, value)
        self.assertIs(type(decoded), cls)
        # Equal objects must also give equal bytes (ScriptTicket compares
        # case-insensitively, so check the exact text the hard way).
        self.assertEqual(encode_message(ResponseMessage("id", result=decoded))[0],
                         encode_message(ResponseMessage("id", result=value))[0])

    test.__doc__ = f"Arbitrary {cls.__name__} values survive encode and decode."
    return test


class RoundTripTests(SynchronousTestCase):
    """
    Hypothesis round trips, one test per contract type.
    """

    for _cls in CONTRACT_TYPES:
        locals()[f"test_{_cls.__name__}"] = _round_trip_test(_cls)
    del _cls

    @EXAMPLES
    @given(value=instances_of(StartScriptCommand))
    def test_as_parameter(self, value: StartScriptCommand) -> None:
        """
        A command as a request parameter, and its files' streams in order.
        """
        message = RequestMessage("id", uuid.uuid4(), "IScriptService", "StartScript", (value,))
        data, written = encode_message(message)
        decoded, read = decode_message(data, REGISTRY)
        self.assertEqual(decoded, message)
        self.assertEqual(read, [f.contents for f in value.files])
        self.assertEqual(written, read)


# --- names ------------------------------------------------------------------------


class NameTests(SynchronousTestCase):
    """
    The CLR names each class reads and writes.
    """

    def test_legacy_contracts_written_under_legacy_names(self) -> None:
        """
        The twelve types Tentacle remaps keep their current CLR name but are
        written as C{Octopus.Shared.Contracts.X, Octopus.Shared}.
        """
        for cls in (
            contracts.ScriptTicket,
            contracts.ScriptFile,
            contracts.StartScriptCommand,
            contracts.ScriptStatusRequest,
            contracts.CancelScriptCommand,
            contracts.CompleteScriptCommand,
            contracts.ScriptStatusResponse,
            contracts.UploadResult,
            contracts.ScriptIsolationLevel,
            contracts.ScriptType,
        ):
            info = dotnet_type_of(cls)
            self.assertEqual(
                info.name, f"Octopus.Tentacle.Contracts.{cls.__name__}, Octopus.Tentacle.Contracts"
            )
            self.assertEqual(info.wire_name, f"Octopus.Shared.Contracts.{cls.__name__}, Octopus.Shared")

    def test_current_names(self) -> None:
        expected = {
            contracts.ProcessOutput: "Octopus.Tentacle.Contracts.ProcessOutput",
            contracts.ProcessState: "Octopus.Tentacle.Contracts.ProcessState",
            contracts.ProcessOutputSource: "Octopus.Tentacle.Contracts.ProcessOutputSource",
            contracts.StartScriptCommandV2: "Octopus.Tentacle.Contracts.ScriptServiceV2.StartScriptCommandV2",
            contracts.ScriptStatusRequestV2: "Octopus.Tentacle.Contracts.ScriptServiceV2.ScriptStatusRequestV2",
            contracts.CancelScriptCommandV2: "Octopus.Tentacle.Contracts.ScriptServiceV2.CancelScriptCommandV2",
            contracts.CompleteScriptCommandV2: "Octopus.Tentacle.Contracts.ScriptServiceV2.CompleteScriptCommandV2",
            contracts.ScriptStatusResponseV2: "Octopus.Tentacle.Contracts.ScriptServiceV2.ScriptStatusResponseV2",
            contracts.CapabilitiesResponseV2: "Octopus.Tentacle.Contracts.Capabilities.CapabilitiesResponseV2",
        }
        for cls, name in expected.items():
            info = dotnet_type_of(cls)
            self.assertEqual(info.name, name + ", Octopus.Tentacle.Contracts")
            self.assertEqual(info.wire_name, info.name)

    def test_halibut_names(self) -> None:
        self.assertEqual(dotnet_type_of(DataStream).wire_name, "Halibut.DataStream, Halibut")
        self.assertEqual(
            dotnet_type_of(RequestMessage).wire_name, "Halibut.Transport.Protocol.RequestMessage, Halibut"
        )
        self.assertEqual(
            dotnet_type_of(ResponseMessage).wire_name, "Halibut.Transport.Protocol.ResponseMessage, Halibut"
        )

    def test_registry_reads_every_name(self) -> None:
        """
        Current, legacy and fully assembly-qualified names all resolve.
        """
        for cls in CONTRACT_TYPES:
            info = dotnet_type_of(cls)
            for name in info.all_names():
                self.assertIs(REGISTRY.resolve(name), cls)
        self.assertIs(
            REGISTRY.resolve(
                "Octopus.Tentacle.Contracts.ScriptTicket, Octopus.Tentacle.Contracts, "
                "Version=8.0.0.0, Culture=neutral, PublicKeyToken=null"
            ),
            ScriptTicket,
        )

    def test_enum_values(self) -> None:
        self.assertEqual([(m.name, int(m)) for m in contracts.ScriptIsolationLevel],
                         [("NoIsolation", 0), ("FullIsolation", 1)])
        self.assertEqual([(m.name, int(m)) for m in contracts.ScriptType], [("PowerShell", 0), ("Bash", 1)])
        self.assertEqual([(m.name, int(m)) for m in contracts.ProcessState],
                         [("Pending", 0), ("Running", 1), ("Complete", 2)])
        self.assertEqual([(m.name, int(m)) for m in ProcessOutputSource],
                         [("StdOut", 0), ("StdErr", 1), ("Debug", 2)])

    def test_wire_property_names(self) -> None:
        """
        JSON names in .NET declaration order, which is the order on the wire.
        """
        self.assertEqual(
            [f.name for f in fields_of(StartScriptCommand)],
            ["ScriptBody", "Isolation", "Scripts", "Files", "Arguments", "TaskId",
             "ScriptIsolationMutexTimeout", "IsolationMutexName"],
        )
        self.assertEqual(
            [f.name for f in fields_of(StartScriptCommandV2)],
            ["ScriptTicket", "ScriptBody", "TaskId", "DurationToWaitForScriptToFinish", "Isolation",
             "ScriptIsolationMutexTimeout", "IsolationMutexName", "Scripts", "Files", "Arguments"],
        )
        self.assertEqual(
            [f.name for f in fields_of(contracts.ScriptStatusResponse)],
            ["Ticket", "Logs", "NextLogSequence", "State", "ExitCode"],
        )
        self.assertEqual([f.name for f in fields_of(ProcessOutput)], ["Source", "Occurred", "Text"])
        self.assertEqual([f.name for f in fields_of(UploadResult)], ["FullPath", "Hash", "Length"])
        self.assertEqual([f.name for f in fields_of(DataStream)], ["id", "length"])
        self.assertEqual(
            [f.name for f in fields_of(RequestMessage)],
            ["id", "activityId", "endpoint", "service", "method", "params"],
        )
        self.assertEqual([f.name for f in fields_of(ResponseMessage)], ["id", "error", "result"])
        self.assertEqual(
            [f.name for f in fields_of(serializer.ServerError)], ["message", "details", "HalibutErrorType"]
        )


# --- values ---------------------------------------------------------------------


class ValueTests(SynchronousTestCase):
    def test_ticket_compares_ignoring_case(self) -> None:
        """
        As .NET's C{ScriptTicket.Equals} (OrdinalIgnoreCase), including hashing.
        """
        self.assertEqual(ScriptTicket("AbC"), ScriptTicket("aBc"))
        self.assertEqual(hash(ScriptTicket("AbC")), hash(ScriptTicket("aBc")))
        self.assertNotEqual(ScriptTicket("abc"), ScriptTicket("abd"))
        # Full case mapping would make these equal; .NET does not.
        self.assertNotEqual(ScriptTicket("stra\u00dfe"), ScriptTicket("STRASSE"))
        self.assertEqual(str(ScriptTicket("x")), "x")

    def test_timedelta_accepted(self) -> None:
        command = StartScriptCommand(
            script_body="", isolation=contracts.ScriptIsolationLevel.NoIsolation,
            script_isolation_mutex_timeout=timedelta(minutes=-1),
        )
        self.assertEqual(command.script_isolation_mutex_timeout, TimeSpan(-600_000_000))
        self.assertEqual(command.script_isolation_mutex_timeout.format(), "-00:01:00")

    def test_collections_become_tuples(self) -> None:
        command = StartScriptCommand(script_body="", isolation=contracts.ScriptIsolationLevel.NoIsolation,
                                     arguments=["a"])
        self.assertEqual(command.arguments, ("a",))
        self.assertEqual(CapabilitiesResponseV2(["IScriptService"]).supported_capabilities, ("IScriptService",))

    def test_naive_occurred_rejected(self) -> None:
        """
        A DateTimeOffset always has an offset; a naive datetime is a bug.
        """
        self.assertRaises(ValueError, ProcessOutput, ProcessOutputSource.StdOut, datetime(2024, 1, 1), "x")

    def test_enums_are_dotnet_integers(self) -> None:
        for enum in (contracts.ScriptIsolationLevel, contracts.ScriptType, contracts.ProcessState,
                     ProcessOutputSource):
            self.assertTrue(issubclass(enum, IntEnum))


# --- the service table -----------------------------------------------------------


class ServiceTableTests(SynchronousTestCase):
    def test_services(self) -> None:
        self.assertEqual(
            sorted(SERVICES),
            ["ICapabilitiesServiceV2", "IFileTransferService", "IScriptService", "IScriptServiceV2"],
        )
        self.assertEqual(
            SCRIPT_SERVICE_V2.dotnet_type,
            "Octopus.Tentacle.Contracts.ScriptServiceV2.IScriptServiceV2, Octopus.Tentacle.Contracts",
        )

    def test_operations(self) -> None:
        """
        Sync method names with their parameter and result types.
        """
        table = {
            (service.name, op.name): ([(p.name, p.type) for p in op.parameters], op.returns)
            for service in SERVICES.values()
            for op in service.operations
        }
        self.assertEqual(
            table,
            {
                ("IScriptService", "StartScript"): ([("command", StartScriptCommand)], ScriptTicket),
                ("IScriptService", "GetStatus"): (
                    [("request", ScriptStatusRequest)], contracts.ScriptStatusResponse),
                ("IScriptService", "CancelScript"): (
                    [("command", contracts.CancelScriptCommand)], contracts.ScriptStatusResponse),
                ("IScriptService", "CompleteScript"): (
                    [("command", contracts.CompleteScriptCommand)], contracts.ScriptStatusResponse),
                ("IScriptServiceV2", "StartScript"): (
                    [("command", StartScriptCommandV2)], contracts.ScriptStatusResponseV2),
                ("IScriptServiceV2", "GetStatus"): (
                    [("request", contracts.ScriptStatusRequestV2)], contracts.ScriptStatusResponseV2),
                ("IScriptServiceV2", "CancelScript"): (
                    [("command", contracts.CancelScriptCommandV2)], contracts.ScriptStatusResponseV2),
                ("IScriptServiceV2", "CompleteScript"): (
                    [("command", contracts.CompleteScriptCommandV2)], None),
                ("IFileTransferService", "UploadFile"): (
                    [("remotePath", str), ("upload", DataStream)], UploadResult),
                ("IFileTransferService", "DownloadFile"): ([("remotePath", str)], DataStream),
                ("ICapabilitiesServiceV2", "GetCapabilities"): ([], CapabilitiesResponseV2),
            },
        )
        self.assertEqual(CAPABILITIES_SERVICE_V2.operations[0].cache_response_seconds, 600)

    def test_operation_lookup_ignores_case(self) -> None:
        """
        Halibut's C{ServiceInvoker} matches method names OrdinalIgnoreCase.
        """
        operation = SCRIPT_SERVICE.operation("getstatus")
        assert operation is not None
        self.assertEqual(operation.name, "GetStatus")
        self.assertIsNone(SCRIPT_SERVICE.operation("GetStatusAsync"))

    def test_accepts(self) -> None:
        upload = FILE_TRANSFER_SERVICE.operation("UploadFile")
        assert upload is not None
        stream = DataStream.fresh(3)
        self.assertTrue(upload.accepts(["/tmp/x", stream]))
        self.assertTrue(upload.accepts([None, None]))
        self.assertFalse(upload.accepts(["/tmp/x"]))
        self.assertFalse(upload.accepts([stream, "/tmp/x"]))
        get_status = SCRIPT_SERVICE.operation("GetStatus")
        assert get_status is not None
        self.assertFalse(get_status.accepts([contracts.ScriptStatusRequestV2(ScriptTicket("t"), 0)]))

    def test_every_operation_type_registered(self) -> None:
        """
        Every class a call can carry is in the allow-list.
        """
        for service in SERVICES.values():
            for op in service.operations:
                for cls in [p.type for p in op.parameters] + [op.returns]:
                    if cls not in (None, str):
                        self.assertIn(cls, REGISTRY)


on_both_cores(globals(), "RoundTripTests", "ValueTests")
