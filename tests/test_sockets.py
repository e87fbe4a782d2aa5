"""
Keepalive on accepted sockets through the listening socket
(L{tentacle.sockets.ListeningKeepAlive}), read back from real sockets.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tentacle.halibut.connection import KeepAlive
from tentacle.sockets import INHERITANCE_CHECKS, ListeningKeepAlive, has_keepalive

if not hasattr(socket, "TCP_KEEPIDLE"):  # pragma: no cover
    skip = "TCP_KEEPIDLE is Linux's"


class _Port:
    """
    What Twisted's TCP port shows: its listening socket.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


class _TCP:
    """
    What Twisted's accepted TCP transport shows: its port, and its socket.
    """

    def __init__(self, port: _Port, sock: socket.socket) -> None:
        self.server = port
        self._sock = sock

    def getHandle(self) -> socket.socket:
        return self._sock


class _TLS:
    def __init__(self, tcp: _TCP) -> None:
        self.transport = tcp


class ListeningKeepAliveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.listening = socket.socket()
        self.addCleanup(self.listening.close)
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen(50)
        self.port = _Port(self.listening)
        self.keepalive = ListeningKeepAlive()

    def accept(self) -> tuple[Any, socket.socket]:
        client = socket.create_connection(self.listening.getsockname())
        self.addCleanup(client.close)
        accepted, _ = self.listening.accept()
        self.addCleanup(accepted.close)
        return _TLS(_TCP(self.port, accepted)), accepted

    def test_every_accepted_socket_has_the_options(self) -> None:
        wanted = KeepAlive(31, 7, 4)
        sockets = []
        for _ in range(5):
            transport, sock = self.accept()
            self.keepalive.apply(transport, wanted)
            sockets.append(sock)
        self.assertTrue(has_keepalive(self.listening, wanted))
        self.assertEqual([has_keepalive(s, wanted) for s in sockets], [True] * 5)

    def test_off(self) -> None:
        for _ in range(3):
            transport, sock = self.accept()
            self.keepalive.apply(transport, None)
            self.assertTrue(has_keepalive(sock, None))
        self.assertFalse(bool(self.listening.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)))

    def test_a_changed_setting_is_set_again(self) -> None:
        first, second = KeepAlive(31, 7, 4), KeepAlive(20, 5, 3)
        for _ in range(2):
            transport, _ = self.accept()
            self.keepalive.apply(transport, first)
        transport, sock = self.accept()
        self.keepalive.apply(transport, second)
        self.assertTrue(has_keepalive(sock, second))
        self.assertTrue(has_keepalive(self.listening, second))

    def test_sockets_without_the_options_get_them_set(self) -> None:
        """
        A socket that did not inherit the options (accepted by the kernel
        before the listening socket was set, or a kernel that does not
        hand them on) gets them set itself; after a few such, every socket
        does.
        """
        wanted = KeepAlive(31, 7, 4)
        transport, _ = self.accept()
        self.keepalive.apply(transport, wanted)
        self.listening.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)  # as if not inherited
        sockets = []
        for _ in range(INHERITANCE_CHECKS + 3):
            transport, sock = self.accept()
            self.keepalive.apply(transport, wanted)
            sockets.append(sock)
        self.assertEqual([has_keepalive(s, wanted) for s in sockets], [True] * len(sockets))

    def test_not_a_tcp_port(self) -> None:
        """
        A transport without a listening socket under it (a proxy, a test's
        fake) gets the options set on its own socket.
        """
        client = socket.create_connection(self.listening.getsockname())
        self.addCleanup(client.close)
        accepted, _ = self.listening.accept()
        self.addCleanup(accepted.close)
        wanted = KeepAlive(31, 7, 4)
        self.keepalive.apply(_TLS(_TCP(_Port(None), accepted)), wanted)  # type: ignore[arg-type]
        self.assertTrue(has_keepalive(accepted, wanted))
        self.assertFalse(has_keepalive(self.listening, wanted))
