"""
The agent's own log output: text or JSON lines, to stdout or to a file
rotated by size, from a chosen level up.  C{tentacle run} passes the choice
to twistd as its C{--logger}, through environment variables, since twistd
calls the observer factory without arguments.

A JSON line is one flat object that log tools read without knowing
Twisted: C{time} (RFC 3339, UTC), C{level}, C{logger} (the namespace),
C{message} (rendered), then the event's own fields (C{peer},
C{thumbprint}, C{service}, C{method}, C{ticket}, C{outcome},
C{duration}, ...), and C{traceback} for a failure.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

FORMAT_VARIABLE = "TENTACLE_LOG_FORMAT"
FILE_VARIABLE = "TENTACLE_LOG_FILE"
MAX_SIZE_VARIABLE = "TENTACLE_LOG_MAX_SIZE"
LEVEL_VARIABLE = "TENTACLE_LOG_LEVEL"
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_LEVEL = "info"
LEVELS = ("debug", "info", "warn", "error", "critical")
KEEP = 10

#: Names a flat line gives itself; an event field of the same name is kept
#: under C{field_<name>}.
_RESERVED = frozenset({"level", "logger", "traceback"})
#: What Twisted's legacy C{log.msg} adds to an event, already in C{message}.
_LEGACY = frozenset({"message", "isError", "system", "time", "format", "failure", "why"})


def _plain(value: Any) -> Any:
    """
    C{value} as JSON can hold it: containers kept, everything else as text.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def flatten_event(event: LogEvent) -> dict[str, Any]:
    """
    One event as a flat JSON-ready object (see the module docstring).
    """
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "logger": event.get("log_namespace", "-"),
        "message": formatEvent(event) if event.get("log_format") is not None else "",
    }
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
        if not line["message"]:
            line["message"] = failure.getErrorMessage()
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY:
            continue
        name = f"field_{key}" if key in _RESERVED else key
        line[name] = _plain(value)
    return line


@implementer(ILogObserver)
class FlatJSONObserver:
    """
    Writes each event as one flat JSON object per line.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        self._out.write(json.dumps(flatten_event(event), ensure_ascii=False) + "\n")
        self._out.flush()


def make_observer(log_format: str, path: str | None, max_size: int, level: str = DEFAULT_LEVEL) -> ILogObserver:
    """
    @param log_format: C{"text"} or C{"json"}.
    @param path: a file rotated at C{max_size} bytes (ten old ones kept),
        or C{None} for stdout.
    @param level: the least severe level written (one of L{LEVELS});
        per-request lines are C{debug}.
    """
    out: IO[str]
    if path:
        directory, name = os.path.split(os.path.abspath(path))
        out = LogFile(  # type: ignore[assignment]
            name, directory, rotateLength=max_size, maxRotatedFiles=KEEP, defaultMode=0o600
        )
    else:
        out = sys.stdout
    observer = FlatJSONObserver(out) if log_format == "json" else textFileLogObserver(out)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.levelWithName(level))])


def observer() -> ILogObserver:
    """
    twistd's C{--logger tentacle.logs.observer}.
    """
    return make_observer(
        os.environ.get(FORMAT_VARIABLE, "text"),
        os.environ.get(FILE_VARIABLE) or None,
        int(os.environ.get(MAX_SIZE_VARIABLE, DEFAULT_MAX_SIZE)),
        os.environ.get(LEVEL_VARIABLE, DEFAULT_LEVEL),
    )
