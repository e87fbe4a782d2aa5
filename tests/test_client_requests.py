"""
What the client sends has the shape Octopus Server's requests have, as the
Json.NET vectors record them: the same $type names, member names and order,
and BSON types.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tentacle.client.api import build_request
from tentacle.contracts import (
    ScriptFile,
    ScriptIsolationLevel,
    ScriptStatusRequestV2,
    ScriptTicket,
    ScriptType,
    StartScriptCommandV2,
)
from tentacle.halibut import bson
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.serializer import DataStream, encode_message

VECTORS = FilePath(__file__).sibling("vectors")


def skeleton(tree: Any) -> Any:
    """
    The structure without the values: member names in order, $type names,
    and the BSON type of each leaf.
    """
    if isinstance(tree, dict):
        return [(k, tree[k] if k == "$type" else skeleton(v)) for k, v in tree.items()]
    if isinstance(tree, list):
        return [skeleton(v) for v in tree[:1]]
    return type(tree).__name__


def request_skeleton(data: bytes) -> Any:
    message = dict(bson.decode_document(data)["Message"])
    message.pop("endpoint")  # Octopus sends its ServiceEndPoint; we send null
    return skeleton({"Message": message})


class ClientRequestShapeTests(SynchronousTestCase):
    def compare(self, vector: str, request: Any) -> None:
        ours, _ = encode_message(request)
        theirs = VECTORS.child(vector + ".bson").getContent()
        self.assertEqual(request_skeleton(ours), request_skeleton(theirs))

    def test_start_script_v2(self) -> None:
        command = StartScriptCommandV2(
            script_ticket=ScriptTicket("t"), script_body="x", task_id="ServerTasks-1",
            duration_to_wait_for_script_to_finish=TimeSpan.from_timedelta(timedelta(seconds=5)),
            isolation=ScriptIsolationLevel.FullIsolation,
            script_isolation_mutex_timeout=TimeSpan(0), isolation_mutex_name="m",
            scripts={ScriptType.PowerShell: "x"},
            files=(ScriptFile("data.bin", DataStream(uuid.uuid4(), 3)),), arguments=("a",),
        )
        self.compare("v2_start_script_request", build_request("IScriptServiceV2", "StartScript", command))

    def test_get_status_v2(self) -> None:
        self.compare(
            "v2_get_status_request",
            build_request("IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(ScriptTicket("t"), 3)),
        )

    def test_upload(self) -> None:
        self.compare(
            "upload_file_request",
            build_request("IFileTransferService", "UploadFile", "C:\\x", DataStream(uuid.uuid4(), 3)),
        )

    def test_capabilities(self) -> None:
        self.compare("get_capabilities_request", build_request("ICapabilitiesServiceV2", "GetCapabilities"))
