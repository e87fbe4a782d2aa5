"""
Shared test helpers: throwaway identities, an agent on a free port, and
blocking TLS clients run in a thread (real sockets, real TLS).
"""

from __future__ import annotations

import socket
import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import attrs
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from tentacle.config import TentacleConfig
from tentacle.identity import Identity
from tentacle.service import TentacleService


#: Files bigger than this are removed when the test that made them ends.
BIG_FILE = 1024 * 1024


def remove_big_files(case: TestCase, limit: int = BIG_FILE) -> None:
    """
    When C{case} ends, pass or fail, delete the files over C{limit} bytes
    in its temp folders, so a run of the suite leaves megabytes, not
    gigabytes, in C{_trial_temp}; the small ones (homes, logs, states)
    stay for a post-mortem.  Call it first in C{setUp}: cleanups run last
    to first, so the agents are stopped by then.
    """
    folder = Path(case.mktemp()).absolute().parent.parent

    def clean() -> None:
        for path in folder.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and path.stat().st_size > limit:
                    path.unlink()
            except OSError:
                continue

    case.addCleanup(clean)


@lru_cache(maxsize=None)
def identity(name: str) -> Identity:
    """
    One RSA identity per name, generated once per test run (RSA is slow).
    """
    return Identity.generate(common_name=name)


def write_pem(identity: Identity, folder: Path) -> tuple[str, str]:
    """
    The certificate and key as files, for clients that need paths.
    """
    cert, key = folder / "client.crt", folder / "client.key"
    cert.write_bytes(identity.certificate_pem())
    key.write_bytes(identity.private_key_pem())
    return str(cert), str(key)


def _matches(event: LogEvent, fields: dict[str, Any]) -> bool:
    return all(event.get(k) == v for k, v in fields.items())


@implementer(ILogObserver)
@attrs.define
class LogCapture:
    """
    Collects log events from the global publisher while a test runs.
    """

    events: list[LogEvent] = attrs.field(factory=list)
    _waiting: list[tuple[dict[str, Any], Deferred[LogEvent]]] = attrs.field(factory=list)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
        for waiting in list(self._waiting):
            fields, d = waiting
            if _matches(event, fields):
                self._waiting.remove(waiting)
                reactor.callLater(0, d.callback, event)  # type: ignore[attr-defined]

    def wait_for(self, **fields: Any) -> Deferred[LogEvent]:
        """
        Fires with the first event, logged already or later, having these
        fields: waiting on the event itself, not on time.
        """
        for event in self.events:
            if _matches(event, fields):
                return succeed(event)
        d: Deferred[LogEvent] = Deferred()
        self._waiting.append((fields, d))
        return d

    def matching(self, **fields: Any) -> list[LogEvent]:
        return [e for e in self.events if _matches(e, fields)]

    @classmethod
    def install(cls, case: TestCase) -> LogCapture:
        capture = cls()
        globalLogPublisher.addObserver(capture)
        case.addCleanup(globalLogPublisher.removeObserver, capture)
        return capture


def start_agent(
    case: TestCase,
    trusted: tuple[str, ...] = (),
    home: Path | None = None,
    service_options: dict[str, Any] | None = None,
    **config_changes: Any,
) -> TentacleService:
    """
    A running agent on a free loopback port, stopped when the test ends.
    """
    if home is None:
        home = Path(case.mktemp()).absolute()
        home.mkdir()
    config = TentacleConfig(
        home=home, port=0, listen_address="127.0.0.1", trusted_thumbprints=trusted
    )
    config = attrs.evolve(config, **config_changes)
    service = TentacleService(
        config, reactor, identity=identity("agent"), **(service_options or {})
    )
    service.startService()
    case.addCleanup(lambda: service.stopService() if service.running else None)
    return service


def agent_port(service: TentacleService) -> int:
    assert service.port is not None
    return int(service.port.getHost().port)  # type: ignore[attr-defined]


def client_context(
    client: Identity | None = None,
    tmp: Path | None = None,
    maximum: ssl.TLSVersion | None = None,
    minimum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """
    A Python C{ssl} client context that does not check the agent's
    certificate and optionally presents C{client}'s.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        context.maximum_version = maximum
    if minimum is not None:
        context.minimum_version = minimum
    if client is not None:
        assert tmp is not None
        cert, key = write_pem(client, tmp)
        context.load_cert_chain(cert, key)
    return context


@attrs.frozen
class Exchange:
    """
    What a blocking client saw: the bytes it received and how it ended.
    """

    received: bytes
    ending: str  # "closed", "reset", "timeout" or "open"


def converse(
    port: int,
    context: ssl.SSLContext,
    send: bytes,
    timeout: float = 10.0,
    expect: int | None = None,
) -> Exchange:
    """
    Connect with TLS, send, and read until the agent closes or resets, or
    until C{expect} bytes have arrived (ending "open").
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = b""
    try:
        with context.wrap_socket(raw) as tls:
            tls.sendall(send)
            while True:
                try:
                    chunk = tls.recv(65536)
                except ConnectionResetError:
                    return Exchange(received, "reset")
                except ssl.SSLEOFError:
                    return Exchange(received, "closed")
                except socket.timeout:
                    return Exchange(received, "timeout")
                if not chunk:
                    return Exchange(received, "closed")
                received += chunk
                if expect is not None and len(received) >= expect:
                    return Exchange(received, "open")
    except ConnectionResetError:
        return Exchange(received, "reset")


def in_thread(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    return deferToThread(f, *args, **kwargs)


def client_tls_options(client: Identity | None = None) -> CertificateOptions:
    """
    Twisted client-side TLS that presents C{client}'s certificate and does
    not check the agent's (the tests check thumbprints themselves).
    """
    if client is None:
        return CertificateOptions()
    return CertificateOptions(privateKey=client.private_key, certificate=client.certificate)


class Recorder(Protocol):
    """
    A client protocol that keeps what it receives and how it was lost.
    """

    def __init__(self) -> None:
        self.received = b""
        self.lost: Any = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = reason


def der(identity: Identity) -> bytes:
    return identity.certificate.public_bytes(serialization.Encoding.DER)


#: The subscription the polling tests' agent uses.
SUBSCRIPTION = "poll://testagentsubscription/"


def start_polling_server(
    case: TestCase,
    trusted: tuple[str, ...] | None = None,
    **options: Any,
) -> Any:
    """
    A polling port (the server's side of polling mode) on a free loopback
    port, as C{identity("hub")}, trusting the test agent by default;
    stopped when the test ends.
    """
    from tentacle.hub.polling_server import PollingServer

    server = PollingServer(
        identity("hub"),
        trusted if trusted is not None else (identity("agent").thumbprint,),
        reactor,
        port=0,
        interface="127.0.0.1",
        **options,
    )
    server.startService()
    case.addCleanup(server.stopService)
    return server


def polled(server: Any, thumbprint: str | None = None, subscription: str = SUBSCRIPTION, **changes: Any) -> Any:
    """
    The configuration entry for an agent to poll C{server}.
    """
    from tentacle.config import PolledServer

    return PolledServer(
        "127.0.0.1", thumbprint or identity("hub").thumbprint, subscription, server.listening_port, **changes
    )


def start_polling_agent(case: TestCase, server: Any, home: Path | None = None, **config_changes: Any) -> TentacleService:
    """
    A running agent that polls C{server} and does not listen.
    """
    config_changes.setdefault("polling_servers", (polled(server),))
    config_changes.setdefault("listen", False)
    return start_agent(case, home=home, **config_changes)
