"""
Releases on disk (L{ReleaseStore}, in process) and the deploy tool as the
agent runs it: C{python -m tentacle.deploy} in a child process, with a
sample package that records what its convention scripts did.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tentacle.deploy.packages import file_hashes
from tentacle.deploy.releases import JOURNAL, ReleaseError, ReleaseStore, remove_tree
from tests.deploy_support import markers, sample_package


class ReleaseStoreTests(TestCase):
    def setUp(self) -> None:
        self.apps = Path(self.mktemp()).absolute()
        self.store = ReleaseStore(self.apps, "webapp")
        self.store.root.mkdir(parents=True)

    def release(self, version: str, record: bool = True) -> None:
        (self.store.root / version).mkdir()
        (self.store.root / version / "VERSION").write_text(version)
        if record:
            self.store.record(version, f"sha1-of-{version}")

    def test_activate_switches_a_relative_link(self) -> None:
        self.release("1.0")
        self.release("2.0")
        self.assertIsNone(self.store.current_version())
        self.store.activate("1.0")
        self.store.activate("2.0")
        link = self.store.root / "current"
        self.assertEqual(os.readlink(link), "2.0")
        self.assertEqual((link / "VERSION").read_text(), "2.0")
        self.assertEqual(self.store.current_version(), "2.0")
        self.assertEqual(sorted(p.name for p in self.store.root.iterdir()), [JOURNAL, "1.0", "2.0", "current"])

    def test_activate_refuses_a_missing_release_or_a_current_folder(self) -> None:
        with self.assertRaises(ReleaseError):
            self.store.activate("3.0")
        self.release("1.0")
        (self.store.root / "current").mkdir()
        with self.assertRaises(ReleaseError) as caught:
            self.store.activate("1.0")
        self.assertIn("not a symlink", str(caught.exception))

    def test_order_previous_and_unknown_folders(self) -> None:
        self.release("0.9", record=False)  # on disk, unknown to the journal: oldest
        for version in ("1.0", "2.0", "1.5"):
            self.release(version)
        self.store.activate("1.5")
        self.assertEqual([r.version for r in self.store.releases()], ["0.9", "1.0", "2.0", "1.5"])
        self.assertEqual([r.current for r in self.store.releases()], [False, False, False, True])
        self.assertEqual(self.store.previous("1.5").version, "2.0")  # type: ignore[union-attr]
        self.assertIsNone(self.store.previous("0.9"))
        self.store.record("1.0", "sha1-of-1.0")  # redeployed: now the newest
        self.assertEqual([r.version for r in self.store.releases()], ["0.9", "2.0", "1.5", "1.0"])

    def test_prune_keeps_the_newest_and_the_current(self) -> None:
        for version in ("1.0", "2.0", "3.0", "4.0"):
            self.release(version)
        self.store.activate("1.0")  # rolled far back
        self.assertEqual(self.store.prune(2), ["2.0"])
        self.assertEqual([r.version for r in self.store.releases()], ["1.0", "3.0", "4.0"])
        self.assertFalse((self.store.root / "2.0").exists())
        self.assertNotIn("2.0", (self.store.root / JOURNAL).read_text())
        with self.assertRaises(ReleaseError):
            self.store.remove("1.0")
        with self.assertRaises(ReleaseError):
            self.store.prune(0)

    def test_leftovers_and_read_only_trees(self) -> None:
        leftover = self.store.new_extract_folder()
        (leftover / "locked").mkdir()
        (leftover / "locked" / "file").write_text("x")
        (leftover / "locked").chmod(stat.S_IRUSR | stat.S_IXUSR)
        (leftover / "escape").symlink_to(self.apps)  # removed, never followed
        os.symlink("1.0", self.store.root / ".current-abc")
        self.assertEqual(len(self.store.clean_leftovers()), 2)
        self.assertEqual(list(self.store.root.iterdir()), [])
        self.assertTrue(self.apps.is_dir())
        remove_tree(self.store.root / "never-existed")


class ToolTests(TestCase):
    """
    The deploy tool in a child process, as the agent's script runs it.
    """

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.apps = self.home / "Applications"
        self.packages = self.base / "packages"
        for folder in (self.home, self.packages):
            folder.mkdir(parents=True)
        self.root = self.apps / "webapp"

    def tool(self, *args: str) -> tuple[int, str, str]:
        env = dict(os.environ, TentacleHome=str(self.home), TentacleApplications=str(self.apps))
        done = subprocess.run(
            [sys.executable, "-m", "tentacle.deploy", *args],
            capture_output=True, text=True, env=env, cwd=self.base, timeout=120,
        )
        return done.returncode, done.stdout, done.stderr

    def deploy(self, package: Path, *args: str) -> tuple[int, str, str]:
        return self.tool("deploy", "--package", str(package), *args)

    def current(self) -> str | None:
        link = self.root / "current"
        return os.readlink(link) if link.is_symlink() else None

    def releases(self) -> dict[str, Any]:
        code, out, _ = self.tool("releases", "--id", "webapp", "--json")
        self.assertEqual(code, 0)
        return dict(json.loads(out))

    def test_deploy_runs_the_conventions_in_order(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        sha1, sha256, _ = file_hashes(package)
        code, out, err = self.deploy(package, "--sha1", sha1, "--sha256", sha256, "--var", "Greeting=hi")
        self.assertEqual(code, 0, err)
        self.assertEqual(markers(self.home), [
            "PreDeploy 1.0.0 in=1.0.0 current=none",
            "Deploy 1.0.0 in=1.0.0 current=none",
            "PostDeploy 1.0.0 in=1.0.0 current=1.0.0",
        ])
        self.assertEqual(self.current(), "1.0.0")
        self.assertEqual((self.root / "current" / "site" / "index.html").read_text(), "<h1>hello</h1>\n")
        lines = out.splitlines()
        order = [lines.index(t) for t in ("pre-deploy says hello", "deploying 1.0.0 greeting=hi", "post-deploy done")]
        self.assertEqual(order, sorted(order))
        self.assertIn("a warning", err)
        self.assertEqual([p.name for p in self.root.iterdir() if p.name.startswith(".extract")], [])

    def test_failing_deploy_keeps_current_and_runs_deploy_failed(self) -> None:
        self.assertEqual(self.deploy(sample_package(self.packages, "1.0.0"))[0], 0)
        code, out, err = self.deploy(sample_package(self.packages, "1.1.0"), "--var", "FAIL_DEPLOY=yes")
        self.assertEqual(code, 1)
        self.assertEqual(self.current(), "1.0.0")
        self.assertEqual(markers(self.home)[-2:], [
            "Deploy 1.1.0 in=1.1.0 current=1.0.0",
            "DeployFailed 1.1.0 error=Deploy.sh failed with exit code 7",
        ])
        self.assertIn("Deploy.sh failed with exit code 7", err)
        self.assertIn("still points to 1.0.0", out)
        self.assertFalse((self.root / "1.1.0").exists(), "the failed release is not kept")
        self.assertEqual([r["version"] for r in self.releases()["releases"]], ["1.0.0"])

    def test_failing_post_deploy_leaves_the_new_release_live(self) -> None:
        self.deploy(sample_package(self.packages, "1.0.0"))
        code, _, err = self.deploy(sample_package(self.packages, "1.1.0"), "--var", "FAIL_POST=yes")
        self.assertEqual(code, 1)
        self.assertIn("PostDeploy.sh failed with exit code 9", err)
        self.assertEqual(self.current(), "1.1.0")
        self.assertEqual(markers(self.home)[-1], "DeployFailed 1.1.0 error=PostDeploy.sh failed with exit code 9")

    def test_wrong_hash_is_refused_before_anything_is_written(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        code, _, err = self.deploy(package, "--sha1", "0" * 40)
        self.assertEqual(code, 1)
        self.assertIn("not the expected", err)
        self.assertFalse(self.root.exists())
        self.assertEqual(markers(self.home), [])

    def test_redeploying_the_same_package_makes_no_second_release(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        self.assertEqual(self.deploy(package)[0], 0)
        code, out, _ = self.deploy(package)
        self.assertEqual(code, 0)
        self.assertIn("already extracted", out)
        self.assertEqual([r["version"] for r in self.releases()["releases"]], ["1.0.0"])
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), [".lock", JOURNAL, "1.0.0", "current"])
        self.assertEqual(len([m for m in markers(self.home) if m.startswith("Deploy ")]), 2, "scripts run again")

    def test_a_live_version_is_never_replaced_by_other_contents(self) -> None:
        self.deploy(sample_package(self.packages, "1.0.0"))
        other = self.base / "other"
        other.mkdir()
        changed = sample_package(other, "1.0.0", files={"site/index.html": "changed"})
        code, _, err = self.deploy(changed)
        self.assertEqual(code, 1)
        self.assertIn("deploy the change as a new version", err)
        self.assertEqual((self.root / "1.0.0" / "site" / "index.html").read_text(), "<h1>hello</h1>\n")

    def test_rollback_of_an_unknown_package_changes_nothing(self) -> None:
        code, _, err = self.tool("rollback", "--id", "webapp")
        self.assertEqual(code, 1)
        self.assertIn("no releases of webapp", err)
        self.assertFalse(self.apps.exists())

    def test_retention_and_rollback(self) -> None:
        for version in ("1.0.0", "2.0.0", "3.0.0"):
            self.assertEqual(self.deploy(sample_package(self.packages, version), "--keep", "2")[0], 0)
        self.assertFalse((self.root / "1.0.0").exists())
        listing = self.releases()
        versions = [r["version"] for r in listing["releases"]]
        self.assertEqual((versions, listing["current"]), (["2.0.0", "3.0.0"], "3.0.0"))

        code, out, _ = self.tool("rollback", "--id", "webapp")
        self.assertEqual(code, 0)
        self.assertIn("-> 2.0.0 (was 3.0.0)", out)
        self.assertEqual(self.current(), "2.0.0")
        self.assertEqual(markers(self.home)[-1], "PostDeploy 2.0.0 in=2.0.0 current=2.0.0")

        code, _, err = self.tool("rollback", "--id", "webapp")
        self.assertEqual((code, self.current()), (1, "2.0.0"))
        self.assertIn("nothing earlier", err)

        self.assertEqual(self.tool("rollback", "--id", "webapp", "--to", "3.0.0")[0], 0)
        self.assertEqual(self.current(), "3.0.0")
        self.assertEqual(self.tool("rollback", "--id", "webapp", "--to", "1.0.0")[0], 1)

    def test_substitution_and_variables(self) -> None:
        variables_file = self.base / "variables.json"
        variables_file.write_text(json.dumps({"Port": "8080", "Greeting": "from the file"}))
        code, out, err = self.deploy(
            sample_package(self.packages, "1.0.0"), "--variables-file", str(variables_file),
            "--var", "Greeting=hello", "--substitute", "config/*.conf",
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            (self.root / "1.0.0" / "config" / "app.conf").read_text(),
            "greeting=hello\nport=8080\nkept=#{NotAVariable}\nliteral=#{Greeting}\n",
        )
        self.assertEqual((self.root / "1.0.0" / "config" / "other.txt").read_text(), "untouched=#{Greeting}\n")
        self.assertIn("deploying 1.0.0 greeting=hello", out)

    def test_bad_variables_are_refused(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        for spec, expected in (("1st=x", "not a variable name"), ("A-B=x", "not a variable name"),
                               ("TentacleHome=/tmp", "agent's own"), ("NoValue", "NAME=VALUE")):
            code, _, err = self.deploy(package, "--var", spec)
            self.assertEqual(code, 1, spec)
            self.assertIn(expected, err)
        self.assertFalse(self.root.exists())

    def test_unsafe_package_is_refused(self) -> None:
        self.deploy(sample_package(self.packages, "1.0.0"))
        evil = self.packages / "webapp.2.0.0.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("Deploy.sh", "echo hi")
            zf.writestr("../../../evil", "gotcha")
        code, _, err = self.deploy(evil)
        self.assertEqual(code, 1)
        self.assertIn("'..'", err)
        self.assertEqual(self.current(), "1.0.0")
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), [".lock", JOURNAL, "1.0.0", "current"])
        self.assertFalse((self.base / "evil").exists())

    def test_cancelled_deployment_leaves_nothing_half_done(self) -> None:
        self.deploy(sample_package(self.packages, "1.0.0"))
        env = dict(os.environ, TentacleHome=str(self.home), TentacleApplications=str(self.apps))
        package = sample_package(self.packages, "2.0.0")
        child = subprocess.Popen(
            [sys.executable, "-m", "tentacle.deploy", "deploy", "--package", str(package), "--var", "BLOCK=yes"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "started":
                break
        os.killpg(child.pid, signal.SIGTERM)  # as the agent cancels a script
        code = child.wait(60)
        child.stdout.close()
        assert child.stderr is not None
        child.stderr.close()
        self.assertEqual(code, 128 + signal.SIGTERM)
        self.assertEqual(self.current(), "1.0.0")
        self.assertEqual(sorted(p.name for p in self.root.iterdir()), [".lock", JOURNAL, "1.0.0", "current"])

    def test_hash_and_listing(self) -> None:
        package = sample_package(self.packages, "1.0.0")
        code, out, _ = self.tool("hash", "--json", "--path", str(package))
        self.assertEqual(json.loads(out)["sha1"], file_hashes(package)[0])
        code, out, _ = self.tool("hash", "--json", "--path", str(self.base / "missing.zip"))
        self.assertEqual((code, json.loads(out)["exists"]), (0, False))
        self.assertEqual(self.releases(), {"id": "webapp", "current": None, "releases": []})
        self.deploy(package)
        code, out, _ = self.tool("releases", "--id", "webapp")
        self.assertTrue(out.startswith("* 1.0.0 "), out)

    def test_usage_errors(self) -> None:
        code, _, err = self.tool("deploy", "--package", "x.zip", "--keep", "0")
        self.assertEqual(code, 2)
        code, _, err = self.tool("releases", "--id", "../etc")
        self.assertEqual(code, 1)
        self.assertIn("not a package id", err)
