"""
Socket options of Halibut connections, set by whoever owns the socket: the
listener on each accepted connection, the dialler on each one it makes.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.logger import Logger

from tentacle.halibut.connection import KeepAlive

__all__ = ["ListeningKeepAlive", "has_keepalive", "set_keepalive", "set_socket_keepalive", "socket_of"]

log = Logger()

#: The idle-time option: TCP_KEEPIDLE on Linux, TCP_KEEPALIVE on macOS.
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", getattr(socket, "TCP_KEEPALIVE", None))


def socket_of(transport: Any) -> socket.socket | None:
    """
    The OS socket under a transport: TCP itself, or TLS (or a proxy
    tunnel) over TCP; C{None} for a transport without one (tests' fakes).
    """
    link = transport
    for _ in range(4):
        if link is None:
            return None
        get_handle = getattr(link, "getHandle", None)
        if callable(get_handle):
            handle = get_handle()
            if isinstance(handle, socket.socket):
                return handle
        link = getattr(link, "transport", None)
    return None


def set_keepalive(transport: Any, keepalive: KeepAlive | None) -> bool:
    """
    Turn TCP keepalive on with C{keepalive}'s timing, or off for C{None}.

    @return: whether there was a TCP socket to set it on.  A failure to set
        an option is logged, never raised: the connection works without.
    """
    sock = socket_of(transport)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    set_socket_keepalive(sock, keepalive)
    return True


def set_socket_keepalive(sock: socket.socket, keepalive: KeepAlive | None) -> None:
    """
    L{set_keepalive} on a socket itself (a connection's, or a listening
    socket's, whose accepted sockets inherit the options on Linux).
    """
    try:
        if keepalive is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if _KEEPIDLE is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _KEEPIDLE, keepalive.idle)
        if hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
        if hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
    except OSError as e:
        log.warn("Could not set TCP keepalive on a connection: {error}", error=str(e))


def has_keepalive(sock: socket.socket, keepalive: KeepAlive | None) -> bool:
    """
    Whether the socket's keepalive options are C{keepalive}'s (off, for
    C{None}), as the kernel holds them.
    """
    try:
        on = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        if keepalive is None or not on:
            return keepalive is None and not on
        if _KEEPIDLE is not None and sock.getsockopt(socket.IPPROTO_TCP, _KEEPIDLE) != keepalive.idle:
            return False
        if hasattr(socket, "TCP_KEEPINTVL") and (
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) != keepalive.interval
        ):
            return False
        if hasattr(socket, "TCP_KEEPCNT") and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) != keepalive.count:
            return False
    except OSError:
        return False
    return True


class ListeningKeepAlive:
    """
    Keepalive for every connection a listening port accepts, at the cost
    of none of their system calls where it can be.

    Linux (and the BSDs) give an accepted socket the listening socket's
    keepalive options; so they are set once on the listening socket, and
    the next accepted socket is read back to see that they came with it.
    From then on, an accepted socket is left as it comes.  Where they did
    not (another kernel, a port that is not a TCP port of Twisted's), each
    connection gets them set, as before.
    """

    def __init__(self) -> None:
        # Listening port -> (keepalive, inherited?, accepted sockets left to
        # look at before giving up on inheritance).
        self._ports: dict[Any, tuple[KeepAlive | None, bool, int]] = {}

    def apply(self, transport: Any, keepalive: KeepAlive | None) -> None:
        """
        Give the connection under C{transport} (TLS over TCP, or TCP)
        C{keepalive}'s options.
        """
        tcp = getattr(transport, "transport", transport)
        port = getattr(tcp, "server", None)
        listening = getattr(port, "socket", None)
        if not isinstance(listening, socket.socket) or listening.family not in (socket.AF_INET, socket.AF_INET6):
            set_keepalive(transport, keepalive)
            return
        known = self._ports.get(port)
        if known is None or known[0] != keepalive:
            set_socket_keepalive(listening, keepalive)
            self._ports[port] = (keepalive, False, INHERITANCE_CHECKS)
        else:
            _, inherited, checks = known
            if inherited:
                return
            if checks:
                # Sockets the kernel had accepted before the listening socket
                # was set come first, without the options: look a few times.
                sock = socket_of(transport)
                if sock is not None and has_keepalive(sock, keepalive):
                    self._ports[port] = (keepalive, True, 0)
                    return
                self._ports[port] = (keepalive, False, checks - 1)
        set_keepalive(transport, keepalive)


#: Accepted sockets read back for the listening socket's keepalive options
#: before each connection's are set for good.
INHERITANCE_CHECKS = 16
