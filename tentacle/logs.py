"""
The agent's own log output: text or JSON lines, to stdout or to a file
rotated by size.  C{tentacle run} passes the choice to twistd as its
C{--logger}, through environment variables, since twistd calls the
observer factory without arguments.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

FORMAT_VARIABLE = "TENTACLE_LOG_FORMAT"
FILE_VARIABLE = "TENTACLE_LOG_FILE"
MAX_SIZE_VARIABLE = "TENTACLE_LOG_MAX_SIZE"
DEFAULT_MAX_SIZE = 10 * 1024 * 1024
KEEP = 10


def make_observer(log_format: str, path: str | None, max_size: int) -> ILogObserver:
    """
    @param log_format: C{"text"} or C{"json"}.
    @param path: a file rotated at C{max_size} bytes (ten old ones kept),
        or C{None} for stdout.
    """
    out: IO[str]
    if path:
        directory, name = os.path.split(os.path.abspath(path))
        out = LogFile(  # type: ignore[assignment]
            name, directory, rotateLength=max_size, maxRotatedFiles=KEEP, defaultMode=0o600
        )
    else:
        out = sys.stdout
    observer = jsonFileLogObserver(out) if log_format == "json" else textFileLogObserver(out)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(LogLevel.info)])


def observer() -> ILogObserver:
    """
    twistd's C{--logger tentacle.logs.observer}.
    """
    return make_observer(
        os.environ.get(FORMAT_VARIABLE, "text"),
        os.environ.get(FILE_VARIABLE) or None,
        int(os.environ.get(MAX_SIZE_VARIABLE, DEFAULT_MAX_SIZE)),
    )
