"""
Running the agent as a systemd service: the unit, and installing it.

Hardening is limited to options that cannot break a deployment script:
deployments legitimately install packages, write under /etc and /usr, use
sudo, and restart services, so C{ProtectSystem}, C{NoNewPrivileges},
C{PrivateTmp} and friends are deliberately left out.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import attrs

DEFAULT_UNIT_DIRECTORY = Path("/etc/systemd/system")
_SAFE_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ServiceError(Exception):
    """
    The service could not be installed or controlled; the message says what
    to do by hand.
    """


def check_instance(name: str) -> str:
    if not _SAFE_INSTANCE.fullmatch(name):
        raise ValueError(
            f"{name!r} cannot be an instance name: use letters, digits, '.', '_' and '-' (at most 64)"
        )
    return name


def unit_name(instance: str) -> str:
    return "tentacle.service" if instance == "default" else f"tentacle-{instance}.service"


#: What systemd itself accepts as a user name (or a numeric uid).
_SAFE_USER = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,30}[$]?|[0-9]{1,10})$")


def check_user(name: str) -> str:
    """
    @raise ServiceError: not a name systemd takes as C{User=}: it could
        otherwise add lines or specifiers to the unit.
    """
    if not _SAFE_USER.match(name):
        raise ServiceError(
            f"{name!r} cannot be a service user: use letters, digits, '_', '.' and '-' "
            "(starting with a letter or '_', at most 32), or a numeric uid"
        )
    return name


def check_unit_path(path: str) -> str:
    """
    @raise ServiceError: the path holds a control character (a newline
        would end the unit's line and start another), which no escaping
        of a unit file can carry safely everywhere.
    """
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise ServiceError(f"{path!r} holds a control character (a newline?); a service cannot use it")
    return path


def _quote(argument: str) -> str:
    """
    An ExecStart argument as systemd reads it back: C-style quoted when it
    is not plain, C{$} doubled (no variable is expanded) and C{%} doubled
    (no specifier is).
    """
    if not re.fullmatch(r"[A-Za-z0-9_@+=:,./-]+", argument):
        argument = '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return argument.replace("$", "$$").replace("%", "%%")


def _environment_value(value: str) -> str:
    """
    A value for C{Environment=}: quoted, C{%} doubled (C{$} is not
    expanded there).
    """
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


@attrs.frozen
class Unit:
    """
    One instance's unit: its home, the user it runs as, and how to start it.
    """

    instance: str
    home: Path
    user: str | None = None
    python: str = sys.executable

    @property
    def name(self) -> str:
        return unit_name(self.instance)

    def render(self) -> str:
        """
        The unit's text.

        @raise ServiceError: the user or a path cannot be written into a
            unit safely (see L{check_user}, L{check_unit_path}).
        """
        home = check_unit_path(str(self.home))
        python = check_unit_path(self.python)
        command = " ".join(_quote(a) for a in [python, "-m", "tentacle", "--home", home, "run"])
        user = f"User={check_user(self.user)}\n" if self.user else ""
        return (
            "[Unit]\n"
            f"Description=Tentacle deployment agent ({self.instance})\n"
            "After=network-online.target\n"
            "Wants=network-online.target\n"
            "\n"
            "[Service]\n"
            "Type=simple\n"
            f"{user}"
            f"Environment={_environment_value('TENTACLE_HOME=' + home)}\n"
            f"ExecStart={command}\n"
            "Restart=always\n"
            "RestartSec=5\n"
            "TimeoutStopSec=30\n"
            "LimitNOFILE=65536\n"
            "# Hardening that no deployment should notice:\n"
            "LockPersonality=yes\n"
            "RestrictRealtime=yes\n"
            "ProtectClock=yes\n"
            "ProtectKernelLogs=yes\n"
            "\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n"
        )


@attrs.frozen
class Systemd:
    """
    The unit folder and C{systemctl}; both replaceable for tests and for
    machines laid out differently.
    """

    unit_directory: Path = DEFAULT_UNIT_DIRECTORY
    systemctl: str | None = attrs.field(factory=lambda: shutil.which("systemctl"))
    #: Whether systemd is this machine's init (what sd_booted checks).
    booted: bool = attrs.field(factory=lambda: Path("/run/systemd/system").is_dir())
    run: Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"] = attrs.field(
        default=lambda argv: subprocess.run(list(argv), capture_output=True, text=True, check=False)
    )

    def _systemctl(self, *arguments: str) -> "subprocess.CompletedProcess[str]":
        if not self.systemctl or not self.booted:
            raise ServiceError(
                "this machine does not run systemd (systemctl not found, or systemd is not "
                "the init system): run 'tentacle run' under your init system instead"
            )
        result = self.run([self.systemctl, *arguments])
        if result.returncode != 0 and arguments[0] not in ("status", "is-active"):
            raise ServiceError(
                f"'systemctl {' '.join(arguments)}' failed: {(result.stderr or result.stdout).strip()}"
            )
        return result

    def install(self, unit: Unit) -> Path:
        """
        Write the unit, reload systemd, enable the unit.

        @raise ServiceError: with the unit's text and what to do by hand.
        """
        path = self.unit_directory / unit.name
        if not self.systemctl or not self.booted:
            raise ServiceError(
                "this machine does not run systemd (systemctl not found, or systemd is not the "
                "init system). Run 'tentacle run' under your init system, or on a systemd machine "
                f"save this unit as {path}:\n\n" + unit.render()
            )
        try:
            self.unit_directory.mkdir(parents=True, exist_ok=True)
            path.write_text(unit.render())
        except OSError as e:
            raise ServiceError(
                f"cannot write {path} ({e.strerror}); run as root, or save this unit as {path} "
                f"yourself and run 'systemctl daemon-reload && systemctl enable {unit.name}':\n\n"
                + unit.render()
            ) from None
        try:
            self._systemctl("daemon-reload")
            self._systemctl("enable", unit.name)
        except ServiceError as e:
            raise ServiceError(
                f"wrote {path}, but {e}; run 'systemctl daemon-reload && systemctl enable {unit.name}' by hand"
            ) from None
        return path

    def uninstall(self, unit: Unit) -> Path:
        path = self.unit_directory / unit.name
        if self.systemctl and self.booted:
            self.run([self.systemctl, "disable", "--now", unit.name])
        try:
            path.unlink()
        except FileNotFoundError:
            raise ServiceError(f"{path} does not exist: nothing to uninstall") from None
        except OSError as e:
            raise ServiceError(f"cannot remove {path} ({e.strerror}); remove it as root") from None
        if self.systemctl and self.booted:
            self.run([self.systemctl, "daemon-reload"])
        return path

    def control(self, action: str, unit: Unit) -> str:
        """
        start, stop, restart or status; the output of systemctl.
        """
        result = self._systemctl(action, unit.name)
        return (result.stdout or result.stderr).strip()
