"""
L{TentacleService}: the whole agent as one Twisted service, for twistd or for
embedding in any Twisted application::

    from twisted.application.service import MultiService
    from tentacle.config import ConfigFile, resolve_home
    from tentacle.service import TentacleService

    home = resolve_home(None)
    config_file = ConfigFile(home)
    agent = TentacleService(config_file.load(), reactor, config_file=config_file)
    agent.setServiceParent(my_multi_service)

(docs/embedding.rst has complete C{.tac} files.)
"""

from __future__ import annotations

import os
import gc
import signal
from types import FrameType
from typing import Any, Callable

import attrs

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from twisted.protocols.policies import WrappingFactory

from tentacle.contracts import SCRIPT_SERVICE, SCRIPT_SERVICE_V2, ProcessState, tentacle_registry
from tentacle.fsutil import atomic_write, private_folder, tighten_folder
from tentacle.metrics import Metrics
from tentacle import events
from tentacle.observe import AgentObserver, AuditLog, ObservedHandler
from tentacle.dispatch import Dispatcher
from tentacle.halibut.connection import ExchangeSettings
from tentacle.config import LIVE_SETTINGS, ConfigError, ConfigFile, PolledServer, TentacleConfig, changed_settings
from tentacle.identity import Identity, IdentityStore
from tentacle.addresses import describe_address
from tentacle.admission import LISTEN_BACKLOG
from tentacle.listener import (
    Accepted,
    ListenerFactory,
    ListeningTLSFactory,
    SessionFactory,
    halibut_sessions,
    take_turns,
)
from tentacle.polling import PollingService
from tentacle.tls import AgentTLSOptions
from tentacle.services import register_tentacle_services
from tentacle.services.script_environment import script_variables, signature_algorithm_name
from tentacle.services.files import FileTransferService
from tentacle.services.scripts import ScriptRunner, ScriptService, ScriptServiceV2
from tentacle.trust import TrustList
from tentacle.workspace import remove_stale_workspaces

def freeze_startup_objects() -> None:
    """
    Keep what exists once the agent has started (modules, classes, the
    services: tens of thousands of objects that live as long as it does) out
    of every later full garbage collection.  Such a collection scans them
    all while holding the GIL; when a thread builds a big status page, the
    collections it triggers stalled the reactor for 20-40 ms.
    """
    gc.collect()
    gc.freeze()


#: How often a running agent looks for edits to its configuration file, so
#: `tentacle configure --trust` takes effect within a few seconds.
CONFIG_POLL_INTERVAL = 2.0
#: Tentacle looks for old workspaces every two hours.
WORKSPACE_CLEANING_INTERVAL = 7200.0
#: How often the agent proves it is alive (the heartbeat file for
#: C{tentacle livez}) and publishes its metrics for C{tentacle metrics}.
HEARTBEAT_INTERVAL = 10.0
HEARTBEAT_FILE = "Logs/heartbeat"
METRICS_FILE = "Logs/metrics.prom"
#: Folders of the home that the agent fills, made private (0700) at start
#: when an older agent left them open: script workspaces, its logs, and
#: the package cache uploads go to.
PRIVATE_FOLDERS = ("Work", "Logs", "Packages")


class _AcceptCounter(WrappingFactory):
    """
    Logs each accepted TCP connection (at debug level) for the metrics.
    """

    noisy = False

    def __init__(self, wrapped: Any, log: Logger) -> None:
        super().__init__(wrapped)
        self.log = log

    def buildProtocol(self, addr: Any) -> Any:
        events.debug(
            self.log, "Accepted a connection from {peer}", peer=describe_address(addr), event=events.CONNECTION_ACCEPTED
        )
        return self.wrappedFactory.buildProtocol(addr)


