"""
What a real Octopus Server would see, over real TLS sockets: failures it
will not retry, the capabilities list, the environment of every script, and
script files stored encrypted (by the agent for the Server's passwords, and
for our own client's C{--encrypt} and deployments).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.client.deploy import deploy
from tentacle.config import ProxySetting
from tentacle.contracts import (
    FILE_TRANSFER_SERVICE,
    Operation,
    Parameter,
    ScriptFile,
    ServiceContract,
)
from tentacle.dispatch import Dispatcher
from tentacle.encryption import IV_PREFIX, PASSWORD_VARIABLE, decrypt
from tentacle.halibut.failures import (
    AMBIGUOUS_METHOD,
    METHOD_NOT_FOUND,
    SERVICE_INVOCATION,
    SERVICE_NOT_FOUND,
    TARGET_INVOCATION_PREFIX,
    Retry,
    classify,
)
from tentacle.halibut.serializer import DataStream, ResponseMessage, ServerError
from tentacle.service import TentacleService
from tests.deploy_support import sample_package
from tests.e2e.test_scripts import ScriptClient, v2_command
from tests.support import LogCapture, agent_port, client_context, identity, in_thread, start_agent
from tests.transfer_client import TransferClient
from tests.wire_client import request

SERVER = identity("server")

#: Every variable Tentacle sets for scripts (EnvironmentVariables.cs and
#: RunAgentCommand), and ours.
VARIABLES = (
    "TentacleHome", "TentacleApplications", "TentacleJournal", "CalamariPackageRetentionJournalPath",
    "TentacleInstanceName", "TentacleVersion", "TentacleNetFrameworkDescription",
    "TentacleExecutablePath", "TentacleProgramDirectoryPath", "AgentProgramDirectoryPath",
    "TentacleCertificateSignatureAlgorithm", "TentacleUseDefaultProxy", "TentacleProxyUsername",
    "TentacleProxyPassword", "TentacleProxyHost", "TentacleProxyPort", "TentaclePython",
)
PRINT_VARIABLES = (
    "for v in " + " ".join(VARIABLES) + '; do printf "%s=%s\\n" "$v" "${!v-<unset>}"; done'
)


class AgentCase(TestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True)
        self.context = client_context(SERVER, self.base)

    def agent(self, **config: Any) -> TentacleService:
        """
        An agent with Tentacle's own services, as a daemon has them.
        """
        return start_agent(self, trusted=(SERVER.thumbprint,), home=self.home, **config)

    def client(self, service: TentacleService) -> TentacleClient:
        target = Target("127.0.0.1", agent_port(service), Pin(identity("agent").thumbprint))
        client = TentacleClient(target, SERVER, reactor)
        self.addCleanup(client.close)
        return client

    def run_lines(self, service: TentacleService, body: str, **options: Any) -> Any:
        lines: list[str] = []

        async def run() -> tuple[int, list[str]]:
            code = await self.client(service).run_script(
                body, on_log=lambda line: lines.append(line.text), **options
            )
            return code, lines

        return run()


class FailureTests(AgentCase):
    """
    The answers Octopus Server classifies as final, so it does not re-send
    a refused upload or a call to a missing service for minutes.
    """

    def wire(self, service: TentacleService) -> TransferClient:
        return TransferClient(agent_port(service), self.context)

    async def test_refused_upload(self) -> None:
        service = self.agent()
        folder = self.home / "a-folder"
        folder.mkdir()

        def run() -> ResponseMessage:
            client = self.wire(service)
            response, _ = client.upload(str(folder), 10)
            client.end()
            return response

        response = await in_thread(run)
        message = f"{folder} is a folder, not a file"
        self.assertEqual(
            response.error,
            ServerError(
                message,
                TARGET_INVOCATION_PREFIX
                + f"\n ---> System.ArgumentException: {message}"
                + "\n   --- End of inner exception stack trace ---",
            ),
        )
        assert response.error is not None
        self.assertEqual(classify(response.error).retry, Retry.NOT_RETRYABLE)
        self.assertEqual(classify(response.error).exception, SERVICE_INVOCATION)

    async def test_missing_service_and_method_and_wrong_arguments(self) -> None:
        service = self.agent()
        interface = FILE_TRANSFER_SERVICE.dotnet_type.split(",")[0]

        def run() -> list[ServerError | None]:
            client = self.wire(service)
            errors: list[ServerError | None] = []
            for call in (
                request("IScriptServiceV9", "StartScript", "x"),
                request("IFileTransferService", "Frobnicate", "x"),
                request("IFileTransferService", "DownloadFile", 5, None),
            ):
                if errors:
                    client.next()
                response, _ = client.call(call)
                errors.append(response.error)
            client.end()
            return errors

        missing_service, missing_method, wrong_arguments = await in_thread(run)
        message = "Service not found: IScriptServiceV9"
        self.assertEqual(missing_service, ServerError(message, f"{SERVICE_NOT_FOUND}: {message}", SERVICE_NOT_FOUND))
        message = f"Method {interface}::FrobnicateAsync not found"
        self.assertEqual(missing_method, ServerError(message, f"{METHOD_NOT_FOUND}: {message}", METHOD_NOT_FOUND))
        assert wrong_arguments is not None
        self.assertEqual(wrong_arguments.halibut_error_type, AMBIGUOUS_METHOD)
        self.assertIn("The request arguments were:\nInt32, <null>\n", wrong_arguments.message)
        for error in (missing_service, missing_method, wrong_arguments):
            assert error is not None
            self.assertEqual(classify(error).retry, Retry.NOT_RETRYABLE)

    async def test_failing_service_method_keeps_its_traceback_at_home(self) -> None:
        """
        A bug in a service: the peer gets the .NET shape, the log the
        Python traceback.
        """
        contract = ServiceContract("IBrokenService", "MyApp.IBrokenService, MyApp", (
            Operation("Divide", (Parameter("text", str),), str),
        ))

        class Broken:
            def divide(self, text: str) -> str:
                return str(1 / len(text))

        dispatcher = Dispatcher()
        dispatcher.register(contract, Broken())
        service = start_agent(
            self, trusted=(SERVER.thumbprint,), home=self.home, service_options={"dispatcher": dispatcher}
        )

        def run() -> ResponseMessage:
            client = self.wire(service)
            response, _ = client.call(request("IBrokenService", "Divide", ""))
            client.end()
            return response

        response = await in_thread(run)
        self.assertEqual(
            response.error,
            ServerError(
                "division by zero",
                TARGET_INVOCATION_PREFIX
                + "\n ---> System.DivideByZeroException: division by zero"
                + "\n   --- End of inner exception stack trace ---",
            ),
        )
        [logged] = self.flushLoggedErrors(ZeroDivisionError)
        self.assertIn("in divide", logged.getTraceback())


class CapabilitiesTests(AgentCase):
    async def test_custom_services_listed_kubernetes_never(self) -> None:
        service = self.agent()
        for name in ("IEchoService", "IKubernetesScriptServiceV1", "IAnotherService"):
            contract = ServiceContract(name, f"MyApp.{name}, MyApp", (Operation("Ping", (), None),))

            class Stub:
                def ping(self) -> None:
                    return None

            service.dispatcher.register(contract, Stub())
        self.assertEqual(
            await self.client(service).capabilities(),
            ["IScriptService", "IFileTransferService", "IScriptServiceV2", "IAnotherService", "IEchoService"],
        )

    async def test_only_tentacles_own_by_default(self) -> None:
        """
        Exactly a listening Tentacle's answer.
        """
        self.assertEqual(
            await self.client(self.agent()).capabilities(),
            ["IScriptService", "IFileTransferService", "IScriptServiceV2"],
        )


class EnvironmentTests(AgentCase):
    """
    Every script sees Tentacle's variables, through a real bash.
    """

    async def variables(self, service: TentacleService) -> dict[str, str]:
        code, lines = await self.run_lines(service, PRINT_VARIABLES)
        self.assertEqual(code, 0)
        return dict(line.split("=", 1) for line in lines)

    async def test_all_of_tentacles_variables(self) -> None:
        import sys

        from tentacle import __version__

        seen = await self.variables(self.agent(instance_name="web-1"))
        home = str(self.home)
        self.assertEqual(set(seen), set(VARIABLES))
        self.assertNotIn("<unset>", seen.values())
        program = str(Path(seen["TentacleExecutablePath"]).parent)
        self.assertEqual(seen, {
            "TentacleHome": home,
            "TentacleApplications": f"{home}/Applications",
            "TentacleJournal": f"{home}/DeploymentJournal.xml",
            "CalamariPackageRetentionJournalPath": f"{home}/PackageRetentionJournal.json",
            "TentacleInstanceName": "web-1",
            "TentacleVersion": __version__,
            "TentacleNetFrameworkDescription": seen["TentacleNetFrameworkDescription"],
            "TentacleExecutablePath": seen["TentacleExecutablePath"],
            "TentacleProgramDirectoryPath": program,
            "AgentProgramDirectoryPath": program,
            "TentacleCertificateSignatureAlgorithm": "sha256RSA",
            "TentacleUseDefaultProxy": "True",
            "TentacleProxyUsername": "",
            "TentacleProxyPassword": "",
            "TentacleProxyHost": "",
            "TentacleProxyPort": "",
            "TentaclePython": sys.executable,
        })
        self.assertTrue(seen["TentacleNetFrameworkDescription"].startswith("CPython 3."))
        self.assertTrue(Path(seen["TentacleExecutablePath"]).is_file())

    async def test_configured_proxy(self) -> None:
        proxy = ProxySetting.parse("http://deploy%40corp:p%3Ass%20word@proxy.corp.example:3128")
        seen = await self.variables(self.agent(proxy=proxy))
        self.assertEqual(
            {k: v for k, v in seen.items() if "Proxy" in k},
            {
                "TentacleUseDefaultProxy": "False",
                "TentacleProxyUsername": "deploy@corp",
                "TentacleProxyPassword": "p:ss word",
                "TentacleProxyHost": "proxy.corp.example",
                "TentacleProxyPort": "3128",
            },
        )

    async def test_no_proxy_at_all(self) -> None:
        seen = await self.variables(self.agent(proxy=ProxySetting.parse("none")))
        self.assertEqual(
            (seen["TentacleUseDefaultProxy"], seen["TentacleProxyHost"], seen["TentacleProxyPort"]),
            ("False", "", ""),
        )


class EncryptedFileTests(AgentCase):
    async def test_server_sent_password(self) -> None:
        """
        As Octopus Server sends sensitive variables: the workspace holds the
        ciphertext, which the password opens; a file without one is kept as
        it came.
        """
        service = self.agent()
        secret = '{"Octopus.Action.Password": "h\u00fcnter2"}\n'.encode()
        plain = b"\xef\xbb\xbfnot secret\n"
        secret_ref, plain_ref = DataStream.fresh(len(secret)), DataStream.fresh(len(plain))
        command = v2_command(
            "base64 -w0 Variables.secret; echo; base64 -w0 plain.txt; echo",
            files=(ScriptFile("Variables.secret", secret_ref, "s3cr3t"), ScriptFile("plain.txt", plain_ref)),
        )

        def run() -> list[str]:
            client = ScriptClient(agent_port(service), self.context)
            try:
                client.start(command, {secret_ref.id: [secret[:5], secret[5:]], plain_ref.id: [plain]})
                logs, status = client.run_to_end(command.script_ticket)
                assert status.exit_code == 0, logs
                return [entry.text for entry in logs]
            finally:
                client.close()

        stored_secret, stored_plain = [base64.b64decode(line) for line in await in_thread(run)]
        self.assertEqual(stored_secret[:4], IV_PREFIX)
        self.assertNotIn(b"nter2", stored_secret)
        self.assertEqual(decrypt(stored_secret, "s3cr3t"), secret.decode())
        self.assertEqual(stored_plain, plain)

    async def test_client_encrypt(self) -> None:
        """
        C{run --encrypt}: the file is stored encrypted, the script (and
        only its processes) has the password in its environment, never in
        its command line.
        """
        service = self.agent()
        local = self.base / "secret.txt"
        local.write_text("token=abc123\n")
        body = (
            f'"$TentaclePython" -m tentacle.encryption secret.txt\n'
            "head -c 4 secret.txt; echo\n"
            "tr '\\0' ' ' < /proc/$$/cmdline; echo\n"
            f'echo "args=$# password-length=${{#{PASSWORD_VARIABLE}}}"\n'
        )
        code, lines = await self.run_lines(service, body, files={"secret.txt": local}, encrypt_files=True)
        self.assertEqual(code, 0, lines)
        decrypted, header, command_line, facts = lines
        self.assertEqual((decrypted, header), ("token=abc123", "IV__"))
        self.assertEqual(command_line.split()[0], "/bin/bash")
        self.assertEqual(len(command_line.split()), 2, "bash and its bootstrap file, nothing else")
        self.assertEqual(facts, "args=0 password-length=32")

    async def test_deploy_variables_are_encrypted_and_not_passed_on(self) -> None:
        """
        The variables file of a deployment is ciphertext on the agent; the
        deploy tool decrypts it in memory, and the package's scripts get
        the variables but not the password.
        """
        service = self.agent()
        packages = self.base / "packages"
        packages.mkdir()
        package = sample_package(packages, "1.0.0", scripts={"PreDeploy.sh": (
            'echo "greeting=$Greeting password=${%s-unset}"\n'
            'head -c 4 "$TentacleHome"/Work/*/variables.json; echo\n' % PASSWORD_VARIABLE
        )})
        lines: list[str] = []
        result = await deploy(
            self.client(service), package, variables={"Greeting": "hello"},
            on_log=lambda line: lines.append(line.text),
        )
        self.assertEqual(result.exit_code, 0, lines)
        self.assertIn("greeting=hello password=unset", lines)
        self.assertIn("IV__", lines)

    def test_run_flag(self) -> None:
        from tentacle.client.cli import build_parser

        args = build_parser().parse_args(["run", "-c", "true", "--file-arg", "a=b", "--encrypt", "host"])
        self.assertEqual((args.encrypt, args.file_arg), (True, ["a=b"]))
        args = build_parser().parse_args(["run", "-c", "true", "host"])
        self.assertFalse(args.encrypt)
