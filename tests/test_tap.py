"""
The twistd plugin and the service it makes, on a memory reactor and fake clock.
"""

from __future__ import annotations

import os
import stat

from pathlib import Path

import attrs
from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from tentacle.config import ConfigFile, TentacleConfig
from tentacle.identity import IdentityStore
from tentacle.service import CONFIG_POLL_INTERVAL, TentacleService
from tentacle.tap import Options, makeService
from tests.support import LogCapture, identity


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("tentacle", makers)
        self.assertIsInstance(makers["tentacle"].options(), Options)

    def test_the_dropin_and_tentacle_run_make_the_same_service(self) -> None:
        from tentacle.tap import service_maker
        from twisted.plugins.tentacle_plugin import tentacle

        self.assertEqual(
            (tentacle.tapname, tentacle.module, tentacle.description),
            (service_maker.tapname, service_maker.module, service_maker.description),
        )

    def test_version(self) -> None:
        import contextlib
        import io

        from tentacle import __version__

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertRaises(SystemExit, Options().parseOptions, ["--version"])
        self.assertRegex(out.getvalue(), rf"^tentacle {__version__} \(Twisted \d+\.\d+")


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertIsNone(options["home"])
        self.assertIsNone(options["port"])

    def test_bad_port(self) -> None:
        e = self.assertRaises(UsageError, Options().parseOptions, ["--port", "0"])
        self.assertIn("expected a number from 1 to 65535", str(e))

    def test_bad_address(self) -> None:
        e = self.assertRaises(UsageError, Options().parseOptions, ["--listen-address", "x"])
        self.assertIn("is not an IP address", str(e))


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.logs = LogCapture.install(self)
        # makeService sets the process's umask, as a daemon's; not the suite's.
        self.addCleanup(os.umask, os.umask(0o022))

    def make(self, *argv: str) -> TentacleService:
        options = Options()
        options.parseOptions(["--home", str(self.home), *argv])
        service = makeService(options, MemoryReactorClock())
        assert isinstance(service, TentacleService)
        return service

    def test_first_start_creates_identity_and_says_what_next(self) -> None:
        service = self.make()
        stored = IdentityStore(self.home).load()
        self.assertEqual(service.identity.thumbprint, stored.thumbprint)
        [event] = [e for e in self.logs.events if e.get("thumbprint") == stored.thumbprint]
        self.assertIn("tentacle configure --trust", event["log_format"])

    def test_the_daemon_freezes_its_startup_objects(self) -> None:
        """
        As started by twistd, the agent keeps its start-up objects out of
        later full collections (they stalled the reactor for tens of ms);
        an embedded one leaves the process's collector alone.
        """
        import gc

        self.addCleanup(gc.unfreeze)
        service = self.make()
        self.assertTrue(service._freeze_startup_objects)
        gc.unfreeze()
        service.startService()
        self.addCleanup(service.stopService)
        self.assertGreater(gc.get_freeze_count(), 1000)
        embedded = TentacleService(service.config, MemoryReactorClock(), identity=service.identity)
        self.assertFalse(embedded._freeze_startup_objects)

    def test_umask_077_and_a_private_home(self) -> None:
        self.make()
        self.assertEqual(os.umask(0o077), 0o077)
        self.assertEqual(stat.S_IMODE(self.home.stat().st_mode), 0o700)
        for path in self.home.iterdir():
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)

    def test_existing_identity_is_kept(self) -> None:
        IdentityStore(self.home).save(identity("agent"))
        self.assertEqual(self.make().identity.thumbprint, identity("agent").thumbprint)

    def test_options_override_config_file(self) -> None:
        ConfigFile(self.home).save(TentacleConfig(home=self.home, port=2000, trusted_thumbprints=("A" * 40,)))
        service = self.make("--port", "3000", "--listen-address", "127.0.0.1")
        self.assertEqual(service.config.port, 3000)
        self.assertEqual(service.config.listen_address, "127.0.0.1")
        self.assertEqual(service.trust.thumbprints, {"A" * 40})

    def test_broken_config_is_a_usage_error(self) -> None:
        self.home.mkdir()
        ConfigFile(self.home).path.write_text('{"listen-port": "x"}')
        e = self.assertRaises(UsageError, self.make)
        self.assertIn("listen-port", str(e))


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.reactor = MemoryReactorClock()
        self.config_file = ConfigFile(self.home)
        self.config_file.save(TentacleConfig(home=self.home, trusted_thumbprints=("A" * 40,)))
        self.logs = LogCapture.install(self)

    def service(self, **changes: object) -> TentacleService:
        config = attrs.evolve(self.config_file.load(), **changes)
        return TentacleService(
            config, self.reactor, identity=identity("agent"), config_file=self.config_file
        )

    def test_listens_dual_stack_by_default(self) -> None:
        service = self.service()
        service.startService()
        [(port, factory, backlog, interface)] = self.reactor.tcpServers
        self.assertEqual((port, interface), (10933, "::"))

    def test_listens_on_given_address(self) -> None:
        self.service(listen_address="127.0.0.1").startService()
        [(port, _, _, interface)] = self.reactor.tcpServers
        self.assertEqual(interface, "127.0.0.1")

    def test_bind_failure_is_raised(self) -> None:
        class Refusing(MemoryReactorClock):
            def listenTCP(self, *args: object, **kwargs: object) -> object:
                raise CannotListenError("", 10933, OSError("in use"))

        self.reactor = Refusing()
        self.assertRaises(CannotListenError, self.service().privilegedStartService)

    def test_edited_config_is_picked_up_by_polling(self) -> None:
        service = self.service()
        service.startService()
        self.config_file.save(self.config_file.load().trust("B" * 40).distrust("A" * 40))
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        self.assertEqual(service.trust.thumbprints, {"B" * 40})
        self.assertTrue(self.logs.matching(event="trust_added", thumbprint="B" * 40))
        self.assertTrue(self.logs.matching(event="trust_removed", thumbprint="A" * 40))

    def test_broken_config_keeps_trust(self) -> None:
        service = self.service()
        service.startService()
        self.config_file.path.write_text("{")
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        self.assertEqual(service.trust.thumbprints, {"A" * 40})
        self.assertEqual(len([e for e in self.logs.events if "not reloaded" in e.get("log_format", "")]), 1)

    def test_reloads_are_logged(self) -> None:
        service = self.service()
        service.startService()
        self.config_file.save(self.config_file.load().trust("B" * 40))
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        service.reload("SIGHUP")
        self.assertEqual(
            [e["trigger"] for e in self.logs.matching(event="config_reload")], ["the file changed", "SIGHUP"]
        )

    def test_live_settings_are_applied(self) -> None:
        from tentacle.services.files import FileTransferService

        service = self.service()
        service.startService()
        root = self.home / "allowed"
        config = attrs.evolve(
            self.config_file.load(), script_timeout=5.0, max_concurrent_scripts=2, allowed_roots=(root,),
            handshake_timeout=12.0, max_connections=7, workspace_max_age=100.0,
            max_unauthenticated_connections=5, first_byte_timeout=2.0,
        )
        self.config_file.save(config)
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        assert service.scripts is not None
        self.assertEqual((service.scripts._slots.limit, service.scripts._script_timeout), (2, 5.0))
        [files] = [i for i in service.dispatcher.implementations if isinstance(i, FileTransferService)]
        self.assertEqual(files.allowed_roots, (root,))
        limits = service.listener_factory.limits
        self.assertEqual(
            (limits.handshake_timeout, limits.max_connections, limits.max_unauthenticated, limits.first_byte_timeout),
            (12.0, 7, 5, 2.0),
        )
        self.assertEqual(service.config.workspace_max_age, 100.0)
        applied = {e["setting"]: e["new"] for e in self.logs.matching(event="setting_applied")}
        self.assertEqual(applied, {
            "allowed-roots": [str(root)], "max-concurrent-scripts": 2, "script-timeout": 5.0,
            "handshake-timeout": 12.0, "max-connections": 7, "workspace-max-age": 100.0,
            "max-unauthenticated-connections": 5, "first-byte-timeout": 2.0,
        })
        self.assertEqual(self.logs.matching(event="setting_needs_restart"), [])

    def test_settings_that_need_a_restart_say_so(self) -> None:
        service = self.service()
        service.startService()
        self.config_file.save(attrs.evolve(self.config_file.load(), port=2000, metrics_port=9101))
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        restart = self.logs.matching(event="setting_needs_restart")
        self.assertEqual([(e["setting"], e["old"], e["new"]) for e in restart],
                         [("listen-port", 10933, 2000), ("metrics-port", None, 9101)])
        self.assertIn("restart the agent to apply it", restart[0]["log_format"])
        self.assertEqual(service.config.port, 10933)
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        self.assertEqual(len(self.logs.matching(event="setting_needs_restart")), 2, "said once, not on every poll")

    def test_command_line_overrides_are_not_reported_as_changes(self) -> None:
        options = Options()
        options.parseOptions(["--home", str(self.home), "--port", "3000"])
        IdentityStore(self.home).save(identity("agent"))
        service = makeService(options, self.reactor)
        assert isinstance(service, TentacleService)
        service.startService()
        self.config_file.save(self.config_file.load().trust("B" * 40))
        self.reactor.advance(CONFIG_POLL_INTERVAL)
        self.assertEqual(self.logs.matching(event="setting_needs_restart"), [])
        self.assertEqual(service.config.port, 3000)

    def test_metrics_are_published_at_stop(self) -> None:
        from tentacle.service import HEARTBEAT_FILE, METRICS_FILE

        service = self.service()
        service.startService()
        self.reactor.advance(10)
        self.assertTrue((self.home / HEARTBEAT_FILE).exists())
        service.metrics.bytes_uploaded = 314_572_800
        service.stopService()
        self.assertIn("tentacle_uploaded_bytes_total 314572800\n", (self.home / METRICS_FILE).read_text())
        self.assertFalse((self.home / HEARTBEAT_FILE).exists())

    def test_warns_when_nothing_is_trusted(self) -> None:
        self.service(trusted_thumbprints=()).startService()
        self.assertTrue([e for e in self.logs.events if "No server is trusted yet" in e.get("log_format", "")])


