"""
Hostile transfers from a trusted server: downloads of files that are not
what their size says (/proc, /sys), of FIFOs and devices, of a name swapped
for a symlink mid-request, an upload to a folder's name, and a StartScript
with 150 files that would each stay in memory.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tentacle.client.api import Target, TentacleClient
from tentacle.client.connection import Pin
from tentacle.contracts import ProcessState, ScriptFile, ScriptStatusRequestV2, StartScriptCommandV2
from tentacle.halibut.errors import MiB, CodecLimits
from tentacle.halibut.serializer import DataStream
from tentacle.services.files import FileTransferError, FileTransferService
from tests.agent_process import spawn_agent
from tests.e2e.test_scripts import v2_command
from tests.figures import record
from tests.support import agent_port, client_context, identity, in_thread, start_agent
from tests.test_files import context_with
from tests.transfer_client import TransferClient

SERVER = identity("server")


class PseudoFileTests(TestCase):
    """
    One pooled connection downloads /proc and /sys files, then is still
    in step for the next call: the length declared is what is sent.
    """

    async def test_sys_and_proc_files_do_not_abort_the_connection(self) -> None:
        readable = [p for p in ("/sys/class/net/lo/mtu", "/proc/version", "/proc/cpuinfo") if os.path.exists(p)]
        unreadable = [p for p in ("/sys/bus/pci/rescan",) if os.path.exists(p)]
        if not readable:
            self.skipTest("no /proc or /sys here")  # type: ignore[attr-defined]
        service = start_agent(self, trusted=(SERVER.thumbprint,))
        port = agent_port(service)
        context = client_context(SERVER, Path(self.mktemp()).parent)

        def run() -> list[tuple[str, object, object]]:
            client = TransferClient(port, context)
            answers = []
            try:
                for path in readable + unreadable:
                    response, sink = client.download(path)
                    answers.append((path, response.error.message if response.error else None,
                                    (sink.length, sink.sha1.hexdigest()) if sink else None))
                    client.next()
                client.capabilities()
            finally:
                client.end()
            return answers

        answers = await in_thread(run)
        for path, error, received in answers:
            if path in unreadable:
                self.assertIn("Could not read", str(error))
                continue
            self.assertIsNone(error, path)
            content = Path(path).read_bytes()
            if path != "/proc/cpuinfo":  # its MHz lines change between reads
                self.assertEqual(received, (len(content), hashlib.sha1(content).hexdigest()), path)
            self.assertNotEqual(os.stat(path).st_size, len(content), f"{path}: its size is not its content")
        record(self, "hostile", f"downloads of {', '.join(readable + unreadable)} on one connection",
               "each answered with its real content (or a clear error); the connection stayed in step",
               inputs=len(answers))


class SpecialFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.service = FileTransferService(self.home, reactor=reactor)  # type: ignore[arg-type]

    def refused(self, path: str) -> str:
        with self.assertRaises(FileTransferError) as caught:
            self.service.download_file(path, context=context_with())
        return str(caught.exception)

    def test_download_of_a_fifo_a_device_or_a_terminal_is_refused(self) -> None:
        os.mkfifo(self.home / "fifo")
        self.assertIn("is not a regular file", self.refused("fifo"))
        self.assertIn("is not a regular file", self.refused("/dev/null"))
        if os.path.exists("/dev/ptmx"):
            self.assertIn("is not a regular file", self.refused("/dev/ptmx"))

    def test_download_of_a_name_swapped_for_a_symlink_never_leaves_the_roots(self) -> None:
        """
        A script flips a name inside the allowed root between a file and a
        link to a secret outside it, while the server downloads it: the
        path check and the open never disagree.
        """
        root = self.home / "root"
        root.mkdir()
        secret = self.home / "secret"
        secret.write_bytes(b"the secret")
        service = FileTransferService(self.home, (root,), reactor)  # type: ignore[arg-type]
        name = root / "flip"
        plain, link = root / ".plain", root / ".link"
        stop = threading.Event()

        def flip() -> None:
            while not stop.is_set():
                plain.write_bytes(b"harmless")
                os.replace(plain, name)
                link.symlink_to(secret)
                os.replace(link, name)

        flipper = threading.Thread(target=flip)
        flipper.start()
        outcomes: dict[str, int] = {}
        try:
            for _ in range(3000):
                try:
                    stream = service.download_file(str(name), context=(context := context_with()))
                except FileTransferError as e:
                    kind = "symlink" if "symbolic link" in str(e) else "outside" if "outside" in str(e) else str(e)
                else:
                    if stream is None:
                        kind = "missing"
                    else:
                        with context.outgoing[stream.id]() as source:
                            kind = source.read().decode()
                outcomes[kind] = outcomes.get(kind, 0) + 1
        finally:
            stop.set()
            flipper.join()
        self.assertNotIn("the secret", outcomes)
        self.assertIn("harmless", outcomes)
        record(self, "hostile", "3,000 downloads of a name flipped between a file and a symlink out of the "
               "allowed roots", f"the secret never sent ({outcomes.get('symlink', 0)} caught at the open by "
               f"O_NOFOLLOW, {outcomes.get('outside', 0)} at the path check)", inputs=sum(outcomes.values()))


class FolderNameUploadTests(TestCase):
    async def test_upload_to_a_path_ending_in_a_slash_is_refused(self) -> None:
        service = start_agent(self, trusted=(SERVER.thumbprint,))
        port = agent_port(service)
        home = service.config.home
        context = client_context(SERVER, Path(self.mktemp()).parent)

        def run() -> list[str | None]:
            client = TransferClient(port, context)
            errors = []
            try:
                for path in ("Packages/", "Packages\\", "new-folder/", str(home / "Work") + "/"):
                    response, _ = client.upload(path, 5)
                    errors.append(response.error.message if response.error else None)
                    client.next()
            finally:
                client.end()
            return errors

        errors = await in_thread(run)
        for error in errors:
            self.assertIn("ends with a '/', so it names a folder", str(error))
        self.assertFalse((home / "Packages").exists())
        self.assertFalse((home / "new-folder").exists())


def _file_content(index: int, size: int) -> bytes:
    """
    A script file's bytes, different for each file and made again on demand.
    """
    seed = hashlib.sha256(f"script file {index}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


class ScriptFilesMemoryTests(TestCase):
    """
    Many script files in one StartScript, each under the per-stream
    threshold, against an agent in its own process so its memory can be
    measured: together they may hold only the request's budget in memory.
    """

    async def test_150_script_files_of_600_kb_hold_at_most_the_request_budget_in_memory(self) -> None:
        files, size = 150, 600_000
        limits = CodecLimits()
        self.assertLess(size, limits.max_stream_memory_bytes, "each file alone would stay in memory")
        agent, home, port = await spawn_agent(self, identity("agent"), (SERVER.thumbprint,), options=("--scripts",))
        self.addCleanup(shutil.rmtree, home / "Work", True)
        client = TentacleClient(Target("127.0.0.1", port, Pin(identity("agent").thumbprint)), SERVER, reactor)
        self.addCleanup(client.close)

        async def run(command: StartScriptCommandV2, payloads: dict[Any, Any]) -> list[str]:
            await client.call("IScriptServiceV2", "StartScript", command, payloads=payloads)
            lines: list[str] = []
            after = 0
            while True:
                status, _ = await client.call(
                    "IScriptServiceV2", "GetStatus", ScriptStatusRequestV2(command.script_ticket, after)
                )
                lines += [e.text for e in status.logs]
                after = status.next_log_sequence
                if status.state is ProcessState.Complete:
                    assert status.exit_code == 0, lines
                    return lines
                await deferLater(reactor, 0.05, lambda: None)

        # Warm up (modules, threads, a file through the same path) before the baseline.
        warm = DataStream.fresh(1000)
        await run(v2_command("cat warm.bin > /dev/null", files=(ScriptFile("warm.bin", warm),)),
                  {warm.id: lambda: io.BytesIO(_file_content(-1, 1000))})
        before = agent.status("VmRSS")

        refs = [DataStream.fresh(size) for _ in range(files)]
        names = [f"f{n:03}.bin" for n in range(files)]
        expected = {name: hashlib.sha256(_file_content(n, size)).hexdigest() for n, name in enumerate(names)}
        command = v2_command(
            "sha256sum f*.bin", files=tuple(ScriptFile(name, ref) for name, ref in zip(names, refs)),
        )
        payloads = {
            ref.id: (lambda n=n: io.BytesIO(_file_content(n, size))) for n, ref in enumerate(refs)
        }
        lines = await run(command, payloads)
        growth = agent.status("VmHWM") - before

        seen = dict(reversed(line.split()) for line in lines if line.strip())
        self.assertEqual(seen, expected, "the script saw every file intact")
        budget = limits.max_streams_memory_bytes
        # Without the request's budget it grew by 87 MiB.
        self.assertLess(growth, 8 * MiB, f"the agent's peak RSS grew by {growth / MiB:.1f} MiB")
        record(
            self, "hostile", f"{files} script files of {size / 1e6:.1f} MB ({files * size / 1e6:.0f} MB) in "
            "one StartScript, each under the 1 MiB per-stream threshold",
            f"agent peak RSS +{growth / MiB:.1f} MiB (the request's streams hold at most "
            f"{budget // MiB} MiB in memory; the rest spool to temporary files); the script saw every "
            "file intact", rss_growth_mib=round(growth / MiB, 1), inputs=files,
        )
