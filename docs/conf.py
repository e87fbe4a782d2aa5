import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tentacle import __version__  # noqa: E402

project = "tentacle"
author = "the tentacle developers"
release = version = __version__
extensions = ["sphinx.ext.autodoc"]
exclude_patterns = ["_build", "examples"]
html_theme = "alabaster"
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}

# The code's docstrings are epytext (as Twisted's); turn its markup into
# reStructuredText for autodoc.
_FIELDS = re.compile(r"^(\s*)@(param|ivar|type|raise|return|rtype|cvar|var|keyword|see|note)\b\s*([^:]*):?(.*)$")
_INLINE = re.compile(r"([CLIBU])\{([^{}]*)\}")
_ROLES = {"C": "``{}``", "L": ":py:obj:`{}`", "I": "*{}*", "B": "**{}**", "U": "{}"}
_FIELD_NAMES = {"return": "returns", "rtype": "rtype", "see": "seealso", "note": "note"}


def _inline(text: str) -> str:
    return _INLINE.sub(lambda m: _ROLES[m.group(1)].format(m.group(2)) if m.group(2) else "", text)


def _epytext(app, what, name, obj, options, lines):  # type: ignore[no-untyped-def]
    converted = []
    for line in lines:
        match = _FIELDS.match(line)
        if match:
            indent, field, argument, rest = match.groups()
            field = _FIELD_NAMES.get(field, field)
            argument = argument.strip()
            if field in ("returns", "rtype", "seealso", "note"):
                line = f"{indent}:{field}: {argument}{rest}".rstrip()
            else:
                line = f"{indent}:{field} {argument}:{rest}".rstrip()
        converted.append(_inline(line))
    lines[:] = converted


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("autodoc-process-docstring", _epytext)
