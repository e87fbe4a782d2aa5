"""
A polling port: the server's side of polling mode.

    server = PollingServer(identity, trusted=[agent_thumbprint], reactor=reactor)
    server.startService()
    client = TentacleClient(Target.polling("poll://abc.../", Pin(agent)), identity, reactor, hub=server)
    await client.run_script("echo hello")

Agents dial in (port 10943 by default) and take the requests queued for
their subscription (L{tentacle.hub.queues}).  Beyond Halibut, a subscription
may be bound to the thumbprints allowed to claim it; a bound subscription
refuses any other trusted agent.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from zope.interface import implementer

from tentacle.contracts import tentacle_registry
from tentacle.halibut.connection import ExchangeSettings, HalibutConnection
from tentacle.halibut.handshake import normalize_subscription
from tentacle.halibut.rpc import IRequestHandler, IRequestSource, PayloadOpener, PendingRequest
from tentacle.halibut.serializer import RequestMessage, ResponseMessage
from tentacle.halibut.streams import ReceivedStream
from tentacle.hub.queues import DEFAULT_COLLECT_TIMEOUT, PollingQueues
from tentacle.identity import Identity, normalize_thumbprint
from tentacle.admission import DEFAULT_MAX_UNAUTHENTICATED, LISTEN_BACKLOG, AdmissionLimits
from tentacle.listener import Accepted, ListenerFactory, ListeningTLSFactory, halibut_sessions, take_turns
from tentacle.tls import AgentTLSOptions
from tentacle.trust import PeerIdentity, TrustList

DEFAULT_POLLING_PORT = 10943
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

POLLING_SUBSCRIBED = "polling_subscribed"
POLLING_UNSUBSCRIBED = "polling_unsubscribed"
POLLING_CLAIM_REFUSED = "polling_claim_refused"


@implementer(IRequestSource)
class _ForPeer:
    """
    The queues as one connection sees them: takes name the connection's peer.
    """

    def __init__(self, queues: PollingQueues, peer: PeerIdentity) -> None:
        self._queues = queues
        self._peer = peer

    def next_request(self, subscription: str, wait: float) -> Deferred[PendingRequest | None]:
        return self._queues.next_request(subscription, wait, self._peer)


class PollingServer(Service):
    """
    A polling port: listens (10943 by default) with our certificate, asks
    every peer for a client certificate without requiring one, serves the
    friendly page to anything that is not Halibut, closes untrusted or
    absent certificates silently, and gives each subscriber the requests
    queued for its subscription.

    @param trusted: the thumbprints of the agents that may poll.
    @param users: the thumbprints that may send requests through the port
        (a hub's CLI users); an agent may not, unless listed here too.
    @param bindings: subscription -> the thumbprints allowed to claim it.
    @param admission: the connection budgets and deadlines before a peer
        authenticates (L{tentacle.admission}); the defaults, with
        C{handshake_timeout}, when not given.
    @param on_collected: told each request's wait in the queue (metrics).
    @ivar handler: serves MX-CLIENT connections (a hub forwards them to
        the queues); while C{None}, only subscribers are served.
    """

    log = Logger()

    def __init__(
        self,
        identity: Identity,
        trusted: Iterable[str],
        reactor: Any = None,
        *,
        users: Iterable[str] = (),
        port: int = DEFAULT_POLLING_PORT,
        interface: str = "",
        bindings: Mapping[str, Iterable[str]] | None = None,
        collect_timeout: float = DEFAULT_COLLECT_TIMEOUT,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        admission: AdmissionLimits | None = None,
        settings: ExchangeSettings = ExchangeSettings(),
        on_collected: Callable[[float], None] | None = None,
        log: Logger | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if log is not None:
            self.log = log
        self.identity = identity
        self.reactor = reactor
        #: Agents (may poll) and users (may send requests through a hub):
        #: two lists, so a trusted agent cannot drive the others.
        self.agents = frozenset(normalize_thumbprint(t) for t in trusted)
        self.users = frozenset(normalize_thumbprint(t) for t in users)
        self.trust = TrustList(self.agents | self.users)
        self._clients: dict[HalibutConnection, Accepted] = {}
        self.queues = PollingQueues(reactor, collect_timeout, on_collected)
        self.bindings: dict[str, frozenset[str]] = {}
        #: The subscribers connected now, so a new binding can cut them.
        self._subscribers: dict[HalibutConnection, Accepted] = {}
        self.set_bindings(bindings or {})
        self._port_number = port
        self._interface = interface
        self._settings = settings
        self.handler: Callable[[Accepted], IRequestHandler | None] | None = None
        self._connected: collections.Counter[str] = collections.Counter()
        sessions = halibut_sessions(
            reactor, tentacle_registry(), settings,
            handler_for=self._handler_for,
            source_for=self._source_for,
            log=self.log,
        )
        if admission is None:
            # Polling agents are the ones behind NAT: hundreds may share one
            # address, and all come back at once after a restart.  So no
            # cap per address, only the unauthenticated budget itself.
            admission = AdmissionLimits(
                handshake_timeout=handshake_timeout, max_unauthenticated_per_address=DEFAULT_MAX_UNAUTHENTICATED
            )
        self.factory = ListenerFactory(self.trust, reactor, admission, self._track(sessions), log=self.log,
            keepalive=settings.keepalive,
        )
        self.port: IListeningPort | None = None

    # --- who may subscribe ---------------------------------------------------------

    def bind(self, subscription: str, *thumbprints: str) -> None:
        """
        Only these thumbprints may claim C{subscription} from now on; any
        other agent polling it now is cut off.
        """
        self.bindings[normalize_subscription(subscription)] = frozenset(
            normalize_thumbprint(t) for t in thumbprints
        )
        self._enforce_bindings()

    def set_bindings(self, bindings: Mapping[str, Iterable[str]]) -> None:
        """
        Replace every binding (subscriptions normalised as agents announce
        them); any agent polling a subscription it may no longer claim is
        cut off.
        """
        self.bindings = {
            normalize_subscription(sub): frozenset(normalize_thumbprint(t) for t in thumbprints)
            for sub, thumbprints in bindings.items()
        }
        self._enforce_bindings()

    def _may_claim(self, accepted: Accepted) -> bool:
        subscription = accepted.identity.subscription
        assert subscription is not None
        allowed = self.bindings.get(subscription)
        peer = accepted.peer
        if allowed is not None and peer.thumbprint not in allowed and peer.sha256 not in allowed:
            self.log.warn(
                "Refused {thumbprint} at {peer}: {subscription} is bound to other agents",
                thumbprint=peer.thumbprint, peer=accepted.address, subscription=subscription,
                event=POLLING_CLAIM_REFUSED,
            )
            return False
        return True

    def _enforce_bindings(self) -> None:
        for connection, accepted in list(self._subscribers.items()):
            if not self._may_claim(accepted):
                connection.abort()

    def _source_for(self, accepted: Accepted) -> IRequestSource | None:
        if not self._trusted_as(accepted, self.agents, "an agent") or not self._may_claim(accepted):
            return None
        return _ForPeer(self.queues, accepted.peer)

    def _handler_for(self, accepted: Accepted) -> IRequestHandler | None:
        if self.handler is None or not self._trusted_as(accepted, self.users, "a user"):
            return None
        return self.handler(accepted)

    def _trusted_as(self, accepted: Accepted, allowed: frozenset[str], what: str) -> bool:
        peer = accepted.peer
        if peer.thumbprint in allowed or peer.sha256 in allowed:
            return True
        self.log.warn(
            "Refused {thumbprint} at {peer}: it is not trusted as {what}",
            thumbprint=peer.thumbprint, peer=accepted.address, what=what, event=POLLING_CLAIM_REFUSED,
        )
        return False

    def set_trust(self, agents: Iterable[str], users: Iterable[str] = ()) -> tuple[frozenset[str], frozenset[str]]:
        """
        Replace whom the port trusts: connections of whoever is no longer
        trusted in their role are cut off at once.

        @return: the thumbprints added and removed (either list).
        """
        self.agents = frozenset(normalize_thumbprint(t) for t in agents)
        self.users = frozenset(normalize_thumbprint(t) for t in users)
        changes = self.trust.replace(self.agents | self.users)
        for connection, accepted in list(self._subscribers.items()):
            if accepted.peer.thumbprint not in self.agents and accepted.peer.sha256 not in self.agents:
                connection.abort()
        for connection, accepted in list(self._clients.items()):
            if accepted.peer.thumbprint not in self.users and accepted.peer.sha256 not in self.users:
                connection.abort()
        return changes

    def _track(self, sessions: Callable[[Accepted], Any]) -> Callable[[Accepted], Any]:
        def build(accepted: Accepted) -> HalibutConnection | None:
            connection = sessions(accepted)
            subscription = accepted.identity.subscription
            if isinstance(connection, HalibutConnection) and subscription is None:
                self._clients[connection] = accepted
                connection.closed.addCallback(lambda _: self._clients.pop(connection, None))
            if isinstance(connection, HalibutConnection) and subscription is not None:
                self._connected[subscription] += 1
                self._subscribers[connection] = accepted
                self.log.info(
                    "{thumbprint} at {peer} polls as {subscription}",
                    thumbprint=accepted.peer.thumbprint, peer=accepted.address,
                    subscription=subscription, event=POLLING_SUBSCRIBED,
                )
                connection.closed.addCallback(self._gone, subscription, accepted, connection)
            return connection

        return build

    def _gone(self, _: object, subscription: str, accepted: Accepted, connection: HalibutConnection) -> None:
        self._subscribers.pop(connection, None)
        self._connected[subscription] -= 1
        if self._connected[subscription] <= 0:
            del self._connected[subscription]
        self.log.info(
            "{thumbprint} at {peer} stopped polling as {subscription}",
            thumbprint=accepted.peer.thumbprint, peer=accepted.address,
            subscription=subscription, event=POLLING_UNSUBSCRIBED,
        )

    def connections(self, subscription: str | None = None) -> int:
        """
        Subscriber connections up now (for one subscription, or all).
        """
        if subscription is None:
            return sum(self._connected.values())
        return self._connected.get(subscription, 0)

    def subscriptions(self) -> dict[str, int]:
        return dict(self._connected)

    # --- sending -------------------------------------------------------------------

    def send(
        self,
        subscription: str,
        request: RequestMessage,
        payloads: Mapping[Any, PayloadOpener] | None = None,
        pin: Callable[[Any], bool] | None = None,
    ) -> Deferred[tuple[ResponseMessage, list[ReceivedStream]]]:
        """
        Queue C{request} for C{subscription}; fires with the response and
        the streams that came with it (the caller discards their sinks).
        """
        pending = self.queues.queue(normalize_subscription(subscription)).put(request, payloads, pin)
        return pending.outcome

    # --- the port ------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        if self.port is None:
            tls = ListeningTLSFactory(AgentTLSOptions(self.identity), self.factory, clock=self.reactor)
            self.port = self.reactor.listenTCP(self._port_number, tls, backlog=LISTEN_BACKLOG, interface=self._interface)
            take_turns(self.port)
        super().privilegedStartService()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        self.factory.doStart()
        super().startService()
        self.log.info(
            "Polling port {port} open as {thumbprint}; trusting {count} thumbprint(s)",
            port=self.listening_port, thumbprint=self.identity.thumbprint, count=len(self.trust.thumbprints),
        )

    @property
    def listening_port(self) -> int | None:
        if self.port is None:
            return None
        return int(self.port.getHost().port)  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        for connection in self.factory.authenticated_connections:
            if connection.transport is not None:
                connection.transport.loseConnection()
        self.factory.doStop()
        if port is None:
            return succeed(None)
        d: Deferred[None] = Deferred.fromCoroutine(_stop(port))
        return d


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


__all__ = ["DEFAULT_POLLING_PORT", "PollingServer"]
