"""
What the benchmarks share: the machine's description, statistics, CPU
placement, the certificates, child server processes, the clients (a
blocking Halibut wire client; L{TentacleClient} and the C{tentacle-client}
command, as users run them; a bare Twisted mutual-TLS client), the goal
rows handed to C{run_all.py}, and the pieces the child servers are built
from (quiet logging, readiness lines, the bare Twisted mutual-TLS listener,
the agent).

Every benchmark runs from the repository root as C{python
benchmarks/<name>.py}, which puts this folder on C{sys.path}, so they
C{import common}.

Only the standard library is imported at module level. Tentacle's and
Twisted's modules are imported where they are used, so that
C{bare_server.py} (the baseline of the memory benchmark) loads no more of
them than a bare Twisted TLS server needs.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import ssl
import subprocess
import sys
import threading
import uuid
import zlib
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

HERE = Path(__file__).resolve().parent
_T = TypeVar("_T")
IDENTITY_LINE = b"MX-SERVER 1.0\r\n\r\n"
MiB = 1024 * 1024


# --- the machine ----------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def machine() -> str:
    import twisted

    return (
        f"{os.cpu_count()} CPU(s), {cpu_model()}; Linux {platform.release()}; "
        f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
        f"{ssl.OPENSSL_VERSION}, zlib {zlib.ZLIB_RUNTIME_VERSION}"
    )


def codec_core() -> str:
    """
    Which core the Halibut codec runs on in this interpreter (the child
    processes run the same interpreter with the same environment, so the
    same core): C{"compiled core"}, or why it is pure Python.
    """
    from tentacle.halibut import accel

    return accel.reason


def tentacle_location() -> str:
    """
    Where C{import tentacle} comes from: the benchmarks must run the
    installed package (an editable install builds the compiled core in
    place), not a stray copy.
    """
    import tentacle

    return str(Path(tentacle.__file__).resolve().parent)


def header(name: str) -> str:
    """
    The first line of each benchmark's report.
    """
    return f"# {name}: {machine()}\n# codec: {codec_core()}; tentacle from {tentacle_location()}"


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def cpu_seconds(pid: int) -> float:
    """
    The CPU time (user + system) process C{pid} has used itself, without
    that of its reaped children.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def proc_status(pid: int, field: str) -> int:
    """
    A size field of C{/proc/<pid>/status} (C{VmRSS}, C{VmHWM}, ...), in bytes.
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def row(
    name: str, ours: list[float], base: list[float], unit: str, better: str, *,
    key: str | None = None, fmt: str = "{:.1f}", ratios: list[float] | None = None,
) -> dict[str, Any]:
    """
    One row of C{run_all.py}'s tables: our figure and the baseline's over
    the rounds (their medians), and the median and spread of the per-round
    ratios, ours / baseline (for rates, higher is better; for times and
    sizes, lower), unless C{ratios} gives them.  C{key} names a row of the
    goals table.
    """
    import statistics

    if ratios is None:
        ratios = [o / b if b else float("nan") for o, b in zip(ours, base)]
    return {
        "name": name,
        "key": key,
        "unit": unit,
        "better": better,
        "fmt": fmt,
        "ours": statistics.median(ours),
        "base": statistics.median(base),
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
        "ours_rounds": list(ours),
        "base_rounds": list(base),
    }


def describe_row(r: dict[str, Any]) -> str:
    fmt = r["fmt"]
    return (
        f"{r['name']}: {fmt.format(r['ours'])} vs {fmt.format(r['base'])} {r['unit']}; "
        f"ratio {r['ratio']:.2f} (rounds {r['min']:.2f}..{r['max']:.2f}, n={r['rounds']})"
    )


def percentile(sorted_samples: list[float], q: float) -> float:
    index = min(len(sorted_samples) - 1, max(0, round(q * (len(sorted_samples) - 1))))
    return sorted_samples[index]


def placement(pin: str, servers: str = "server") -> tuple[int | None, int | None, str]:
    """
    The CPUs for the client and for the server processes, and how to
    describe them: C{split} puts them on two CPUs (on one when there is
    only one), C{same} on one, C{none} leaves placement to the scheduler.
    """
    if pin == "none" or not hasattr(os, "sched_getaffinity"):
        return None, None, "not pinned"
    allowed = sorted(os.sched_getaffinity(0))
    if pin == "split" and len(allowed) >= 2:
        return allowed[0], allowed[1], f"client on CPU {allowed[0]}, {servers} on CPU {allowed[1]}"
    return allowed[0], allowed[0], f"client and {servers} on CPU {allowed[0]}"


def add_pin_option(parser: Any, default: str = "split", choices: tuple[str, ...] = ("split", "same", "none")) -> None:
    parser.add_argument(
        "--pin", choices=choices, default=default,
        help=f"split: the client on one CPU and the servers on another; same: all on one CPU; "
        f"none: wherever the scheduler likes (default: {default})",
    )


def pin_self(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


# --- results for run_all.py --------------------------------------------------------


def add_json_option(parser: Any) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON (for run_all.py)")


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(figures, indent=2) + "\n")


# --- certificates -------------------------------------------------------------------


class Certificates:
    """
    A fresh agent identity (in C{agent.pem}, for the child servers) and a
    server identity that the client presents, as Octopus Server does:
    C{context} is like C{tests.support.client_context}, it does not check
    the agent's certificate (Octopus would check its thumbprint).
    """

    def __init__(self, folder: Path) -> None:
        from tentacle.identity import Identity

        self.agent = Identity.generate("agent")
        self.server = Identity.generate("server")
        self.agent_pem = folder / "agent.pem"
        self.agent_pem.write_bytes(self.agent.certificate_pem() + self.agent.private_key_pem())
        cert, key = folder / "server.crt", folder / "server.key"
        cert.write_bytes(self.server.certificate_pem())
        key.write_bytes(self.server.private_key_pem())
        key.chmod(0o600)
        #: The server identity's files, for the child clients.
        self.server_cert, self.server_key = cert, key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE
        self.context.load_cert_chain(str(cert), str(key))


# --- child processes -------------------------------------------------------------------


def server_command(script: str, *args: object) -> list[str]:
    return [sys.executable, str(HERE / script), *map(str, args)]


def start_child(command: list[str], cpu: int | None = None, **popen: Any) -> subprocess.Popen[str]:
    """
    A child that reads commands (or only end of input) on stdin and answers
    on stdout; pinned to C{cpu} at once, before it starts any thread.
    """
    options: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    options.update(popen)
    child = subprocess.Popen(command, **options)
    if cpu is not None:
        os.sched_setaffinity(child.pid, {cpu})
    return child


def read_ready(child: subprocess.Popen[str], word: str, count: int) -> list[int]:
    """
    The numbers on the child's first line, C{"<word> <n>..."}: its ports.
    """
    assert child.stdout is not None
    line = child.stdout.readline().split()
    if len(line) != count + 1 or line[0] != word:
        child.kill()
        child.wait()
        words = [str(a) for a in child.args] if isinstance(child.args, list) else [str(child.args)]
        name = next((Path(w).name for w in words if w.endswith(".py")), words[0])
        raise RuntimeError(f"{name} did not start (said {line!r})")
    return [int(n) for n in line[1:]]


def stop_child(child: subprocess.Popen[str], timeout: float = 15, terminate: bool = False) -> None:
    """
    Close the child's stdin (its signal to stop) or, with C{terminate},
    send it SIGTERM; kill it if it lingers.
    """
    if terminate:
        child.terminate()
    elif child.stdin is not None:
        try:
            child.stdin.close()
        except OSError:
            pass
    try:
        child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


# --- the client: blocking TLS sockets and Halibut on the wire --------------------------------


class Connection:
    """
    A blocking TLS client socket to 127.0.0.1 with exact reads, a bulk
    sink and a bulk source.
    """

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 60) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw)
        self.buffer = b""
        self.scratch: bytearray | None = None

    def recv(self) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self.recv()
        self.buffer = data[n:] + self.buffer
        return data[:n]

    def drain(self, n: int) -> None:
        """
        Read and drop exactly C{n} bytes, C{recv_into} a 1 MiB buffer.
        """
        if self.scratch is None:
            self.scratch = bytearray(MiB)
        taken = min(n, len(self.buffer))
        self.buffer = self.buffer[taken:]
        n -= taken
        view = memoryview(self.scratch)
        while n:
            got = self.sock.recv_into(view, min(n, len(view)))
            if not got:
                raise ConnectionError("the server closed the connection")
            n -= got

    def send_bytes(self, n: int, block: bytes) -> None:
        """
        Send C{n} bytes as C{sendall}s of C{block}.
        """
        while n >= len(block):
            self.sock.sendall(block)
            n -= len(block)
        if n:
            self.sock.sendall(block[:n])

    def close(self) -> None:
        self.sock.close()


class HalibutClient(Connection):
    """
    A connection to the agent, past the MX preamble and identity lines,
    making pooled calls as Octopus Server does.
    """

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 60) -> None:
        from tentacle.halibut.deflate import Inflater

        self._inflater = Inflater
        super().__init__(port, context, timeout)
        self.sock.sendall(b"MX\r\n\r\nMX-CLIENT 1.0\r\n\r\n")
        if self.read_exactly(len(IDENTITY_LINE)) != IDENTITY_LINE:
            raise AssertionError("the agent did not answer MX-SERVER")
        self.fresh = True

    def read_payload(self, followed: bool = False) -> bytes:
        """
        The next response's BSON, once its DEFLATE stream has ended. Bytes
        after it are an error unless C{followed} (by data streams).
        """
        inflater = self._inflater()
        payload = None
        while payload is None:
            payload = inflater.feed(self.recv())
        if followed:
            self.buffer = inflater.unused + self.buffer
        elif inflater.unused:
            raise AssertionError("unexpected bytes after the response")
        return payload

    def round_trip(self, request_wire: bytes) -> bytes:
        """
        NEXT/PROCEED (except on the first call), a pre-encoded request, and
        the response's BSON.
        """
        sock = self.sock
        if not self.fresh:
            sock.sendall(b"NEXT\r\n")
            if self.read_exactly(9) != b"PROCEED\r\n":
                raise AssertionError("the agent did not answer PROCEED")
        self.fresh = False
        sock.sendall(request_wire)
        return self.read_payload()

    def call(self, request_wire: bytes) -> Any:
        return result(self.round_trip(request_wire))

    def end(self) -> None:
        """
        END, as Octopus Server retires a pooled connection, then close.
        """
        try:
            self.sock.sendall(b"END\r\n")
        finally:
            self.sock.close()


_registry: Any = None


def registry() -> Any:
    global _registry
    if _registry is None:
        from tentacle.contracts import tentacle_registry

        _registry = tentacle_registry()
    return _registry


def request(service: str, method: str, *params: object) -> Any:
    """
    A C{RequestMessage}, built as C{tests/wire_client.request()} builds it.
    """
    from tentacle.halibut.serializer import RequestMessage

    call = uuid.uuid4()
    return RequestMessage(
        id=f"{service}::{method}[1] / {call}",
        activity_id=call,
        service=service,
        method=method,
        params=params,
    )


def wire(message: Any) -> bytes:
    """
    A message without data streams as it goes on the wire: DEFLATE'd BSON.
    """
    from tentacle.halibut.deflate import compress
    from tentacle.halibut.serializer import encode_message

    data, streams = encode_message(message)
    assert not streams
    return compress(data)


def response(payload: bytes) -> tuple[Any, list[Any]]:
    from tentacle.halibut.serializer import ResponseMessage, decode_message

    message, streams = decode_message(payload, registry(), expected=ResponseMessage)
    assert isinstance(message, ResponseMessage)
    return message, list(streams)


def result(payload: bytes) -> Any:
    """
    The result of a response without data streams; an error raises.
    """
    message, streams = response(payload)
    assert not streams
    if message.error is not None:
        raise AssertionError(f"the call failed: {message.error.message}")
    return message.result


# --- the child servers ----------------------------------------------------------------------


def quiet_logging() -> None:
    """
    Twisted's log to stderr, warnings and worse only.
    """
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def stop_on_eof(on_line: Callable[[str], None] | None = None) -> None:
    """
    Read standard input in a thread: each line goes to C{on_line} in the
    reactor thread; end of input stops the reactor.
    """
    from twisted.internet import reactor

    def read() -> None:
        for line in sys.stdin:
            if on_line is not None:
                reactor.callFromThread(on_line, line.strip())  # type: ignore[attr-defined]
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    threading.Thread(target=read, daemon=True).start()


def listen_bare_tls(identity: Any, protocol: Any) -> Any:
    """
    A bare Twisted TLS server on 127.0.0.1 with the agent's TLS policy and
    certificate (L{AgentTLSOptions}: it asks for a client certificate),
    speaking C{protocol}. A Deferred that fires with the listening port; a
    failure to listen stops the reactor.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from tentacle.tls import AgentTLSOptions

    factory = TLSMemoryBIOFactory(
        AgentTLSOptions(identity), False, Factory.forProtocol(protocol), clock=reactor
    )
    factory.noisy = False
    d = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)

    def failed(failure: Any) -> None:
        failure.printTraceback()
        reactor.stop()

    d.addErrback(failed)
    return d


