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
import threading
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
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


#: How long an audit entry may wait in memory before it is written: the
#: entries of a busy moment go to the file in one write.
AUDIT_FLUSH_INTERVAL = 0.2
#: Entries held at most before they are written, whatever the time.
AUDIT_MAX_PENDING = 256

log = Logger()


class AuditLog:
    """
    JSON lines, one per authenticated request and per refusal, in a file
    rotated by size.  Script bodies never appear, only their length and hash.

    Entries are written in batches: an entry waits at most C{flush_interval}
    seconds (or until C{max_pending} are waiting) before it reaches the
    file, where it survives the process.  A clean stop (L{close}) writes
    every waiting entry; a crash (C{SIGKILL}, the machine's power) loses
    those of the last C{flush_interval} seconds at most, as a crash of the
    machine always lost what the kernel had not yet written to the disk.
    With no C{clock}, or a C{flush_interval} of 0, each entry is written
    as it comes.

    @param clock: the reactor, to schedule the writes.
    """

    def __init__(
        self,
        path: str,
        max_size: int = 10 * 1024 * 1024,
        keep: int = 10,
        *,
        clock: IReactorTime | None = None,
        flush_interval: float = AUDIT_FLUSH_INTERVAL,
        max_pending: int = AUDIT_MAX_PENDING,
    ) -> None:
        directory, _, name = path.rpartition("/")
        self._file = LogFile(name, directory or ".", rotateLength=max_size, maxRotatedFiles=keep, defaultMode=0o600)
        self._clock = clock if flush_interval > 0 else None
        self._flush_interval = flush_interval
        self._max_pending = max(max_pending, 1)
        self._pending: list[tuple[str, LogEvent]] = []
        self._timer: IDelayedCall | None = None
        # Entries come from the reactor thread; the lock keeps one that
        # comes from another (written at once) from racing a timed write.
        self._lock = threading.Lock()
        self._closed = False

    def record(self, kind: str, event: LogEvent) -> None:
        """
        Keep an entry for C{event}, to be written within the flush interval.
        """
        with self._lock:
            self._pending.append((kind, event))
            waiting = len(self._pending)
        if self._clock is None or waiting >= self._max_pending or not isInIOThread():
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._flush_interval, self._flush_due)

    @staticmethod
    def line(kind: str, event: LogEvent) -> str:
        """
        One entry: a JSON object and a newline.
        """
        get = event.get
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(get("log_time", 0), timezone.utc).isoformat(),
            "kind": kind,
        }
        for field in _AUDIT_FIELDS:
            value = get(field)
            if value is not None:
                entry[field] = value
        if get("event") == events.CLIENT_DENIED and "reason" not in entry:
            entry["reason"] = "untrusted certificate" if get("thumbprint") else "no client certificate"
        duration = entry.get("duration")
        if isinstance(duration, float):
            entry["duration"] = round(duration, 6)
        return json.dumps(entry) + "\n"

    def _flush_due(self) -> None:
        self._timer = None
        try:
            self.flush()
        except OSError:
            pass  # logged by flush; the next entries try again

    def flush(self) -> None:
        """
        Write every waiting entry now.

        @raise OSError: the file could not be written (logged; those
            entries are lost, as a failed write always lost its entry).
        """
        if isInIOThread():
            timer, self._timer = self._timer, None
            if timer is not None and timer.active():
                timer.cancel()
        line = self.line
        with self._lock:
            pending, self._pending = self._pending, []
            if not pending:
                return
            try:
                self._file.write("".join([line(kind, event) for kind, event in pending]))
                self._file.flush()
            except OSError as e:
                failed: OSError | None = e
            else:
                failed = None
        if failed is not None:
            log.error(
                "Could not write {count} audit log entries: {error}", count=len(pending), error=str(failed)
            )
            raise failed

    def close(self) -> None:
        """
        Write what is waiting, and close the file (once).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
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
    outcome, how long the handler took; a script body only as its length
    and hash), for one connection, once the answer is on its way.

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
        d.addCallback(self._answered, request, context, started)
        return d

    def _answered(
        self, response: ResponseMessage, request: RequestMessage, context: CallContext, started: float
    ) -> ResponseMessage:
        # Timed to here, as always; logged once the answer is on its way
        # (the role calls context.answered), so the peer need not wait for it.
        duration = self._clock.seconds() - started
        context.answered.append(lambda: self._served(response, request, duration))
        return response

    def _served(self, response: ResponseMessage, request: RequestMessage, duration: float) -> None:
        error = response.error
        summary = self._summarize(request) if request.params else {}
        # Per request, so at debug level; the audit log keeps every one.
        events.debug(
            self._log,
            "{service}.{method} for {thumbprint} at {peer}: {outcome} in {duration:.3f} s",
            event=events.REQUEST_SERVED,
            peer=self._address,
            thumbprint=self._thumbprint,
            service=request.service,
            method=request.method,
            outcome="error" if error is not None else "ok",
            error=error.message if error is not None else None,
            duration=duration,
            request_id=request.id,
            **summary,
        )
