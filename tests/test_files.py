"""
File transfer and capabilities services, called directly: path rules, the
upload sink and its cleanup, the free-space check, the capabilities list.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import uuid
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tentacle.config import TentacleConfig
from tentacle.contracts import (
    CAPABILITIES_SERVICE_V2,
    FILE_TRANSFER_SERVICE,
    SCRIPT_SERVICE,
    SCRIPT_SERVICE_V2,
    CapabilitiesResponseV2,
    DataStream,
    UploadResult,
)
from tentacle.dispatch import CallContext, Dispatcher
from tentacle.halibut.serializer import RequestMessage
from tentacle.halibut.streams import ExpectedStream, ReceivedStream
from tentacle.services import CapabilitiesService, register_tentacle_services
from tentacle.services.files import (
    STALE_UPLOAD_SECONDS,
    TEMP_MARKER,
    WRITE_BATCH,
    WRITEBACK_WINDOW,
    FileTransferError,
    FileTransferService,
    Target,
    UploadSink,
    resolve_remote_path,
)
from tests.support import LogCapture
from tests.transfer_client import FakeFreeSpace, Stub, tree


def context_with(stream: DataStream | None = None, sink: Any = None) -> CallContext:
    request = RequestMessage("id", uuid.uuid4(), "IFileTransferService", "UploadFile", ())
    received = {} if stream is None else {stream.id: ReceivedStream(stream.id, stream.length, sink)}
    return CallContext(None, request, received)


class PathRuleTests(TestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.home = self.base / "home"
        self.root = self.base / "srv" / "app"
        self.root.mkdir(parents=True)
        self.home.mkdir()

    def test_relative_resolves_against_home(self) -> None:
        target = resolve_remote_path("pkgs/a.nupkg", self.home)
        self.assertEqual(target.full_path, str(self.home / "pkgs" / "a.nupkg"))

    def test_absolute_is_used_as_given(self) -> None:
        self.assertEqual(resolve_remote_path("/etc/x", self.home).full_path, "/etc/x")

    def test_backslashes_become_slashes(self) -> None:
        target = resolve_remote_path("pkgs\\sub\\a.zip", self.home)
        self.assertEqual(target.full_path, str(self.home / "pkgs" / "sub" / "a.zip"))

    def test_dot_dot_is_normalised_without_roots(self) -> None:
        target = resolve_remote_path("../elsewhere/f", self.home)
        self.assertEqual(target.full_path, str(self.base / "elsewhere" / "f"))

    def test_nul_and_empty_are_refused(self) -> None:
        for bad in ("a\0b", "", None):
            with self.assertRaises(FileTransferError):
                resolve_remote_path(bad, self.home)

    def test_inside_a_root(self) -> None:
        target = resolve_remote_path(str(self.root / "v1" / "a.zip"), self.home, (self.root,))
        self.assertEqual(target.real_path, str(self.root / "v1" / "a.zip"))

    def test_escapes_are_refused(self) -> None:
        roots = (self.root,)
        home_in_root = self.root / "home"
        escapes = [
            "../../x",
            "..\\..\\x",
            "a/../../../x",
            "/etc/passwd",
            str(self.root) + "-evil/x",
            str(self.root),
            "C:/x/../../../../../../x",
        ]
        for path in escapes:
            with self.assertRaises(FileTransferError, msg=path) as caught:
                resolve_remote_path(path, home_in_root, roots)
            self.assertIn("outside the allowed roots", str(caught.exception))

    def test_symlinks_pointing_outside_are_refused(self) -> None:
        outside = self.base / "outside"
        outside.mkdir()
        (self.root / "dir-link").symlink_to(outside)
        (self.root / "file-link").symlink_to(outside / "target")
        for path in (self.root / "dir-link" / "x", self.root / "file-link"):
            with self.assertRaises(FileTransferError) as caught:
                resolve_remote_path(str(path), self.home, (self.root,))
            self.assertIn(f"resolves to {outside}", str(caught.exception))

    def test_a_root_that_is_a_symlink(self) -> None:
        link = self.base / "current"
        link.symlink_to(self.root)
        target = resolve_remote_path(str(link / "f"), self.home, (link,))
        self.assertEqual((target.full_path, target.real_path), (str(link / "f"), str(self.root / "f")))


class UploadTests(TestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.logs = LogCapture.install(self)

    def service(self, **changes: Any) -> FileTransferService:
        return attrs.evolve(FileTransferService(self.home, reactor=reactor), **changes)  # type: ignore[arg-type]

    async def upload(
        self, service: FileTransferService, path: str, data: bytes, pieces: int = 3
    ) -> UploadResult:
        stream = DataStream.fresh(len(data))
        sink = service.upload_file_sink(path, stream, stream=ExpectedStream(stream.id, len(data)))
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            sink.write(data[i : i + step])
        sink.finish()
        try:
            return await service.upload_file(path, stream, context=context_with(stream, sink))
        finally:
            sink.discard()  # as the exchange does once the response is sent

    async def test_upload_stores_hashes_and_reports(self) -> None:
        data = os.urandom(100_000)
        result = await self.upload(self.service(), "pkgs/deep/a.nupkg", data)
        destination = self.home / "pkgs" / "deep" / "a.nupkg"
        self.assertEqual(
            result, UploadResult(str(destination), hashlib.sha1(data).hexdigest(), len(data))
        )
        self.assertEqual(destination.read_bytes(), data)
        self.assertEqual(tree(self.home), ["pkgs", "pkgs/deep", "pkgs/deep/a.nupkg"])
        self.assertTrue(self.logs.matching(event="upload_stored", path=str(destination)))

    async def test_empty_upload(self) -> None:
        result = await self.upload(self.service(), "empty", b"")
        self.assertEqual((result.hash, result.length), (hashlib.sha1().hexdigest(), 0))
        self.assertEqual((self.home / "empty").read_bytes(), b"")

    async def test_replaces_an_existing_file_whole(self) -> None:
        (self.home / "f").write_bytes(b"old contents, longer than the new")
        await self.upload(self.service(), "f", b"new")
        self.assertEqual((self.home / "f").read_bytes(), b"new")

    async def test_a_large_upload_is_written_back_as_it_arrives(self) -> None:
        """
        So the fsync before the answer has at most a window left to write.
        """
        service = self.service()
        size = WRITEBACK_WINDOW + 8 * WRITE_BATCH
        stream = DataStream.fresh(size)
        sink = service.upload_file_sink("big", stream, stream=ExpectedStream(stream.id, size))
        piece = os.urandom(WRITE_BATCH // 4)
        for _ in range(size // len(piece)):
            sink.write(piece)
        writeback = sink._writeback
        assert writeback is not None
        self.assertTrue(writeback.enabled)
        self.assertLessEqual(writeback.pending, WRITEBACK_WINDOW)
        sink.finish()
        result = await service.upload_file("big", stream, context=context_with(stream, sink))
        sink.discard()
        self.assertEqual(result.length, size)
        (self.home / "big").unlink()

    def test_nothing_visible_until_committed(self) -> None:
        service = self.service()
        stream = ExpectedStream(uuid.uuid4(), 10)
        sink = service.upload_file_sink("f", None, stream=stream)
        sink.write(b"12345")
        [temp] = tree(self.home)
        self.assertTrue(temp.startswith(".f" + TEMP_MARKER) and temp.endswith(".tmp"), temp)
        self.assertFalse((self.home / "f").exists())
        sink.discard()
        self.assertEqual(tree(self.home), [])
        self.assertTrue(self.logs.matching(event="upload_abandoned", received=5, length=10))

    def test_discard_is_idempotent(self) -> None:
        sink = self.service().upload_file_sink("f", None, stream=ExpectedStream(uuid.uuid4(), 1))
        sink.discard()
        sink.discard()
        self.assertEqual(tree(self.home), [])

    async def test_length_mismatch_leaves_nothing(self) -> None:
        service = self.service()
        stream = DataStream.fresh(10)
        sink = service.upload_file_sink("f", stream, stream=ExpectedStream(stream.id, 10))
        sink.write(b"123")
        sink.finish()
        self.assertEqual(tree(self.home), [])
        with self.assertRaises(FileTransferError) as caught:
            await service.upload_file("f", stream, context=context_with(stream, sink))
        self.assertEqual(
            str(caught.exception),
            f"The upload to {self.home / 'f'} was 3 bytes but 10 were declared",
        )

    async def test_argument_length_must_match_the_stream(self) -> None:
        service = self.service()
        stream = DataStream.fresh(3)
        sink = service.upload_file_sink("f", stream, stream=ExpectedStream(stream.id, 3))
        sink.write(b"123")
        sink.finish()
        claimed = DataStream(stream.id, 4)
        with self.assertRaises(FileTransferError):
            await service.upload_file("f", claimed, context=context_with(claimed, sink))
        self.assertEqual(tree(self.home), [])

    async def test_write_failure_is_answered_and_cleaned_up(self) -> None:
        """
        A file-size limit makes write() fail with EFBIG midway: the temp
        file goes at once, later writes are read past, and the call fails
        with a clear message.
        """
        self.assertEqual(signal.getsignal(signal.SIGXFSZ), signal.SIG_IGN)
        service = self.service()
        length = 100 + WRITE_BATCH + 100
        stream = DataStream.fresh(length)
        sink = service.upload_file_sink("big", stream, stream=ExpectedStream(stream.id, length))
        sink.write(b"a" * 100)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150, hard))
        try:
            sink.write(b"b" * WRITE_BATCH)  # a full batch: written now
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        self.assertEqual(tree(self.home), [])
        sink.write(b"c" * 100)
        sink.finish()
        self.assertEqual(tree(self.home), [])
        with self.assertRaises(FileTransferError) as caught:
            await service.upload_file("big", stream, context=context_with(stream, sink))
        message = str(caught.exception)
        self.assertIn(f"Could not write {self.home / 'big'} after 150 of {length} bytes", message)
        self.assertIn(os.strerror(errno.EFBIG), message)
        self.assertIn("RLIMIT_FSIZE", message)
        sink.discard()
        self.assertEqual(tree(self.home), [])

    def test_too_little_free_space_is_refused_before_anything_is_created(self) -> None:
        asked: list[str] = []

        def statvfs(path: str) -> FakeFreeSpace:
            asked.append(path)
            return FakeFreeSpace(f_bavail=2)

        service = self.service(statvfs=statvfs)
        with self.assertRaises(FileTransferError) as caught:
            service.upload_file_sink("new/folder/f", None, stream=ExpectedStream(uuid.uuid4(), 8193))
        self.assertEqual(
            str(caught.exception),
            f"Not enough free disk space for {self.home / 'new/folder/f'}: the upload is "
            f"8193 bytes but only 8192 are free in {self.home}",
        )
        self.assertEqual(asked, [str(self.home)])
        self.assertEqual(tree(self.home), [])
        self.assertTrue(self.logs.matching(event="upload_refused"))
        # Exactly enough is enough.
        sink = service.upload_file_sink("f", None, stream=ExpectedStream(uuid.uuid4(), 8192))
        sink.discard()

    def test_refusals_create_nothing(self) -> None:
        root = self.home / "root"
        root.mkdir()
        (self.home / "a-file").write_bytes(b"")
        service = self.service(allowed_roots=(root,))
        for path, message in [
            ("../x/y", "outside the allowed roots"),
            ("/tmp/x", "outside the allowed roots"),
            (str(root), "outside the allowed roots"),
        ]:
            with self.assertRaises(FileTransferError) as caught:
                service.upload_file_sink(path, None, stream=ExpectedStream(uuid.uuid4(), 1))
            self.assertIn(message, str(caught.exception))
        (root / "folder").mkdir()
        for path, message in [
            (str(root / "folder"), "is a folder, not a file"),
        ]:
            with self.assertRaises(FileTransferError) as caught:
                service.upload_file_sink(path, None, stream=ExpectedStream(uuid.uuid4(), 1))
            self.assertIn(message, str(caught.exception))
        service = self.service()
        with self.assertRaises(FileTransferError) as caught:
            service.upload_file_sink("a-file/x", None, stream=ExpectedStream(uuid.uuid4(), 1))
        self.assertIn("Could not create the folder", str(caught.exception))
        self.assertEqual(tree(self.home), ["a-file", "root", "root/folder"])

    def test_stale_temp_files_of_the_same_name_are_swept(self) -> None:
        stale = self.home / f".f{TEMP_MARKER}{'0' * 32}.tmp"
        fresh = self.home / f".f{TEMP_MARKER}{'1' * 32}.tmp"
        other = self.home / f".g{TEMP_MARKER}{'2' * 32}.tmp"
        for p in (stale, fresh, other):
            p.write_bytes(b"x")
        old = os.stat(fresh).st_mtime - STALE_UPLOAD_SECONDS - 1
        os.utime(stale, (old, old))
        os.utime(other, (old, old))
        sink = self.service().upload_file_sink("f", None, stream=ExpectedStream(uuid.uuid4(), 1))
        self.assertFalse(stale.exists())
        self.assertTrue(fresh.exists() and other.exists())
        sink.discard()

    async def test_commit_failure_removes_the_temp_file(self) -> None:
        """
        If the rename fails (here: the destination became a folder), the
        call fails clearly and the temp file goes.
        """
        service = self.service()
        stream = DataStream.fresh(1)
        sink = service.upload_file_sink("f", stream, stream=ExpectedStream(stream.id, 1))
        sink.write(b"x")
        sink.finish()
        (self.home / "f").mkdir()
        (self.home / "f" / "keep").write_bytes(b"")
        with self.assertRaises(FileTransferError) as caught:
            await service.upload_file("f", stream, context=context_with(stream, sink))
        self.assertIn(f"Could not store {self.home / 'f'}", str(caught.exception))
        self.assertEqual(tree(self.home), ["f", "f/keep"])

    async def test_a_stream_that_did_not_come_through_the_sink(self) -> None:
        stream = DataStream.fresh(1)
        with self.assertRaises(FileTransferError):
            await self.service().upload_file("f", stream, context=context_with())
        with self.assertRaises(FileTransferError):
            await self.service().upload_file("f", None, context=context_with())

    def test_upload_sink_is_what_the_dispatcher_asks_for(self) -> None:
        dispatcher = Dispatcher()
        register_tentacle_services(dispatcher, TentacleConfig(home=self.home), reactor)  # type: ignore[arg-type]
        stream = DataStream.fresh(4)
        request = RequestMessage(
            "id", uuid.uuid4(), "IFileTransferService", "UploadFile", ("x", stream)
        )
        sink = dispatcher.sink_for(request, ExpectedStream(stream.id, 4))
        self.assertIsInstance(sink, UploadSink)
        assert isinstance(sink, UploadSink)
        self.assertEqual(sink.target, Target(str(self.home / "x"), str(self.home / "x")))
        sink.discard()


class DownloadTests(TestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.service = FileTransferService(self.home, reactor=reactor)  # type: ignore[arg-type]

    def test_missing_file_is_none(self) -> None:
        context = context_with()
        self.assertIsNone(self.service.download_file("nope", context=context))
        self.assertIsNone(self.service.download_file("nope/deeper", context=context))
        (self.home / "file").write_bytes(b"")
        self.assertIsNone(self.service.download_file("file/below", context=context))
        self.assertEqual(context.outgoing, {})

    def test_download_opens_the_file(self) -> None:
        (self.home / "f").write_bytes(b"hello")
        context = context_with()
        stream = self.service.download_file("f", context=context)
        assert stream is not None
        self.assertEqual(stream.length, 5)
        with context.outgoing[stream.id]() as source:
            self.assertEqual(source.read(), b"hello")

    def test_a_folder_is_an_error(self) -> None:
        with self.assertRaises(FileTransferError) as caught:
            self.service.download_file(".", context=context_with())
        self.assertIn("is a folder", str(caught.exception))

    def test_only_regular_files_are_sent(self) -> None:
        """
        A FIFO is refused at once: opening it must not wait for a writer.
        """
        os.mkfifo(self.home / "pipe")
        with self.assertRaises(FileTransferError) as caught:
            self.service.download_file("pipe", context=context_with())
        self.assertEqual(str(caught.exception), f"{self.home / 'pipe'} is not a regular file")

    def test_outside_the_roots_is_refused(self) -> None:
        root = self.home / "root"
        root.mkdir()
        (self.home / "secret").write_bytes(b"s")
        service = attrs.evolve(self.service, allowed_roots=(root,))
        (root / "link").symlink_to(self.home / "secret")
        for path in ("secret", "root/../secret", "root/link", str(self.home / "secret")):
            with self.assertRaises(FileTransferError, msg=path):
                service.download_file(path, context=context_with())


class CapabilitiesTests(TestCase):
    def test_only_registered_services_in_tentacle_order(self) -> None:
        dispatcher = Dispatcher()
        dispatcher.register(CAPABILITIES_SERVICE_V2, CapabilitiesService(dispatcher))
        capabilities = CapabilitiesService(dispatcher)
        self.assertEqual(capabilities.get_capabilities(), CapabilitiesResponseV2(()))
        dispatcher.register(SCRIPT_SERVICE_V2, Stub())
        dispatcher.register(FILE_TRANSFER_SERVICE, Stub())
        self.assertEqual(
            capabilities.get_capabilities().supported_capabilities,
            ("IFileTransferService", "IScriptServiceV2"),
        )
        dispatcher.register(SCRIPT_SERVICE, Stub())
        self.assertEqual(
            capabilities.get_capabilities().supported_capabilities,
            ("IScriptService", "IFileTransferService", "IScriptServiceV2"),
        )

    def test_registered_by_register_tentacle_services(self) -> None:
        dispatcher = Dispatcher()
        register_tentacle_services(dispatcher, TentacleConfig(home=Path("/nonexistent")), reactor)  # type: ignore[arg-type]
        self.assertEqual(
            dispatcher.contracts, frozenset({"IFileTransferService", "ICapabilitiesServiceV2"})
        )