def echo_protocol() -> Any:
    """
    The bare servers' echo: every byte back as it comes.
    """
    from twisted.internet.protocol import Protocol

    class Echo(Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[union-attr]

    return Echo


def bench_service() -> tuple[Any, Any]:
    """
    C{IBenchService.Echo(string) -> string}: the contract and an
    implementation, for timing a trivial call.
    """
    from tentacle.contracts import Operation, Parameter, ServiceContract

    contract = ServiceContract(
        "IBenchService",
        "Tentacle.Benchmarks.IBenchService, Tentacle.Benchmarks",
        (Operation("Echo", (Parameter("text", str),), str),),
    )

    class BenchService:
        def echo(self, text: str) -> str:
            return text

    return contract, BenchService()


def start_agent(identity_path: str, trusted: str, home: Path, dispatcher: Any) -> tuple[Any, int]:
    """
    A started L{TentacleService} on 127.0.0.1 (a free port) serving
    C{dispatcher} (Tentacle's own services when C{None}, as the deployed
    agent) to one trusted server, and its port. It stops with the reactor.
    """
    from twisted.internet import reactor

    from tentacle.config import TentacleConfig
    from tentacle.identity import Identity
    from tentacle.service import TentacleService

    config = TentacleConfig(home=home, port=0, listen_address="127.0.0.1", trusted_thumbprints=(trusted,))
    agent = TentacleService(
        config, reactor, identity=Identity.from_file(Path(identity_path)), dispatcher=dispatcher,
        freeze_startup_objects=True,  # as the daemon (tap.makeService) starts it
    )
    agent.startService()
    assert agent.port is not None
    reactor.addSystemEventTrigger("before", "shutdown", agent.stopService)
    return agent, agent.port.getHost().port  # type: ignore[attr-defined]


# --- the clients users run: TentacleClient and tentacle-client ---------------------------------


def tentacle_client_command() -> list[str]:
    """
    The C{tentacle-client} command of this interpreter's installation (the
    script beside C{sys.executable}), or C{python -m tentacle.client.cli}
    when there is no such script.
    """
    script = Path(sys.executable).parent / "tentacle-client"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "tentacle.client.cli"]


