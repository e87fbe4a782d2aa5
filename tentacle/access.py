"""
Whether another user can reach a file, judged from permission bits: a
service unit that points at an interpreter its user cannot read fails on
every start, far from the command that installed it.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

import attrs


@attrs.frozen
class Account:
    """
    A user as the kernel sees one: uid and every group.
    """

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def named(cls, name: str) -> Account:
        """
        @raise KeyError: there is no such user.
        """
        entry = pwd.getpwnam(name)
        groups = {entry.pw_gid} | {g.gr_gid for g in grp.getgrall() if name in g.gr_mem}
        return cls(name, entry.pw_uid, frozenset(groups))

    def may(self, path: Path, want: int) -> bool:
        """
        Whether the mode bits give this account C{want} (a mix of
        C{os.R_OK}, C{os.W_OK}, C{os.X_OK}) on C{path}; ACLs are not read.
        """
        if self.uid == 0:
            return True
        st = path.stat()
        if st.st_uid == self.uid:
            shift = 6
        elif st.st_gid in self.gids:
            shift = 3
        else:
            shift = 0
        granted = (stat.S_IMODE(st.st_mode) >> shift) & 0o7
        return granted & want == want


def unreachable(path: Path, account: Account, want: int = os.R_OK) -> Path | None:
    """
    The first folder on the way to C{path} that C{account} cannot enter,
    or C{path} itself when it lacks C{want} there; C{None} when all is well.
    Symbolic links are followed, and the folders on the way to their
    targets checked too.
    """
    path = Path(os.path.abspath(path))
    seen: set[Path] = set()
    for step in _steps(path, seen):
        if not account.may(step, os.X_OK):
            return step
    try:
        return None if account.may(path, want) else path
    except FileNotFoundError:
        return path


def _steps(path: Path, seen: set[Path]) -> list[Path]:
    """
    Every folder traversed to reach C{path}, through symbolic links.
    """
    steps: list[Path] = []
    current = Path("/")
    for part in path.parts[1:]:
        steps.append(current)
        candidate = current / part
        if candidate.is_symlink() and candidate not in seen:
            seen.add(candidate)
            target = Path(os.path.join(current, os.readlink(candidate)))
            steps += _steps(Path(os.path.normpath(target)), seen)
            current = candidate.resolve()
        else:
            current = candidate
    return steps
