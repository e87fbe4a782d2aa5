"""
Figures the reliability tests record for C{docs/reliability.md}.

A test calls L{record} once its assertions have passed.  Nothing is written
unless C{TENTACLE_RELIABILITY_FIGURES} names a file, which
C{tools/reliability_report.py} sets before it runs the suite; each record is
one JSON line there.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ENVIRONMENT_VARIABLE = "TENTACLE_RELIABILITY_FIGURES"


def record(case: SynchronousTestCase, area: str, injects: str, result: str, **figures: Any) -> None:
    """
    @param area: the report's section ("network", "crash", ...).
    @param injects: the fault or input, in a few words.
    @param result: what the test established, in a few words.
    @param figures: counts for the table (faults survived, inputs tried,
        connections held, seconds to detect, ...).
    """
    path = os.environ.get(ENVIRONMENT_VARIABLE)
    if not path:
        return
    line = json.dumps(
        {"test": case.id(), "area": area, "injects": injects, "result": result, "figures": figures}
    )
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