def cli_identity(certs: Certificates) -> list[str]:
    """
    The C{tentacle-client} options that present the server identity and
    pin the agent's certificate.
    """
    return [
        "--cert", str(certs.server_cert), "--key", str(certs.server_key),
        "--thumbprint", certs.agent.thumbprint,
    ]


def tentacle_client(reactor: Any, port: int, certs: Certificates, **options: Any) -> Any:
    """
    A L{TentacleClient} of the agent on 127.0.0.1:C{port}, pinned to its
    certificate, presenting the server identity, as users make one.
    """
    from tentacle.client.api import Target, TentacleClient
    from tentacle.client.connection import Pin

    return TentacleClient(Target("127.0.0.1", port, Pin(certs.agent.thumbprint)), certs.server, reactor, **options)


def react(main: Callable[[Any], Awaitable[_T]]) -> _T:
    """
    Run C{main(reactor)} (a coroutine function) in the global reactor to
    its end, and return what it returned; its exception propagates.
    """
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    out: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        out["result"] = await main(reactor)

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise RuntimeError(f"the benchmark failed (exit status {e.code}); see above") from None
    if "result" not in out:
        raise RuntimeError("the benchmark stopped without a result")
    return out["result"]  # type: ignore[no-any-return]


async def sleep(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


async def in_thread(f: Callable[..., _T], *args: Any) -> _T:
    from twisted.internet.threads import deferToThread

    return await deferToThread(f, *args)  # type: ignore[no-any-return]


# --- a bare Twisted mutual-TLS client ------------------------------------------------------------


def client_tls(identity: Any) -> Any:
    """
    The client side's TLS options, as L{TentacleClient} makes them: our
    certificate, TLS 1.2 at least; the agent's certificate is not checked
    here (the bare clients pin nothing).
    """
    from twisted.internet.ssl import CertificateOptions, TLSVersion

    return CertificateOptions(
        privateKey=identity.private_key, certificate=identity.certificate, raiseMinimumTo=TLSVersion.TLSv1_2
    )


class BareTLSClient:
    """
    A bare Twisted mutual-TLS client connection (C{TCP4ClientEndpoint}
    wrapped in TLS): write bytes, wait for exactly so many back.
    """

    def __init__(self) -> None:
        from twisted.internet.protocol import Protocol

        outer = self

        class _Protocol(Protocol):
            def dataReceived(self, data: bytes) -> None:
                outer._received(data)

            def connectionLost(self, reason: Any = None) -> None:
                outer._lost(reason)

        self.protocol = _Protocol()
        self._buffer = bytearray()
        self._want = 0
        self._waiting: Any = None
        self.closed: Any = None

    @classmethod
    async def connect(cls, reactor: Any, port: int, tls: Any) -> BareTLSClient:
        from twisted.internet.defer import Deferred
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
        from twisted.internet.protocol import Factory

        client = cls()
        client.closed = Deferred()
        factory = Factory.forProtocol(lambda: client.protocol)
        factory.noisy = False
        await wrapClientTLS(tls, TCP4ClientEndpoint(reactor, "127.0.0.1", port)).connect(factory)
        return client

    def exchange(self, payload: bytes) -> Any:
        """
        Send C{payload}; a Deferred that fires with as many bytes back.
        """
        from twisted.internet.defer import Deferred

        self._want = len(payload)
        self._waiting = Deferred()
        self.protocol.transport.write(payload)  # type: ignore[union-attr]
        return self._waiting

    def _received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiting is not None and len(self._buffer) >= self._want:
            got, self._buffer = bytes(self._buffer[: self._want]), self._buffer[self._want :]
            waiting, self._waiting = self._waiting, None
            waiting.callback(got)

    def _lost(self, reason: Any) -> None:
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.errback(ConnectionError("the server closed the connection"))
        if self.closed is not None and not self.closed.called:
            self.closed.callback(None)

    def close(self) -> Any:
        self.protocol.transport.loseConnection()  # type: ignore[union-attr]
        return self.closed
