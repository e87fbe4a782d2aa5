"""
The C{tentacle} command: every command's happy path, and every error path's
message and exit status.
"""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from twisted.trial.unittest import SynchronousTestCase

from tentacle.cli import main
from tentacle.config import ConfigFile
from tentacle.identity import IdentityStore
from tests.support import identity

SHA1 = "ab" * 20
SHA256 = "cd" * 32


class CLITestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()

    def run_cli(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        environ = {"TENTACLE_HOME": str(self.home)} if env is None else env
        code = main(list(argv), out, err, environ)
        return code, out.getvalue(), err.getvalue()

    def assertFails(self, code: int, message: str, *argv: str) -> None:
        got, out, err = self.run_cli(*argv)
        self.assertEqual((got, out), (code, ""), err)
        self.assertIn(message, err)
        self.assertEqual(err.count("\n"), 1, f"not one line: {err!r}")


class HelpTests(CLITestCase):
    def test_lists_commands(self) -> None:
        code, out, _ = self.run_cli("--help")
        self.assertEqual(code, 0)
        for command in [
            "new-certificate", "import-certificate", "show-thumbprint",
            "configure", "show-configuration", "run", "create-instance", "list-instances",
            "delete-instance",
        ]:
            self.assertIn(command, out)

    def test_every_command_has_help(self) -> None:
        for command in [
            "new-certificate", "import-certificate", "show-thumbprint",
            "configure", "show-configuration", "run", "create-instance", "list-instances",
            "delete-instance", "livez", "metrics", "service",
        ]:
            code, out, _ = self.run_cli(command, "--help")
            self.assertEqual(code, 0)
            self.assertIn(f"usage: tentacle {command}", out)

    def test_no_command(self) -> None:
        self.assertFails(2, "the following arguments are required: COMMAND")

    def test_unknown_command(self) -> None:
        self.assertFails(2, "invalid choice: 'frobnicate'", "frobnicate")


class CertificateTests(CLITestCase):
    def test_new_then_show(self) -> None:
        code, out, _ = self.run_cli("new-certificate")
        self.assertEqual(code, 0)
        stored = IdentityStore(self.home).load()
        self.assertIn(stored.thumbprint, out)
        self.assertEqual(stat.S_IMODE(IdentityStore(self.home).private_key_path.stat().st_mode), 0o600)
        code, out, _ = self.run_cli("show-thumbprint")
        self.assertEqual(code, 0)
        self.assertIn(f"The thumbprint of this Tentacle is: {stored.thumbprint}\n", out)
        self.assertIn(stored.sha256, out)
        code, out, _ = self.run_cli("show-thumbprint", "--format", "json")
        self.assertEqual(json.loads(out), {"Thumbprint": stored.thumbprint, "Sha256": stored.sha256})

    def test_home_option_beats_environment(self) -> None:
        other = Path(self.mktemp())
        code, _, _ = self.run_cli("--home", str(other), "new-certificate")
        self.assertEqual(code, 0)
        self.assertTrue(IdentityStore(other).exists())
        self.assertFalse(IdentityStore(self.home).exists())

    def test_new_refuses_to_overwrite(self) -> None:
        self.run_cli("new-certificate")
        before = IdentityStore(self.home).load().thumbprint
        self.assertFails(1, "already has a certificate; use --force", "new-certificate")
        self.assertEqual(IdentityStore(self.home).load().thumbprint, before)

    def test_new_if_blank_keeps_existing(self) -> None:
        self.run_cli("new-certificate")
        before = IdentityStore(self.home).load().thumbprint
        code, out, _ = self.run_cli("new-certificate", "--if-blank")
        self.assertEqual(code, 0)
        self.assertIn(before, out)
        self.assertEqual(IdentityStore(self.home).load().thumbprint, before)

    def test_new_force_replaces(self) -> None:
        self.run_cli("new-certificate")
        before = IdentityStore(self.home).load().thumbprint
        self.assertEqual(self.run_cli("new-certificate", "--force")[0], 0)
        self.assertNotEqual(IdentityStore(self.home).load().thumbprint, before)

    def test_show_without_certificate(self) -> None:
        self.home.mkdir()
        self.assertFails(1, "no certificate in", "show-thumbprint")

    def test_show_bad_format(self) -> None:
        self.assertFails(2, "invalid choice: 'xml'", "show-thumbprint", "--format", "xml")

    def write_pfx(self, password: bytes) -> Path:
        ident = identity("imported")
        path = Path(self.mktemp())
        path.write_bytes(
            pkcs12.serialize_key_and_certificates(
                b"x", ident.private_key, ident.certificate, None,
                serialization.BestAvailableEncryption(password),
            )
        )
        return path

    def test_import_pkcs12(self) -> None:
        path = self.write_pfx(b"pw")
        code, out, err = self.run_cli("import-certificate", "--from-file", str(path), "--password", "pw")
        self.assertEqual(code, 0, err)
        self.assertEqual(IdentityStore(self.home).load().thumbprint, identity("imported").thumbprint)

    def test_import_pem(self) -> None:
        ident = identity("imported")
        path = Path(self.mktemp())
        path.write_bytes(ident.certificate_pem() + ident.private_key_pem())
        self.assertEqual(self.run_cli("import-certificate", "-f", str(path))[0], 0)
        self.assertEqual(IdentityStore(self.home).load().thumbprint, ident.thumbprint)

    def test_import_wrong_password(self) -> None:
        path = self.write_pfx(b"pw")
        self.assertFails(1, "the password is wrong", "import-certificate", "--from-file", str(path), "--password", "no")
        self.assertFalse(IdentityStore(self.home).exists())

    def test_import_missing_file(self) -> None:
        self.assertFails(1, "cannot read", "import-certificate", "--from-file", "/nonexistent/x.pfx")

    def test_import_requires_file(self) -> None:
        self.assertFails(2, "the following arguments are required: --from-file/-f", "import-certificate")

    def test_import_refuses_to_overwrite(self) -> None:
        self.run_cli("new-certificate")
        path = self.write_pfx(b"pw")
        self.assertFails(1, "already has a certificate; use --force", "import-certificate", "-f", str(path), "--password", "pw")


class ConfigureTests(CLITestCase):
    def config(self):  # type: ignore[no-untyped-def]
        return ConfigFile(self.home).load()

    def test_trust_and_remove(self) -> None:
        code, out, _ = self.run_cli("configure", "--trust", SHA1, "--trust", SHA256.upper())
        self.assertEqual(code, 0)
        self.assertEqual(self.config().trusted_thumbprints, (SHA1.upper(), SHA256.upper()))
        code, _, _ = self.run_cli("configure", "--remove-trust", SHA1.upper())
        self.assertEqual(self.config().trusted_thumbprints, (SHA256.upper(),))

    def test_trust_with_colons(self) -> None:
        with_colons = ":".join(SHA1[i : i + 2] for i in range(0, 40, 2))
        self.assertEqual(self.run_cli("configure", "--trust", with_colons)[0], 0)
        self.assertEqual(self.config().trusted_thumbprints, (SHA1.upper(),))

    def test_reset_trust(self) -> None:
        self.run_cli("configure", "--trust", SHA1, "--trust", SHA256)
        self.assertEqual(self.run_cli("configure", "--reset-trust", "--trust", SHA256)[0], 0)
        self.assertEqual(self.config().trusted_thumbprints, (SHA256.upper(),))

    def test_port_address_app(self) -> None:
        code, _, err = self.run_cli("configure", "--port", "10934", "--listen-ip", "127.0.0.1", "--app", "/srv/apps")
        self.assertEqual(code, 0, err)
        config = self.config()
        self.assertEqual((config.port, config.listen_address), (10934, "127.0.0.1"))
        self.assertEqual(config.applications, Path("/srv/apps"))
        self.run_cli("configure", "--listen-ip", "any")
        self.assertIsNone(self.config().listen_address)

    def test_bad_thumbprints(self) -> None:
        for bad in ["abc", "zz" * 20, "ab" * 21]:
            self.assertFails(2, "expected 40 hex digits (SHA-1) or 64 hex digits (SHA-256)", "configure", "--trust", bad)
        self.assertFails(2, "expected 40 hex digits", "configure", "--remove-trust", "nope")

    def test_remove_untrusted(self) -> None:
        self.assertFails(1, f"{SHA1.upper()} is not in the trust list", "configure", "--remove-trust", SHA1)

    def test_bad_port(self) -> None:
        for bad in ["0", "65536", "http", "-1"]:
            self.assertFails(2, "expected a port number from 1 to 65535", "configure", "--port", bad)

    def test_bad_address(self) -> None:
        self.assertFails(2, "'example.com' is not an IP address", "configure", "--listen-ip", "example.com")

    def test_nothing_to_change(self) -> None:
        self.assertFails(2, "nothing to change", "configure")

    def test_broken_config_file(self) -> None:
        self.home.mkdir()
        ConfigFile(self.home).path.write_text("{")
        self.assertFails(1, "is not valid JSON", "configure", "--trust", SHA1)
        self.assertFails(1, "is not valid JSON", "show-configuration")


class ShowConfigurationTests(CLITestCase):
    def test_text(self) -> None:
        self.run_cli("configure", "--trust", SHA1)
        code, out, _ = self.run_cli("show-configuration")
        self.assertEqual(code, 0)
        self.assertIn("Listen port:           10933", out)
        self.assertIn(f"\n  {SHA1.upper()}\n", out)
        self.assertIn("none (run tentacle new-certificate)", out)

    def test_json(self) -> None:
        self.run_cli("new-certificate")
        self.run_cli("configure", "--trust", SHA1)
        code, out, _ = self.run_cli("show-configuration", "--format", "json")
        data = json.loads(out)
        self.assertEqual(data["listen-port"], 10933)
        self.assertEqual(data["trusted-thumbprints"], [SHA1.upper()])
        self.assertEqual(data["thumbprint"], IdentityStore(self.home).load().thumbprint)
        self.assertEqual(data["home"], str(self.home))


class GlobalOptionTests(CLITestCase):
    def test_home_after_the_command(self) -> None:
        other = Path(self.mktemp()).absolute()
        code, _, err = self.run_cli("configure", "--trust", SHA1, "--home", str(other))
        self.assertEqual(code, 0, err)
        self.assertEqual(ConfigFile(other).load().trusted_thumbprints, (SHA1.upper(),))
        self.assertFalse(self.home.exists())

    def test_after_does_not_undo_before(self) -> None:
        other = Path(self.mktemp()).absolute()
        self.assertEqual(self.run_cli("--home", str(other), "configure", "--port", "2000")[0], 0)
        self.assertEqual(ConfigFile(other).load().port, 2000)

    def test_agent_is_run(self) -> None:
        from tentacle.cli import build_parser

        self.assertEqual(build_parser().parse_args(["agent", "--log-format", "json"]).handler, "run")
        code, out, _ = self.run_cli("agent", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--log-level", out)

    def test_home_and_instance_together(self) -> None:
        self.assertFails(2, "give --home or --instance, not both", "--home", "/x", "--instance", "web", "show-configuration")


class InstanceTests(CLITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.registry = Path(self.mktemp()).absolute()
        self.env = {"TENTACLE_REGISTRY": str(self.registry), "HOME": "/nonexistent-home"}

    def run_cli(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        return super().run_cli(*argv, env=self.env if env is None else env)

    def test_create_use_list_delete(self) -> None:
        web = Path(self.mktemp()).absolute()
        code, out, err = self.run_cli("create-instance", "web", "--home", str(web))
        self.assertEqual(code, 0, err)
        self.assertIn(f"Created the instance web with its home in {web}", out)
        self.assertEqual(stat.S_IMODE(web.stat().st_mode), 0o700)
        self.assertEqual(self.run_cli("--instance", "web", "configure", "--port", "10934")[0], 0)
        self.assertEqual(self.run_cli("configure", "--instance", "web", "--trust", SHA1)[0], 0)
        config = ConfigFile(web).load()
        self.assertEqual((config.port, config.trusted_thumbprints), (10934, (SHA1.upper(),)))
        code, out, _ = self.run_cli("show-configuration", "--instance", "web")
        self.assertIn("Instance:              web\n", out)
        self.assertIn(f"Home:                  {web}\n", out)
        self.run_cli("create-instance", "api", "--home", str(web.parent / "api"))
        code, out, _ = self.run_cli("list-instances")
        self.assertEqual(out.splitlines()[1:], [f"api  stopped   {web.parent / 'api'}", f"web  stopped   {web}"])
        code, out, _ = self.run_cli("list-instances", "--format", "json")
        self.assertEqual(json.loads(out)[1], {"name": "web", "home": str(web), "running": False})
        code, out, _ = self.run_cli("delete-instance", "web")
        self.assertEqual(code, 0)
        self.assertIn(f"its home {web} is kept", out)
        self.assertTrue(ConfigFile(web).path.exists())
        self.assertFails(1, "there is no instance named 'web'", "--instance", "web", "show-configuration")

    def test_default_home(self) -> None:
        from tentacle.instances import default_instance_home

        self.assertEqual(default_instance_home("web", {}, is_root=True), Path("/var/lib/tentacle/web"))
        self.assertEqual(default_instance_home("web", {"XDG_DATA_HOME": "/d"}, is_root=False), Path("/d/tentacle/web"))
        self.assertEqual(default_instance_home("web", {"HOME": "/home/u"}, is_root=False),
                         Path("/home/u/.local/share/tentacle/web"))

    def test_running_instances_are_listed_as_running(self) -> None:
        web = Path(self.mktemp()).absolute()
        self.run_cli("create-instance", "web", "--home", str(web))
        (web / "Logs").mkdir()
        (web / "Logs" / "heartbeat").write_text("1")
        code, out, _ = self.run_cli("list-instances")
        self.assertIn(f"web  running   {web}", out)

    def test_errors(self) -> None:
        web = Path(self.mktemp()).absolute()
        code, out, _ = self.run_cli("list-instances")
        self.assertIn("No instances in", out)
        self.run_cli("create-instance", "web", "--home", str(web))
        self.assertFails(1, "an instance named 'web' already exists", "create-instance", "web", "--home", "/x")
        self.assertFails(1, f"{web} is already the home of the instance 'web'", "create-instance", "other", "--home", str(web))
        self.assertFails(1, "there is no instance named 'api' in", "delete-instance", "api")
        self.assertFails(1, "(instances: web)", "--instance", "api", "configure", "--port", "2000")
        self.assertFails(2, "cannot be an instance name", "create-instance", "../evil")
        self.assertFails(2, "cannot be an instance name", "--instance", "a b", "run")

    def test_registry_location(self) -> None:
        from tentacle.instances import SYSTEM_REGISTRY, default_registry

        self.assertEqual(default_registry({"TENTACLE_REGISTRY": "/r"}), Path("/r"))
        self.assertEqual(default_registry({}, is_root=True), SYSTEM_REGISTRY)
        self.assertEqual(default_registry({"HOME": "/home/u"}, is_root=False), Path("/home/u/.config/tentacle"))
        self.assertEqual(default_registry({"XDG_CONFIG_HOME": "/c"}, is_root=False), Path("/c/tentacle"))


class ConfigureEverySettingTests(CLITestCase):
    def test_every_setting(self) -> None:
        roots = [str(Path(self.mktemp()).absolute()) for _ in range(2)]
        code, out, err = self.run_cli(
            "configure", "--handshake-timeout", "12.5", "--allowed-root", roots[0], "--allowed-root", roots[1],
            "--max-concurrent-scripts", "3", "--script-timeout", "600", "--workspace-max-age", "3600",
            "--max-connections", "50", "--audit-log", "off", "--metrics-port", "9101",
        )
        self.assertEqual(code, 0, err)
        config = ConfigFile(self.home).load()
        self.assertEqual(
            (config.handshake_timeout, config.allowed_roots, config.max_concurrent_scripts, config.script_timeout,
             config.workspace_max_age, config.max_connections, config.audit_log, config.metrics_port),
            (12.5, tuple(Path(r) for r in roots), 3, 600.0, 3600.0, 50, False, 9101),
        )
        self.assertIn("Script timeout set to 600 s (a running agent applies it within seconds)\n", out)
        self.assertIn("Metrics port set to 9101 (takes effect on restart)\n", out)
        code, out, _ = self.run_cli("show-configuration")
        for line in [
            "Handshake timeout:     12.5 s", "Max connections:       50", "Max concurrent scripts:3",
            "Script timeout:        600 s", "Workspace max age:     3600 s", f"Allowed roots:\n  {roots[0]}\n  {roots[1]}",
            "Audit log:             off", "Metrics port:          http://127.0.0.1:9101/metrics",
        ]:
            self.assertIn(line, out)

    def test_none_removes_a_limit(self) -> None:
        self.run_cli("configure", "--script-timeout", "60", "--max-concurrent-scripts", "2", "--metrics-port", "9101")
        code, out, err = self.run_cli(
            "configure", "--script-timeout", "none", "--max-concurrent-scripts", "none", "--metrics-port", "none",
            "--max-connections", "none",
        )
        self.assertEqual(code, 0, err)
        config = ConfigFile(self.home).load()
        self.assertEqual((config.script_timeout, config.max_concurrent_scripts, config.metrics_port, config.max_connections),
                         (None, None, None, None))
        self.assertIn("Script timeout set to none (a running agent applies it within seconds)\n", out)
        self.assertIn("Metrics port set to off (takes effect on restart)\n", out)
        self.assertIn("Max connections set to no limit", out)
        code, out, _ = self.run_cli("configure", "--listen-ip", "any")
        self.assertEqual(out, "Listen address set to any (takes effect on restart)\n")
        code, out, _ = self.run_cli("show-configuration")
        self.assertIn("none (scripts may run forever)", out)

    def test_allowed_roots_removed_and_reset(self) -> None:
        a, b = (str(Path(self.mktemp()).absolute()) for _ in range(2))
        self.run_cli("configure", "--allowed-root", a, "--allowed-root", b)
        self.assertEqual(self.run_cli("configure", "--remove-allowed-root", a)[0], 0)
        self.assertEqual(ConfigFile(self.home).load().allowed_roots, (Path(b),))
        self.assertFails(1, f"{a} is not an allowed root", "configure", "--remove-allowed-root", a)
        self.assertEqual(self.run_cli("configure", "--reset-allowed-roots")[0], 0)
        self.assertEqual(ConfigFile(self.home).load().allowed_roots, ())

    def test_bad_values(self) -> None:
        self.assertFails(2, "expected a positive number of seconds, not 'soon' (or 'none')",
                         "configure", "--script-timeout", "soon")
        self.assertFails(2, "expected a whole number of at least 1, not '0' (or 'none')",
                         "configure", "--max-concurrent-scripts", "0")
        self.assertFails(2, "expected on or off, not 'maybe'", "configure", "--audit-log", "maybe")
        self.assertFails(2, "expected a positive number of seconds, not '-1'", "configure", "--handshake-timeout", "-1")
        self.assertFails(2, "expected a port number from 1 to 65535", "configure", "--metrics-port", "70000")
        self.assertFails(2, "expected a whole number of 0 or more, not '-1'", "configure", "--connection-log-lines", "-1")

    def test_connection_log_lines(self) -> None:
        code, out, err = self.run_cli("configure", "--connection-log-lines", "0")
        self.assertEqual(code, 0, err)
        self.assertEqual(ConfigFile(self.home).load().connection_log_lines, 0)
        self.assertIn("Connection log lines set to 0 (a running agent applies it within seconds)\n", out)
        code, out, _ = self.run_cli("show-configuration")
        self.assertIn("Connection log lines:  0 per kind per 10 s", out)

    def test_every_documented_setting_has_a_flag(self) -> None:
        from tentacle.cli import build_parser
        from tentacle.config import TentacleConfig

        configure = build_parser()._subparsers._group_actions[0].choices["configure"]  # type: ignore[union-attr]
        flags = {option for action in configure._actions for option in action.option_strings}
        names = {"listen-port": "--port", "listen-address": "--listen-address", "trusted-thumbprints": "--trust",
                 "application-directory": "--app", "allowed-roots": "--allowed-root",
                 "polling-servers": "--remove-poll-server"}  # added with 'tentacle poll-server'
        for key in TentacleConfig(home=self.home).to_json():
            self.assertIn(names.get(key, f"--{key}"), flags)


class UnknownHomeTests(CLITestCase):
    def test_show_configuration_of_a_missing_home(self) -> None:
        self.assertFails(1, f"{self.home} is not a tentacle home (it does not exist)", "show-configuration")
        self.assertFalse(self.home.exists())


class PollServerTests(CLITestCase):
    """
    C{tentacle poll-server} and the polling switches of C{configure}.
    """

    thumbprint = "AB" * 20

    def poll(self, *extra: str) -> str:
        code, out, err = self.run_cli(
            "poll-server", "--server-address", "octopus.example.com", "--server-thumbprint", self.thumbprint, *extra
        )
        self.assertEqual(code, 0, err)
        return out

    def test_adds_a_server_with_a_new_subscription(self) -> None:
        import re

        out = self.poll()
        [subscription] = re.findall(r"Subscription id: (\S+)", out)
        self.assertRegex(subscription, r"\Apoll://[a-hj-np-z2-9]{20}/\Z")
        [server] = ConfigFile(self.home).load().polling_servers
        self.assertEqual(
            (server.host, server.port, server.thumbprint, server.subscription_id, server.connections),
            ("octopus.example.com", 10943, self.thumbprint, subscription, 1),
        )
        self.assertIn(self.thumbprint, ConfigFile(self.home).load().trusted, "trusted for listening too")

    def test_another_node_of_the_same_server_reuses_the_subscription(self) -> None:
        first = ConfigFile(self.home)
        self.poll()
        self.run_cli("poll-server", "--server-address", "node2.example.com:11000", "--server-thumbprint",
                     self.thumbprint.lower())
        servers = first.load().polling_servers
        self.assertEqual([s.address for s in servers], ["octopus.example.com:10943", "node2.example.com:11000"])
        self.assertEqual(servers[0].subscription_id, servers[1].subscription_id)

    def test_explicit_subscription_connections_and_proxy(self) -> None:
        out = self.poll("--subscription-id", "POLL://MyAgent", "--connections", "4",
                        "--proxy", "http://me:secret@proxy:3128")
        self.assertIn("as poll://myagent/ over 4 connection(s) through http://me:***@proxy:3128", out)
        self.assertNotIn("secret", out)
        [server] = ConfigFile(self.home).load().polling_servers
        self.assertEqual((server.subscription_id, server.connections, server.proxy),
                         ("poll://myagent/", 4, "http://me:secret@proxy:3128"))

    def test_bad_input_is_a_usage_error(self) -> None:
        base = ("poll-server", "--server-thumbprint", self.thumbprint)
        self.assertFails(2, "--server-address", *base, "--server-address", "host:99999")
        self.assertFails(2, "from 1 to 512", *base, "--server-address", "h", "--connections", "513")
        self.assertFails(2, "poll://ID/", *base, "--server-address", "h", "--subscription-id", "abc")
        self.assertFails(2, "HTTP proxy", *base, "--server-address", "h", "--proxy", "socks5://p:1")
        self.assertFails(2, "the following arguments are required: --server-address",
                         "poll-server", "--server-thumbprint", self.thumbprint)

    def test_no_listen_needs_a_server_to_poll(self) -> None:
        self.assertFails(1, "must poll a server", "configure", "--no-listen")
        self.poll()
        code, out, err = self.run_cli("configure", "--no-listen")
        self.assertEqual(code, 0, err)
        self.assertIn("Listening set to off (takes effect on restart)", out)
        self.assertFalse(ConfigFile(self.home).load().listen)
        self.run_cli("configure", "--listen")
        self.assertTrue(ConfigFile(self.home).load().listen)

    def test_tcp_keepalive(self) -> None:
        code, out, err = self.run_cli("configure", "--tcp-keepalive", "30,5,3")
        self.assertEqual(code, 0, err)
        self.assertIn("TCP keepalive set to idle 30, interval 5, count 3 (takes effect on restart)", out)
        self.run_cli("configure", "--tcp-keepalive", "none")
        self.assertIsNone(ConfigFile(self.home).load().tcp_keepalive)
        self.assertFails(2, "expected IDLE,INTERVAL,COUNT", "configure", "--tcp-keepalive", "30")

    def test_remove_a_server(self) -> None:
        self.poll()
        code, out, err = self.run_cli("configure", "--remove-poll-server", "octopus.example.com")
        self.assertEqual(code, 0, err)
        self.assertEqual(ConfigFile(self.home).load().polling_servers, ())
        self.assertFails(1, "no polling server 'elsewhere' is configured",
                         "configure", "--remove-poll-server", "elsewhere")

    def test_show_configuration_lists_each_server_with_its_style(self) -> None:
        self.run_cli("configure", "--trust", "CD" * 20)
        self.poll("--subscription-id", "poll://myagent/")
        code, out, _ = self.run_cli("show-configuration")
        self.assertEqual(code, 0)
        self.assertIn(f"{'CD' * 20}  style 1 (listening)", out)
        self.assertIn(f"{self.thumbprint}  style 2 (polling)  octopus.example.com:10943  poll://myagent/", out)

    def test_livez_reports_each_polled_server(self) -> None:
        logs = self.home / "Logs"
        logs.mkdir(parents=True)
        heartbeat = logs / "heartbeat"
        heartbeat.write_text("1\npolling octopus.example.com:10943 poll://myagent/ 2/2\n")
        code, out, err = self.run_cli("livez")
        self.assertEqual(code, 0, err)
        self.assertIn("polling octopus.example.com:10943 as poll://myagent/: 2/2 connection(s) up", out)
        heartbeat.write_text("1\npolling octopus.example.com:10943 poll://myagent/ 0/2\n")
        code, out, err = self.run_cli("livez")
        self.assertEqual(code, 1)
        self.assertIn("not connected to the polling server(s) octopus.example.com:10943", err)
