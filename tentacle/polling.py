"""
The agent's polling side: it dials the servers it polls, and answers the
requests they send over those connections.

For each configured server the agent keeps N connections (1 by default,
1..512), each a loop::

    dial (TCP or HTTP CONNECT proxy) -> TLS, the server pinned by thumbprint
      -> MX-SUBSCRIBER poll://id/ -> MX-SERVER
      -> answer requests (the same dispatcher as listening mode) until the
         connection ends
    -> wait (ReconnectDelay: 5 s after a healthy session, then growing with
       the outage, jittered, at most 2 min) -> dial again

A connection attempt is tried up to five times a second apart, except when
the server refused the connection, its name does not resolve or its
certificate is not the pinned one: those stop at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import deferLater
from twisted.logger import Logger

from tentacle import events
from tentacle.config import PolledServer
from tentacle.halibut.connection import ExchangeSettings
from tentacle.halibut.roles import PollingSubscriber
from tentacle.halibut.rpc import IRequestHandler
from tentacle.halibut.serializer import TypeRegistry
from tentacle.identity import Identity

if TYPE_CHECKING:
    from tentacle.dialer import DialError, PinnedConnection, ReconnectDelay

#: Tries of one connection attempt, a second apart, before the backoff.
QUICK_TRIES = 5
QUICK_INTERVAL = 1.0
CONNECT_TIMEOUT = 60.0

#: Builds the handler for a connection to a server (the agent wraps its
#: dispatcher so each answer is logged with who asked).
HandlerFor = Callable[[PolledServer, str], IRequestHandler]


def _client_tls(identity: Identity) -> CertificateOptions:
    return CertificateOptions(
        privateKey=identity.private_key,  # type: ignore[arg-type]
        certificate=identity.certificate,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


class PollingConnection(Service):
    """
    One of the connections to one polling server, redialled for as long as
    the service runs.

    @ivar connected: whether it is identified with the server now.
    """

    def __init__(
        self,
        server: PolledServer,
        index: int,
        identity: Identity,
        handler_for: HandlerFor,
        reactor: Any,
        registry: TypeRegistry,
        settings: ExchangeSettings,
        log: Logger,
        delay: ReconnectDelay | None = None,
    ) -> None:
        self.server = server
        self.index = index
        # The dialer (and twisted.internet.endpoints with it) is loaded
        # once a server is polled, not in every listening agent.
        from tentacle.dialer import Proxy, ReconnectDelay

        self._identity = identity
        self._tls = _client_tls(identity)
        self._handler_for = handler_for
        self._reactor = reactor
        self._registry = registry
        self._settings = settings
        self.log = log
        self.delay = delay or ReconnectDelay(reactor.seconds)
        self.connected = False
        self.sessions = 0
        self._loop: Deferred[None] | None = None
        self._waiting: Deferred[Any] | None = None
        self._dialling: Deferred[Any] | None = None
        self._connection: PinnedConnection | None = None
        self._proxy = Proxy.from_url(server.proxy) if server.proxy else None
        # No service name: two entries may share an address (two
        # subscriptions on one server), and names must be unique.

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: f.trap(CancelledError))

    def stopService(self) -> Deferred[None]:
        super().stopService()
        connection = self._connection
        if connection is not None and self.connected and connection.reading:
            # Between requests: say goodbye as Halibut does, then close.
            connection.send_line("END")
            connection.close()
        elif connection is not None:
            # Dialling, identifying, or in the middle of a request or its
            # answer: an END would land inside a message, and a polite
            # close would wait for a large answer to drain.
            connection.abort()
        if self._dialling is not None:
            self._dialling.cancel()
        if self._waiting is not None:
            self._waiting.cancel()
        loop, self._loop = self._loop, None
        if loop is None:
            return Deferred.fromCoroutine(_done())
        d: Deferred[None] = Deferred()
        loop.addBoth(lambda _: d.callback(None))
        return d

    def _sleep(self, seconds: float) -> Deferred[None]:
        self._waiting = deferLater(self._reactor, seconds, lambda: None)
        return self._waiting

    async def _run(self) -> None:
        while self.running:
            try:
                await self._session()
            except CancelledError:
                return
            except Exception:
                # A bug, or input nobody foresaw: this connection must not
                # stop polling for good over one attempt.
                self.log.failure(
                    "Polling {server}: the connection failed unexpectedly", server=self.server.address,
                    connection=self.index,
                )
            if not self.running:
                return
            wait = self.delay.failed()
            self.log.info(
                "Polling {server}: dialling again in {wait:.1f} s",
                server=self.server.address, wait=wait, connection=self.index,
            )
            try:
                await self._sleep(wait)
            except CancelledError:
                return

    async def _session(self) -> None:
        """
        Dial (a few quick tries), then answer requests until the connection
        ends.
        """
        # Loaded by __init__ already; here for the names (see there).
        from tentacle.dialer import DialError, Pin, PinnedConnection, UnexpectedCertificate, dial

        server = self.server
        role = PollingSubscriber(self._handler_for(server, server.address), server.subscription_id)
        for attempt in range(1, QUICK_TRIES + 1):
            if not self.running:
                return
            connection = PinnedConnection(
                Pin(server.thumbprint), role, self._reactor, self._registry, self._settings,
                peer_name="server", label=server.address, log=self.log,
            )
            self._connection = connection
            # Kept, so that stopping the service cancels a dial under way.
            self._dialling = Deferred.fromCoroutine(dial(
                self._reactor, server.host, server.port, self._tls, connection,
                proxy=self._proxy, timeout=CONNECT_TIMEOUT,
            ))
            try:
                await self._dialling
                break
            except CancelledError:
                connection.abort()
                raise
            except UnexpectedCertificate as e:
                self.log.error(
                    "Polling {server}: {error}; not trusted, will try again later",
                    server=server.address, error=str(e), expected=server.thumbprint,
                    presented=connection.peer.thumbprint if connection.peer else None,
                    event=events.POLLING_REFUSED, subscription=server.subscription_id,
                )
                return
            except DialError as e:
                final = attempt == QUICK_TRIES or _final(e)
                self.log.info(
                    "Polling {server}: {error}", server=server.address, error=str(e), connection=self.index,
                )
                if final or not self.running:
                    return
                await self._sleep(QUICK_INTERVAL)
            finally:
                self._dialling = None
        try:
            await _either(role.identified, connection.closed)
        except Exception:
            return
        if not self.running:
            return
        if not role.identified.called:
            self.log.warn(
                "Polling {server}: the server closed the connection after our identity; "
                "it may not trust this agent's certificate {thumbprint}, or had no room yet "
                "for another connection (this agent dials again)",
                server=server.address, thumbprint=self._identity.thumbprint,
                event=events.POLLING_REFUSED, subscription=server.subscription_id,
            )
            return
        self.delay.succeeded()
        self.connected = True
        self.sessions += 1
        self.log.info(
            "Polling {server} as {subscription} (connection {connection})",
            server=server.address, subscription=server.subscription_id, connection=self.index,
            event=events.POLLING_CONNECTED,
        )
        try:
            await connection.closed
        finally:
            self.connected = False
            self._connection = None
            self.log.info(
                "Polling {server}: connection {connection} ended after {served} request(s)",
                server=server.address, connection=self.index, served=role.requests_served,
                event=events.POLLING_DISCONNECTED,
            )

    def drop(self) -> None:
        """
        Cut the current connection (its server is no longer trusted).
        """
        if self._connection is not None:
            self._connection.abort()


def _final(error: DialError) -> bool:
    """
    Connection refused, an unknown name: a second later will not differ.
    """
    # Loaded by PollingConnection already; imported here for the names.
    from tentacle.dialer import ConnectionRefused, HostNotFound

    return isinstance(error, (ConnectionRefused, HostNotFound))


async def _either(first: Deferred[Any], second: Deferred[Any]) -> None:
    """
    Whichever fires first (without consuming either).
    """
    done: Deferred[None] = Deferred()

    def fired(result: object) -> object:
        if not done.called:
            done.callback(None)
        return result

    first.addBoth(fired)
    second.addBoth(fired)
    await done


async def _done() -> None:
    return None


class PollingService(MultiService):
    """
    The agent's polling connections: N per configured server.
    """

    def __init__(
        self,
        identity: Identity,
        handler_for: HandlerFor,
        reactor: Any,
        registry: TypeRegistry,
        settings: ExchangeSettings,
        log: Logger,
        connection_count: Callable[[PolledServer], int],
    ) -> None:
        super().__init__()
        self._identity = identity
        self._handler_for = handler_for
        self._reactor = reactor
        self._registry = registry
        self._settings = settings
        self.log = log
        self._count = connection_count
        self._servers: dict[PolledServer, list[PollingConnection]] = {}

    @property
    def servers(self) -> dict[PolledServer, list[PollingConnection]]:
        return dict(self._servers)

    def status(self) -> list[tuple[PolledServer, int, int]]:
        """
        Each server with its connections identified now and configured.
        """
        return [
            (server, sum(1 for c in connections if c.connected), len(connections))
            for server, connections in self._servers.items()
        ]

    def apply(self, servers: tuple[PolledServer, ...]) -> None:
        """
        Poll exactly C{servers}: start the new ones, stop (and cut) the ones
        gone or changed.
        """
        for server in list(self._servers):
            if server not in servers:
                for connection in self._servers.pop(server):
                    connection.drop()
                    connection.disownServiceParent()
                self.log.info("No longer polling {server}", server=server.address)
        for server in servers:
            if server in self._servers:
                continue
            connections = [
                PollingConnection(
                    server, index, self._identity, self._handler_for, self._reactor,
                    self._registry, self._settings, self.log,
                )
                for index in range(1, self._count(server) + 1)
            ]
            self._servers[server] = connections
            for connection in connections:
                connection.setServiceParent(self)
            self.log.info(
                "Polling {server} as {subscription} over {count} connection(s)",
                server=server.address, subscription=server.subscription_id, count=len(connections),
            )
