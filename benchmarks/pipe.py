"""
The bare Twisted mutual-TLS pipe: the ceiling of C{bench_transfer.py}'s
whole-command rows. Two programs, each its own process, that move a file
over one mutual-TLS connection with nothing of Tentacle in them:

    python benchmarks/pipe.py serve IDENTITY.pem FOLDER
    python benchmarks/pipe.py put  PORT CERT KEY LOCAL NAME [--durable]
    python benchmarks/pipe.py get  PORT CERT KEY NAME LOCAL [--durable]

C{serve} listens on a free loopback port with the agent's TLS policy and
certificate (L{tentacle.tls.AgentTLSOptions}: TLS 1.2 at least, AEAD only,
asks for the client's certificate), prints C{"port <n>"}, and stops when
its standard input closes.  C{put} and C{get} are the client commands,
timed whole by the benchmark like C{tentacle-client upload}/C{download}
(L{transfer} is the same client for a reactor that is already running):
they import only Twisted (no Tentacle), connect to 127.0.0.1:PORT
presenting CERT/KEY with the client TLS options L{TentacleClient} uses,
move the file, and exit 0 once it is all there.

What the pipe does (plain, the ceiling):

  - C{put}: the client reads LOCAL in 256 KiB reads (a pull producer) and
    sends C{PUT <name> <size>} then the bytes; the server writes them to a
    new temp file in FOLDER in 1 MiB batches and renames it to NAME, then
    answers C{OK}.  No hash, no fsync: the bytes reach the page cache, not
    necessarily the disk.
  - C{get}: the client sends C{GET <name>}; the server answers the size
    and sends the file in 256 KiB reads (pull producer); the client writes
    it to a new temp file beside LOCAL in 1 MiB batches and renames it.
    No hash, no fsync.

With C{--durable} each side also does the integrity and durability work
the agent and the client do (a reference, not the ceiling): C{put} hashes
(SHA-1) as it sends, the server hashes as it receives, fsyncs the file,
renames it and fsyncs the folder before answering C{OK <sha1>}, and the
client checks the hash; C{get} has the client hash, fsync, rename and fsync
the folder.  Unlike L{TentacleClient}, it never reads the file twice.
"""

from __future__ import annotations

import hashlib
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

READ = 256 * 1024
BATCH = 1024 * 1024


def fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@implementer(IPullProducer)
class FileProducer:
    """
    Writes a file to a transport, C{READ} bytes each time it is asked;
    C{done} is called after the last.
    """

    def __init__(self, f: Any, transport: Any, digest: Any, done: Any) -> None:
        self.f, self.transport, self.digest, self.done = f, transport, digest, done

    def resumeProducing(self) -> None:
        data = self.f.read(READ)
        if not data:
            self.f.close()
            self.transport.unregisterProducer()
            self.done()
            return
        if self.digest is not None:
            self.digest.update(data)
        self.transport.write(data)

    def stopProducing(self) -> None:
        self.f.close()


class Sink:
    """
    A new temp file beside C{path}, written in C{BATCH} batches; renamed
    to C{path} by L{close} (after a hash and an fsync when durable).
    """

    def __init__(self, path: Path, durable: bool) -> None:
        self.path = path
        self.temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self.durable = durable
        self.digest = hashlib.sha1(usedforsecurity=False) if durable else None
        self.batch = bytearray()

    def write(self, data: bytes) -> None:
        if self.digest is not None:
            self.digest.update(data)
        self.batch += data
        if len(self.batch) >= BATCH:
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
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.temp, self.path)
        if self.durable:
            fsync_folder(self.path.parent)
        return self.digest.hexdigest() if self.digest is not None else ""


# --- the server ------------------------------------------------------------------------------


class Serve(Protocol):
    """
    C{PUT <name> <size> <durable>\\n} then the bytes, or
    C{GET <name>\\n}; one command per connection.
    """

    folder = Path(".")

    def __init__(self) -> None:
        self.line = b""
        self.remaining = 0
        self.sink: Sink | None = None
        self.command = False

    def dataReceived(self, data: bytes) -> None:
        if self.sink is not None:
            self.receive(data)
            return
        if self.command:
            return
        self.line += data
        if b"\n" not in self.line:
            return
        command, rest = self.line.split(b"\n", 1)
        self.line = b""
        self.command = True
        words = command.decode().split()
        if words[0] == "PUT":
            self.remaining = int(words[2])
            self.sink = Sink(self.folder / words[1], words[3] == "1")
            if rest or not self.remaining:
                self.receive(rest)
        elif words[0] == "GET":
            f = (self.folder / words[1]).open("rb")
            self.transport.write(f"{os.fstat(f.fileno()).st_size}\n".encode())  # type: ignore[union-attr]
            self.transport.registerProducer(  # type: ignore[union-attr]
                FileProducer(f, self.transport, None, lambda: None), False
            )
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]

    def receive(self, data: bytes) -> None:
        assert self.sink is not None
        take = min(self.remaining, len(data))
        if take:
            self.sink.write(data if take == len(data) else data[:take])
            self.remaining -= take
        if not self.remaining:
            sink, self.sink = self.sink, None
            digest = sink.close()
            self.transport.write(f"OK {digest}\n".encode())  # type: ignore[union-attr]


