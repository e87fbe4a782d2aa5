"""
A fault-injecting TCP forwarder for tests, after Halibut's
C{Octopus.TestPortForwarder}: put it between a client and the agent and it
relays bytes both ways, and on demand adds latency, limits bandwidth,
holds back the last byte of each write, pauses (black-holes) and resumes connections, and kills
existing or new connections with a TCP reset.

    forwarder = FaultForwarder(reactor, agent_port, latency=0.02)
    port = forwarder.start()
    ...
    forwarder.pause_existing()        # a black-holed link: nothing moves, no close seen
    forwarder.resume_existing()
    forwarder.kill_existing()         # RST both ends of every open connection
    forwarder.kill_new = True         # RST every connection as it arrives
    forwarder.watch(callback)         # callback(link, direction, data) before each relay

It runs in the test's reactor, so a test can act at an exact moment: a
watcher sees bytes before they are relayed, and a log observer on the agent
runs before the agent's reply has left its socket buffer.
"""

from __future__ import annotations

import enum
import socket
import struct
from collections import deque
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

_LINGER_RESET = struct.pack("ii", 1, 0)
#: Bytes a link holds in its delay queue before it stops reading the sender.
BACKLOG = 256 * 1024


class Direction(enum.Enum):
    UPSTREAM = "client to agent"
    DOWNSTREAM = "agent to client"


Watcher = Callable[["Link", Direction, bytes], None]


def _reset(transport: Any) -> None:
    """
    Close with RST rather than FIN, as a killed link or a crashed host would.
    """
    handle = getattr(transport, "getHandle", lambda: None)()
    if isinstance(handle, socket.socket):
        try:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abortConnection()


