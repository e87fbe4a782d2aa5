"""
Which core the Halibut codec runs on: the compiled one, or pure Python.

C{tentacle/halibut/_codec.c} is an optional C extension built by
C{pip install .}. It is an accelerator, never an authority: each of its
functions either returns exactly what the pure-Python code in
L{tentacle.halibut.bson} and L{tentacle.halibut.serializer} returns for the
same input, or C{None}, and then the pure-Python code runs and gives the
result or the precise error. So the pure-Python code is always there,
always tested, and the only source of errors.

The compiled core is used when it imports and was built from the C{_codec.c}
beside it (a stale build from an older source is ignored). Setting
C{TENTACLE_CODEC=python} in the environment turns it off.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

__all__ = ["core", "reason", "compiled", "register", "use", "implementation"]

#: The configured compiled core in use, or C{None} for pure Python.
core: ModuleType | None = None

#: Why L{core} is what it is, in words for logs and benchmarks.
reason: str = "pure Python: not loaded yet"

_configurators: list[Callable[[ModuleType], None]] = []
_SOURCE = Path(__file__).with_name("_codec.c")
_INTERFACE = 1


def compiled() -> tuple[ModuleType | None, str]:
    """
    The built core, if there is a usable one, and why (not).
    """
    try:
        from tentacle.halibut import _codec
    except ImportError as e:
        return None, f"pure Python: the compiled core is not built ({e})"
    problem = mismatch(_codec)
    if problem:
        return None, f"pure Python: {problem}"
    return _codec, "compiled core"


def mismatch(module: ModuleType, source: Path = _SOURCE) -> str | None:
    """
    Why C{module} must not be used with this Python code, or C{None}.
    """
    if getattr(module, "INTERFACE", None) != _INTERFACE:
        return "the compiled core has another interface version"
    built_from = getattr(module, "SOURCE_SHA256", "")
    if built_from and source.exists():
        if hashlib.sha256(source.read_bytes()).hexdigest() != built_from:
            return "the compiled core was built from an older _codec.c (rebuild it)"
    return None


def register(configure: Callable[[ModuleType], None]) -> None:
    """
    Called by each codec module once its own classes exist: C{configure}
    hands them to a core, now if one is in use and whenever L{use} installs
    another.
    """
    _configurators.append(configure)
    if core is not None:
        configure(core)


def use(module: ModuleType | None) -> ModuleType | None:
    """
    Run the codec on C{module} (a compiled core) or, with C{None}, on pure
    Python; returns the core that was in use. For tests and benchmarks that
    compare the two.
    """
    global core, reason
    previous = core
    if module is not None:
        for configure in _configurators:
            configure(module)
        reason = "compiled core"
    else:
        reason = "pure Python: chosen"
    core = module
    return previous


def implementation() -> str:
    """
    C{"compiled"} or C{"python"}, for reports.
    """
    return "python" if core is None else "compiled"


def _initial() -> None:
    global core, reason
    if os.environ.get("TENTACLE_CODEC", "").strip().lower() == "python":
        core, reason = None, "pure Python: TENTACLE_CODEC=python"
    else:
        core, reason = compiled()


_initial()
