"""
Turning the agent's structured log events into its audit log and metrics.

The listener, the exchange and the services log what happens with an
C{event} field (C{client_denied}, C{request_served}, ...).  One observer per
agent picks out the events of I{its} agent (several may share a process)
and feeds the audit log and the counters, so the request path knows nothing
of either.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from twisted.logger import ILogObserver, LogEvent
from twisted.python.logfile import LogFile
from zope.interface import implementer

from tentacle.metrics import Metrics

#: What the audit log records, and under which name.
_AUDITED = {
    "client_denied": "refused",
    "connection_refused": "refused",
    "request_served": "request",
}
_AUDIT_FIELDS = (
    "peer", "thumbprint", "sha256", "service", "method", "ticket", "outcome", "error",
    "duration", "script_body_length", "script_body_sha256", "reason",
)


class AuditLog:
    """
    JSON lines, one per authenticated request and per refusal, in a file
    rotated by size.  Script bodies never appear, only their length and hash.
    """

    def __init__(self, path: str, max_size: int = 10 * 1024 * 1024, keep: int = 10) -> None:
        directory, _, name = path.rpartition("/")
        self._file = LogFile(name, directory or ".", rotateLength=max_size, maxRotatedFiles=keep, defaultMode=0o600)

    def record(self, kind: str, event: LogEvent) -> None:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(),
            "kind": kind,
        }
        for field in _AUDIT_FIELDS:
            if event.get(field) is not None:
                entry[field] = event[field]
        if event.get("event") == "client_denied" and "reason" not in entry:
            entry["reason"] = "untrusted certificate" if event.get("thumbprint") else "no client certificate"
        if isinstance(entry.get("duration"), float):
            entry["duration"] = round(entry["duration"], 6)
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


@implementer(ILogObserver)
class AgentObserver:
    """
    Feeds one agent's events to its audit log and metrics.

    @param belongs: whether an event was logged by this agent's objects.
    """

    def __init__(
        self,
        belongs: Callable[[LogEvent], bool],
        metrics: Metrics,
        audit: AuditLog | None = None,
    ) -> None:
        self._belongs = belongs
        self.metrics = metrics
        self.audit = audit

    def __call__(self, event: LogEvent) -> None:
        kind = event.get("event")
        if kind is None or not self._belongs(event):
            return
        m = self.metrics
        if kind == "connection_accepted":
            m.connections_accepted += 1
        elif kind == "client_denied":
            m.connections_refused["untrusted" if event.get("thumbprint") else "no_certificate"] += 1
        elif kind == "connection_refused":
            m.connections_refused[str(event.get("reason") or "refused")] += 1
        elif kind == "request_served":
            m.requests[(event["service"], event["method"], event["outcome"])] += 1
            m.observe_latency(float(event.get("duration", 0.0)))
        elif kind == "script_finished":
            m.scripts_finished[int(event["exit_code"])] += 1
        elif kind == "upload_stored":
            m.bytes_uploaded += int(event.get("length", 0))
        elif kind == "download_started":
            m.bytes_downloaded += int(event.get("length", 0))
        if self.audit is not None and kind in _AUDITED:
            self.audit.record(_AUDITED[kind], event)


def owned_by(objects: Callable[[], Iterable[object]], attributes: dict[str, object]) -> Callable[[LogEvent], bool]:
    """
    An event belongs to an agent when it was logged by one of its objects,
    or by an object whose named attribute is one of them (a connection's
    C{factory}, an exchange's C{dispatcher}).
    """

    def belongs(event: LogEvent) -> bool:
        source = event.get("log_source")
        if source is None:
            return False
        if any(source is o for o in objects()):
            return True
        return any(getattr(source, name, None) is owner for name, owner in attributes.items())

    return belongs
