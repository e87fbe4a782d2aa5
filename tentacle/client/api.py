"""
L{TentacleClient}: drive a listening tentacle (ours or Octopus's) from Python.

    client = TentacleClient(Target("web01", 10933, Pin("8E9F...")), identity, reactor)
    print(await client.capabilities())
    code = await client.run_script("echo hello", on_log=print)
    await client.upload(Path("app.tar.gz"), "Packages/app.tar.gz")
    await client.close()

Connections are pooled as Halibut pools them: one request at a time on a
connection, at most five idle per agent, retired after nine idle minutes,
checked with NEXT/PROCEED before reuse.  Connection failures are retried
(five tries within five minutes, a second apart); once a request has been
sent, only calls that are safe to repeat are retried (V2 script calls,
status and cancel, uploads and downloads), never V1 StartScript; nothing
is retried after a certificate or trust failure.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
    TimeoutError,
)
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import deferLater
from twisted.logger import Logger

from tentacle.client.connection import (
    HEARTBEAT_TIMEOUT,
    RESPONSE_TIMEOUT,
    ClientConnection,
    ClientError,
    ConnectionFailed,
    Pin,
    RequestFailed,
)
from tentacle.client.proxy import Proxy, ProxyEndpoint, ProxyRefused
from tentacle.contracts import (
    CancelScriptCommand,
    CancelScriptCommandV2,
    CompleteScriptCommand,
    CompleteScriptCommandV2,
    ProcessOutput,
    ProcessState,
    ScriptFile,
    ScriptIsolationLevel,
    ScriptStatusRequest,
    ScriptStatusRequestV2,
    ScriptTicket,
    StartScriptCommand,
    StartScriptCommandV2,
    UploadResult,
)
from tentacle.dispatch import PayloadOpener
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.serializer import DataStream, RequestMessage, ServerError
from tentacle.halibut.streams import ReceivedStream
from tentacle.identity import Identity
from tentacle.fsutil import fsync_directory


def describe_connect_error(error: ConnectError) -> str:
    """
    Why a connection could not be made, as a sentence (not C{111: ...}).
    """
    if isinstance(error, ConnectionRefusedError):
        return "the connection was refused: no agent listens on that port, or a firewall refuses it"
    if isinstance(error, (TCPTimedOutError, TimeoutError)):
        return "the connection timed out: the host may be down, or a firewall drops the packets"
    if isinstance(error, NoRouteError):
        return "there is no route to the host"
    number = error.osError
    if isinstance(number, int):
        return os.strerror(number)[:1].lower() + os.strerror(number)[1:]
    return (error.args[0] if error.args else "") or str(error)


class RemoteError(ClientError):
    """
    The agent answered with an error.
    """

    def __init__(self, error: ServerError) -> None:
        super().__init__(error.message)
        self.error = error


class TransferError(ClientError):
    """
    A transfer arrived, but not as sent (hash or length differ).
    """


def build_request(service: str, method: str, *params: Any) -> RequestMessage:
    """
    A request as Octopus Server words it: an id naming the call, a fresh
    activity id.  (Octopus also sends its ServiceEndPoint; agents never
    read it, so we send null.)
    """
    call_id = uuid.uuid4()
    return RequestMessage(
        id=f"{service}::{method}Async[{call_id.int % 10000}] / {call_id}",
        activity_id=call_id,
        service=service,
        method=method,
        params=params,
    )


@attrs.frozen
class Target:
    """
    Where an agent listens, and the certificate it must present.
    """

    host: str
    port: int = 10933
    pin: Pin | None = None
    proxy: Proxy | None = None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@attrs.frozen
class RetryPolicy:
    """
    Halibut's defaults: five tries, a second apart, within five minutes.
    """

    attempts: int = 5
    interval: float = 1.0
    within: float = 300.0


Progress = Callable[[int, int], None]


class _CountingReader:
    """
    A file wrapper that reports how much has been read, for progress.
    """

    def __init__(self, f: IO[bytes], total: int, progress: Progress) -> None:
        self._f = f
        self._total = total
        self._done = 0
        self._progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        self._progress(self._done, self._total)
        return data

    def close(self) -> None:
        self._f.close()


class TentacleClient:
    """
    A client of one agent.

    @param identity: the certificate we present; the agent must trust its
        thumbprint.
    """

    log = Logger()

    def __init__(
        self,
        target: Target,
        identity: Identity,
        reactor: Any = None,
        *,
        retry: RetryPolicy = RetryPolicy(),
        max_idle: int = 5,
        idle_expiry: float = 540.0,
        connect_timeout: float = 60.0,
        response_timeout: float = RESPONSE_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.target = target
        self._reactor = reactor
        self._retry = retry
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._connect_timeout = connect_timeout
        self._response_timeout = response_timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._tls = CertificateOptions(
            privateKey=identity.private_key,  # type: ignore[arg-type]
            certificate=identity.certificate,  # type: ignore[arg-type]
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        self._idle: list[tuple[ClientConnection, IDelayedCall]] = []
        self._capabilities: list[str] | None = None

    # --- connections ----------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        tcp: Any
        if self.target.proxy is not None:
            tcp = ProxyEndpoint(
                self._reactor, self.target.proxy, self.target.host, self.target.port, self._connect_timeout
            )
        else:
            tcp = HostnameEndpoint(self._reactor, self.target.host, self.target.port, timeout=self._connect_timeout)
        endpoint = wrapClientTLS(self._tls, tcp)
        connection = ClientConnection(
            self.target.pin, self._reactor,
            response_timeout=self._response_timeout, heartbeat_timeout=self._heartbeat_timeout,
        )
        try:
            await endpoint.connect(Factory.forProtocol(lambda: connection))
        except DNSLookupError as e:
            raise ConnectionFailed(f"cannot resolve {self.target.host}: {e}") from None
        except ConnectError as e:
            raise ConnectionFailed(f"cannot connect to {self.target}: {describe_connect_error(e)}") from None
        await connection.ready
        return connection

    async def connect(self) -> ClientConnection:
        """
        A checked idle connection from the pool, or a new one, with retries.
        """
        while self._idle:
            connection, expiry = self._idle.pop()
            if expiry.active():
                expiry.cancel()
            if not connection.idle:
                continue  # the agent closed it while it waited (a restart, say)
            try:
                await connection.next()
                return connection
            except ClientError:
                continue
        deadline = self._reactor.seconds() + self._retry.within
        last: Exception | None = None
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return await self._open()
            except ProxyRefused:
                raise  # the proxy's answer will not change in a second
            except ConnectionFailed as e:
                last = e
                if "cannot resolve" in str(e):
                    break  # as Halibut: an unknown host will not appear in a second
                if attempt == self._retry.attempts or self._reactor.seconds() + self._retry.interval > deadline:
                    break
                self.log.info(
                    "Connecting to {target} failed ({error}); trying again",
                    target=str(self.target), error=str(e),
                )
                await deferLater(self._reactor, self._retry.interval, lambda: None)
        raise ConnectionFailed(f"could not connect to {self.target} after {attempt} tries: {last}")

    def _release(self, connection: ClientConnection) -> None:
        if not connection.idle:
            return
        if len(self._idle) >= self._max_idle:
            connection.end()
            return
        entry: list[Any] = []

        def expire() -> None:
            if entry and entry[0] in self._idle:
                self._idle.remove(entry[0])
            connection.end()

        timer = self._reactor.callLater(self._idle_expiry, expire)
        entry.append((connection, timer))
        self._idle.append((connection, timer))

    async def close(self) -> None:
        """
        Retire every pooled connection (END), as Octopus Server does.
        """
        idle, self._idle = self._idle, []
        for connection, timer in idle:
            if timer.active():
                timer.cancel()
            connection.end()
        for connection, _ in idle:
            await connection.closed

    # --- calls ----------------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        *params: Any,
        payloads: Mapping[uuid.UUID, PayloadOpener] | None = None,
    ) -> tuple[Any, list[ReceivedStream]]:
        """
        One request; the result and any data streams that came with it
        (the caller discards their sinks).

        @raise RemoteError: the agent answered with an error.
        @raise ClientError: the connection failed.
        """
        request = build_request(service, method, *params)
        connection = await self.connect()
        try:
            response, streams = await connection.call(request, payloads)
        except CancelledError:
            connection.end()  # the answer would arrive on a connection nobody reads
            raise
        self._release(connection)
        if response.error is not None:
            for stream in streams:
                stream.sink.discard()
            raise RemoteError(response.error)
        return response.result, streams

    async def call_idempotent(
        self,
        service: str,
        method: str,
        *params: Any,
        payloads: Mapping[uuid.UUID, PayloadOpener] | None = None,
    ) -> tuple[Any, list[ReceivedStream]]:
        """
        L{call} for a call that is safe to repeat: when the connection
        breaks, even after the request was sent, it is sent again within the
        retry policy, since a second run changes nothing the first did not.
        """
        deadline = self._reactor.seconds() + self._retry.within
        attempt = 1
        while True:
            try:
                return await self.call(service, method, *params, payloads=payloads)
            except (RequestFailed, ConnectionFailed) as e:
                if attempt >= self._retry.attempts or self._reactor.seconds() + self._retry.interval > deadline:
                    raise
                self.log.info(
                    "{service}.{method} on {target} failed ({error}); sending it again",
                    service=service, method=method, target=str(self.target), error=str(e),
                    event="call_retried",
                )
                attempt += 1
                await deferLater(self._reactor, self._retry.interval, lambda: None)

    async def capabilities(self) -> list[str]:
        """
        The services the agent offers (cached, as Halibut caches for 10 min).
        """
        if self._capabilities is None:
            result, _ = await self.call("ICapabilitiesServiceV2", "GetCapabilities")
            self._capabilities = list(result.supported_capabilities)
        return self._capabilities

    # --- scripts --------------------------------------------------------------------

    async def run_script(
        self,
        body: str,
        *,
        arguments: tuple[str, ...] = (),
        isolation: ScriptIsolationLevel = ScriptIsolationLevel.NoIsolation,
        mutex: str | None = None,
        mutex_timeout: float = 0.0,
        files: Mapping[str, Path] | None = None,
        task_id: str | None = None,
        on_log: Callable[[ProcessOutput], None] | None = None,
        poll_interval: float = 0.1,
        max_poll_interval: float = 1.0,
    ) -> int:
        """
        Run a script to its end, passing each log line to C{on_log} as it
        comes; the exit code.  V2 when the agent offers it, else V1.
        Cancelling the Deferred cancels the script on the agent, waits for it
        to stop, then raises L{CancelledError}.
        """
        task_id = task_id or f"ServerTasks-{uuid.uuid4().int % 1_000_000}"
        payloads: dict[uuid.UUID, PayloadOpener] = {}
        script_files = []
        for name, path in (files or {}).items():
            ref = DataStream.fresh(path.stat().st_size)
            payloads[ref.id] = lambda path=path: path.open("rb")  # type: ignore[misc]
            script_files.append(ScriptFile(name, ref))
        v2 = "IScriptServiceV2" in await self.capabilities()
        timeout = TimeSpan.from_timedelta(timedelta(seconds=mutex_timeout))
        if v2:
            ticket = ScriptTicket(uuid.uuid4().hex)
            # V2 StartScript is idempotent by ticket: a resend after a lost
            # answer reports the same run, never starts a second.
            await self.call_idempotent(
                "IScriptServiceV2", "StartScript",
                StartScriptCommandV2(
                    script_ticket=ticket, script_body=body, task_id=task_id,
                    duration_to_wait_for_script_to_finish=None, isolation=isolation,
                    script_isolation_mutex_timeout=timeout, isolation_mutex_name=mutex,
                    scripts={}, files=tuple(script_files), arguments=arguments,
                ),
                payloads=payloads,
            )
        else:
            ticket, _ = await self.call(
                "IScriptService", "StartScript",
                StartScriptCommand(
                    script_body=body, isolation=isolation, files=tuple(script_files),
                    arguments=arguments, task_id=task_id,
                    script_isolation_mutex_timeout=timeout, isolation_mutex_name=mutex,
                ),
                payloads=payloads,
            )
        service = "IScriptServiceV2" if v2 else "IScriptService"
        # Status, cancel and (V2) complete are safe to repeat; V1's
        # CompleteScript hands back the rest of the log once only.
        again = self.call_idempotent
        status_type = ScriptStatusRequestV2 if v2 else ScriptStatusRequest
        sequence = 0
        interval = poll_interval
        cancelled = False
        while True:
            try:
                status, _ = await again(service, "GetStatus", status_type(ticket, sequence))
                for line in status.logs:
                    if on_log is not None:
                        on_log(line)
                sequence = status.next_log_sequence
                if status.state is ProcessState.Complete:
                    break
                await deferLater(self._reactor, interval if not status.logs else poll_interval, lambda: None)
                interval = min(interval * 1.15, max_poll_interval)
            except CancelledError:
                if cancelled:
                    raise
                cancelled = True
                cancel_type = CancelScriptCommandV2 if v2 else CancelScriptCommand
                await again(service, "CancelScript", cancel_type(ticket, sequence))
        if v2:
            await again(service, "CompleteScript", CompleteScriptCommandV2(ticket))
        else:
            await self.call(service, "CompleteScript", CompleteScriptCommand(ticket, sequence))
        if cancelled:
            raise CancelledError(f"the script was cancelled (exit code {status.exit_code})")
        return int(status.exit_code)

    # --- files ----------------------------------------------------------------------

    async def upload(self, local: Path, remote: str, progress: Progress | None = None) -> UploadResult:
        """
        Send a file; check the agent stored exactly what was sent.

        @raise TransferError: the agent's hash or length differ from ours.
        """
        size = local.stat().st_size
        digest = hashlib.sha1()
        with local.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        ref = DataStream.fresh(size)

        def opener() -> Any:
            f = local.open("rb")
            return _CountingReader(f, size, progress) if progress else f

        # Storing the same bytes at the same path again changes nothing, and
        # the agent drops an interrupted upload's temp file: safe to resend.
        result, _ = await self.call_idempotent(
            "IFileTransferService", "UploadFile", remote, ref, payloads={ref.id: opener}
        )
        assert isinstance(result, UploadResult)
        if result.length != size or result.hash.lower() != digest.hexdigest():
            raise TransferError(
                f"the agent stored {result.length} bytes with SHA-1 {result.hash}; "
                f"we sent {size} bytes with SHA-1 {digest.hexdigest()}"
            )
        return result

    async def download(self, remote: str, local: Path, progress: Progress | None = None) -> tuple[int, str]:
        """
        Fetch a file into C{local} (written to a temp file, then renamed).

        @return: its length and SHA-1.
        @raise RemoteError: the file does not exist on the agent.
        """
        result, streams = await self.call_idempotent("IFileTransferService", "DownloadFile", remote)
        if result is None:
            raise RemoteError(ServerError(f"{remote} does not exist on the agent"))
        [stream] = streams
        digest = hashlib.sha1()
        temp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        done = 0
        try:
            with temp.open("wb") as out:
                for chunk in stream.sink.read_chunks():  # type: ignore[attr-defined]
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(done, stream.length)
                out.flush()
                os.fsync(out.fileno())
            if done != stream.length:
                raise TransferError(f"received {done} bytes of {stream.length}")
            os.replace(temp, local)
            fsync_directory(local.parent)
        finally:
            stream.sink.discard()
            temp.unlink(missing_ok=True)
        return done, digest.hexdigest()
