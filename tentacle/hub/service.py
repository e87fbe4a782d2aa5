"""
L{HubService}: a hub as one Twisted service, for C{twistd -n tentacle-hub},
C{tentacle hub}, or embedding.

It holds a polling port (L{PollingServer}) that polling agents dial, and
forwards each request a CLI user sends it (C{tentacle-client --hub}) to the
queue of the agent its endpoint names.  It has its own identity and trust
list (agents and CLI users), publishes metrics (subscriptions connected,
queue depth, how long requests wait to be collected) and reloads its trust
and bindings when C{hub.json} changes.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.logger import Logger

from tentacle import events
from tentacle.config import ConfigError
from tentacle.dispatch import Dispatcher
from tentacle.fsutil import atomic_write
from tentacle.hub.config import HubConfig, HubConfigFile
from tentacle.hub.forwarding import ForwardingHandler
from tentacle.hub.polling_server import PollingServer
from tentacle.identity import Identity, IdentityStore
from tentacle.listener import Accepted
from tentacle.metrics import LATENCY_BUCKETS, _labels
from tentacle.observe import ObservedHandler

#: How often a running hub looks for edits to hub.json.
CONFIG_POLL_INTERVAL = 2.0
HEARTBEAT_INTERVAL = 10.0
METRICS_FILE = "Logs/metrics.prom"
HEARTBEAT_FILE = "Logs/heartbeat"


class HubMetrics:
    """
    What a hub counts, in Prometheus' text format.
    """

    def __init__(self, server: PollingServer) -> None:
        self._server = server
        self.collect_buckets = [0] * len(LATENCY_BUCKETS)
        self.collect_sum = 0.0
        self.collect_count = 0
        self.forwarded: collections.Counter[str] = collections.Counter()

    def collected(self, seconds: float) -> None:
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.collect_buckets[i] += 1
        self.collect_sum += seconds
        self.collect_count += 1

    def render(self) -> str:
        server = self._server
        connected = server.subscriptions()
        queues = server.queues.queues()
        lines = [
            "# HELP tentacle_hub_subscriptions_connected Subscriptions with at least one polling connection.",
            "# TYPE tentacle_hub_subscriptions_connected gauge",
            f"tentacle_hub_subscriptions_connected {len(connected)}",
            "# HELP tentacle_hub_polling_connections Polling connections up, by subscription.",
            "# TYPE tentacle_hub_polling_connections gauge",
        ]
        lines += [
            f"tentacle_hub_polling_connections{_labels({'subscription': s})} {n}" for s, n in sorted(connected.items())
        ]
        lines += [
            "# HELP tentacle_hub_queue_depth Requests waiting to be collected, by subscription.",
            "# TYPE tentacle_hub_queue_depth gauge",
        ]
        lines += [f"tentacle_hub_queue_depth{_labels({'subscription': s})} {len(q)}" for s, q in sorted(queues.items())]
        lines += [
            "# HELP tentacle_hub_collect_seconds Time a request waited in its queue before an agent collected it.",
            "# TYPE tentacle_hub_collect_seconds histogram",
        ]
        lines += [
            f'tentacle_hub_collect_seconds_bucket{{le="{bound!r}"}} {count}'
            for bound, count in zip(LATENCY_BUCKETS, self.collect_buckets)
        ]
        lines += [
            f'tentacle_hub_collect_seconds_bucket{{le="+Inf"}} {self.collect_count}',
            f"tentacle_hub_collect_seconds_sum {self.collect_sum!r}",
            f"tentacle_hub_collect_seconds_count {self.collect_count}",
            "# HELP tentacle_hub_requests_forwarded_total Requests from CLI users answered, by outcome.",
            "# TYPE tentacle_hub_requests_forwarded_total counter",
        ]
        lines += [
            f"tentacle_hub_requests_forwarded_total{_labels({'outcome': o})} {n}"
            for o, n in sorted(self.forwarded.items())
        ]
        return "\n".join(lines) + "\n"


class HubService(MultiService):
    """
    The hub: a polling port for agents, which CLI users reach through it.

    @param config_file: when given, trust and bindings are reloaded from it
        when it changes (polled every L{CONFIG_POLL_INTERVAL} seconds).
    """

    def __init__(
        self,
        config: HubConfig,
        reactor: Any = None,
        *,
        identity: Identity | None = None,
        config_file: HubConfigFile | None = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.events = events.agent_publisher()
        self.log = Logger(observer=self.events, source=self)
        self.identity = identity if identity is not None else IdentityStore(config.home).load()
        self.metrics: HubMetrics
        self.server = PollingServer(
            self.identity,
            config.agents,
            reactor,
            users=config.users,
            port=config.port,
            interface=config.listen_address or "",
            bindings=dict(config.bindings),
            collect_timeout=config.collect_timeout,
            handshake_timeout=config.handshake_timeout,
            admission=config.admission,
            on_collected=lambda seconds: self.metrics.collected(seconds),
            log=Logger(namespace="tentacle.hub", observer=self.events),
        )
        self.metrics = HubMetrics(self.server)
        self.events.addObserver(self._count)  # type: ignore[arg-type]
        self.server.handler = self._forwarding
        self.server.setServiceParent(self)
        beat = TimerService(HEARTBEAT_INTERVAL, self._beat)
        beat.clock = reactor
        beat.setServiceParent(self)
        self._config_file = config_file
        self._signature = config_file.signature() if config_file else None
        if config_file is not None:
            watcher = TimerService(CONFIG_POLL_INTERVAL, self._poll_config)
            watcher.clock = reactor
            watcher.setServiceParent(self)

    def _forwarding(self, accepted: Accepted) -> ObservedHandler:
        return ObservedHandler(
            ForwardingHandler(self.server), self.reactor, Logger(namespace="tentacle.hub", observer=self.events),
            address=accepted.address, thumbprint=accepted.peer.thumbprint, summarize=Dispatcher.summarize,
        )

    def _count(self, event: Any) -> None:
        if event.get("event") == events.REQUEST_SERVED:
            self.metrics.forwarded[str(event.get("outcome"))] += 1

    def startService(self) -> None:
        super().startService()
        if not self.config.agents:
            self.log.warn(
                "No agent is trusted yet: run 'tentacle-hub configure --trust <agent thumbprint>'"
            )

    def _beat(self) -> None:
        home = self.config.home
        try:
            (home / "Logs").mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(home / METRICS_FILE, self.metrics.render().encode(), durable=False)
            atomic_write(home / HEARTBEAT_FILE, f"{self.reactor.seconds():.0f}\n".encode(), durable=False)
        except OSError as e:
            self.log.error("Could not write the heartbeat: {error}", error=str(e))

    def _poll_config(self) -> None:
        assert self._config_file is not None
        signature = self._config_file.signature()
        if signature != self._signature:
            self._signature = signature
            self.reload()

    def reload(self) -> None:
        """
        Re-read trust, bindings and the connection budgets; agents and
        users no longer trusted are cut off at once.  A broken file changes
        nothing.
        """
        if self._config_file is None:
            return
        try:
            config = self._config_file.load()
        except ConfigError as e:
            self.log.error("Configuration not reloaded: {error}", error=str(e))
            return
        added, removed = self.server.set_trust(config.agents, config.users)
        for t in sorted(added):
            self.log.info("Now trusting {thumbprint}", thumbprint=t, event=events.TRUST_ADDED)
        for t in sorted(removed):
            self.log.info("No longer trusting {thumbprint}", thumbprint=t, event=events.TRUST_REMOVED)
        self.server.set_bindings(dict(config.bindings))
        if config.admission != self.config.admission:
            self.server.factory.set_limits(config.admission)
            self.log.info(
                "Connection budgets now {max_connections} connections, {max_unauthenticated} "
                "unauthenticated, {log_lines} log lines per kind per 10 s; applied",
                max_connections=config.max_connections or "unlimited",
                max_unauthenticated=config.max_unauthenticated_connections,
                log_lines=config.connection_log_lines,
                event="setting_applied",
            )
        self.config = config
