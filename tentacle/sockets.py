"""
Socket options of Halibut connections, set by whoever owns the socket: the
listener on each accepted connection, the dialler on each one it makes.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.logger import Logger

from tentacle.halibut.connection import KeepAlive

__all__ = ["set_keepalive", "socket_of"]

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
    try:
        if keepalive is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)
            return True
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if _KEEPIDLE is not None:
            sock.setsockopt(socket.IPPROTO_TCP, _KEEPIDLE, keepalive.idle)
        if hasattr(socket, "TCP_KEEPINTVL"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
        if hasattr(socket, "TCP_KEEPCNT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
    except OSError as e:
        log.warn("Could not set TCP keepalive on a connection: {error}", error=str(e))
    return True
