"""
File transfer and capabilities over real TLS sockets, driven by a client
that speaks the wire protocol itself.  The agent runs in this process,
except where its memory or its file-size limit must be its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from tentacle.config import TentacleConfig
from tentacle.contracts import (
    CAPABILITIES_SERVICE_V2,
    FILE_TRANSFER_SERVICE,
    SCRIPT_SERVICE,
    SCRIPT_SERVICE_V2,
    CapabilitiesResponseV2,
)
from tentacle.dispatch import Dispatcher
from tentacle.service import TentacleService
from tentacle.services import CapabilitiesService, register_tentacle_services
from tentacle.services.files import TEMP_MARKER, FileTransferError, FileTransferService
from tests.agent_process import spawn_agent
from tests.support import LogCapture, agent_port, client_context, identity, in_thread, remove_big_files, start_agent
from tests.transfer_client import (
    FakeFreeSpace,
    GiB,
    MiB,
    Stub,
    TransferClient,
    generated_sha1,
    tree,
    upload_result,
)

SERVER = identity("server")


class TransferTestCase(TestCase):
    def setUp(self) -> None:
        remove_big_files(self)
        self.logs = LogCapture.install(self)
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.home.mkdir(parents=True)
        self.context = client_context(SERVER, self.base)

    def agent(self, dispatcher: Dispatcher | None = None, **config: Any) -> TentacleService:
        """
        An agent in this process with Tentacle's services registered.
        """
        if dispatcher is None:
            dispatcher = Dispatcher()
            settings = TentacleConfig(home=self.home, **config)
            register_tentacle_services(dispatcher, settings, reactor)  # type: ignore[arg-type]
        return start_agent(
            self,
            trusted=(SERVER.thumbprint,),
            home=self.home,
            service_options={"dispatcher": dispatcher},
            **config,
        )

    def client(self, service: TentacleService) -> TransferClient:
        return TransferClient(agent_port(service), self.context)


class FileTransferTests(TransferTestCase):
    async def test_upload_then_download(self) -> None:
        """
        Each size goes up and comes back intact on one connection; the
        answer names the file and its length, and no temp file remains.
        """
        sizes = [0, 1, MiB, 200 * MiB]
        service = self.agent()

        def run() -> list[tuple[Any, ...]]:
            client = self.client(service)
            outcomes = []
            for i, size in enumerate(sizes):
                if i:
                    client.next()
                response, sent = client.upload(f"packages/size-{size}.bin", size)
                result = upload_result(response)
                client.next()
                response, received = client.download(f"packages/size-{size}.bin")
                assert response.error is None, response.error
                assert received is not None
                outcomes.append(
                    (result, sent.sha1, received.sha1.hexdigest(), received.length)
                )
            client.end()
            return outcomes

        outcomes = await in_thread(run)
        for size, (result, sent_sha1, received_sha1, received_length) in zip(sizes, outcomes):
            path = self.home / "packages" / f"size-{size}.bin"
            self.assertEqual(result.full_path, str(path))
            self.assertEqual(result.length, size)
            self.assertEqual(result.hash, sent_sha1)
            self.assertEqual(result.hash, generated_sha1(size))
            self.assertEqual((received_sha1, received_length), (sent_sha1, size))
            self.assertEqual(path.stat().st_size, size)
        self.assertEqual(
            tree(self.home / "packages"), sorted(f"size-{size}.bin" for size in sizes)
        )

    async def test_absolute_and_backslash_paths(self) -> None:
        service = self.agent()
        elsewhere = self.base / "elsewhere"

        def run() -> list[str]:
            client = self.client(service)
            first, _ = client.upload(str(elsewhere / "a.txt"), 10)
            client.next()
            second, _ = client.upload("windows\\style\\b.txt", 10)
            client.end()
            return [upload_result(first).full_path, upload_result(second).full_path]

        self.assertEqual(
            await in_thread(run),
            [str(elsewhere / "a.txt"), str(self.home / "windows" / "style" / "b.txt")],
        )
        self.assertTrue((self.home / "windows" / "style" / "b.txt").is_file())

    async def test_download_of_a_missing_file_is_null(self) -> None:
        service = self.agent()

        def run() -> tuple[Any, Any]:
            client = self.client(service)
            response, stream = client.download("no/such/file")
            client.end()
            return response, stream

        response, stream = await in_thread(run)
        self.assertEqual((response.error, response.result, stream), (None, None, None))

    async def test_upload_cut_off_midway_leaves_nothing(self) -> None:
        service = self.agent()
        (self.home / "incoming").mkdir()
        size = 8 * MiB

        def run() -> None:
            client = self.client(service)
            client.send_upload("incoming/cut.bin", size, stop_after=size // 2)
            client.close()

        await in_thread(run)
        event = await self.logs.wait_for(event="upload_abandoned")
        self.assertEqual((event["received"], event["length"]), (size // 2, size))
        self.assertEqual(tree(self.home / "incoming"), [])

    async def test_trailer_mismatch_is_refused_and_leaves_nothing(self) -> None:
        service = self.agent()

        def run() -> str:
            client = self.client(service)
            client.send_upload("mismatch.bin", 1000, trailer_length=999)
            try:
                client.read_response()
            except OSError as e:
                return type(e).__name__
            return "answered"

        self.assertNotEqual(await in_thread(run), "answered")
        self.assertTrue(self.logs.matching(event="upload_abandoned", length=1000))
        self.assertEqual(tree(self.home), [])

    async def test_header_length_mismatch_is_refused_and_leaves_nothing(self) -> None:
        service = self.agent()

        def run() -> str:
            client = self.client(service)
            client.send_upload("mismatch.bin", 1000, header_length=1001)
            try:
                client.read_response()
            except OSError as e:
                return type(e).__name__
            return "answered"

        self.assertNotEqual(await in_thread(run), "answered")
        self.assertTrue([e for e in self.logs.events if "declared" in str(e.get("why", ""))])
        self.assertEqual(tree(self.home), [])

    async def test_too_little_free_space_is_a_clear_error(self) -> None:
        """
        Refused before anything is written; the payload is read past, so
        the connection serves the next request.
        """
        dispatcher = Dispatcher()
        files = FileTransferService(
            self.home, reactor=reactor, statvfs=lambda path: FakeFreeSpace(f_bavail=1)  # type: ignore[arg-type]
        )
        dispatcher.register(FILE_TRANSFER_SERVICE, files)
        dispatcher.register(CAPABILITIES_SERVICE_V2, CapabilitiesService(dispatcher))
        service = self.agent(dispatcher)

        def run() -> tuple[Any, Any]:
            client = self.client(service)
            refused, _ = client.upload("pkgs/big.bin", 10_000)
            client.next()
            capabilities = client.capabilities()
            client.end()
            return refused, capabilities

        refused, capabilities = await in_thread(run)
        self.assertEqual(
            refused.error.message,
            f"Not enough free disk space for {self.home / 'pkgs/big.bin'}: "
            f"the upload is 10000 bytes but only 4096 are free in {self.home}",
        )
        self.assertIsNone(capabilities.error)
        self.assertEqual(tree(self.home), [])

    async def test_capabilities(self) -> None:
        dispatcher = Dispatcher()
        register_tentacle_services(dispatcher, TentacleConfig(home=self.home), reactor)  # type: ignore[arg-type]
        service = self.agent(dispatcher)

        def ask() -> Any:
            client = self.client(service)
            response = client.capabilities()
            client.end()
            return response

        self.assertEqual((await in_thread(ask)).result, CapabilitiesResponseV2(["IFileTransferService"]))
        dispatcher.register(SCRIPT_SERVICE_V2, Stub())
        dispatcher.register(SCRIPT_SERVICE, Stub())
        self.assertEqual(
            (await in_thread(ask)).result,
            CapabilitiesResponseV2(["IScriptService", "IFileTransferService", "IScriptServiceV2"]),
        )


class AllowedRootsTests(TransferTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.root = self.base / "srv" / "apps"
        self.outside = self.base / "outside"
        self.root.mkdir(parents=True)
        self.outside.mkdir()
        (self.root / "escape").symlink_to(self.outside)
        (self.outside / "secret").write_bytes(b"secret")
        self.home = self.root / "home"
        self.home.mkdir()

    async def test_escapes_are_refused_before_anything_is_created(self) -> None:
        service = self.agent(allowed_roots=(self.root,))
        before = tree(self.base)
        refused_paths = [
            "../../../outside/x/new.bin",
            "..\\..\\..\\outside\\new.bin",
            str(self.outside / "new" / "file.bin"),
            str(self.root / "escape" / "new" / "file.bin"),
            str(self.root) + "-evil/x.bin",
        ]

        def run() -> tuple[list[Any], Any, list[Any]]:
            client = self.client(service)
            uploads = []
            for path in refused_paths:
                response, _ = client.upload(path, 100)
                uploads.append(response.error)
                client.next()
            allowed, _ = client.upload("inside/ok.bin", 100)
            downloads = []
            for path in ("../../../outside/secret", str(self.root / "escape" / "secret")):
                client.next()
                response, stream = client.download(path)
                downloads.append((response.error, stream))
            client.end()
            return uploads, allowed, downloads

        uploads, allowed, downloads = await in_thread(run)
        # A refused download is a request error: logged as a warning, not a failure.
        self.assertEqual(self.flushLoggedErrors(FileTransferError), [])
        for path, error in zip(refused_paths, uploads):
            self.assertIsNotNone(error, path)
            self.assertIn("is outside the allowed roots", error.message)
        for error, stream in downloads:
            self.assertIn("is outside the allowed roots", error.message)
            self.assertIsNone(stream)
        self.assertEqual(upload_result(allowed).full_path, str(self.home / "inside" / "ok.bin"))
        self.assertEqual(
            tree(self.base), sorted(before + ["srv/apps/home/inside", "srv/apps/home/inside/ok.bin"])
        )


class ChildAgentTests(TestCase):
    """
    The agent in its own process: its memory measured, its file size limited.
    """

    def setUp(self) -> None:
        remove_big_files(self)
        self.context = client_context(SERVER, Path(self.mktemp()).parent)

    async def test_two_gibibytes_up_and_down_in_flat_memory(self) -> None:
        size = 2 * GiB
        agent, home, port = await spawn_agent(self, identity("agent"), (SERVER.thumbprint,))
        before = agent.status("VmRSS")

        def run() -> tuple[Any, Any, Any]:
            client = TransferClient(port, self.context, timeout=120)
            response, sent = client.upload("big/two.bin", size)
            client.next()
            downloaded, received = client.download("big/two.bin")
            client.end()
            return upload_result(response), sent, (downloaded, received)

        result, sent, (downloaded, received) = await in_thread(run)
        growth = agent.status("VmHWM") - before
        Logger().info(
            "2 GiB up and down: agent RSS {before} before, peak growth {growth} bytes",
            before=before,
            growth=growth,
        )
        self.assertEqual(
            (result.full_path, result.length, result.hash),
            (str(home / "big" / "two.bin"), size, sent.sha1),
        )
        self.assertEqual(sent.length, size)
        self.assertIsNone(downloaded.error)
        self.assertEqual((received.length, received.sha1.hexdigest()), (size, sent.sha1))
        self.assertLess(growth, 64 * MiB, f"the agent's peak RSS grew by {growth / MiB:.1f} MiB")

    test_two_gibibytes_up_and_down_in_flat_memory.timeout = 300  # type: ignore[attr-defined]

    async def test_disk_full_is_a_clear_error_and_leaves_nothing(self) -> None:
        """
        A file-size limit stands in for a full disk: write() fails midway
        with EFBIG; the agent answers a clear error, removes its temp file
        and keeps serving.
        """
        agent, home, port = await spawn_agent(
            self, identity("agent"), (SERVER.thumbprint,), file_size_limit=MiB
        )
        (home / "pkgs").mkdir()

        def run() -> tuple[Any, Any]:
            client = TransferClient(port, self.context)
            refused, _ = client.upload("pkgs/too-big.bin", 4 * MiB)
            client.next()
            fits, sent = client.upload("pkgs/fits.bin", MiB // 2)
            client.end()
            return refused, (upload_result(fits), sent)

        refused, (fits, sent) = await in_thread(run)
        self.assertIsNotNone(refused.error)
        self.assertIn(
            f"Could not write {home / 'pkgs' / 'too-big.bin'} after {MiB} of {4 * MiB} bytes: "
            "File too large",
            refused.error.message,
        )
        self.assertEqual(fits.hash, sent.sha1)
        self.assertEqual(tree(home / "pkgs"), ["fits.bin"])
        self.assertFalse([n for n in tree(home) if TEMP_MARKER in n])
        self.assertTrue(agent.output)
