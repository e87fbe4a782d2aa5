"""
Operations: the systemd unit and its installation, livez, metrics, log output.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tentacle.cli import main
from tentacle.logs import make_observer
from tentacle.metrics import Metrics
from tentacle.service import HEARTBEAT_FILE, METRICS_FILE
from tentacle.systemd import Unit, unit_name


class CLI(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.registry = Path(self.mktemp()).absolute()

    def run_cli(self, *argv: str, home: bool = True) -> tuple[int, str, str]:
        """
        The command on this test's home (or, with C{home=False}, on the
        instance it names), with a registry of its own.
        """
        out, err = io.StringIO(), io.StringIO()
        prefix = ["--home", str(self.home)] if home else []
        code = main([*prefix, *argv], out, err, {"TENTACLE_REGISTRY": str(self.registry)})
        return code, out.getvalue(), err.getvalue()


class UnitTests(CLI):
    def test_content(self) -> None:
        text = Unit("web", Path("/srv/tentacle web"), "deploy", "/usr/bin/python3").render()
        self.assertIn("ExecStart=/usr/bin/python3 -m tentacle --home \"/srv/tentacle web\" run\n", text)
        self.assertIn("User=deploy\n", text)
        self.assertIn("Restart=always\n", text)
        self.assertIn("WantedBy=multi-user.target\n", text)
        self.assertIn('Environment="TENTACLE_HOME=/srv/tentacle web"\n', text)
        for breaking in ("NoNewPrivileges", "ProtectSystem", "PrivateTmp", "ProtectHome"):
            self.assertNotIn(breaking, text)

    def test_names_per_instance(self) -> None:
        self.assertEqual(unit_name("default"), "tentacle.service")
        self.assertEqual(unit_name("web"), "tentacle-web.service")

    def test_systemd_accepts_it(self) -> None:
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            self.skipTest("systemd-analyze is not installed")  # type: ignore[attr-defined]
        folder = Path(self.mktemp())
        folder.mkdir()
        unit = folder / "tentacle-test.service"
        unit.write_text(Unit("test", self.home).render())
        result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Unknown", result.stderr)


class InstallTests(CLI):
    def setUp(self) -> None:
        super().setUp()
        self.units = Path(self.mktemp()).absolute()
        self.calls = Path(self.mktemp()).absolute()
        self.systemctl = Path(self.mktemp()).absolute()
        # Stands in for systemctl: records its arguments, as the real one
        # would need a running systemd.
        self.systemctl.write_text(f'#!/bin/sh\necho "$@" >> {self.calls}\n')
        self.systemctl.chmod(0o755)

    def service(self, *argv: str) -> tuple[int, str, str]:
        return self.run_cli(
            "service", *argv, "--unit-dir", str(self.units), "--systemctl", str(self.systemctl),
            home="--instance" not in argv,
        )

    def create(self, *names: str) -> None:
        for name in names:
            code, _, err = self.run_cli("create-instance", name, "--home", str(self.home / name), home=False)
            self.assertEqual(code, 0, err)

    def test_install_and_uninstall(self) -> None:
        code, out, err = self.service("--install", "--user", "nobody")
        self.assertEqual(code, 0, err)
        unit = self.units / "tentacle.service"
        self.assertIn("User=nobody", unit.read_text())
        self.assertIn(f"--home {self.home} run", unit.read_text())
        self.assertEqual(self.calls.read_text().splitlines(), ["daemon-reload", "enable tentacle.service"])
        code, out, err = self.service("--uninstall")
        self.assertEqual(code, 0, err)
        self.assertFalse(unit.exists())
        self.assertEqual(
            self.calls.read_text().splitlines()[2:], ["disable --now tentacle.service", "daemon-reload"]
        )

    def test_several_instances(self) -> None:
        self.create("blue", "green")
        self.service("--install", "--instance", "blue")
        self.service("--instance", "green", "--install")
        self.assertEqual(sorted(p.name for p in self.units.iterdir()), ["tentacle-blue.service", "tentacle-green.service"])
        self.assertIn(f"--home {self.home / 'blue'} run", (self.units / "tentacle-blue.service").read_text())

    def test_unknown_instance(self) -> None:
        code, _, err = self.service("--install", "--instance", "blue")
        self.assertEqual(code, 1)
        self.assertIn("there is no instance named 'blue'", err)
        self.assertFalse(self.units.exists())

    def test_control(self) -> None:
        self.create("blue")
        for action in ("start", "stop", "restart"):
            code, _, err = self.service(f"--{action}", "--instance", "blue")
            self.assertEqual(code, 0, err)
        self.assertEqual(
            self.calls.read_text().splitlines(),
            ["start tentacle-blue.service", "stop tentacle-blue.service", "restart tentacle-blue.service"],
        )

    def test_without_systemd(self) -> None:
        code, out, err = self.run_cli(
            "service", "--start", "--unit-dir", str(self.units), "--systemctl", ""
        )
        self.assertEqual(code, 1)
        self.assertIn("this machine does not run systemd", err)
        code, _, err = self.run_cli("service", "--install", "--unit-dir", str(self.units), "--systemctl", "")
        self.assertEqual(code, 1)
        self.assertIn("save this unit as", err)
        self.assertIn("ExecStart=", err, "the unit is printed for doing it by hand")
        self.assertFalse(self.units.exists())

    def test_without_permission(self) -> None:
        if os.geteuid() == 0:
            locked = Path("/proc/no-such-folder")  # not writable even for root
        else:
            locked = Path(self.mktemp())
            locked.mkdir()
            locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        code, out, err = self.run_cli(
            "service", "--install", "--unit-dir", str(locked), "--systemctl", str(self.systemctl)
        )
        self.assertEqual(code, 1)
        self.assertIn("cannot write", err)
        self.assertIn("[Service]", err, "the unit is printed for doing it by hand")

    def test_warns_when_the_user_cannot_reach_the_interpreter(self) -> None:
        import tempfile

        private = Path(tempfile.mkdtemp(prefix="tentacle-private-"))
        self.addCleanup(shutil.rmtree, private)
        python = private / "bin" / "python3"
        python.parent.mkdir()
        python.write_text("")
        python.chmod(0o755)
        private.chmod(0o700)
        code, out, err = self.run_cli("service", "--print", "--user", "nobody", "--python", str(python))
        self.assertEqual(code, 0, err)
        self.assertIn(f"ExecStart={python} -m tentacle", out)
        self.assertEqual(
            err,
            f"tentacle: warning: nobody cannot reach {python} ({private} is closed to it), so the service will "
            "not start; install tentacle where every user can read it (docs/install.rst, 'A system-wide install "
            "for a service') and give the home to the user\n",
        )

    def test_unknown_service_user(self) -> None:
        code, out, err = self.run_cli("service", "--print", "--user", "no-such-user-here")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("there is no user 'no-such-user-here'", err)

    def test_bad_instance(self) -> None:
        code, _, err = self.service("--install", "--instance", "../evil")
        self.assertEqual(code, 2)
        self.assertIn("cannot be an instance name", err)


class LivezTests(CLI):
    def beat(self, age: float) -> None:
        path = self.home / HEARTBEAT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
        then = time.time() - age
        os.utime(path, (then, then))

    def test_fresh(self) -> None:
        self.beat(5)
        code, out, _ = self.run_cli("livez")
        self.assertEqual(code, 0)
        self.assertIn("alive", out)

    def test_stale(self) -> None:
        self.beat(120)
        code, _, err = self.run_cli("livez", "--max-age", "60")
        self.assertEqual(code, 1)
        self.assertIn("heartbeat is 120 s old (more than 60 s)", err)
        self.assertEqual(self.run_cli("livez", "--max-age", "300")[0], 0)

    def test_no_agent(self) -> None:
        code, _, err = self.run_cli("livez")
        self.assertEqual(code, 1)
        self.assertIn("no agent is running", err)

    def test_metrics_without_agent(self) -> None:
        code, out, err = self.run_cli("metrics")
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, f"tentacle: error: no agent is running for {self.home}\n")

    def test_metrics_of_a_stopped_agent(self) -> None:
        path = self.home / METRICS_FILE
        path.parent.mkdir(parents=True)
        path.write_text(Metrics().render())
        code, out, err = self.run_cli("metrics")
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"no agent is running for {self.home}; the counts it published when it last stopped are in {path}", err)

    def test_unknown_home(self) -> None:
        self.home = self.home / "typo"
        for command in ("livez", "metrics", "show-configuration", "show-thumbprint"):
            code, out, err = self.run_cli(command)
            self.assertEqual((code, out), (1, ""))
            self.assertIn(f"{self.home} is not a tentacle home (it does not exist)", err)
            self.assertEqual(err.count("\n"), 1)

    def test_metrics(self) -> None:
        self.beat(1)
        path = self.home / METRICS_FILE
        path.write_text(Metrics().render())
        code, out, _ = self.run_cli("metrics")
        self.assertEqual(code, 0)
        self.assertIn("tentacle_requests_total", out)


class LogOutputTests(SynchronousTestCase):
    def log_to(self, observer: object) -> Logger:
        publisher = LogPublisher(observer)  # type: ignore[arg-type]
        return Logger(namespace="t", observer=publisher)

    def test_json_lines_rotated_by_size(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        log = self.log_to(make_observer("json", str(folder / "agent.log"), 2048))
        for i in range(40):
            log.info("event {n} {padding}", n=i, padding="x" * 100)
        log.debug("not shown at the default level")
        lines = (folder / "agent.log").read_text().splitlines()
        self.assertTrue((folder / "agent.log.1").exists(), "rotated")
        record = json.loads(lines[-1])
        self.assertEqual(record["n"], 39)
        everything = "".join(p.read_text() for p in folder.iterdir())
        self.assertNotIn("not shown", everything)

    def test_text(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        log = self.log_to(make_observer("text", str(folder / "agent.log"), 10**6))
        log.info("hello {who}", who="world")
        self.assertIn("[t#info] hello world", (folder / "agent.log").read_text())


class FlatJSONTests(SynchronousTestCase):
    def lines(self, emit: object, level: str = "info") -> list[dict[str, object]]:
        folder = Path(self.mktemp())
        folder.mkdir()
        observer = make_observer("json", str(folder / "agent.log"), 10**6, level)
        log = Logger(namespace="tentacle.test", observer=LogPublisher(observer))
        emit(log)  # type: ignore[operator]
        return [json.loads(line) for line in (folder / "agent.log").read_text().splitlines()]

    def test_one_flat_object_per_event(self) -> None:
        [line] = self.lines(lambda log: log.info(
            "{service}.{method} for {thumbprint}: {outcome}", event="request_served", peer="127.0.0.1:5000",
            thumbprint="AB" * 20, service="IScriptServiceV2", method="StartScript", ticket="T-1",
            outcome="ok", duration=0.25,
        ))
        time_text = line.pop("time")
        self.assertRegex(str(time_text), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertEqual(line, {
            "level": "info", "logger": "tentacle.test",
            "message": f"IScriptServiceV2.StartScript for {'AB' * 20}: ok",
            "event": "request_served", "peer": "127.0.0.1:5000", "thumbprint": "AB" * 20,
            "service": "IScriptServiceV2", "method": "StartScript", "ticket": "T-1", "outcome": "ok",
            "duration": 0.25,
        })

    def test_values_json_cannot_hold_become_text(self) -> None:
        [line] = self.lines(lambda log: log.warn("at {path}", path=Path("/x"), roots=(Path("/a"),), logger=3))
        self.assertEqual((line["path"], line["roots"], line["field_logger"], line["level"]), ("/x", ["/a"], 3, "warn"))

    def test_failures_carry_their_traceback(self) -> None:
        def emit(log: Logger) -> None:
            try:
                1 / 0
            except ZeroDivisionError:
                log.failure("Script {ticket} failed", ticket="T-2")

        [line] = self.lines(emit)
        self.assertEqual((line["level"], line["message"], line["ticket"]), ("critical", "Script T-2 failed", "T-2"))
        self.assertIn("ZeroDivisionError", str(line["traceback"]))

    def test_levels(self) -> None:
        def emit(log: Logger) -> None:
            log.debug("per request")
            log.info("script finished")

        self.assertEqual([line["message"] for line in self.lines(emit)], ["script finished"])
        self.assertEqual([line["message"] for line in self.lines(emit, "debug")], ["per request", "script finished"])


class MetricValueTests(SynchronousTestCase):
    def test_exact_values(self) -> None:
        from tentacle.metrics import format_value

        self.assertEqual(
            [format_value(v) for v in (314_572_800, 0, 3.0, 0.1, 1 / 3, 2.5e-07, float("inf"), float("nan"), True)],
            ["314572800", "0", "3", "0.1", "0.3333333333333333", "2.5e-07", "+Inf", "NaN", "1"],
        )

    def test_rendered(self) -> None:
        metrics = Metrics()
        metrics.bytes_uploaded = 314_572_800
        metrics.observe_latency(0.1)
        metrics.observe_latency(0.2)
        text = metrics.render()
        self.assertIn("tentacle_uploaded_bytes_total 314572800\n", text)
        self.assertIn(f"tentacle_request_duration_seconds_sum {0.1 + 0.2!r}\n", text)
        self.assertIn('tentacle_request_duration_seconds_bucket{le="0.25"} 2\n', text)
        self.assertNotIn("e+", text)
