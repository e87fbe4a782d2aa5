"""
The audit log and the metrics after a known sequence of events: one refused
connection, two scripts, one upload.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import RetryPolicy, Target, TentacleClient
from tentacle.client.connection import AgentRefused, Pin
from tests.support import agent_port, identity, start_agent


class AuditAndMetricsTests(TestCase):
    async def test_a_known_sequence(self) -> None:
        agent = start_agent(self, trusted=(identity("server").thumbprint,))
        home = agent.config.home
        # a second agent in the same process must not leak into this one's records
        start_agent(self, trusted=(identity("server").thumbprint,))

        def client(who: str) -> TentacleClient:
            target = Target("127.0.0.1", agent_port(agent), Pin(identity("agent").thumbprint))
            c = TentacleClient(target, identity(who), reactor, retry=RetryPolicy(attempts=1))
            self.addCleanup(c.close)
            return c

        with self.assertRaises(AgentRefused):
            await client("intruder").capabilities()
        server = client("server")
        self.assertEqual(await server.run_script("echo one"), 0)
        self.assertEqual(await server.run_script("export TOKEN=s3cret; exit 2"), 2)
        upload = Path(self.mktemp())
        upload.write_bytes(b"z" * 12345)
        await server.upload(upload, "Packages/z.bin")

        agent.flush_audit()  # the entries of the last moments wait for their batch
        entries = [json.loads(line) for line in (home / "Logs" / "audit.log").read_text().splitlines()]
        refused = [e for e in entries if e["kind"] == "refused"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["thumbprint"], identity("intruder").thumbprint)
        self.assertEqual(refused[0]["reason"], "untrusted certificate")
        self.assertTrue(refused[0]["peer"].startswith("127.0.0.1:"))
        requests = [(e["service"], e["method"]) for e in entries if e["kind"] == "request"]
        self.assertEqual(requests.count(("IScriptServiceV2", "StartScript")), 2)
        self.assertEqual(requests.count(("IScriptServiceV2", "CompleteScript")), 2)
        self.assertEqual(requests.count(("IFileTransferService", "UploadFile")), 1)
        self.assertEqual(requests.count(("ICapabilitiesServiceV2", "GetCapabilities")), 1)
        self.assertEqual(
            set(requests) - {("IScriptServiceV2", m) for m in ("StartScript", "GetStatus", "CompleteScript")},
            {("IFileTransferService", "UploadFile"), ("ICapabilitiesServiceV2", "GetCapabilities")},
        )
        starts = [e for e in entries if e.get("method") == "StartScript"]
        self.assertEqual({e["script_body_length"] for e in starts}, {len("echo one"), len("export TOKEN=s3cret; exit 2")})
        self.assertTrue(all(e["outcome"] == "ok" and e["thumbprint"] == identity("server").thumbprint
                            and isinstance(e["duration"], float) for e in entries if e["kind"] == "request"))
        self.assertNotIn("s3cret", (home / "Logs" / "audit.log").read_text())

        metrics = agent.metrics
        self.assertEqual(dict(metrics.connections_refused), {"untrusted": 1})
        self.assertEqual(dict(metrics.scripts_finished), {0: 1, 2: 1})
        self.assertEqual(metrics.bytes_uploaded, 12345)
        self.assertEqual(metrics.bytes_downloaded, 0)
        served = sum(metrics.requests.values())
        self.assertEqual(served, len([e for e in entries if e["kind"] == "request"]))
        self.assertEqual(metrics.requests[("IScriptServiceV2", "StartScript", "ok")], 2)
        text = metrics.render()
        self.assertIn('tentacle_connections_refused_total{reason="untrusted"} 1', text)
        self.assertIn('tentacle_scripts_finished_total{exit_code="2"} 1', text)
        self.assertIn("tentacle_uploaded_bytes_total 12345", text)
        self.assertIn(f"tentacle_request_duration_seconds_count {served}", text)
        # two connections at least: the refused one and the server's
        self.assertGreaterEqual(metrics.connections_accepted, 2)

    async def test_metrics_over_http(self) -> None:
        import socket

        from twisted.web.client import Agent, readBody

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        agent = start_agent(self, metrics_port=port)
        response: Any = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        body = await readBody(response)
        self.assertEqual(response.code, 200)
        self.assertIn(b"tentacle_connections_accepted_total", body)
        self.assertEqual(response.headers.getRawHeaders(b"content-type")[0][:10], b"text/plain")
        self.assertIsNotNone(agent.metrics)
