"""
The server half of C{bench_transfer.py}, run by it as a child process so
client and agent do not share a GIL.

In one reactor, on loopback:

  - a real agent (L{TentacleService}) with Tentacle's services
    (L{register_tentacle_services}), its home in HOME, trusting one server
    thumbprint;
  - a bare Twisted TLS server with the same TLS policy and certificate
    (L{AgentTLSOptions} of the same identity) that only moves bytes:
    C{PUT <n>\\n} then n bytes, answered C{OK\\n} once all arrived (read
    and dropped); C{STORE <n>\\n} the same, but the bytes are hashed (SHA-1)
    and written to a new file in 1 MiB batches, fsynced and renamed over the
    last one before C{OK <sha1>\\n}, as the agent does with an upload but
    with no Halibut and all in the reactor thread; C{GET <n>\\n}, answered
    with n bytes pushed from memory in 64 KiB chunks by a pull producer, as
    the agent sends a download.

Prints C{"ports <agent> <bare>"} on one line once both listen, and stops
when its standard input closes.

    python benchmarks/transfer_server.py IDENTITY.pem TRUSTED_THUMBPRINT HOME
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from common import listen_bare_tls, quiet_logging, say, start_agent, stop_on_eof
from tentacle.dispatch import Dispatcher
from tentacle.fsutil import fsync_directory
from tentacle.services import register_tentacle_services

#: The agent's own outgoing chunk (tentacle.halibut.connection.CHUNK_SIZE).
CHUNK = 65536
BLOCK = bytes(range(256)) * (CHUNK // 256)


@implementer(IPullProducer)
class Pusher:
    """
    Writes n bytes as fast as the transport takes them.
    """

    def __init__(self, transport: object, remaining: int) -> None:
        self.transport = transport
        self.remaining = remaining

    def resumeProducing(self) -> None:
        if self.remaining == 0:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            return
        take = min(CHUNK, self.remaining)
        self.remaining -= take
        self.transport.write(BLOCK if take == CHUNK else BLOCK[:take])  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self.remaining = 0


class Store:
    """
    The agent's upload work without Halibut: SHA-1 and write to a new temp
    file in 1 MiB batches, then fsync, rename over the destination and
    fsync the folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.sha1 = hashlib.sha1(usedforsecurity=False)
        self.batch = bytearray()

    def write(self, data: bytes) -> None:
        self.sha1.update(data)
        self.batch += data
        if len(self.batch) >= 1024 * 1024:
            self.flush()

    def flush(self) -> None:
        view = memoryview(self.batch)
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done:])
        view.release()
        self.batch = bytearray()

    def close(self) -> str:
        self.flush()
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.temp, self.path)
        fsync_directory(self.path.parent)
        return self.sha1.hexdigest()


class Bare(Protocol):
    store_path = Path("bare-store.bin")

    def __init__(self) -> None:
        self.line = b""
        self.remaining = 0
        self.store: Store | None = None

    def dataReceived(self, data: bytes) -> None:
        while data:
            if self.remaining:
                take = min(self.remaining, len(data))
                self.remaining -= take
                if self.store is not None:
                    self.store.write(data[:take] if take < len(data) else data)
                data = data[take:]
                if not self.remaining:
                    if self.store is not None:
                        digest, self.store = self.store.close(), None
                        self.transport.write(f"OK {digest}\n".encode())  # type: ignore[union-attr]
                    else:
                        self.transport.write(b"OK\n")  # type: ignore[union-attr]
                continue
            self.line += data
            if b"\n" not in self.line:
                return
            command, data = self.line.split(b"\n", 1)
            self.line = b""
            verb, count = command.split()
            if verb in (b"PUT", b"STORE"):
                self.remaining = int(count)
                if verb == b"STORE":
                    self.store = Store(self.store_path)
                if not self.remaining:
                    self.transport.write(b"OK\n")  # type: ignore[union-attr]
            elif verb == b"GET":
                self.transport.registerProducer(Pusher(self.transport, int(count)), False)  # type: ignore[union-attr]
            else:
                self.transport.loseConnection()  # type: ignore[union-attr]
                return


class NoWriteback:
    """
    The agent's uploads as they were before they were written back as they
    arrive (C{TENTACLE_BENCH_WRITEBACK=off}): for A/B runs.
    """

    def __init__(self, fd: int, window: int) -> None:
        pass

    def wrote(self, offset: int, length: int) -> None:
        pass


def main(identity_path: str, trusted: str, home: str) -> None:
    quiet_logging()
    if os.environ.get("TENTACLE_BENCH_WRITEBACK") == "off":
        from tentacle.services import files

        files.Writeback = NoWriteback  # type: ignore[misc,assignment]
    agent, agent_port = start_agent(identity_path, trusted, Path(home), Dispatcher())
    # Before the first request (none can come before the ports line).
    register_tentacle_services(agent.dispatcher, agent.config, reactor)  # type: ignore[arg-type]
    Bare.store_path = Path(home) / "bare-store.bin"
    listening = listen_bare_tls(agent.identity, Bare)
    listening.addCallback(lambda port: say(f"ports {agent_port} {port.getHost().port}"))
    stop_on_eof()
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