@implementer(IPushProducer)
class _Side(Protocol):
    """
    One end of a link.  It reads only while the link runs and the other
    end's send buffer has room (it is registered there as the producer).
    """

    def __init__(self, link: Link, direction: Direction) -> None:
        self.link = link
        #: the direction of the bytes this side reads
        self.direction = direction
        #: the other end's send buffer is full
        self.throttled = False
        #: too much of what this side read is still queued for delivery
        self.backlogged = False
        self.lost = False

    def connectionMade(self) -> None:
        self.link.side_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.link.received(self.direction, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.link.side_lost(self)

    # IPushProducer, for the other end's transport
    def pauseProducing(self) -> None:
        self.throttled = True
        self.update()

    def resumeProducing(self) -> None:
        self.throttled = False
        self.update()

    def stopProducing(self) -> None:
        pass

    def update(self) -> None:
        if self.transport is None or self.lost:
            return
        reading = self.link.running and not self.throttled and not self.backlogged
        if reading:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        else:
            self.transport.pauseProducing()  # type: ignore[attr-defined]


class Link:
    """
    One forwarded connection: the client's end and the agent's end.

    @ivar bytes_up: bytes relayed from the client to the agent.
    @ivar bytes_down: bytes relayed from the agent to the client.
    """

    def __init__(self, forwarder: FaultForwarder) -> None:
        self.forwarder = forwarder
        self.client = _Side(self, Direction.UPSTREAM)
        self.agent = _Side(self, Direction.DOWNSTREAM)
        self.paused = False
        self.killed = False
        self.closed = False
        self.bytes_up = 0
        self.bytes_down = 0
        self._agent_connected = False
        self.connector: Any = None
        self._queues: dict[Direction, deque[tuple[float, bytes]]] = {
            Direction.UPSTREAM: deque(),
            Direction.DOWNSTREAM: deque(),
        }
        self._timers: dict[Direction, IDelayedCall | None] = {
            Direction.UPSTREAM: None,
            Direction.DOWNSTREAM: None,
        }
        self._ended: set[Direction] = set()
        self._queued = {Direction.UPSTREAM: 0, Direction.DOWNSTREAM: 0}
        self._last_due = {Direction.UPSTREAM: 0.0, Direction.DOWNSTREAM: 0.0}

    @property
    def running(self) -> bool:
        return self._agent_connected and not self.paused and not self.killed

    # --- set-up ---------------------------------------------------------------

    def side_connected(self, side: _Side) -> None:
        if side is self.client:
            if self.forwarder.kill_new:
                self.forwarder.connections_killed += 1
                self.killed = True
                _reset(side.transport)
                return
            self.forwarder.accepted(self)
            side.update()  # hold the client's bytes until the agent answers
            self.forwarder.dial(self)
            return
        self._agent_connected = True
        if self.killed or self.client.lost:
            self.kill()
            _reset(side.transport)
            return
        assert self.client.transport is not None and self.agent.transport is not None
        self.client.transport.registerProducer(self.agent, True)  # type: ignore[attr-defined]
        self.agent.transport.registerProducer(self.client, True)  # type: ignore[attr-defined]
        self.client.update()
        self.agent.update()

    def dial_failed(self) -> None:
        self.kill()

    # --- relaying -------------------------------------------------------------

    def received(self, direction: Direction, data: bytes) -> None:
        if self.killed:
            return
        for watcher in list(self.forwarder.watchers):
            watcher(self, direction, data)
            if self.killed:
                return
        forwarder = self.forwarder
        now = forwarder.reactor.seconds()
        due = now + forwarder.latency
        if forwarder.bandwidth:
            # Bytes leave one after another at the link's rate.
            due = max(due, self._last_due[direction]) + len(data) / forwarder.bandwidth
            self._last_due[direction] = due
        queue = self._queues[direction]
        held = forwarder.hold_back if len(data) > forwarder.hold_back else 0
        if held:
            queue.append((due, data[:-held]))
            queue.append((due + forwarder.hold_delay, data[-held:]))
        else:
            queue.append((due, data))
        self._queued[direction] += len(data)
        source = self.client if direction is Direction.UPSTREAM else self.agent
        if self._queued[direction] > BACKLOG and not source.backlogged:
            # Push back on the sender, as a slow link's full window would.
            source.backlogged = True
            source.update()
        self._pump(direction)

    def _pump(self, direction: Direction) -> None:
        """
        Deliver what is due, in order: a held-back byte holds back what
        follows it too, as on a real link.
        """
        if self.killed or self.paused:
            return
        queue = self._queues[direction]
        target = self.agent if direction is Direction.UPSTREAM else self.client
        now = self.forwarder.reactor.seconds()
        while queue and queue[0][0] <= now:
            _, data = queue.popleft()
            self._queued[direction] -= len(data)
            if target.transport is not None and not target.lost:
                target.transport.write(data)
            if direction is Direction.UPSTREAM:
                self.bytes_up += len(data)
                self.forwarder.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
                self.forwarder.bytes_down += len(data)
        source = self.client if direction is Direction.UPSTREAM else self.agent
        if source.backlogged and self._queued[direction] <= BACKLOG:
            source.backlogged = False
            source.update()
        if queue:
            timer = self._timers[direction]
            if timer is None or not timer.active():
                self._timers[direction] = self.forwarder.reactor.callLater(
                    max(0.0, queue[0][0] - now), self._tick, direction
                )
        elif direction in self._ended:
            self._close_toward(direction)

    def _tick(self, direction: Direction) -> None:
        self._timers[direction] = None
        self._pump(direction)

    def side_lost(self, side: _Side) -> None:
        if self.killed:
            self._finish_if_gone()
            return
        if side is self.client and not self._agent_connected:
            self.kill()
            return
        # Relay the close after the bytes already on their way.
        self._ended.add(side.direction)
        if not self.paused:
            self._pump(side.direction)
        self._finish_if_gone()

    def _close_toward(self, direction: Direction) -> None:
        target = self.agent if direction is Direction.UPSTREAM else self.client
        if target.transport is not None and not target.lost:
            target.transport.loseConnection()

    def _finish_if_gone(self) -> None:
        """
        The link is over once neither end has a socket left.
        """
        agent_gone = self.agent.lost or (self.killed and not self._agent_connected)
        if self.client.lost and agent_gone and not self.closed:
            self.closed = True
            self.forwarder.finished(self)

    # --- faults ---------------------------------------------------------------

    def pause(self) -> None:
        """
        Black-hole the link: nothing is relayed either way and neither end's
        close is noticed, until L{resume}.
        """
        self.paused = True
        self.client.update()
        self.agent.update()

    def resume(self) -> None:
        self.paused = False
        self.client.update()
        self.agent.update()
        for direction in Direction:
            self._pump(direction)

    def kill(self) -> None:
        """
        Reset both ends at once; whatever was in flight is lost.
        """
        if self.killed:
            return
        self.killed = True
        self.forwarder.connections_killed += 1
        for direction, timer in self._timers.items():
            if timer is not None and timer.active():
                timer.cancel()
            self._queues[direction].clear()
        if self.connector is not None and not self._agent_connected:
            self.connector.stopConnecting()
        for side in (self.client, self.agent):
            if side.transport is not None and not side.lost:
                _reset(side.transport)
        self._finish_if_gone()


class _ClientFactory(Factory):
    def __init__(self, forwarder: FaultForwarder) -> None:
        self.forwarder = forwarder

    def buildProtocol(self, addr: Any) -> Protocol:
        link = Link(self.forwarder)
        self.forwarder.live.add(link)
        return link.client


class _AgentFactory(ClientFactory):
    def __init__(self, link: Link) -> None:
        self.link = link

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.link.agent

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.link.dial_failed()


class FaultForwarder:
    """
    Listens on a loopback port and relays each connection to C{target_port}.

    @ivar latency: seconds added to every write, each way.
    @ivar hold_back: this many bytes at the end of each write are delivered
        C{hold_delay} seconds after the rest (Halibut's "last byte late").
    @ivar bandwidth: bytes per second each way (0: as fast as loopback).
    @ivar kill_new: reset connections as they arrive.
    @ivar watchers: called with (link, direction, data) before each relay;
        a watcher may kill or pause the link.
    @ivar connections_accepted, connections_killed, bytes_up, bytes_down:
        figures for the report.
    """

    def __init__(
        self,
        reactor: Any,
        target_port: int,
        target_host: str = "127.0.0.1",
        *,
        latency: float = 0.0,
        hold_back: int = 0,
        hold_delay: float = 0.0,
        bandwidth: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.target_host = target_host
        self.target_port = target_port
        self.latency = latency
        self.hold_back = hold_back
        self.hold_delay = hold_delay
        self.bandwidth = bandwidth
        self.kill_new = False
        self.watchers: list[Watcher] = []
        self.links: list[Link] = []
        #: every link with a socket still open, killed on arrival or not
        self.live: set[Link] = set()
        self.connections_accepted = 0
        self.connections_killed = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self._port: Any = None
        self._idle: list[Deferred[None]] = []

    def start(self) -> int:
        self._port = self.reactor.listenTCP(0, _ClientFactory(self), interface="127.0.0.1")
        if self.bandwidth:
            # A fixed, small receive window (inherited by accepted sockets), so
            # a shaped link does not hide megabytes in the kernel's buffers.
            self._port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        return int(self._port.getHost().port)

    async def stop(self) -> None:
        """
        Stop listening and reset every open connection (for cleanups);
        done once every socket is closed.
        """
        self.kill_new = True
        if self._port is not None:
            port, self._port = self._port, None
            await port.stopListening()
        self.kill_existing()
        await self.when_idle()

    def dial(self, link: Link) -> None:
        link.connector = self.reactor.connectTCP(self.target_host, self.target_port, _AgentFactory(link))

    def accepted(self, link: Link) -> None:
        self.connections_accepted += 1
        self.links.append(link)

    def finished(self, link: Link) -> None:
        if link in self.links:
            self.links.remove(link)
        self.live.discard(link)
        if not self.live:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def when_idle(self) -> Deferred[None]:
        """
        Fires once no connection is open.
        """
        if not self.live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # --- faults ---------------------------------------------------------------

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """
        Add a watcher; returns what removes it.
        """
        self.watchers.append(watcher)
        return lambda: self.watchers.remove(watcher) if watcher in self.watchers else None

    def kill_existing(self) -> int:
        """
        Reset every open connection; how many there were.
        """
        links = list(self.links)
        for link in links:
            link.kill()
        return len(links)

    def pause_existing(self) -> None:
        for link in self.links:
            link.pause()

    def resume_existing(self) -> None:
        for link in list(self.links):
            link.resume()
