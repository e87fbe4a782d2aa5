"""
Every structured event the agent, the hub and the client log, by name.

An event is a log line with an C{event} field; the audit log and the
metrics are made of them (L{tentacle.observe}).  Each agent logs through its
own publisher (L{agent_publisher}), so several agents in one process never
mix, and nothing on the request path asks whose an event is.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import LogLevel, LogPublisher, Logger, globalLogPublisher

from tentacle.halibut.connection import CONNECTION_TIMED_OUT, PROTOCOL_ERROR

# --- connections (listener) ---------------------------------------------------
CONNECTION_ACCEPTED = "connection_accepted"
#: Closed before TLS: every place is held by an authenticated connection.
CONNECTION_REFUSED = "connection_refused"
#: An unauthenticated connection closed to make room for a newer one
#: (C{reason}: the budget that was full).
CONNECTION_EVICTED = "connection_evicted"
#: An unauthenticated connection that sent no TLS, or no trusted identity,
#: in time (C{reason}: C{first-byte-timeout} or C{handshake-timeout}).
HANDSHAKE_TIMED_OUT = "handshake_timed_out"
#: An MX exchange without a trusted certificate.
CLIENT_DENIED = "client_denied"
CLIENT_AUTHENTICATED = "client_authenticated"

# --- requests (agent) ---------------------------------------------------------
REQUEST_SERVED = "request_served"

# --- services -----------------------------------------------------------------
SCRIPT_FINISHED = "script_finished"
UPLOAD_STORED = "upload_stored"
UPLOAD_ABANDONED = "upload_abandoned"
UPLOAD_REFUSED = "upload_refused"
DOWNLOAD_STARTED = "download_started"

# --- start-up -----------------------------------------------------------------
#: Root with no allowed-roots: a trusted server may touch any file.
RUNNING_AS_ROOT = "running_as_root"

# --- trust --------------------------------------------------------------------
TRUST_ADDED = "trust_added"
TRUST_REMOVED = "trust_removed"

# --- polling (agent) ----------------------------------------------------------
#: A polling connection identified with its server.
POLLING_CONNECTED = "polling_connected"
POLLING_DISCONNECTED = "polling_disconnected"
#: The server presented the wrong certificate, or closed on our identity.
POLLING_REFUSED = "polling_refused"

# --- client -------------------------------------------------------------------
CALL_RETRIED = "call_retried"

__all__ = [
    "CALL_RETRIED",
    "CLIENT_AUTHENTICATED",
    "CLIENT_DENIED",
    "CONNECTION_ACCEPTED",
    "CONNECTION_EVICTED",
    "CONNECTION_REFUSED",
    "CONNECTION_TIMED_OUT",
    "DOWNLOAD_STARTED",
    "HANDSHAKE_TIMED_OUT",
    "POLLING_CONNECTED",
    "POLLING_DISCONNECTED",
    "POLLING_REFUSED",
    "PROTOCOL_ERROR",
    "REQUEST_SERVED",
    "RUNNING_AS_ROOT",
    "SCRIPT_FINISHED",
    "TRUST_ADDED",
    "TRUST_REMOVED",
    "UPLOAD_ABANDONED",
    "UPLOAD_REFUSED",
    "UPLOAD_STORED",
    "agent_publisher",
    "debug",
]


def agent_publisher() -> LogPublisher:
    """
    A publisher for one agent's events: everything it gets also goes to the
    global log; the agent adds its audit and metrics observer.
    """
    publisher = LogPublisher()
    publisher.addObserver(globalLogPublisher)
    return publisher


def debug(log: Logger, format: str, **fields: Any) -> None:
    """
    C{log.debug(format, **fields)}, for the events made on every connection
    and every request: the same event (Twisted's C{log_*} keys and the
    fields), given to the logger's observer without C{Logger.emit}'s
    checks, which cost as much again as building it.
    """
    fields["log_logger"] = log
    fields["log_level"] = LogLevel.debug
    fields["log_namespace"] = log.namespace
    fields["log_source"] = log.source
    fields["log_format"] = format
    fields["log_time"] = time.time()
    log.observer(fields)