def serve(identity_path: str, folder: str) -> None:
    from twisted.internet import reactor

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import listen_bare_tls, quiet_logging, say, stop_on_eof
    from tentacle.identity import Identity

    quiet_logging()
    Serve.folder = Path(folder)
    listening = listen_bare_tls(Identity.from_file(Path(identity_path)), Serve)
    listening.addCallback(lambda port: say(f"port {port.getHost().port}"))
    stop_on_eof()
    reactor.run()  # type: ignore[attr-defined]


# --- the clients -----------------------------------------------------------------------------


class Put(Protocol):
    def __init__(self, local: Path, name: str, durable: bool, finished: Any) -> None:
        self.local, self.name, self.durable, self.finished = local, name, durable, finished
        self.digest = hashlib.sha1(usedforsecurity=False) if durable else None
        self.answer = b""

    def connectionMade(self) -> None:
        f = self.local.open("rb", buffering=0)
        size = os.fstat(f.fileno()).st_size
        self.transport.write(f"PUT {self.name} {size} {int(self.durable)}\n".encode())  # type: ignore[union-attr]
        self.transport.registerProducer(  # type: ignore[union-attr]
            FileProducer(f, self.transport, self.digest, lambda: None), False
        )

    def dataReceived(self, data: bytes) -> None:
        self.answer += data
        if b"\n" in self.answer:
            words = self.answer.split(b"\n", 1)[0].decode().split()
            if words[0] != "OK":
                self.finished.errback(RuntimeError(f"the server answered {words!r}"))
            elif self.digest is not None and words[1:] != [self.digest.hexdigest()]:
                self.finished.errback(RuntimeError("the server stored other bytes"))
            else:
                self.finished.callback(None)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.finished.called:
            self.finished.errback(RuntimeError(f"the connection closed early: {reason}"))


class Get(Protocol):
    def __init__(self, name: str, local: Path, durable: bool, finished: Any) -> None:
        self.name, self.local, self.durable, self.finished = name, local, durable, finished
        self.line = b""
        self.remaining: int | None = None
        self.sink: Sink | None = None

    def connectionMade(self) -> None:
        self.transport.write(f"GET {self.name}\n".encode())  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.remaining is None:
            self.line += data
            if b"\n" not in self.line:
                return
            size, data = self.line.split(b"\n", 1)
            self.remaining = int(size)
            self.sink = Sink(self.local, self.durable)
        assert self.sink is not None
        take = min(self.remaining, len(data))
        if take:
            self.sink.write(data if take == len(data) else data[:take])
            self.remaining -= take
        if not self.remaining and not self.finished.called:
            self.sink.close()
            self.finished.callback(None)
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if not self.finished.called:
            self.finished.errback(RuntimeError(f"the connection closed early: {reason}"))


def client_options(cert: str, key: str) -> Any:
    """
    The client's TLS options, as L{TentacleClient} makes them (our
    certificate, TLS 1.2 at least), from PEM files.
    """
    from twisted.internet.ssl import CertificateOptions, PrivateCertificate, TLSVersion

    mine = PrivateCertificate.loadPEM(Path(cert).read_text() + Path(key).read_text())
    return CertificateOptions(
        privateKey=mine.privateKey.original, certificate=mine.original, raiseMinimumTo=TLSVersion.TLSv1_2
    )


async def transfer(reactor: Any, kind: str, port: int, tls: Any, first: str, second: str, durable: bool) -> None:
    """
    One C{put LOCAL NAME} or C{get NAME LOCAL} on a new connection.
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS

    finished: Deferred[None] = Deferred()
    if kind == "put":
        protocol: Protocol = Put(Path(first), second, durable, finished)
    else:
        protocol = Get(first, Path(second), durable, finished)
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    await wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(factory)
    await finished


def client(kind: str, port: str, cert: str, key: str, first: str, second: str, *flags: str) -> None:
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    tls = client_options(cert, key)
    task.react(
        lambda reactor: Deferred.fromCoroutine(
            transfer(reactor, kind, int(port), tls, first, second, "--durable" in flags)
        )
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve(*sys.argv[2:4])
    elif sys.argv[1:2] in (["put"], ["get"]):
        client(*sys.argv[1:])
    else:
        raise SystemExit(__doc__)
