"""
Variable substitution in a release's files, in Octopus's syntax:
C{#{Name}} becomes the variable's value, C{##{Name}} is an escape that
becomes a literal C{#{Name}}, and a placeholder naming no known variable
is left exactly as it was (so a file can hold placeholders for someone
else, and a typo stays visible).

Files are rewritten through a temp file and a rename: never in place, so a
file hard-linked elsewhere, or being read while we write, is never changed
underneath its other users.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Mapping, Sequence

from tentacle.fsutil import atomic_write

_PLACEHOLDER = re.compile(r"#(#?)\{([^{}\r\n]*)\}")


class SubstitutionError(Exception):
    """
    A file to substitute is outside the release or not a regular file.
    """


def substitute_text(text: str, variables: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        escaped, name = match.group(1), match.group(2)
        if escaped:
            return "#{" + name + "}"
        value = variables.get(name.strip())
        return match.group(0) if value is None else value

    return _PLACEHOLDER.sub(replace, text)


def substitute_file(path: Path, variables: Mapping[str, str]) -> bool:
    """
    Substitute one file; whether it changed.  Bytes that are not UTF-8 are
    carried over untouched.
    """
    original = path.read_bytes()
    text = original.decode("utf-8", "surrogateescape")
    changed = substitute_text(text, variables).encode("utf-8", "surrogateescape")
    if changed == original:
        return False
    atomic_write(path, changed, mode=stat.S_IMODE(path.stat().st_mode), durable=False)
    return True


def files_to_substitute(folder: Path, patterns: Sequence[str]) -> tuple[list[Path], list[str]]:
    """
    The files that C{patterns} (relative globs, C{**} included) name inside
    C{folder}, resolved; and the patterns that matched nothing.

    @raise SubstitutionError: a pattern or a match leaves the folder, or a
        match is not a regular file.
    """
    root = os.path.realpath(folder)
    found: list[Path] = []
    unmatched: list[str] = []
    for pattern in patterns:
        parts = pattern.replace("\\", "/").split("/")
        if not pattern or pattern.startswith(("/", "\\")) or ".." in parts:
            raise SubstitutionError(f"{pattern!r} must be a path inside the release (relative, no '..')")
        matches = sorted(folder.glob(pattern.replace("\\", "/")))
        if not matches:
            unmatched.append(pattern)
        for match in matches:
            real = os.path.realpath(match)
            if not real.startswith(root + os.sep):
                raise SubstitutionError(f"{match.relative_to(folder)} resolves outside the release ({real})")
            if match.is_dir():
                continue
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise SubstitutionError(f"{match.relative_to(folder)} is not a regular file")
            if Path(real) not in found:
                found.append(Path(real))
    return found, unmatched