class WorkspaceCleanerTests(SynchronousTestCase):
    def test_old_workspaces_are_removed_on_a_timer(self) -> None:
        import os
        import time

        from tentacle.workspace import WorkspaceStore

        home = Path(self.mktemp()).absolute()
        reactor = MemoryReactorClock()
        reactor.advance(time.time())
        service = TentacleService(
            TentacleConfig(home=home, workspace_max_age=3600), reactor, identity=identity("agent")
        )
        store = WorkspaceStore(home)
        old, fresh = store.workspace("old"), store.workspace("fresh")
        old.create()
        fresh.create()
        os.utime(old.root, (time.time() - 7200, time.time() - 7200))
        service.startService()
        self.assertFalse(old.exists())
        self.assertTrue(fresh.exists())
        reactor.advance(1800)  # the next round, half the age later
        self.assertTrue(fresh.exists())
        reactor.advance(3601)
        self.assertFalse(fresh.exists())


class PeriodicTaskTests(SynchronousTestCase):
    """
    The agent's periodic tasks (heartbeat, configuration watch, workspace
    cleaning): at once, then every interval while running.
    """

    def test_runs_while_running(self) -> None:
        from twisted.internet.task import Clock

        from tentacle.service import _Every

        clock = Clock()
        calls: list[float] = []
        every = _Every(10, lambda: calls.append(clock.seconds()), clock)
        every.startService()
        clock.pump([10, 10, 5])
        self.assertEqual(calls, [0, 10, 20])
        self.successResultOf(every.stopService())
        clock.advance(100)
        self.assertEqual(calls, [0, 10, 20])
        self.assertFalse(every.running)

    def test_a_failure_is_logged(self) -> None:
        from twisted.internet.task import Clock

        from tentacle.service import _Every

        logs = LogCapture.install(self)
        clock = Clock()

        def broken() -> None:
            raise OSError("disk full")

        every = _Every(10, broken, clock)
        every.startService()
        [failure] = [e["log_failure"] for e in logs.events if "log_failure" in e]
        self.assertIsInstance(failure.value, OSError)
        self.flushLoggedErrors(OSError)
        self.successResultOf(every.stopService())
