"""
Named instances: a name for a home, as Tentacle has them.

The home stays the unit of state; an instance is only a name that points at
one, kept in a small registry so that C{tentacle --instance web run} finds
its home, and so that several agents on one machine can be listed.  The
registry is a folder of JSON files, one per instance
(C{<registry>/instances/<name>.json} holding C{{"name": ..., "home": ...}}):

  - as root, C{/etc/tentacle};
  - otherwise C{$XDG_CONFIG_HOME/tentacle} (C{~/.config/tentacle});
  - anywhere else when C{$TENTACLE_REGISTRY} names a folder (for tests, and
    for machines laid out differently).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

import attrs

from tentacle.fsutil import atomic_write

REGISTRY_ENVIRONMENT_VARIABLE = "TENTACLE_REGISTRY"
SYSTEM_REGISTRY = Path("/etc/tentacle")
SYSTEM_HOMES = Path("/var/lib/tentacle")
#: The heartbeat a running agent touches every 10 seconds (see
#: L{tentacle.service}); an instance whose heartbeat is this fresh is running.
HEARTBEAT_FILE = "Logs/heartbeat"
FRESH_HEARTBEAT = 60.0


class InstanceError(Exception):
    """
    No such instance, or one that cannot be created or removed.
    """


def default_registry(environ: Mapping[str, str] = os.environ, is_root: bool | None = None) -> Path:
    """
    Where instances are registered: C{$TENTACLE_REGISTRY}, else
    C{/etc/tentacle} for root, else C{~/.config/tentacle}.
    """
    if environ.get(REGISTRY_ENVIRONMENT_VARIABLE):
        return Path(environ[REGISTRY_ENVIRONMENT_VARIABLE]).expanduser().absolute()
    if is_root if is_root is not None else os.geteuid() == 0:
        return SYSTEM_REGISTRY
    config = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".config")
    return Path(config).expanduser().absolute() / "tentacle"


def default_instance_home(
    name: str, environ: Mapping[str, str] = os.environ, is_root: bool | None = None
) -> Path:
    """
    Where C{create-instance} puts a home when none is given:
    C{/var/lib/tentacle/<name>} for root, else
    C{$XDG_DATA_HOME/tentacle/<name>} (C{~/.local/share/tentacle/<name>}).
    """
    if is_root if is_root is not None else os.geteuid() == 0:
        return SYSTEM_HOMES / name
    data = environ.get("XDG_DATA_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".local" / "share")
    return Path(data).expanduser().absolute() / "tentacle" / name


@attrs.frozen
class Instance:
    """
    A registered instance: its name and its home.
    """

    name: str
    home: Path

    def heartbeat_age(self, now: Callable[[], float] = time.time) -> float | None:
        """
        Seconds since the running agent last proved it is alive, or
        C{None} when no agent is running in this home.
        """
        try:
            return max(0.0, now() - (self.home / HEARTBEAT_FILE).stat().st_mtime)
        except OSError:
            return None

    def running(self, now: Callable[[], float] = time.time) -> bool:
        age = self.heartbeat_age(now)
        return age is not None and age <= FRESH_HEARTBEAT


@attrs.frozen
class InstanceRegistry:
    """
    The registry folder; nothing is cached, so two commands never disagree.

    @param check_name: validates a name (raises C{ValueError}); the
        systemd unit name is made from it, so it is kept strict.
    """

    directory: Path
    check_name: Callable[[str], str] = attrs.field(factory=lambda: _check_name)

    @property
    def _folder(self) -> Path:
        return self.directory / "instances"

    def _path(self, name: str) -> Path:
        try:
            name = self.check_name(name)
        except ValueError as e:
            raise InstanceError(str(e)) from None
        return self._folder / f"{name.lower()}.json"

    def get(self, name: str) -> Instance:
        """
        @raise InstanceError: there is no instance of that name.
        """
        path = self._path(name)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            known = ", ".join(i.name for i in self) or "none"
            raise InstanceError(
                f"there is no instance named {name!r} in {self.directory} (instances: {known}); "
                "create it with 'tentacle create-instance NAME'"
            ) from None
        except (OSError, ValueError) as e:
            raise InstanceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        return _instance(path, data)

    def __iter__(self) -> Iterator[Instance]:
        try:
            paths = sorted(self._folder.glob("*.json"))
        except OSError:
            return
        for path in paths:
            try:
                yield _instance(path, json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, InstanceError):
                continue

    def create(self, name: str, home: Path) -> Instance:
        """
        Register C{name} for C{home}, creating the home (0700) if needed.

        @raise InstanceError: the name is taken, or the home already belongs
            to another instance.
        """
        path = self._path(name)
        if path.exists():
            raise InstanceError(
                f"an instance named {name!r} already exists (home {self.get(name).home}); "
                f"remove it first with 'tentacle delete-instance {name}'"
            )
        home = home.expanduser().absolute()
        for other in self:
            if other.home == home:
                raise InstanceError(f"{home} is already the home of the instance {other.name!r}")
        try:
            home.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._folder.mkdir(mode=0o755, parents=True, exist_ok=True)
            text = json.dumps({"name": name, "home": str(home)}, indent=2) + "\n"
            atomic_write(path, text.encode("utf-8"), mode=0o644)
        except OSError as e:
            raise InstanceError(
                f"cannot create the instance {name!r}: {e.filename or ''}: {e.strerror}"
            ) from None
        return Instance(name, home)

    def delete(self, name: str) -> Instance:
        """
        Forget C{name}; its home is left as it is.
        """
        instance = self.get(name)
        try:
            self._path(name).unlink()
        except OSError as e:
            raise InstanceError(f"cannot remove the instance {name!r}: {e.strerror}") from None
        return instance


def _check_name(name: str) -> str:
    from tentacle.systemd import check_instance

    return check_instance(name)


def _instance(path: Path, data: object) -> Instance:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("home"), str):
        raise InstanceError(f"{path} is not an instance entry (expected {{\"name\": ..., \"home\": ...}})")
    return Instance(data["name"], Path(data["home"]))
