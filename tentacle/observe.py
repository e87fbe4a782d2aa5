"""
Turning the agent's structured log events into its audit log and metrics.

The listener, the services and L{ObservedHandler} log what happens with an
C{event} field (names in L{tentacle.events}) to the agent's own publisher.
One observer on that publisher feeds the audit log and the counters, so the
request path knows nothing of either, and agents sharing a process never
mix.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.logfile import LogFile
from zope.interface import implementer

from tentacle import events
from tentacle.halibut.rpc import CallContext, IRequestHandler
from tentacle.halibut.serializer import RequestMessage, ResponseMessage
from tentacle.halibut.streams import ExpectedStream, StreamSink
from tentacle.metrics import Metrics

#: What the audit log records, and under which name.
_AUDITED = {
    events.CLIENT_DENIED: "refused",
    events.CONNECTION_REFUSED: "refused",
    events.REQUEST_SERVED: "request",
    events.POLLING_CONNECTED: "polling-connected",
    events.POLLING_DISCONNECTED: "polling-disconnected",
    events.POLLING_REFUSED: "polling-refused",
}
_AUDIT_FIELDS = (
    "peer", "thumbprint", "sha256", "service", "method", "ticket", "outcome", "error",
    "duration", "script_body_length", "script_body_sha256", "reason",
    "server", "subscription", "connection", "expected", "presented", "served",
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
    Feeds one agent's events (from its own publisher) to its audit log and
    metrics.
    """

    def __init__(self, metrics: Metrics, audit: AuditLog | None = None) -> None:
        self.metrics = metrics
        self.audit = audit

    def __call__(self, event: LogEvent) -> None:
        kind = event.get("event")
        if kind is None:
            return
        m = self.metrics
        if kind == events.CONNECTION_ACCEPTED:
            m.connections_accepted += 1
        elif kind == events.CLIENT_DENIED:
            m.connections_refused["untrusted" if event.get("thumbprint") else "no_certificate"] += 1
        elif kind == events.CONNECTION_REFUSED:
            m.connections_refused[str(event.get("reason") or "refused")] += 1
        elif kind == events.CONNECTION_EVICTED:
            m.connections_evicted[str(event.get("reason"))] += 1
        elif kind == events.HANDSHAKE_TIMED_OUT:
            m.handshakes_timed_out[str(event.get("reason"))] += 1
        elif kind == events.REQUEST_SERVED:
            m.requests[(event["service"], event["method"], event["outcome"])] += 1
            m.observe_latency(float(event.get("duration", 0.0)))
        elif kind == events.SCRIPT_FINISHED:
            m.scripts_finished[int(event["exit_code"])] += 1
        elif kind == events.UPLOAD_STORED:
            m.bytes_uploaded += int(event.get("length", 0))
        elif kind == events.DOWNLOAD_STARTED:
            m.bytes_downloaded += int(event.get("length", 0))
        elif kind == events.POLLING_CONNECTED:
            m.polling_sessions[str(event.get("server"))] += 1
        elif kind == events.POLLING_REFUSED:
            m.polling_refused[str(event.get("server"))] += 1
        if self.audit is not None and kind in _AUDITED:
            self.audit.record(_AUDITED[kind], event)


@implementer(IRequestHandler)
class ObservedHandler:
    """
    A handler that logs one C{request_served} event per answer (who, what,
    outcome, how long; a script body only as its length and hash), for one
    connection.

    @param summarize: what a log may say about a request's arguments.
    """

    def __init__(
        self,
        handler: IRequestHandler,
        clock: IReactorTime,
        log: Logger,
        *,
        address: str,
        thumbprint: str,
        summarize: Callable[[RequestMessage], dict[str, Any]],
    ) -> None:
        self._handler = handler
        self._clock = clock
        self._log = log
        self._address = address
        self._thumbprint = thumbprint
        self._summarize = summarize

    def sink_for(self, request: RequestMessage, stream: ExpectedStream) -> StreamSink | None:
        sink: StreamSink | None = self._handler.sink_for(request, stream)
        return sink

    def handle(self, request: RequestMessage, context: CallContext) -> Deferred[ResponseMessage]:
        started = self._clock.seconds()
        d: Deferred[ResponseMessage] = self._handler.handle(request, context)
        d.addCallback(self._served, request, started)
        return d

    def _served(self, response: ResponseMessage, request: RequestMessage, started: float) -> ResponseMessage:
        error = response.error
        # Per request, so at debug level; the audit log keeps every one.
        self._log.debug(
            "{service}.{method} for {thumbprint} at {peer}: {outcome} in {duration:.3f} s",
            event=events.REQUEST_SERVED,
            peer=self._address,
            thumbprint=self._thumbprint,
            service=request.service,
            method=request.method,
            outcome="error" if error is not None else "ok",
            error=error.message if error is not None else None,
            duration=self._clock.seconds() - started,
            request_id=request.id,
            **self._summarize(request),
        )
        return response
