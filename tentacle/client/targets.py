"""
Naming agents: C{host[:port][=THUMBPRINT]} on a command line, named targets
in a JSON file, and lists of targets in a text file.

A targets file maps names to agents::

    {"web01": {"host": "10.0.0.5", "port": 10933, "thumbprint": "8E9F..."}}

Every mistake in one is reported with the file, the entry and the field,
before any agent is contacted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tentacle.client.api import Target
from tentacle.client.connection import Pin
from tentacle.config import DEFAULT_POLLING_PORT, DEFAULT_PORT
from tentacle.errors import describe_os_error

_FIELDS = ("host", "port", "thumbprint")


class TargetError(ValueError):
    """
    A target, a targets file or a target list is wrong; the message names
    the file, the entry and the field.
    """


def parse_address(text: str) -> tuple[str, int]:
    """
    C{host}, C{host:port}, C{[v6]} or C{[v6]:port}.

    @raise TargetError: not one of those.
    """
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        number = -1
    if not host or not 0 < number < 65536:
        raise TargetError(f"{text!r} is not host[:port] or a named target")
    return host, number


def _pin(thumbprint: str, where: str) -> Pin:
    try:
        return Pin(thumbprint)
    except ValueError as e:
        raise TargetError(f"{where}: {e}") from None


def parse_target(text: str, named: Mapping[str, Target], pin: Pin | None = None) -> Target:
    """
    A target: a name from the targets file or C{host[:port]}, either
    followed by C{=THUMBPRINT} to pin that agent alone.

    @param pin: the pin for targets that name none (C{--thumbprint}).
    """
    address, equals, thumbprint = text.rpartition("=") if "=" in text else (text, "", "")
    own = _pin(thumbprint, f"the thumbprint of {address}") if equals else None
    if address.lower().startswith("poll://"):
        # A polling agent: reached through a hub (see via_hub), pinned by
        # its own thumbprint, which the hub checks.
        try:
            return Target.polling(address, own or pin)
        except ValueError as e:
            raise TargetError(f"{address!r}: {e}") from None
    if address in named:
        target = named[address]
        if own is not None or target.pin is None:
            return Target(target.host, target.port, own or pin, target.proxy)
        return target
    host, port = parse_address(address)
    return Target(host, port, own or pin)


def via_hub(target: Target, hub: str | None, hub_pin: Pin | None) -> Target:
    """
    A polling target (C{poll://ID/}) as reached through the hub at C{hub}
    (C{host[:port]}, port 10943 by default), pinned by C{hub_pin}; any other
    target as it is.

    @raise TargetError: a polling target without a hub.
    """
    if target.subscription is None:
        return target
    if hub is None or hub_pin is None:
        raise TargetError(
            f"{target.subscription} is a polling agent, reached through a hub: give --hub HOST[:PORT] "
            "and --hub-thumbprint"
        )
    if hub.startswith("[") or hub.count(":") == 1:
        host, port = parse_address(hub)
    else:
        host, port = hub, DEFAULT_POLLING_PORT
    return Target(host, port, hub_pin, target.proxy, subscription=target.subscription, agent_pin=target.pin)


def load_targets_file(path: Path, required: bool) -> dict[str, Target]:
    """
    The named targets in C{path}.

    @param required: whether a missing file is an error (it was named on
        the command line) or means no names (the default file).
    @raise TargetError: the file is missing (when required), unreadable,
        not JSON, or an entry is wrong.
    """
    path = path.expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise TargetError(f"the targets file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        reason = describe_os_error(e, path) if isinstance(e, OSError) else f"{path} is not UTF-8 text"
        raise TargetError(f"cannot read the targets file: {reason}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise TargetError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TargetError(
            f'{path}: expected an object of named targets, {{"name": {{"host": ..., "port": ..., '
            f'"thumbprint": ...}}}}, not a {type(data).__name__}'
        )
    return {name: _entry(path, name, entry) for name, entry in data.items()}


def _entry(path: Path, name: str, entry: Any) -> Target:
    where = f"{path}: target {name!r}"
    if not isinstance(entry, dict):
        raise TargetError(f"{where}: expected an object with host, port and thumbprint, not {entry!r}")
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        raise TargetError(f"{where}: unknown field {unknown[0]!r} (the fields are host, port and thumbprint)")
    host = entry.get("host")
    if not isinstance(host, str) or not host:
        raise TargetError(f"{where}: field 'host' is {'missing' if host is None else 'not a host name'}")
    port = entry.get("port", DEFAULT_PORT)
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise TargetError(f"{where}: field 'port' must be a number from 1 to 65535, not {port!r}")
    thumbprint = entry.get("thumbprint")
    if thumbprint is not None and not isinstance(thumbprint, str):
        raise TargetError(f"{where}: field 'thumbprint' must be a string, not {thumbprint!r}")
    pin = _pin(thumbprint, f"{where}: field 'thumbprint'") if thumbprint else None
    return Target(host, port, pin)


def read_target_list(path: Path) -> list[str]:
    """
    The targets listed in a text file, one a line; blank lines and
    C{#} comments are ignored.
    """
    try:
        lines = path.expanduser().read_text().splitlines()
    except OSError as e:
        raise TargetError(f"cannot read the target list {path}: {describe_os_error(e, 'it')}") from None
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
