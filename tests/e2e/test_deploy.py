"""
Deploying packages through the client library to real agents on loopback:
the package cache check, the upload, the deploy tool run as a script on
each agent, live output, failure, rollback and retention.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from tentacle.client.api import Progress, Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.client.deploy import DeployResult, deploy, releases, rollback
from tentacle.contracts import ProcessOutput, ProcessOutputSource, UploadResult
from tentacle.deploy.packages import PackageError
from tentacle.deploy.deployment import VariableError
from tentacle.service import TentacleService
from tests.deploy_support import markers, sample_package
from tests.support import LogCapture, agent_port, identity, start_agent


class CountingClient(TentacleClient):
    """
    A real client that also counts the uploads it makes.
    """

    uploads = 0

    async def upload(self, local: Path, remote: str, progress: Progress | None = None) -> UploadResult:
        self.uploads += 1
        return await super().upload(local, remote, progress)


class DeployTests(TestCase):
    def setUp(self) -> None:
        self.homes: list[Path] = []
        self.agents: list[TentacleService] = []
        for _ in range(3):
            home = Path(self.mktemp()).absolute()
            home.mkdir()
            self.homes.append(home)
            self.agents.append(start_agent(self, home=home, trusted=(identity("server").thumbprint,)))
        self.packages = Path(self.mktemp()).absolute()
        self.packages.mkdir()

    def client(self, index: int = 0) -> CountingClient:
        target = Target("127.0.0.1", agent_port(self.agents[index]), Pin(identity("agent").thumbprint))
        client = CountingClient(target, identity("server"), reactor)
        self.addCleanup(client.close)
        return client

    def root(self, index: int = 0) -> Path:
        return self.homes[index] / "Applications" / "webapp"

    def current(self, index: int = 0) -> str | None:
        link = self.root(index) / "current"
        return os.readlink(link) if link.is_symlink() else None

    async def test_deploy_to_three_agents(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        clients = [self.client(i) for i in range(3)]
        logs: list[list[tuple[ProcessOutputSource, str]]] = [[], [], []]

        def logger(i: int) -> Any:
            return lambda line: logs[i].append((line.source, line.text))

        results: list[DeployResult] = await gatherResults([
            Deferred.fromCoroutine(deploy(c, package, variables={"Greeting": "hi"}, on_log=logger(i)))
            for i, c in enumerate(clients)
        ])
        for i, result in enumerate(results):
            self.assertEqual((result.exit_code, result.uploaded, clients[i].uploads), (0, True, 1))
            self.assertEqual((result.package.id, result.package.version), ("webapp", "1.0.0"))
            root = self.root(i)
            self.assertEqual((root / "1.0.0" / "site" / "index.html").read_text(), "<h1>hello</h1>\n")
            self.assertEqual(self.current(i), "1.0.0")
            self.assertEqual(markers(self.homes[i]), [
                "PreDeploy 1.0.0 in=1.0.0 current=none",
                "Deploy 1.0.0 in=1.0.0 current=none",
                "PostDeploy 1.0.0 in=1.0.0 current=1.0.0",
            ])
            texts = [text for _, text in logs[i]]
            wanted = ["Running PreDeploy.sh", "pre-deploy says hello", "deploying 1.0.0 greeting=hi",
                      "Running PostDeploy.sh", "post-deploy done", "Deployed webapp 1.0.0"]
            positions = [texts.index(t) for t in wanted]
            self.assertEqual(positions, sorted(positions))
            self.assertIn((ProcessOutputSource.StdErr, "a warning"), logs[i])
            self.assertTrue((self.homes[i] / "Packages" / "webapp.1.0.0.tar.gz").is_file())
            self.assertEqual(list((self.homes[i] / "Work").iterdir()), [], "every script was completed")

    async def test_failing_deploy_keeps_the_previous_release(self) -> None:
        client = self.client()
        self.assertTrue((await deploy(client, sample_package(self.packages, "1.0.0"))).ok)
        lines: list[ProcessOutput] = []
        result = await deploy(
            client, sample_package(self.packages, "1.1.0"), variables={"FAIL_DEPLOY": "yes"}, on_log=lines.append
        )
        self.assertEqual(result.exit_code, 1)
        self.assertEqual(self.current(), "1.0.0")
        self.assertEqual(markers(self.homes[0])[-1], "DeployFailed 1.1.0 error=Deploy.sh failed with exit code 7")
        self.assertIn("Deployment failed: Deploy.sh failed with exit code 7", [line.text for line in lines])
        self.assertEqual([r.version for r in await releases(client, "webapp")], ["1.0.0"])

    async def test_redeploy_uploads_nothing_and_adds_no_release(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        client = self.client()
        first = await deploy(client, package)
        second = await deploy(client, package)
        third = await deploy(self.client(), package)  # a fresh client: the agent's cache decides, not ours
        self.assertEqual([r.uploaded for r in (first, second, third)], [True, False, False])
        self.assertEqual([r.exit_code for r in (first, second, third)], [0, 0, 0])
        self.assertEqual(client.uploads, 1)
        found = await releases(client, "webapp")
        self.assertEqual([(r.version, r.current) for r in found], [("1.0.0", True)])
        visible = sorted(p.name for p in self.root().iterdir() if not p.name.startswith("."))
        self.assertEqual(visible, ["1.0.0", "current"])
        # A cached file that is not this exact package is replaced.
        (self.homes[0] / "Packages" / "webapp.1.0.0.tar.gz").write_bytes(b"something else")
        again = await deploy(client, package)
        self.assertEqual((again.uploaded, again.exit_code, client.uploads), (True, 0, 2))

    async def test_rollback_and_retention(self) -> None:
        client = self.client()
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            result = await deploy(client, sample_package(self.packages, version), keep=2)
            self.assertEqual(result.exit_code, 0)
        found = await releases(client, "webapp")
        self.assertEqual([(r.version, r.current) for r in found], [("2.0.0", False), ("3.0.0", True)])
        self.assertFalse((self.root() / "1.0.0").exists())

        lines: list[str] = []
        self.assertEqual(await rollback(client, "webapp", on_log=lambda line: lines.append(line.text)), 0)
        self.assertEqual(self.current(), "2.0.0")
        self.assertEqual(markers(self.homes[0])[-1], "PostDeploy 2.0.0 in=2.0.0 current=2.0.0")
        self.assertIn("post-deploy done", lines)
        self.assertEqual(client.uploads, 3, "rollback sends no package")
        self.assertEqual(await rollback(client, "webapp"), 1, "nothing earlier than 2.0.0 is kept")
        self.assertEqual(await rollback(client, "webapp", to="3.0.0"), 0)
        self.assertEqual(self.current(), "3.0.0")

    async def test_variables_and_substitution(self) -> None:
        client = self.client()
        package = sample_package(self.packages, "1.0.0")
        result = await deploy(
            client, package, variables={"Greeting": "it's \"quoted\" $HOME", "Port": "8080"},
            substitute=["config/*.conf"],
        )
        self.assertEqual(result.exit_code, 0)
        self.assertEqual(
            (self.root() / "1.0.0" / "config" / "app.conf").read_text(),
            "greeting=it's \"quoted\" $HOME\nport=8080\nkept=#{NotAVariable}\nliteral=#{Greeting}\n",
        )
        with self.assertRaises(VariableError):
            await deploy(client, package, variables={"TentacleHome": "/"})
        with self.assertRaises(PackageError):
            await deploy(client, self.packages / "no-version.zip")

    async def test_unsafe_package_is_refused_on_the_agent(self) -> None:
        evil = self.packages / "webapp.6.6.6.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("Deploy.sh", "echo hi")
            zf.writestr("../../../../evil.txt", "gotcha")
        lines: list[str] = []
        result = await deploy(self.client(), evil, on_log=lambda line: lines.append(line.text))
        self.assertEqual(result.exit_code, 1)
        self.assertTrue(any("'..'" in text for text in lines), lines)
        self.assertFalse((self.root() / "6.6.6").exists())
        for folder in (self.homes[0], self.homes[0].parent, self.homes[0].parent.parent):
            self.assertFalse((folder / "evil.txt").exists())

    async def test_scripts_are_told_the_agents_python(self) -> None:
        lines: list[str] = []
        code = await self.client().run_script('echo "$TentaclePython"', on_log=lambda line: lines.append(line.text))
        self.assertEqual((code, lines), (0, [sys.executable]))


class PollingDeployTests(DeployTests):
    """
    The same deployments, to three agents that poll a polling server in
    this process: each is reached through its subscription's queue.
    """

    def setUp(self) -> None:
        from tests.support import polled, start_polling_agent, start_polling_server

        self.logs = LogCapture.install(self)
        self.polling_server = start_polling_server(self)
        self.homes = []
        self.agents = []
        for index in range(3):
            home = Path(self.mktemp()).absolute()
            home.mkdir()
            self.homes.append(home)
            entry = polled(self.polling_server, subscription=f"poll://deploy{index}/")
            self.agents.append(start_polling_agent(self, self.polling_server, home=home, polling_servers=(entry,)))
        self.packages = Path(self.mktemp()).absolute()
        self.packages.mkdir()
        return Deferred.fromCoroutine(self._connected())  # type: ignore[return-value]

    async def _connected(self) -> None:
        while self.polling_server.connections() < 3:
            await self.logs.wait_for(event="polling_subscribed")
            self.logs.events = [e for e in self.logs.events if e.get("event") != "polling_subscribed"]

    def client(self, index: int = 0) -> CountingClient:
        target = Target.polling(f"poll://deploy{index}/", Pin(identity("agent").thumbprint))
        client = CountingClient(target, identity("server"), reactor, hub=self.polling_server)
        self.addCleanup(client.close)
        return client
