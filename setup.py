"""
Only the optional compiled core of the codec lives here; everything else is
in setup.cfg.

The extension is optional: where it cannot be built (no C compiler, no
Python headers), the build says so and installs the pure-Python codec,
which gives identical results, only slower. TENTACLE_CODEC=python at build
time skips it on purpose.
"""

import hashlib
import os
from pathlib import Path

from setuptools import Extension, setup

SOURCE = Path("tentacle", "halibut", "_codec.c")


def extensions() -> list[Extension]:
    if os.environ.get("TENTACLE_CODEC", "").strip().lower() == "python" or not SOURCE.exists():
        return []
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()
    return [
        Extension(
            "tentacle.halibut._codec",
            [str(SOURCE)],
            define_macros=[("TENTACLE_CODEC_SOURCE", f'"{digest}"')],
            optional=True,
        )
    ]


setup(ext_modules=extensions())
