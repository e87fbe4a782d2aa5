"""
Start a script in a session of its own with one C{posix_spawn}, instead of
spawning util-linux C{setsid}, which then execs the script.

Twisted starts a child with C{posix_spawnp} when it can, but offers no way
to ask for a new session; so every script cost two program starts (C{setsid},
with its C library and locale loading, then Bash).  glibc's C{posix_spawn}
can call C{setsid} in the child itself (C{POSIX_SPAWN_SETSID}, glibc 2.26),
and Python passes it on (C{os.posix_spawn(..., setsid=True)}).

L{SessionProcess} is Twisted's own process transport (pipes, reaping,
C{signalProcess}, everything) with only its spawning step replaced, through
the hook Twisted itself uses to choose C{posix_spawnp} over C{fork}
(C{Process._trySpawnInsteadOfFork}, there since Twisted 23.8).  That hook is
private, so L{available} checks that it is there before it is relied on;
without it (or without C{setsid} support in C{posix_spawn}) scripts go
through the C{setsid} program as before.  C{tests/test_process.py} checks
that this path is the one taken with the Twisted under test, so a Twisted
that drops the hook fails a test rather than slowing every script unseen.

It also lists the descriptors to close in the child more cheaply than
Twisted's generic path (which, per spawn, asks Python's L{signal} module
about all 64 signals through its enum conversion: about 60 us).
"""

from __future__ import annotations

import fcntl
import functools
import os
import signal
import sys
from typing import Any, Mapping, Sequence

import _signal  # the C module behind `signal`: the handlers as they are, no enums
from twisted.internet import process as _twisted_process
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ProcessProtocol


@functools.cache
def _hook_present() -> bool:
    """
    Twisted still spawns through the hook this module replaces, with the
    helper that turns a descriptor map into C{posix_spawn} file actions.
    """
    if not sys.platform.startswith("linux"):
        return False
    return (
        callable(getattr(_twisted_process.Process, "_trySpawnInsteadOfFork", None))
        and callable(getattr(_twisted_process, "_getFileActions", None))
        and callable(getattr(_twisted_process, "_listOpenFDs", None))
        and hasattr(os, "posix_spawn")
        and hasattr(os, "POSIX_SPAWN_CLOSE")
        and hasattr(os, "POSIX_SPAWN_DUP2")
    )


#: Set once C{posix_spawn} refused C{setsid} (a C library without
#: C{POSIX_SPAWN_SETSID}): later scripts go through the C{setsid} program.
_refused: list[bool] = []


def available(reactor: Any) -> bool:
    """
    Scripts for C{reactor} can be started in a new session by
    L{spawn_in_session}: a real POSIX reactor (not a test's fake, nor one
    told never to use C{posix_spawn}), Twisted's hook, and C{setsid} support
    in C{posix_spawn} (not yet refused).
    """
    if not isinstance(reactor, PosixReactorBase):
        return False
    if getattr(reactor, "_neverUseSpawn", False):
        return False
    return _hook_present() and not _refused


def _descriptors() -> list[tuple[int, bool]]:
    """
    Every open descriptor, with whether it closes on exec: Twisted's own
    listing, as for any child (C{/proc}, else C{/dev/fd}, else every number
    below the limit, where C{/proc} cannot be read: a chroot, a sandbox).
    """
    state = []
    for fd in _twisted_process._listOpenFDs():
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:  # the listing's own descriptor, closed since
            continue
        state.append((fd, bool(flags & fcntl.FD_CLOEXEC)))
    return state


def _ignored_signals() -> list[int]:
    """
    Signals this process ignores: the child gets their defaults back, as
    Twisted does for every child.
    """
    return [s for s in range(1, signal.NSIG) if _signal.getsignal(s) == _signal.SIG_IGN]


class SessionProcess(_twisted_process.Process):
    """
    Twisted's process transport, spawned as a session leader.
    """

    def _trySpawnInsteadOfFork(
        self,
        path: Any,
        uid: Any,
        gid: Any,
        executable: str,
        args: Sequence[str],
        environment: Mapping[str, str],
        kwargs: dict[str, Any],
    ) -> bool:
        # Never fall back to Twisted's fork here: that child would not
        # get a session of its own.
        if uid is not None or gid is not None or path is not None:
            raise ValueError("A session process takes no uid, gid or working folder")
        actions = _twisted_process._getFileActions(
            _descriptors(), kwargs["fdmap"], doClose=os.POSIX_SPAWN_CLOSE, doDup2=os.POSIX_SPAWN_DUP2
        )
        self.pid = os.posix_spawn(  # type: ignore[assignment]  # Twisted's stub says None
            executable,
            list(args),
            dict(environment),
            file_actions=actions,
            setsigdef=_ignored_signals(),
            setsid=True,
        )
        self.status = -1
        return True


class SetsidUnsupported(Exception):
    """
    This C library's C{posix_spawn} cannot make a session; use the C{setsid}
    program instead (and L{available} now says no).
    """


def spawn_in_session(
    reactor: Any,
    protocol: ProcessProtocol,
    executable: str,
    argv: Sequence[str],
    env: Mapping[str, str],
) -> IProcessTransport:
    """
    Start C{executable} (an absolute path) as the leader of a new session
    and process group, with pipes for its standard streams, as
    C{reactor.spawnProcess(protocol, executable, argv, env, usePTY=False)}
    would (in the agent's working folder).

    @raise SetsidUnsupported: the C library cannot; nothing was started.
    @raise OSError: the process could not be created.
    """
    try:
        process: IProcessTransport = SessionProcess(reactor, executable, list(argv), dict(env), None, protocol)
    except NotImplementedError as e:  # CPython built without POSIX_SPAWN_SETSID
        _refused.append(True)
        raise SetsidUnsupported(str(e)) from e
    return process