class _Every(Service):
    """
    Calls C{f} every C{interval} seconds while running, the first time at
    once: what C{twisted.application.internet.TimerService} does, without
    importing that module (and C{automat} with it) into every agent.
    """

    def __init__(self, interval: float, f: Callable[[], object], clock: Any) -> None:
        self._interval = interval
        self._f = f
        self._clock = clock
        self._loop: LoopingCall | None = None
        self._done: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        loop = self._loop = LoopingCall(self._f)
        loop.clock = self._clock
        self._done = loop.start(self._interval, now=True)
        self._done.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        TentacleService.log.failure("A periodic task of the agent failed; it will not run again", failure)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._done


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class TentacleService(MultiService):
    """
    The listening agent: TLS listener, trust list and configuration watcher.

    @param config: what to listen on and whom to trust.
    @param reactor: provides TCP, time and threads; the global one by default.
    @param identity: our certificate and key; read from the home when omitted.
    @param config_file: when given, the settings are reloaded from it when
        it changes (polled every L{CONFIG_POLL_INTERVAL} seconds) and on
        L{reload}: see L{apply_settings}.
    @param handle_sighup: reload on SIGHUP too (for daemons; an embedding
        application usually owns its signals).
    @param dispatcher: the services offered to trusted servers; register
        more on C{service.dispatcher} before the first request.
    @param exchange_settings: message size limits and the idle and
        heartbeat timeouts of authenticated connections (their TCP
        keepalive is the config's C{tcp_keepalive}).
    @param session_factory: replaces the Halibut message exchange
        altogether (for tests and experiments).
    @param freeze_startup_objects: once started, keep the process's objects
        out of later full garbage collections (L{freeze_startup_objects}).
        The daemon does; it is process-wide, so an embedding application
        chooses.
    """

    log = Logger()

    def __init__(
        self,
        config: TentacleConfig,
        reactor: Any = None,
        *,
        identity: Identity | None = None,
        config_file: ConfigFile | None = None,
        handle_sighup: bool = False,
        dispatcher: Dispatcher | None = None,
        exchange_settings: ExchangeSettings = ExchangeSettings(),
        session_factory: SessionFactory | None = None,
        freeze_startup_objects: bool = False,
    ) -> None:
        super().__init__()
        self._freeze_startup_objects = freeze_startup_objects
        self.reactor = reactor if reactor is not None else _default_reactor()
        #: This agent's events: to the global log, and to its own audit log
        #: and metrics (see L{tentacle.events}).
        self.events = events.agent_publisher()
        self.log = Logger(observer=self.events, source=self)
        #: Logs each request (one logger for every connection).
        self._requests_log = self._logger("tentacle.requests")
        self.scripts: ScriptRunner | None = None
        self.identity = identity if identity is not None else IdentityStore(config.home).load()
        if dispatcher is None:
            dispatcher = Dispatcher()
            self.scripts = self._offer_tentacle_services(dispatcher, config)
        self.dispatcher = dispatcher
        exchange_settings = attrs.evolve(exchange_settings, keepalive=config.tcp_keepalive)
        registry = tentacle_registry()
        if session_factory is None:
            session_factory = halibut_sessions(
                self.reactor, registry, exchange_settings,
                handler_for=self._observed, log=self._logger("tentacle.halibut"),
            )
        self.config = config
        self.trust = TrustList(config.trusted)
        self.listener_factory = ListenerFactory(
            self.trust, self.reactor, config.admission, session_factory, log=self._logger("tentacle.listener"),
            keepalive=config.tcp_keepalive,
        )
        self.port: IListeningPort | None = None
        self._privileged_started = False
        self._accepting = _AcceptCounter(self.listener_factory, self._logger("tentacle.listener"))
        #: The servers this agent polls (none unless configured).
        self.polling = PollingService(
            self.identity, self._polling_handler, self.reactor, registry, exchange_settings,
            self._logger("tentacle.polling"), config.polling_connections,
        )
        self.polling.apply(config.polling_servers)
        self.polling.setServiceParent(self)
        self.metrics = Metrics(gauges=self._script_gauges, polling=self.polling.status)
        self._audit: AuditLog | None = None
        self._observer: AgentObserver | None = None
        self._metrics_port: IListeningPort | None = None
        _Every(HEARTBEAT_INTERVAL, self._beat, self.reactor).setServiceParent(self)
        self._config_file = config_file
        self._config_signature = config_file.signature() if config_file else None
        #: The settings as last read from the file: a reload reports what
        #: changed in the file, not where command-line overrides differ.
        self._loaded = config
        if config_file is not None:
            try:
                self._loaded = config_file.load()
            except ConfigError:
                pass
        self._handle_sighup = handle_sighup
        self._previous_sighup: Callable[..., Any] | int | None = None
        if config_file is not None:
            _Every(CONFIG_POLL_INTERVAL, self._poll_config, self.reactor).setServiceParent(self)

    def _logger(self, namespace: str) -> Logger:
        return Logger(namespace=namespace, observer=self.events)

    def _observed(self, accepted: Accepted) -> ObservedHandler:
        return ObservedHandler(
            self.dispatcher, self.reactor, self._requests_log,
            address=accepted.address, thumbprint=accepted.peer.thumbprint,
            summarize=Dispatcher.summarize,
        )

    def _polling_handler(self, server: PolledServer, address: str) -> ObservedHandler:
        return ObservedHandler(
            self.dispatcher, self.reactor, self._requests_log,
            address=address, thumbprint=server.thumbprint, summarize=Dispatcher.summarize,
        )

    def _offer_tentacle_services(self, dispatcher: Dispatcher, config: TentacleConfig) -> ScriptRunner:
        """
        The services an Octopus Server expects: scripts (V1 and V2), file
        transfer and capabilities; and the cleaner for old script workspaces.
        """
        runner = ScriptRunner(
            self.reactor,
            config.home,
            config.applications,
            max_concurrent=config.max_concurrent_scripts,
            script_timeout=config.script_timeout,
            log=self._logger("tentacle.scripts"),
            variables=script_variables(
                home=config.home, applications=config.applications, instance_name=config.instance_name,
                signature_algorithm=signature_algorithm_name(self.identity.certificate), proxy=config.proxy,
            ),
            output_limit=config.script_output_limit,
        )
        dispatcher.register(SCRIPT_SERVICE, ScriptService(runner))
        dispatcher.register(SCRIPT_SERVICE_V2, ScriptServiceV2(runner))
        register_tentacle_services(dispatcher, config, self.reactor, log=self._logger("tentacle.files"))
        _Every(
            min(WORKSPACE_CLEANING_INTERVAL, config.workspace_max_age / 2), self._clean_workspaces, self.reactor
        ).setServiceParent(self)
        return runner

    def _clean_workspaces(self) -> None:
        if self.scripts is None:
            return
        removed = remove_stale_workspaces(
            self.scripts.store, self.config.workspace_max_age, self.scripts.is_active,
            self.reactor.seconds(),
        )
        for folder in removed:
            self.log.info("Removed the old script workspace {folder}", folder=str(folder))

    def _interfaces(self) -> list[str]:
        """
        The addresses to try to listen on, in order, until one works.
        """
        address = self.config.listen_address
        if address is None:
            # One dual-stack IPv6 socket takes IPv4 too; without IPv6, fall back.
            return ["::", ""]
        return [address]

    def privilegedStartService(self) -> None:
        """
        Bind before privileges are dropped, and fail loudly: an agent that
        cannot listen must not look as if it started.
        """
        if self.config.listen and self.port is None:
            self._listen()
        self._privileged_started = True
        super().privilegedStartService()

    def _listen(self) -> None:
        tls = ListeningTLSFactory(AgentTLSOptions(self.identity), self.listener_factory, clock=self.reactor)
        self._accepting.wrappedFactory = tls
        factory = self._accepting
        # listenTCP itself, not twisted.internet.endpoints: the same call,
        # without the endpoint modules (and stdio) in every agent's memory.
        errors: list[BaseException] = []
        for interface in self._interfaces():
            try:
                port = self.reactor.listenTCP(self.config.port, factory, LISTEN_BACKLOG, interface)
            except Exception as e:
                errors.append(e)
                continue
            self.port = port
            take_turns(port)
            break
        if self.port is None:
            raise errors[-1]

    def startService(self) -> None:
        if not self._privileged_started:
            self.privilegedStartService()
        self._make_private()
        self._start_observing()
        super().startService()
        if self._freeze_startup_objects:
            freeze_startup_objects()
        if self._handle_sighup:
            # Before the line saying we listen: whoever waits for that line
            # may send SIGHUP at once, which would otherwise end the process.
            self._previous_sighup = signal.signal(signal.SIGHUP, self._on_sighup)
        if self.port is not None:
            self.log.info(
                "Tentacle listening on port {port} as {thumbprint}; trusting {count} server(s)",
                port=self.port.getHost().port,  # type: ignore[attr-defined]
                thumbprint=self.identity.thumbprint,
                count=len(self.trust.thumbprints),
            )
        else:
            self.log.info(
                "Tentacle not listening (polling only) as {thumbprint}", thumbprint=self.identity.thumbprint
            )
        if not self.trust.thumbprints:
            self.log.warn(
                "No server is trusted yet, so every message exchange will be "
                "refused: run 'tentacle configure --trust <server thumbprint>'"
            )
        if os.geteuid() == 0 and not self.config.allowed_roots:
            self.log.warn(
                "The agent runs as root with no allowed-roots: a trusted server may read and "
                "write any file on this machine. For production, run it as its own user "
                "('tentacle run --user NAME') and confine file transfers with allowed-roots.",
                event=events.RUNNING_AS_ROOT,
            )

    def stopService(self) -> Any:
        self._stop_observing()
        if self._handle_sighup and self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        d = super().stopService()
        port, self.port = self.port, None
        if port is not None:
            d.addCallback(lambda _: port.stopListening())
        for connection in self.listener_factory.authenticated_connections:
            if connection.transport is not None:
                connection.transport.loseConnection()
        return d

    def _make_private(self) -> None:
        """
        Tighten the folders an older agent made 0755 (as whoever the agent
        runs as by now: after twistd dropped privileges).
        """
        for name in PRIVATE_FOLDERS:
            try:
                if tighten_folder(self.config.home / name):
                    self.log.info("Made {folder} private (0700)", folder=str(self.config.home / name))
            except OSError as e:
                self.log.warn("Could not make {folder} private: {error}", folder=name, error=str(e))

    # --- watching the agent ----------------------------------------------------

    def _start_observing(self) -> None:
        if self._observer is not None:
            return
        if self.config.audit_log:
            logs = self.config.home / "Logs"
            private_folder(logs)
            self._audit = AuditLog(str(logs / "audit.log"), clock=self.reactor)
        self._observer = AgentObserver(self.metrics, self._audit)
        self.events.addObserver(self._observer)
        if self.config.metrics_port is not None:
            # Only now: twisted.web is some fifty modules an agent without
            # the page does without.
            from tentacle.metrics_page import metrics_site

            site = metrics_site(self.metrics)
            self._metrics_port = self.reactor.listenTCP(self.config.metrics_port, site, interface="127.0.0.1")
            self.log.info("Metrics at http://127.0.0.1:{port}/metrics", port=self.config.metrics_port)

    def flush_audit(self) -> None:
        """
        Write the audit entries that wait for their batch now (they are
        written within L{tentacle.observe.AUDIT_FLUSH_INTERVAL} anyway).
        """
        if self._audit is not None:
            self._audit.flush()

    def _stop_observing(self) -> None:
        if self._observer is not None:
            self.events.removeObserver(self._observer)
            self._observer = None
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        if self._metrics_port is not None:
            self._metrics_port.stopListening()
            self._metrics_port = None
        self._publish_metrics()  # the last counts, for whoever reads them after the stop
        (self.config.home / HEARTBEAT_FILE).unlink(missing_ok=True)

    def _script_gauges(self) -> dict[str, float]:
        if self.scripts is None:
            return {}
        counts = self.scripts.counts()
        return {"running": counts[ProcessState.Running], "pending": counts[ProcessState.Pending]}

    def _beat(self) -> None:
        """
        Touch the heartbeat file and publish the metrics, for the
        C{livez} and C{metrics} commands of a running agent.
        """
        if self._publish_metrics():
            try:
                atomic_write(self.config.home / HEARTBEAT_FILE, self._heartbeat().encode(), durable=False)
            except OSError as e:
                self.log.error("Could not write the heartbeat: {error}", error=str(e))

    def _publish_metrics(self) -> bool:
        home = self.config.home
        try:
            private_folder(home / "Logs")
            atomic_write(home / METRICS_FILE, self.metrics.render().encode(), durable=False)
        except OSError as e:
            self.log.error("Could not write the metrics: {error}", error=str(e))
            return False
        return True

    def _heartbeat(self) -> str:
        """
        The time, then one line per polling server: C{polling ADDRESS
        SUBSCRIPTION CONNECTED/CONFIGURED}, for C{tentacle livez}.
        """
        lines = [f"{self.reactor.seconds():.0f}"]
        for server, connected, configured in self.polling.status():
            lines.append(f"polling {server.address} {server.subscription_id} {connected}/{configured}")
        return "\n".join(lines) + "\n"

    def _on_sighup(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.reload, "SIGHUP")

    def _poll_config(self) -> None:
        assert self._config_file is not None
        signature = self._config_file.signature()
        if signature != self._config_signature:
            self._config_signature = signature
            self.reload("the file changed")

    def reload(self, trigger: str = "a reload was asked for") -> None:
        """
        Re-read the configuration file and apply what a running agent can:
        trust (servers no longer trusted are disconnected at once), script
        timeout and concurrency, allowed roots, handshake timeout, the
        connection cap and the workspace age.  Other changes are logged as
        needing a restart.  A broken file changes nothing.
        """
        if self._config_file is None:
            return
        self.log.info(
            "Reloading the configuration from {path} ({trigger})",
            path=str(self._config_file.path), trigger=trigger, event="config_reload",
        )
        try:
            config = self._config_file.load()
        except ConfigError as e:
            self.log.error("Configuration not reloaded: {error}", error=str(e), event="config_reload_failed")
            return
        self.apply_settings(config)

    def apply_settings(self, config: TentacleConfig) -> None:
        """
        Apply the live settings of C{config} (see L{reload}); log the
        others that differ from the running ones.
        """
        live: dict[str, Any] = {}
        previous, self._loaded = self._loaded, config
        for key, old, new in changed_settings(previous, config):
            if key not in LIVE_SETTINGS:
                self.log.warn(
                    "{setting} changed from {old} to {new}; restart the agent to apply it",
                    setting=key, old=old, new=new, event="setting_needs_restart",
                )
                continue
            if key != "trusted-thumbprints":
                self.log.info(
                    "{setting} changed from {old} to {new}; applied", setting=key, old=old, new=new,
                    event="setting_applied",
                )
            live[key] = new
        self.apply_trust(config.trusted)
        self.polling.apply(config.polling_servers)
        self.config = attrs.evolve(
            self.config,
            trusted_thumbprints=config.trusted_thumbprints,
            polling_servers=config.polling_servers,
            allowed_roots=config.allowed_roots,
            max_concurrent_scripts=config.max_concurrent_scripts,
            script_timeout=config.script_timeout,
            handshake_timeout=config.handshake_timeout,
            max_connections=config.max_connections,
            max_unauthenticated_connections=config.max_unauthenticated_connections,
            max_unauthenticated_per_address=config.max_unauthenticated_per_address,
            first_byte_timeout=config.first_byte_timeout,
            connection_log_lines=config.connection_log_lines,
            workspace_max_age=config.workspace_max_age,
        )
        if not live:
            return
        if self.scripts is not None:
            self.scripts.set_limits(config.max_concurrent_scripts, config.script_timeout)
        for implementation in self.dispatcher.implementations:
            if isinstance(implementation, FileTransferService):
                implementation.allowed_roots = config.allowed_roots
        self.listener_factory.set_limits(config.admission)

    def apply_trust(self, thumbprints: tuple[str, ...] | frozenset[str]) -> None:
        added, removed = self.trust.replace(thumbprints)
        for t in sorted(added):
            self.log.info("Now trusting {thumbprint}", thumbprint=t, event=events.TRUST_ADDED)
        for t in sorted(removed):
            self.log.info("No longer trusting {thumbprint}", thumbprint=t, event=events.TRUST_REMOVED)
