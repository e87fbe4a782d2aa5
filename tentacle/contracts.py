"""
The Tentacle service contracts as Octopus Server calls them over Halibut.

Mirrors C{source/Octopus.Tentacle.Contracts} of OctopusDeploy/OctopusTentacle:
the four services a listening Tentacle offers (C{IScriptService},
C{IScriptServiceV2}, C{IFileTransferService}, C{ICapabilitiesServiceV2})
and every type they pass. Each class names its CLR type, and each attribute
its JSON property and declared .NET type, which is all
L{tentacle.halibut.serializer} needs to write them exactly as Json.NET does.
Attributes are in .NET declaration order because that is the wire order.

The oldest contracts were renamed from C{Octopus.Shared.Contracts} in
assembly C{Octopus.Shared}. Tentacle's C{WithLegacyContractSupport()} still
writes those twelve types under the old names and reads both, so old
servers keep working; the classes below do the same via C{write_as}.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import IntEnum
from typing import Any, Final

import attrs

from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.serializer import (
    DATETIMEOFFSET,
    INT32,
    INT64,
    STRING,
    TIMESPAN,
    Complex,
    DataStream,
    EnumKeyedDict,
    EnumOf,
    ListOf,
    Nullable,
    TypeRegistry,
    dotnet_type,
    require_aware,
    wire,
)

__all__ = [
    "CAPABILITIES_SERVICE_V2",
    "CONTRACT_TYPES",
    "FILE_TRANSFER_SERVICE",
    "SCRIPT_SERVICE",
    "SCRIPT_SERVICE_V2",
    "SERVICES",
    "CancelScriptCommand",
    "CancelScriptCommandV2",
    "CapabilitiesResponseV2",
    "CompleteScriptCommand",
    "CompleteScriptCommandV2",
    "DataStream",
    "Operation",
    "Parameter",
    "ProcessOutput",
    "ProcessOutputSource",
    "ProcessState",
    "ScriptExitCodes",
    "ScriptFile",
    "ScriptIsolationLevel",
    "ScriptStatusRequest",
    "ScriptStatusRequestV2",
    "ScriptStatusResponse",
    "ScriptStatusResponseV2",
    "ScriptTicket",
    "ScriptType",
    "ServiceContract",
    "StartScriptCommand",
    "StartScriptCommandV2",
    "TimeSpan",
    "UploadResult",
    "tentacle_registry",
]

_ASSEMBLY = "Octopus.Tentacle.Contracts"
_NS = "Octopus.Tentacle.Contracts"
_V2_NS = "Octopus.Tentacle.Contracts.ScriptServiceV2"
_CAPABILITIES_NS = "Octopus.Tentacle.Contracts.Capabilities"
_LEGACY_NS = "Octopus.Shared.Contracts"
_LEGACY_ASSEMBLY = "Octopus.Shared"


def _current(name: str, namespace: str = _NS) -> str:
    return f"{namespace}.{name}, {_ASSEMBLY}"


def _legacy(name: str) -> str:
    return f"{_LEGACY_NS}.{name}, {_LEGACY_ASSEMBLY}"


# --- enums --------------------------------------------------------------------


@dotnet_type(_current("ScriptIsolationLevel"), write_as=_legacy("ScriptIsolationLevel"))
class ScriptIsolationLevel(IntEnum):
    """
    C{FullIsolation} takes the isolation mutex exclusively, C{NoIsolation}
    shared.
    """

    NoIsolation = 0
    FullIsolation = 1


@dotnet_type(_current("ScriptType"), write_as=_legacy("ScriptType"))
class ScriptType(IntEnum):
    """
    Which interpreter an entry of C{Scripts} is for; on the wire it is the
    dictionary key, written as the member's name.
    """

    PowerShell = 0
    Bash = 1


@dotnet_type(_current("ProcessState"))
class ProcessState(IntEnum):
    Pending = 0
    Running = 1
    Complete = 2


@dotnet_type(_current("ProcessOutputSource"))
class ProcessOutputSource(IntEnum):
    StdOut = 0
    StdErr = 1
    Debug = 2


class ScriptExitCodes:
    """
    Exit codes Tentacle reports for outcomes other than the script's own.
    """

    RUNNING: Final = 0
    FATAL: Final = -41
    POWERSHELL_INVOCATION_ERROR: Final = -42
    CANCELED: Final = -43
    TIMEOUT: Final = -44
    UNKNOWN_SCRIPT: Final = -45
    UNKNOWN_RESULT: Final = -46
    POWERSHELL_NEVER_STARTED: Final = -47
    KUBERNETES_SCRIPT_POD_NOT_FOUND: Final = -81


# --- converters -----------------------------------------------------------------


def _timespan(value: TimeSpan | timedelta) -> TimeSpan:
    """
    Let callers pass a L{timedelta}; the wire value is exact ticks.
    """
    return TimeSpan.from_timedelta(value) if isinstance(value, timedelta) else value


def _optional_timespan(value: TimeSpan | timedelta | None) -> TimeSpan | None:
    return None if value is None else _timespan(value)


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _scripts(values: Mapping[ScriptType, str]) -> dict[ScriptType, str]:
    return dict(values)


def _ordinal_ignore_case(value: str) -> str:
    """
    A comparison key matching .NET C{StringComparison.OrdinalIgnoreCase}:
    per-character upper-casing, never changing the length.
    """
    return "".join(c if len(c.upper()) != 1 else c.upper() for c in value)


# --- shared types ---------------------------------------------------------------


@dotnet_type(_current("ScriptTicket"), write_as=_legacy("ScriptTicket"))
@attrs.frozen
class ScriptTicket:
    """
    Identifies one script run; compared case-insensitively, as in .NET.
    """

    task_id: str = attrs.field(eq=_ordinal_ignore_case, metadata=wire("TaskId", STRING))

    def __str__(self) -> str:
        return self.task_id


@dotnet_type(_current("ScriptFile"), write_as=_legacy("ScriptFile"))
@attrs.frozen
class ScriptFile:
    """
    A file to place in the script's workspace; its bytes follow the message
    as the DataStream C{contents}.

    @ivar encryption_password: When set, the file is stored AES-encrypted
        with it.
    """

    name: str = attrs.field(metadata=wire("Name", STRING))
    contents: DataStream = attrs.field(metadata=wire("Contents", Complex(DataStream)))
    encryption_password: str | None = attrs.field(
        default=None, metadata=wire("EncryptionPassword", Nullable(STRING))
    )


def _files(values: Iterable[ScriptFile]) -> tuple[ScriptFile, ...]:
    return tuple(values)


@dotnet_type(_current("ProcessOutput"))
@attrs.frozen
class ProcessOutput:
    """
    One line of script output. C{occurred} travels as a BSON UTC datetime, so
    it comes back in UTC with millisecond precision.
    """

    source: ProcessOutputSource = attrs.field(
        metadata=wire("Source", EnumOf(ProcessOutputSource))
    )
    occurred: datetime = attrs.field(validator=require_aware, metadata=wire("Occurred", DATETIMEOFFSET))
    text: str = attrs.field(metadata=wire("Text", STRING))


def _logs(values: Iterable[ProcessOutput]) -> tuple[ProcessOutput, ...]:
    return tuple(values)


# --- IScriptService ---------------------------------------------------------------


@dotnet_type(_current("StartScriptCommand"), write_as=_legacy("StartScriptCommand"))
@attrs.frozen(kw_only=True)
class StartScriptCommand:
    """
    Run a script; the V1 service picks the ticket.

    @ivar script_body: The script when C{scripts} has none for this platform.
    @ivar scripts: Per-interpreter bodies, preferred over C{script_body}.
    @ivar script_isolation_mutex_timeout: How long to wait for the isolation
        mutex; zero means for ever.
    @ivar isolation_mutex_name: C{None} means the shared C{"RunningScript"}.
    """

    script_body: str = attrs.field(metadata=wire("ScriptBody", STRING))
    isolation: ScriptIsolationLevel = attrs.field(
        metadata=wire("Isolation", EnumOf(ScriptIsolationLevel))
    )
    scripts: dict[ScriptType, str] = attrs.field(
        factory=dict, converter=_scripts, metadata=wire("Scripts", EnumKeyedDict(ScriptType, STRING))
    )
    files: tuple[ScriptFile, ...] = attrs.field(
        default=(), converter=_files, metadata=wire("Files", ListOf(Complex(ScriptFile)))
    )
    arguments: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=wire("Arguments", ListOf(STRING))
    )
    task_id: str | None = attrs.field(default=None, metadata=wire("TaskId", Nullable(STRING)))
    script_isolation_mutex_timeout: TimeSpan = attrs.field(
        default=TimeSpan(0),
        converter=_timespan,
        metadata=wire("ScriptIsolationMutexTimeout", TIMESPAN),
    )
    isolation_mutex_name: str | None = attrs.field(
        default=None, metadata=wire("IsolationMutexName", Nullable(STRING))
    )


@dotnet_type(_current("ScriptStatusRequest"), write_as=_legacy("ScriptStatusRequest"))
@attrs.frozen
class ScriptStatusRequest:
    """
    Ask for state and the log lines after C{last_log_sequence}.
    """

    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    last_log_sequence: int = attrs.field(metadata=wire("LastLogSequence", INT64))


@dotnet_type(_current("CancelScriptCommand"), write_as=_legacy("CancelScriptCommand"))
@attrs.frozen
class CancelScriptCommand:
    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    last_log_sequence: int = attrs.field(metadata=wire("LastLogSequence", INT64))


@dotnet_type(_current("CompleteScriptCommand"), write_as=_legacy("CompleteScriptCommand"))
@attrs.frozen
class CompleteScriptCommand:
    """
    Collect the last log lines and discard the workspace.
    """

    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    last_log_sequence: int = attrs.field(metadata=wire("LastLogSequence", INT64))


@dotnet_type(_current("ScriptStatusResponse"), write_as=_legacy("ScriptStatusResponse"))
@attrs.frozen(kw_only=True)
class ScriptStatusResponse:
    """
    @ivar next_log_sequence: Pass back as C{last_log_sequence} to get only
        newer lines.
    @ivar exit_code: Meaningful once C{state} is C{Complete}; see
        L{ScriptExitCodes} for Tentacle's own codes.
    """

    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    logs: tuple[ProcessOutput, ...] = attrs.field(
        converter=_logs, metadata=wire("Logs", ListOf(Complex(ProcessOutput)))
    )
    next_log_sequence: int = attrs.field(metadata=wire("NextLogSequence", INT64))
    state: ProcessState = attrs.field(metadata=wire("State", EnumOf(ProcessState)))
    exit_code: int = attrs.field(metadata=wire("ExitCode", INT32))


# --- IScriptServiceV2 -------------------------------------------------------------


@dotnet_type(_current("StartScriptCommandV2", _V2_NS))
@attrs.frozen(kw_only=True)
class StartScriptCommandV2:
    """
    Run a script under a ticket the caller chose, so a retried start is
    recognised rather than run twice.

    @ivar duration_to_wait_for_script_to_finish: Block the call up to this
        long so short scripts finish in one round trip.
    """

    script_ticket: ScriptTicket = attrs.field(metadata=wire("ScriptTicket", Complex(ScriptTicket)))
    script_body: str = attrs.field(metadata=wire("ScriptBody", STRING))
    task_id: str = attrs.field(metadata=wire("TaskId", STRING))
    duration_to_wait_for_script_to_finish: TimeSpan | None = attrs.field(
        default=None,
        converter=_optional_timespan,
        metadata=wire("DurationToWaitForScriptToFinish", Nullable(TIMESPAN)),
    )
    isolation: ScriptIsolationLevel = attrs.field(
        metadata=wire("Isolation", EnumOf(ScriptIsolationLevel))
    )
    script_isolation_mutex_timeout: TimeSpan = attrs.field(
        default=TimeSpan(0),
        converter=_timespan,
        metadata=wire("ScriptIsolationMutexTimeout", TIMESPAN),
    )
    isolation_mutex_name: str | None = attrs.field(
        default=None, metadata=wire("IsolationMutexName", Nullable(STRING))
    )
    scripts: dict[ScriptType, str] = attrs.field(
        factory=dict, converter=_scripts, metadata=wire("Scripts", EnumKeyedDict(ScriptType, STRING))
    )
    files: tuple[ScriptFile, ...] = attrs.field(
        default=(), converter=_files, metadata=wire("Files", ListOf(Complex(ScriptFile)))
    )
    arguments: tuple[str, ...] = attrs.field(
        default=(), converter=_strings, metadata=wire("Arguments", ListOf(STRING))
    )


@dotnet_type(_current("ScriptStatusRequestV2", _V2_NS))
@attrs.frozen
class ScriptStatusRequestV2:
    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    last_log_sequence: int = attrs.field(metadata=wire("LastLogSequence", INT64))


@dotnet_type(_current("CancelScriptCommandV2", _V2_NS))
@attrs.frozen
class CancelScriptCommandV2:
    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    last_log_sequence: int = attrs.field(metadata=wire("LastLogSequence", INT64))


@dotnet_type(_current("CompleteScriptCommandV2", _V2_NS))
@attrs.frozen
class CompleteScriptCommandV2:
    """
    Discard the workspace; V2 returns nothing, the logs were read already.
    """

    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))


@dotnet_type(_current("ScriptStatusResponseV2", _V2_NS))
@attrs.frozen(kw_only=True)
class ScriptStatusResponseV2:
    ticket: ScriptTicket = attrs.field(metadata=wire("Ticket", Complex(ScriptTicket)))
    logs: tuple[ProcessOutput, ...] = attrs.field(
        converter=_logs, metadata=wire("Logs", ListOf(Complex(ProcessOutput)))
    )
    next_log_sequence: int = attrs.field(metadata=wire("NextLogSequence", INT64))
    state: ProcessState = attrs.field(metadata=wire("State", EnumOf(ProcessState)))
    exit_code: int = attrs.field(metadata=wire("ExitCode", INT32))


# --- IFileTransferService ---------------------------------------------------------


@dotnet_type(_current("UploadResult"), write_as=_legacy("UploadResult"))
@attrs.frozen
class UploadResult:
    """
    @ivar hash: SHA-1 of the stored file, lowercase hex.
    """

    full_path: str = attrs.field(metadata=wire("FullPath", STRING))
    hash: str = attrs.field(metadata=wire("Hash", STRING))
    length: int = attrs.field(metadata=wire("Length", INT64))


# --- ICapabilitiesServiceV2 -------------------------------------------------------


@dotnet_type(_current("CapabilitiesResponseV2", _CAPABILITIES_NS))
@attrs.frozen
class CapabilitiesResponseV2:
    """
    @ivar supported_capabilities: Service names, e.g. C{"IScriptServiceV2"}.
    """

    supported_capabilities: tuple[str, ...] = attrs.field(
        converter=_strings, metadata=wire("SupportedCapabilities", ListOf(STRING))
    )


CONTRACT_TYPES: Final[tuple[type, ...]] = (
    ScriptTicket,
    ScriptFile,
    ProcessOutput,
    StartScriptCommand,
    ScriptStatusRequest,
    CancelScriptCommand,
    CompleteScriptCommand,
    ScriptStatusResponse,
    StartScriptCommandV2,
    ScriptStatusRequestV2,
    CancelScriptCommandV2,
    CompleteScriptCommandV2,
    ScriptStatusResponseV2,
    UploadResult,
    CapabilitiesResponseV2,
)


def tentacle_registry() -> TypeRegistry:
    """
    The C{"$type"} allow-list for Tentacle traffic: Halibut's own types and
    every contract type above, under current and legacy names.
    """
    registry = TypeRegistry(CONTRACT_TYPES)
    return registry


# --- the services -----------------------------------------------------------------


@attrs.frozen
class Parameter:
    """
    @ivar type: The Python class an argument must be; reference types
        (every one used here) may also be C{None}, as Halibut allows.
    """

    name: str
    type: type


@attrs.frozen
class Operation:
    """
    One contract method as it appears on the wire.

    @ivar name: The synchronous name Halibut sends (C{"StartScript"}); the
        service side runs C{<name>Async}.
    @ivar returns: The result class, or C{None} for C{void}.
    @ivar cache_response_seconds: From C{[CacheResponse]}: how long a client
        may reuse a result.
    """

    name: str
    parameters: tuple[Parameter, ...]
    returns: type | None
    cache_response_seconds: int | None = None

    def accepts(self, arguments: Sequence[Any]) -> bool:
        """
        Whether C{arguments} fit the parameters, as Halibut's
        C{ServiceInvoker} matches them: same count, each C{None} or an
        instance of its parameter's type.
        """
        return len(arguments) == len(self.parameters) and all(
            argument is None or type(argument) is parameter.type
            for argument, parameter in zip(arguments, self.parameters)
        )


@attrs.frozen
class ServiceContract:
    """
    @ivar name: What C{RequestMessage.service} carries: the interface's
        short name, matched exactly.
    @ivar dotnet_type: The interface's CLR name, for reference.
    """

    name: str
    dotnet_type: str
    operations: tuple[Operation, ...]

    def operation(self, name: str) -> Operation | None:
        """
        The operation called C{name}, matched ignoring case as Halibut does.
        """
        folded = name.lower()
        for operation in self.operations:
            if operation.name.lower() == folded:
                return operation
        return None


SCRIPT_SERVICE: Final = ServiceContract(
    "IScriptService",
    _current("IScriptService"),
    (
        Operation("StartScript", (Parameter("command", StartScriptCommand),), ScriptTicket),
        Operation("GetStatus", (Parameter("request", ScriptStatusRequest),), ScriptStatusResponse),
        Operation(
            "CancelScript", (Parameter("command", CancelScriptCommand),), ScriptStatusResponse
        ),
        Operation(
            "CompleteScript", (Parameter("command", CompleteScriptCommand),), ScriptStatusResponse
        ),
    ),
)

SCRIPT_SERVICE_V2: Final = ServiceContract(
    "IScriptServiceV2",
    _current("IScriptServiceV2", _V2_NS),
    (
        Operation(
            "StartScript", (Parameter("command", StartScriptCommandV2),), ScriptStatusResponseV2
        ),
        Operation(
            "GetStatus", (Parameter("request", ScriptStatusRequestV2),), ScriptStatusResponseV2
        ),
        Operation(
            "CancelScript", (Parameter("command", CancelScriptCommandV2),), ScriptStatusResponseV2
        ),
        Operation("CompleteScript", (Parameter("command", CompleteScriptCommandV2),), None),
    ),
)

FILE_TRANSFER_SERVICE: Final = ServiceContract(
    "IFileTransferService",
    _current("IFileTransferService"),
    (
        Operation(
            "UploadFile",
            (Parameter("remotePath", str), Parameter("upload", DataStream)),
            UploadResult,
        ),
        Operation("DownloadFile", (Parameter("remotePath", str),), DataStream),
    ),
)

CAPABILITIES_SERVICE_V2: Final = ServiceContract(
    "ICapabilitiesServiceV2",
    _current("ICapabilitiesServiceV2", _CAPABILITIES_NS),
    (Operation("GetCapabilities", (), CapabilitiesResponseV2, cache_response_seconds=600),),
)

SERVICES: Final[Mapping[str, ServiceContract]] = {
    service.name: service
    for service in (SCRIPT_SERVICE, SCRIPT_SERVICE_V2, FILE_TRANSFER_SERVICE, CAPABILITIES_SERVICE_V2)
}
