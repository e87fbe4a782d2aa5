"""
Byte-for-byte agreement with Json.NET.

The vectors in C{tests/vectors/} were written by Json.NET itself (see
C{tests/vectors/generate/README.md}); each must decode to the objects
spelled out here and encode back to the very same bytes.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import (
    CancelScriptCommand,
    CancelScriptCommandV2,
    CapabilitiesResponseV2,
    CompleteScriptCommand,
    CompleteScriptCommandV2,
    DataStream,
    ProcessOutput,
    ProcessOutputSource,
    ProcessState,
    ScriptExitCodes,
    ScriptFile,
    ScriptIsolationLevel,
    ScriptStatusRequest,
    ScriptStatusRequestV2,
    ScriptStatusResponse,
    ScriptStatusResponseV2,
    ScriptTicket,
    ScriptType,
    StartScriptCommand,
    StartScriptCommandV2,
    TimeSpan,
    UploadResult,
    tentacle_registry,
)
from tentacle.halibut.bson import Int64
from tentacle.halibut.serializer import (
    Message,
    RequestMessage,
    ResponseMessage,
    ServerError,
    UnknownTypeError,
    decode_message,
    encode_message,
)
from tests.codec_cores import on_both_cores

VECTORS = FilePath(__file__).sibling("vectors")
REGISTRY = tentacle_registry()

ACTIVITY = uuid.UUID("3f2504e0-4f89-11d3-9a0c-0305e82c3301")
TICKET = ScriptTicket("20240229235958-1234-7")
V2_TICKET = ScriptTicket("kq3Zb7ZlT0ur2x7a9bQwQ")
UTC = timezone.utc


def message_id(service: str, method: str, counter: int) -> str:
    return f"{service}::{method}Async[{counter}] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d"


def endpoint(base_uri: str, thumbprint: str, proxy: Any = None) -> dict[str, Any]:
    """
    A C{ServiceEndPoint} as the raw tree Octopus Server sends.
    """
    return {
        "PollingRequestQueueTimeout": "00:02:00",
        "RetryListeningSleepInterval": "00:00:01",
        "RetryCountLimit": 5,
        "ConnectionErrorRetryTimeout": "00:05:00",
        "TcpClientConnectTimeout": "00:01:00",
        "BaseUri": base_uri,
        "RemoteThumbprint": thumbprint,
        "Proxy": proxy,
        "ForceResolveHost": None,
        "IsWebSocketEndpoint": False,
    }


OCTOPUS = endpoint("https://tentacle.example.com:10933/", "A1B2C3D4E5F60718293A4B5C6D7E8F9012345678")
PROXIED = endpoint(
    "https://10.0.0.5:10933/",
    "0123456789ABCDEF0123456789ABCDEF01234567",
    {"Host": "proxy.local", "Port": 3128, "UserName": "user", "Password": None, "Type": 1},
)

SAMPLE_LOGS = (
    ProcessOutput(
        ProcessOutputSource.StdOut, datetime(2024, 2, 29, 23, 59, 58, 123000, UTC), "Hello from bash"
    ),
    ProcessOutput(
        ProcessOutputSource.StdErr,
        datetime(2024, 3, 1, 10, 0, 0, 5000, timezone(timedelta(hours=10))),
        "warning: \u00e9t\u00e9 \u2603",
    ),
    ProcessOutput(
        ProcessOutputSource.Debug,
        datetime(1969, 12, 31, 23, 59, 59, 999000, timezone(timedelta(minutes=-330))),
        "",
    ),
)


def request(
    service: str, method: str, counter: int, where: Any, *params: Any
) -> RequestMessage:
    return RequestMessage(
        message_id(service, method, counter), ACTIVITY, service, method, params, where
    )


def response(service: str, method: str, counter: int, result: Any) -> ResponseMessage:
    return ResponseMessage(message_id(service, method, counter), result=result)


START_SCRIPT = StartScriptCommand(
    script_body="echo hello\r\nexit 0",
    isolation=ScriptIsolationLevel.FullIsolation,
    scripts={ScriptType.Bash: "#!/bin/bash\necho hello", ScriptType.PowerShell: "Write-Host hello"},
    files=(
        ScriptFile(
            "package.nupkg", DataStream(uuid.UUID("11111111-2222-3333-4444-555555555555"), 5000000000)
        ),
        ScriptFile(
            "secrets.json", DataStream(uuid.UUID("aabbccdd-eeff-0011-2233-445566778899"), 42), "s3cr3t"
        ),
    ),
    arguments=("-Verbose", "a b", ""),
    task_id="ServerTasks-1234",
    script_isolation_mutex_timeout=timedelta(days=1, hours=2, minutes=3, seconds=4, milliseconds=500),
    isolation_mutex_name="RunningScript",
)

START_SCRIPT_V2 = StartScriptCommandV2(
    script_ticket=V2_TICKET,
    script_body="Write-Host hi",
    task_id="ServerTasks-99",
    duration_to_wait_for_script_to_finish=TimeSpan(52_500_000),
    isolation=ScriptIsolationLevel.FullIsolation,
    script_isolation_mutex_timeout=TimeSpan(-10_000_000),
    isolation_mutex_name="Mutex-A",
    scripts={ScriptType.PowerShell: "Write-Host hi"},
    files=(ScriptFile("data.bin", DataStream(uuid.UUID("00000000-0000-0000-0000-000000000001"), 0)),),
    arguments=("x",),
)

# name -> the message the vector holds.
EXPECTED: dict[str, Message | None] = {
    "v1_start_script_request": request("IScriptService", "StartScript", 1, OCTOPUS, START_SCRIPT),
    "v1_start_script_minimal_request": request(
        "IScriptService",
        "StartScript",
        2,
        None,
        StartScriptCommand(script_body="", isolation=ScriptIsolationLevel.NoIsolation),
    ),
    "v1_start_script_response": response("IScriptService", "StartScript", 1, TICKET),
    "v1_get_status_request": request(
        "IScriptService", "GetStatus", 3, OCTOPUS, ScriptStatusRequest(TICKET, 0)
    ),
    "v1_get_status_response": response(
        "IScriptService",
        "GetStatus",
        3,
        ScriptStatusResponse(
            ticket=TICKET, logs=SAMPLE_LOGS, next_log_sequence=3, state=ProcessState.Running, exit_code=0
        ),
    ),
    "v1_cancel_script_request": request(
        "IScriptService", "CancelScript", 4, OCTOPUS, CancelScriptCommand(TICKET, 3)
    ),
    "v1_cancel_script_response": response(
        "IScriptService",
        "CancelScript",
        4,
        ScriptStatusResponse(
            ticket=TICKET,
            logs=(),
            next_log_sequence=3,
            state=ProcessState.Complete,
            exit_code=ScriptExitCodes.CANCELED,
        ),
    ),
    "v1_complete_script_request": request(
        "IScriptService", "CompleteScript", 5, OCTOPUS, CompleteScriptCommand(TICKET, 3000000000)
    ),
    "v1_complete_script_response": response(
        "IScriptService",
        "CompleteScript",
        5,
        ScriptStatusResponse(
            ticket=TICKET,
            logs=(
                ProcessOutput(
                    ProcessOutputSource.StdOut,
                    datetime(9999, 12, 31, 23, 59, 59, 999000, UTC),
                    "line\twith\ttabs\r\n",
                ),
            ),
            next_log_sequence=-1,
            state=ProcessState.Pending,
            exit_code=-(2**31),
        ),
    ),
    "v2_start_script_request": request(
        "IScriptServiceV2", "StartScript", 6, PROXIED, START_SCRIPT_V2
    ),
    "v2_start_script_minimal_request": request(
        "IScriptServiceV2",
        "StartScript",
        7,
        None,
        StartScriptCommandV2(
            script_ticket=V2_TICKET,
            script_body="echo",
            task_id="ServerTasks-100",
            isolation=ScriptIsolationLevel.NoIsolation,
            script_isolation_mutex_timeout=timedelta(minutes=10),
        ),
    ),
    "v2_start_script_response": response(
        "IScriptServiceV2",
        "StartScript",
        6,
        ScriptStatusResponseV2(
            ticket=V2_TICKET,
            logs=SAMPLE_LOGS,
            next_log_sequence=3,
            state=ProcessState.Running,
            exit_code=0,
        ),
    ),
    "v2_get_status_request": request(
        "IScriptServiceV2", "GetStatus", 8, OCTOPUS, ScriptStatusRequestV2(V2_TICKET, 3)
    ),
    "v2_get_status_response": response(
        "IScriptServiceV2",
        "GetStatus",
        8,
        ScriptStatusResponseV2(
            ticket=V2_TICKET,
            logs=(),
            next_log_sequence=2**63 - 1,
            state=ProcessState.Complete,
            exit_code=1,
        ),
    ),
    "v2_cancel_script_request": request(
        "IScriptServiceV2", "CancelScript", 9, OCTOPUS, CancelScriptCommandV2(V2_TICKET, 12)
    ),
    "v2_cancel_script_response": response(
        "IScriptServiceV2",
        "CancelScript",
        9,
        ScriptStatusResponseV2(
            ticket=V2_TICKET,
            logs=(),
            next_log_sequence=12,
            state=ProcessState.Complete,
            exit_code=-43,
        ),
    ),
    "v2_complete_script_request": request(
        "IScriptServiceV2", "CompleteScript", 10, OCTOPUS, CompleteScriptCommandV2(V2_TICKET)
    ),
    "v2_complete_script_response": response("IScriptServiceV2", "CompleteScript", 10, None),
    "upload_file_request": request(
        "IFileTransferService",
        "UploadFile",
        11,
        OCTOPUS,
        "C:\\Octopus\\Files\\pkg.zip",
        DataStream(uuid.UUID("f0e1d2c3-b4a5-9687-7869-5a4b3c2d1e0f"), 1234567),
    ),
    "upload_file_response": response(
        "IFileTransferService",
        "UploadFile",
        11,
        UploadResult(
            "/home/octopus/Files/pkg.zip", "da39a3ee5e6b4b0d3255bfef95601890afd80709", 1234567
        ),
    ),
    "download_file_request": request(
        "IFileTransferService", "DownloadFile", 12, OCTOPUS, "Files/pkg.zip"
    ),
    "download_file_response": response(
        "IFileTransferService",
        "DownloadFile",
        12,
        DataStream(uuid.UUID("01234567-89ab-cdef-0123-456789abcdef"), 17),
    ),
    "download_file_missing_response": response("IFileTransferService", "DownloadFile", 13, None),
    "get_capabilities_request": request(
        "ICapabilitiesServiceV2", "GetCapabilities", 14, OCTOPUS
    ),
    "get_capabilities_response": response(
        "ICapabilitiesServiceV2",
        "GetCapabilities",
        14,
        CapabilitiesResponseV2(("IScriptService", "IFileTransferService", "IScriptServiceV2")),
    ),
    "error_response": ResponseMessage(
        message_id("IScriptServiceV2", "GetStatus", 15),
        error=ServerError(
            "Service not found: IScriptServiceV3",
            "Halibut.Exceptions.ServiceNotFoundHalibutClientException: Service not found\n"
            "   at Halibut.ServiceModel.ServiceInvoker.Invoke()",
            "Halibut.Exceptions.ServiceNotFoundHalibutClientException",
        ),
    ),
    "error_minimal_response": ResponseMessage(
        message_id("IScriptService", "StartScript", 16), error=ServerError("boom")
    ),
    "null_envelope": None,
    "probe_object_primitives": request(
        "IProbe",
        "Primitives",
        17,
        None,
        "text",
        Int64(5),
        7,
        True,
        uuid.UUID("00112233-4455-6677-8899-aabbccddeeff"),
        1,
        "-1.12:00:00",
        datetime(2001, 2, 3, 11, 5, 6, 7000, UTC),
        1.5,
        None,
    ),
}

# Written under the current contract names; we read them and write the
# legacy names, as Tentacle does, giving the bytes of another vector.
CURRENT_NAMES = {
    "v1_get_status_request_current_names": "v1_get_status_request",
    "v1_start_script_response_current_names": "v1_start_script_response",
}

REJECTED = {"probe_object_collections"}

#: Error shapes, checked in tests/test_failures.py.
FAILURES_PREFIX = "failure_"


def manifest() -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(VECTORS.child("manifest.json").getContent())
    return entries


def vector(name: str) -> bytes:
    return VECTORS.child(name + ".bson").getContent()


class VectorTests(SynchronousTestCase):
    """
    Each vector decodes to the expected objects and re-encodes identically.
    """

    def test_every_vector_is_covered(self) -> None:
        """
        Every vector file is in the manifest and has an expectation here.
        """
        names = {entry["name"] for entry in manifest()}
        on_disk = {path.basename()[: -len(".bson")] for path in VECTORS.globChildren("*.bson")}
        self.assertEqual(on_disk, names)
        failures = {name for name in names if name.startswith(FAILURES_PREFIX)}
        self.assertEqual(names - failures, set(EXPECTED) | set(CURRENT_NAMES) | REJECTED)

    def test_decode(self) -> None:
        for name, expected in EXPECTED.items():
            message, _ = decode_message(vector(name), REGISTRY)
            self.assertEqual(message, expected, name)

    def test_encode_is_byte_identical(self) -> None:
        for name, expected in EXPECTED.items():
            data, _ = encode_message(expected)
            self.assertEqual(data, vector(name), name)

    def test_data_streams_in_manifest_order(self) -> None:
        """
        The DataStreams come back, and go out, in Json.NET's serialization
        order, which is the order their payloads follow on the wire.
        """
        for entry in manifest():
            if entry["name"] in REJECTED:
                continue
            wanted = [(uuid.UUID(s["id"]), s["length"]) for s in entry["dataStreams"]]
            message, read = decode_message(vector(entry["name"]), REGISTRY)
            _, written = encode_message(message)
            self.assertEqual([(s.id, s.length) for s in read], wanted, entry["name"])
            self.assertEqual([(s.id, s.length) for s in written], wanted, entry["name"])

    def test_start_script_streams(self) -> None:
        """
        Spelled out for the richest case: both files' streams, in file order.
        """
        _, streams = decode_message(vector("v1_start_script_request"), REGISTRY)
        self.assertEqual(streams, [f.contents for f in START_SCRIPT.files])

    def test_decoded_times_are_utc(self) -> None:
        """
        A DateTimeOffset's offset does not survive BSON: it comes back in UTC.
        """
        message, _ = decode_message(vector("v1_get_status_response"), REGISTRY)
        assert isinstance(message, ResponseMessage)
        assert isinstance(message.result, ScriptStatusResponse)
        occurred = [line.occurred for line in message.result.logs]
        self.assertEqual([o.utcoffset() for o in occurred], [timedelta(0)] * 3)
        self.assertEqual(occurred[2], datetime(1970, 1, 1, 5, 29, 59, 999000, UTC))

    def test_timespans(self) -> None:
        """
        Day-bearing, fractional and negative TimeSpans keep their exact ticks.
        """
        message, _ = decode_message(vector("v2_start_script_request"), REGISTRY)
        assert isinstance(message, RequestMessage)
        (command,) = message.params
        assert isinstance(command, StartScriptCommandV2)
        self.assertEqual(command.script_isolation_mutex_timeout, TimeSpan(-10_000_000))
        self.assertEqual(command.duration_to_wait_for_script_to_finish, TimeSpan(52_500_000))
        self.assertEqual(
            START_SCRIPT.script_isolation_mutex_timeout.format(), "1.02:03:04.5000000"
        )

    def test_current_names(self) -> None:
        """
        Contracts named without C{WithLegacyContractSupport()} are read, and
        written back under the legacy names.
        """
        for name, legacy in CURRENT_NAMES.items():
            message, _ = decode_message(vector(name), REGISTRY)
            self.assertEqual(message, EXPECTED[legacy], name)
            self.assertEqual(encode_message(message)[0], vector(legacy), name)

    def test_collections_in_object_slots_rejected(self) -> None:
        """
        C{{"$type": "System...", "$values": [...]}} names a framework type
        no contract uses here, so it is refused like any unknown type.
        """
        self.assertRaises(UnknownTypeError, decode_message, vector("probe_object_collections"), REGISTRY)


on_both_cores(globals(), "VectorTests")
