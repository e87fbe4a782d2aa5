"""
Both cores of the codec under test: the pure-Python code and the compiled
core (C{tentacle/halibut/_codec.c}).

A checkout run from its own folder imports C{tentacle} from the source tree,
where the compiled core exists only after C{pip install -e .}; a plain
C{pip install .} puts it in site-packages instead. So when it is not
importable here, L{compiled_core} builds it from the source once per test
run, into a temporary folder, with the same C{setup.py}: the compiled core
is tested wherever a C compiler is, not only where it happened to be built.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, TypeVar

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tentacle.halibut import accel

CHECKOUT = Path(__file__).resolve().parent.parent

_built: tuple[ModuleType | None, str] | None = None

T = TypeVar("T", bound=type)


def build(into: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{setup.py build_ext} from this checkout with C{env} added, writing
    only under C{into}.
    """
    import os

    return subprocess.run(
        [
            sys.executable,
            "setup.py",
            "--quiet",
            "build_ext",
            "--build-lib",
            str(into / "lib"),
            "--build-temp",
            str(into / "temp"),
        ],
        cwd=CHECKOUT,
        # Built as asked, whatever this run's own TENTACLE_CODEC says.
        env={**{k: v for k, v in os.environ.items() if k != "TENTACLE_CODEC"}, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def compile_directly(into: Path) -> subprocess.CompletedProcess[str]:
    """
    Build the core with the compiler and flags Python was built with, for an
    interpreter without setuptools (Python 3.12's venvs have none).
    """
    import hashlib
    import shlex
    import sysconfig

    source = CHECKOUT / "tentacle" / "halibut" / "_codec.c"
    target = into / "lib" / "tentacle" / "halibut"
    target.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    config = sysconfig.get_config_vars()
    command = [
        *shlex.split(config.get("CC") or "cc"),
        *shlex.split(config.get("CCSHARED") or "-fPIC"),
        "-shared",
        "-O2",
        f"-I{sysconfig.get_paths()['include']}",
        f'-DTENTACLE_CODEC_SOURCE="{digest}"',
        str(source),
        "-o",
        str(target / ("_codec" + (config.get("EXT_SUFFIX") or ".so"))),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def built_module(into: Path) -> Path | None:
    found = sorted((into / "lib" / "tentacle" / "halibut").glob("_codec*.so"))
    return found[0] if found else None


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("tentacle.halibut._codec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compiled_core() -> ModuleType:
    """
    The compiled core, built for this run if need be.

    @raise SkipTest: it cannot be built here (no C compiler or headers).
    """
    global _built
    if _built is None:
        module, why = accel.compiled()
        if module is None:
            work = Path(tempfile.mkdtemp(prefix="tentacle-codec-core-"))
            atexit.register(shutil.rmtree, work, True)
            result = build(work)
            if built_module(work) is None and "setuptools" in result.stderr:
                result = compile_directly(work)
            path = built_module(work)
            if path is None:
                why = f"the compiled core could not be built here: {result.stderr[-500:]}"
            else:
                module = load(path)
                problem = accel.mismatch(module)
                if problem:
                    module, why = None, problem
        _built = (module, why)
    module, why = _built
    if module is None:
        raise SkipTest(why)
    return module


class _OnCore(SynchronousTestCase):
    def runOn(self, core: ModuleType | None) -> None:
        previous = accel.use(core)
        self.addCleanup(accel.use, previous)


class OnPurePython(_OnCore):
    """
    Mixin: every test of the class runs with the compiled core turned off.
    """

    def setUp(self) -> None:
        super().setUp()
        self.runOn(None)


class OnCompiledCore(_OnCore):
    """
    Mixin: every test of the class runs on the compiled core.
    """

    def setUp(self) -> None:
        super().setUp()
        self.runOn(compiled_core())


def _delegate(test: Callable[..., Any]) -> Callable[..., Any]:
    def run(self: SynchronousTestCase) -> Any:
        return test(self)

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


def on_both_cores(namespace: dict[str, Any], *names: str) -> None:
    """
    Replace each test class C{names} of a test module's C{namespace} by two:
    one on pure Python (C{<name>OnPurePython}), one on the compiled core
    (C{<name>OnCompiledCore}).

    Hypothesis tests are given a method of their own in each, since
    hypothesis refuses one test function run from several classes.
    """
    for name in names:
        cls = namespace.pop(name)
        for mixin, suffix in ((OnPurePython, "OnPurePython"), (OnCompiledCore, "OnCompiledCore")):
            body: dict[str, Any] = {"__module__": cls.__module__, "__doc__": cls.__doc__}
            for attribute in dir(cls):
                test = getattr(cls, attribute, None) if attribute.startswith("test") else None
                if getattr(test, "is_hypothesis_test", False):
                    body[attribute] = _delegate(test)
            namespace[name + suffix] = type(name + suffix, (mixin, cls), body)
