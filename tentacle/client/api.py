"""
L{TentacleClient}: drive a listening tentacle (ours or Octopus's) from Python.

    client = TentacleClient(Target("web01", 10933, Pin("8E9F...")), identity, reactor)
    print(await client.capabilities())
    code = await client.run_script("echo hello", on_log=print)
    await client.upload(Path("app.tar.gz"), "Packages/app.tar.gz")
    await client.close()

Connections are pooled as Halibut pools them: one request at a time on a
connection, at most five idle per agent, retired after nine idle minutes,
checked with NEXT/PROCEED before reuse.  Failing to connect is retried as
Halibut retries it (L{RetryPolicy}: five tries within five minutes, a
second apart).  A call that failed is sent again as Octopus Server sends it
again (L{RpcRetryPolicy}: backoff C{min(n, 10)} s within 2.5 minutes), and
only when the Server would (L{retried}: never after an error the agent
answered as final, a certificate or trust failure, or a refused
connection), and only for calls that are safe to repeat (V2 script calls,
status and cancel, capabilities, uploads and downloads), never V1
StartScript.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Protocol as TypingProtocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.task import deferLater
from twisted.logger import Logger

from tentacle import events
from tentacle.client.connection import (
    HEARTBEAT_TIMEOUT,
    RESPONSE_TIMEOUT,
    ClientConnection,
    ClientError,
    ConnectionFailed,
    Pin,
    RequestFailed,
)
from tentacle.dialer import ConnectionRefused, HostNotFound, Proxy, ProxyRefused, dial
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
from tentacle.encryption import new_password, password_prelude
from tentacle.halibut.rpc import PayloadOpener
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.connection import ConnectionClosed, KeepAlive
from tentacle.halibut.errors import CodecError, ProtocolError
from tentacle.halibut.failures import RPC_RETRY_WINDOW, classify, retry_delay
from tentacle.halibut.handshake import normalize_subscription
from tentacle.halibut.serializer import DataStream, RequestMessage, ResponseMessage, ServerError
from tentacle.halibut.connection import SinkChooser
from tentacle.halibut.streams import ExpectedStream, ReceivedStream, StreamSink
from tentacle.identity import Identity
from tentacle.fsutil import fsync_directory


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


def build_request(service: str, method: str, *params: Any, endpoint: Any = None) -> RequestMessage:
    """
    A request as Octopus Server words it: an id naming the call, a fresh
    activity id.  (Octopus also sends its ServiceEndPoint; agents never
    read it, so we send null, except to a hub, which forwards by its
    C{BaseUri}.)
    """
    call_id = uuid.uuid4()
    return RequestMessage(
        id=f"{service}::{method}Async[{call_id.int % 10000}] / {call_id}",
        activity_id=call_id,
        service=service,
        method=method,
        params=params,
        endpoint=endpoint,
    )


def endpoint_for(target: Target) -> dict[str, Any] | None:
    """
    The C{ServiceEndPoint} a hub reads to forward a request: the agent's
    subscription and, when pinned, its thumbprint.
    """
    if target.subscription is None or not target.host:
        return None
    return {
        "BaseUri": target.subscription,
        "RemoteThumbprint": target.agent_pin.thumbprint if target.agent_pin else None,
    }


def _subscription(value: str | None) -> str | None:
    return None if value is None else normalize_subscription(value)


@attrs.frozen
class Target:
    """
    Where an agent is, and the certificate it must present.

    A listening agent is reached at C{host:port}.  A polling agent is
    reached through a polling server, by its C{subscription} (C{poll://ID/}):
    either one in this process (C{TentacleClient(..., hub=server)}), or a
    hub at C{host:port} (then C{pin} is the hub's certificate and
    C{agent_pin} the agent's, which the hub checks).
    """

    host: str
    port: int = 10933
    pin: Pin | None = None
    proxy: Proxy | None = None
    subscription: str | None = attrs.field(default=None, converter=_subscription)
    agent_pin: Pin | None = None

    @classmethod
    def polling(cls, subscription: str, pin: Pin | None = None) -> Target:
        """
        A polling agent, reached through a polling server in this process.
        """
        return cls("", 0, pin, subscription=subscription)

    def __str__(self) -> str:
        if self.subscription is not None:
            return self.subscription if not self.host else f"{self.subscription} via {self.host}:{self.port}"
        return f"{self.host}:{self.port}"


@attrs.frozen
class RetryPolicy:
    """
    How connecting is retried, as Halibut retries it: five tries, a second
    apart, within five minutes.
    """

    attempts: int = 5
    interval: float = 1.0
    within: float = 300.0


@attrs.frozen
class RpcRetryPolicy:
    """
    How a failed call is sent again, as Octopus Server's Tentacle client
    does it (C{RpcCallRetryHandler}): after C{backoff(n)} seconds before
    the n-th retry, for as long as more than C{min_remaining} seconds of
    the C{window} would be left after the wait.  A retry still running when
    the window closes is cut off (but not a transfer's, which may
    legitimately take longer), and the call fails with the error that
    caused the retries.
    """

    window: float = RPC_RETRY_WINDOW
    backoff: Callable[[int], float] = retry_delay
    min_remaining: float = 1.0


def retried(error: Exception) -> bool:
    """
    Whether Octopus Server would send a call again after C{error}.

    An error the agent answered is retried unless it classifies as final
    (L{tentacle.halibut.failures.classify}): a service method that threw, an
    unknown service or method.  A connection that broke, or could not be
    made after L{RetryPolicy}'s tries, is retried; but not a refused
    connection or an unknown host (nothing listens there, and a second
    later will not differ), nor a certificate or trust failure.
    """
    if isinstance(error, RemoteError):
        return classify(error.error).retried
    if isinstance(error, (ConnectionRefused, HostNotFound, ProxyRefused)):
        return False
    return isinstance(error, (RequestFailed, ConnectionFailed))


Progress = Callable[[int, int], None]


class _HashingReader:
    """
    A file as it is sent: SHA-1 over what was read, and progress.
    """

    def __init__(self, f: IO[bytes], total: int, progress: Progress | None) -> None:
        self._f = f
        self._total = total
        self._done = 0
        self._progress = progress
        self._sha1 = hashlib.sha1(usedforsecurity=False)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._sha1.update(data)
        self._done += len(data)
        if self._progress is not None:
            self._progress(self._done, self._total)
        return data

    def hexdigest(self) -> str:
        return self._sha1.hexdigest()

    def close(self) -> None:
        self._f.close()


class _DownloadSink:
    """
    A downloaded stream, written as it arrives to a temp file beside its
    destination (created 0600) and hashed on the way.  L{commit} makes it
    durable (in a thread) and puts it in place; L{discard} removes it.

    Unlike the agent's uploads, nothing waits for the disk while it
    arrives: that wait blocks the reactor, so the network and the disk
    took turns (98 against 155 MB/s for 512 MiB, C{bench_transfer.py}),
    and no Server waits on this side for an answer.
    """

    def __init__(self, local: Path, length: int, progress: Progress | None) -> None:
        self._local = local
        self._length = length
        self._progress = progress
        self.temp = local.with_name(f".{local.name}.{uuid.uuid4().hex}.tmp")
        self._fd: int | None = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._sha1 = hashlib.sha1(usedforsecurity=False)
        self.received = 0

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._sha1.update(data)
        self.received += len(data)
        if self._progress is not None:
            self._progress(self.received, self._length)

    def finish(self) -> None:
        pass

    def hexdigest(self) -> str:
        return self._sha1.hexdigest()

    def commit(self) -> None:
        """
        @raise TransferError: fewer bytes than declared arrived.
        """
        if self.received != self._length:
            raise TransferError(f"received {self.received} bytes of {self._length}")
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.temp, self._local)
        fsync_directory(self._local.parent)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.temp.unlink(missing_ok=True)


class Hub(TypingProtocol):
    """
    A polling server in this process that can carry requests to its
    agents (L{tentacle.hub.polling_server.PollingServer}).
    """

    def send(
        self,
        subscription: str,
        request: RequestMessage,
        payloads: Mapping[Any, PayloadOpener] | None = None,
        pin: Callable[[Any], bool] | None = None,
    ) -> Deferred[tuple[ResponseMessage, list[ReceivedStream]]]: ...


class TentacleClient:
    """
    A client of one agent.

    @param identity: the certificate we present; the agent (or the hub)
        must trust its thumbprint.
    @param hub: the polling server in this process through which a polling
        target (L{Target.polling}) is reached.
    @param retry: how connecting is retried (Halibut's).
    @param rpc_retry: how a failed call that is safe to repeat is sent
        again (Octopus Server's); C{None}: never.
    @param response_timeout: the wait for an answer's first byte (5 min).
    @param heartbeat_timeout: the longest silence while a message, a stream
        or a control line is read, or while the agent takes none of what we
        send (1 min).
    @param keepalive: TCP keepalive on our connections (C{None}: off).
    @param max_connecting: at most this many new connections are being
        set up at once (TCP, TLS, identities); more calls at once wait for
        a place, or for a pooled connection another call gave back.  An
        agent evicts the oldest of the connections that have not yet
        shown a trusted certificate beyond its budget per address
        (C{max-unauthenticated-per-address}, 50 by default), so a burst of
        concurrent calls must not open more than that at once.
    """

    log = Logger()

    def __init__(
        self,
        target: Target,
        identity: Identity,
        reactor: Any = None,
        *,
        hub: Hub | None = None,
        retry: RetryPolicy = RetryPolicy(),
        rpc_retry: RpcRetryPolicy | None = RpcRetryPolicy(),
        max_idle: int = 5,
        idle_expiry: float = 540.0,
        connect_timeout: float = 60.0,
        response_timeout: float = RESPONSE_TIMEOUT,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        keepalive: KeepAlive | None = KeepAlive(),
        max_connecting: int = 16,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if target.subscription is not None and not target.host and hub is None:
            raise ValueError(f"{target.subscription} is a polling agent: give the polling server (hub=...)")
        self.target = target
        self._hub = hub if not target.host else None
        self._endpoint = endpoint_for(target)
        self._reactor = reactor
        self._retry = retry
        self._rpc_retry = rpc_retry
        self._max_idle = max_idle
        self._idle_expiry = idle_expiry
        self._connect_timeout = connect_timeout
        self._response_timeout = response_timeout
        self._heartbeat_timeout = heartbeat_timeout
        self._keepalive = keepalive
        self._tls = CertificateOptions(
            privateKey=identity.private_key,  # type: ignore[arg-type]
            certificate=identity.certificate,  # type: ignore[arg-type]
            raiseMinimumTo=TLSVersion.TLSv1_2,
        )
        self._idle: list[tuple[ClientConnection, IDelayedCall]] = []
        self._closed = False
        self._max_connecting = max_connecting
        self._connecting = 0
        self._waiting_to_connect: deque[Deferred[None]] = deque()
        self._capabilities: list[str] | None = None

    # --- connections ----------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        connection = ClientConnection(
            self.target.pin, self._reactor,
            response_timeout=self._response_timeout, heartbeat_timeout=self._heartbeat_timeout,
            keepalive=self._keepalive,
        )
        await dial(
            self._reactor, self.target.host, self.target.port, self._tls, connection.protocol,
            proxy=self.target.proxy, timeout=self._connect_timeout,
        )
        await connection.ready
        return connection

    async def _pooled(self) -> ClientConnection | None:
        """
        An idle connection from the pool, checked with NEXT, if there is one.
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
        return None

    async def _open_one(self) -> ClientConnection | None:
        """
        A new connection, once fewer than C{max_connecting} are being set
        up; C{None} when a pooled connection was given back meanwhile.
        """
        while self._connecting >= self._max_connecting:
            waiting: Deferred[None] = Deferred(self._give_up_waiting)
            self._waiting_to_connect.append(waiting)
            await waiting
            if self._idle:
                self._next_may_connect()  # the place it was woken for is still free
                return None
        self._connecting += 1
        try:
            return await self._open()
        finally:
            self._connecting -= 1
            self._next_may_connect()

    def _next_may_connect(self) -> None:
        """
        Wake the first caller waiting to connect, on the next reactor turn:
        woken at once, a long line of callers that each find a pooled
        connection would wake each other in one ever deeper call stack.
        """
        if self._waiting_to_connect:
            self._reactor.callLater(0, self._wake, self._waiting_to_connect.popleft())

    def _wake(self, waiting: Deferred[None]) -> None:
        if waiting.called:  # cancelled since: its turn passes to the next
            self._next_may_connect()
        else:
            waiting.callback(None)

    def _give_up_waiting(self, waiting: Deferred[None]) -> None:
        if waiting in self._waiting_to_connect:
            self._waiting_to_connect.remove(waiting)

    async def connect(self) -> ClientConnection:
        """
        A checked idle connection from the pool, or a new one, with retries.
        """
        pooled = await self._pooled()
        if pooled is not None:
            return pooled
        deadline = self._reactor.seconds() + self._retry.within
        last: Exception | None = None
        for attempt in range(1, self._retry.attempts + 1):
            try:
                while True:
                    opened = await self._open_one()
                    if opened is not None:
                        return opened
                    pooled = await self._pooled()
                    if pooled is not None:
                        return pooled
            except ProxyRefused:
                raise  # the proxy's answer will not change in a second
            except ConnectionFailed as e:
                last = e
                if isinstance(e, HostNotFound):
                    break  # as Halibut: an unknown host will not appear in a second
                if attempt == self._retry.attempts or self._reactor.seconds() + self._retry.interval > deadline:
                    break
                self.log.info(
                    "Connecting to {target} failed ({error}); trying again",
                    target=str(self.target), error=str(e),
                )
                await deferLater(self._reactor, self._retry.interval, lambda: None)
        # The last failure's kind (refused, unknown host) tells the caller
        # whether a later retry can help.
        kind = type(last) if isinstance(last, (ConnectionRefused, HostNotFound)) else ConnectionFailed
        raise kind(f"could not connect to {self.target} after {attempt} tries: {last}")

    def _release(self, connection: ClientConnection) -> None:
        if not connection.idle:
            return
        if self._closed or len(self._idle) >= self._max_idle:
            connection.end()  # a call that ended after close() pools nothing
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
        Retire every pooled connection (END), as Octopus Server does; one
        still carrying a call is retired when the call ends.
        """
        self._closed = True
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
        sinks: SinkChooser | None = None,
    ) -> tuple[Any, list[ReceivedStream]]:
        """
        One request; the result and any data streams that came with it
        (the caller discards their sinks).

        @param sinks: where the answer's data streams go as they arrive
            (spooled by default; a polling agent's always are).
        @raise RemoteError: the agent answered with an error.
        @raise ClientError: the connection failed.
        """
        request = build_request(service, method, *params, endpoint=self._endpoint)
        if self._hub is not None:
            response, streams = await self._via_hub(request, payloads)
        else:
            connection = await self.connect()
            try:
                response, streams = await connection.call(request, payloads, sinks)
            except CancelledError:
                connection.end()  # the answer would arrive on a connection nobody reads
                raise
            except (TypeError, ValueError):
                self._release(connection)  # nothing was sent: it is as good as before
                raise
            self._release(connection)
        if response.error is not None:
            for stream in streams:
                stream.sink.discard()
            raise RemoteError(response.error)
        return response.result, streams

    async def _via_hub(
        self, request: RequestMessage, payloads: Mapping[uuid.UUID, PayloadOpener] | None
    ) -> tuple[ResponseMessage, list[ReceivedStream]]:
        """
        Queue the request for the polling agent; a broken exchange after it
        was collected is L{RequestFailed} (the agent may have acted on it).
        """
        assert self._hub is not None and self.target.subscription is not None
        pin = self.target.pin
        accepts = (lambda peer: peer is not None and pin.matches(peer)) if pin is not None else None
        try:
            return await self._hub.send(self.target.subscription, request, payloads, accepts)
        except (ConnectionClosed, ProtocolError, CodecError) as e:
            raise RequestFailed(f"the polling connection failed while {request.method} was on it: {e}") from None

    async def call_idempotent(
        self,
        service: str,
        method: str,
        *params: Any,
        payloads: Mapping[uuid.UUID, PayloadOpener] | None = None,
        long_running: bool = False,
        sinks: SinkChooser | None = None,
    ) -> tuple[Any, list[ReceivedStream]]:
        """
        L{call} for a call that is safe to repeat: when it fails in a way
        Octopus Server would retry (L{retried}), even after the request was
        sent, it is sent again under the L{RpcRetryPolicy}, since a second
        run changes nothing the first did not.

        @param long_running: a transfer, whose retries may outlast the
            retry window (as Tentacle's client lets an interrupted transfer
            try again whatever the time).
        @raise ClientError: the first error that was final, or the last one
            once the retry window is spent.
        """
        policy = self._rpc_retry
        if policy is None:
            return await self.call(service, method, *params, payloads=payloads, sinks=sinks)
        started = self._reactor.seconds()
        retries = 0
        last: ClientError | None = None
        while True:
            attempt = Deferred.fromCoroutine(self.call(service, method, *params, payloads=payloads, sinks=sinks))
            cut_off: list[bool] = []
            timer: IDelayedCall | None = None
            if last is not None and not long_running:

                def close_window(attempt: Deferred[Any] = attempt) -> None:
                    cut_off.append(True)
                    attempt.cancel()

                remaining = max(started + policy.window - self._reactor.seconds(), 0.0)
                timer = self._reactor.callLater(remaining, close_window)
            try:
                return await attempt
            except CancelledError:
                if cut_off and last is not None:
                    raise last from None  # the window closed on a retry: report why it was retried
                raise
            except ClientError as e:
                if not retried(e):
                    raise
                last = e
            finally:
                if timer is not None and timer.active():
                    timer.cancel()
            assert last is not None
            retries += 1
            delay = policy.backoff(retries)
            left = started + policy.window - self._reactor.seconds() - delay
            if left <= policy.min_remaining:
                self.log.info(
                    "{service}.{method} on {target} failed ({error}); the retry window of {window:g} s "
                    "is spent, no more retries",
                    service=service, method=method, target=str(self.target), error=str(last),
                    window=policy.window,
                )
                raise last
            self.log.info(
                "{service}.{method} on {target} failed ({error}); retry {retry} in {delay:g} s "
                "(retries go on for up to {left:.0f} s)",
                service=service, method=method, target=str(self.target), error=str(last),
                retry=retries, delay=delay, left=left, event=events.CALL_RETRIED,
            )
            await deferLater(self._reactor, delay, lambda: None)

    async def capabilities(self) -> list[str]:
        """
        The services the agent offers (cached, as Halibut caches for 10 min).
        """
        if self._capabilities is None:
            result, _ = await self.call_idempotent("ICapabilitiesServiceV2", "GetCapabilities")
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
        encrypt_files: bool = False,
        task_id: str | None = None,
        on_log: Callable[[ProcessOutput], None] | None = None,
        wait_for_finish: float = 5.0,
        poll_interval: float = 0.3,
        max_poll_interval: float = 5.0,
    ) -> int:
        """
        Run a script to its end, passing each log line to C{on_log} as it
        comes; the exit code.  V2 when the agent offers it, else V1.
        Cancelling the Deferred cancels the script on the agent, waits for it
        to stop, then raises L{CancelledError}.

        As Octopus Server does: StartScript (V2) waits up to
        C{wait_for_finish} seconds (5, as Octopus Server asks) for the
        script to end, so a quick script is done in one call; our agent
        answers sooner, half a second after the script's first log line,
        if it is still running then (see C{docs/scripts.rst}).  Then
        GetStatus at once, and again after C{poll_interval}, growing by
        1.15 up to C{max_poll_interval} while nothing new arrives.

        @param encrypt_files: have the agent store C{files} encrypted, as
            Octopus Server does for sensitive variables, under a password
            made for this call; the script finds it in
            C{$TENTACLE_FILES_PASSWORD} (L{tentacle.encryption}).
        """
        task_id = task_id or f"ServerTasks-{uuid.uuid4().int % 1_000_000}"
        payloads: dict[uuid.UUID, PayloadOpener] = {}
        script_files = []
        password = new_password() if encrypt_files and files else None
        if password is not None:
            body = password_prelude(password) + body
        for name, path in (files or {}).items():
            ref = DataStream.fresh(path.stat().st_size)
            payloads[ref.id] = lambda path=path: path.open("rb")  # type: ignore[misc]
            script_files.append(ScriptFile(name, ref, password))
        v2 = "IScriptServiceV2" in await self.capabilities()
        timeout = TimeSpan.from_timedelta(timedelta(seconds=mutex_timeout))
        status: Any = None
        cancelled = False
        if v2:
            ticket = ScriptTicket(uuid.uuid4().hex)
            # V2 StartScript is idempotent by ticket: a resend after a lost
            # answer reports the same run, never starts a second.
            try:
                status, _ = await self.call_idempotent(
                    "IScriptServiceV2", "StartScript",
                    StartScriptCommandV2(
                        script_ticket=ticket, script_body=body, task_id=task_id,
                        duration_to_wait_for_script_to_finish=TimeSpan.from_timedelta(
                            timedelta(seconds=wait_for_finish)
                        ),
                        isolation=isolation,
                        script_isolation_mutex_timeout=timeout, isolation_mutex_name=mutex,
                        scripts={}, files=tuple(script_files), arguments=arguments,
                    ),
                    payloads=payloads,
                )
            except CancelledError:
                # It may have started (StartScript waits for it a while):
                # cancel it by its ticket, then wait for it below.
                cancelled = True
                status, _ = await self.call_idempotent(
                    "IScriptServiceV2", "CancelScript", CancelScriptCommandV2(ticket, 0)
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
        delay: float | None = None  # None: the first GetStatus goes at once
        while True:
            try:
                if status is None:
                    status, _ = await again(service, "GetStatus", status_type(ticket, sequence))
                for line in status.logs:
                    if on_log is not None:
                        on_log(line)
                sequence = status.next_log_sequence
                if status.state is ProcessState.Complete:
                    break
                if delay is None:
                    delay = 0.0
                elif status.logs or delay == 0.0:
                    delay = poll_interval
                else:  # back off only while nothing new arrives
                    delay = min(delay * 1.15, max_poll_interval)
                status = None
                if delay:
                    await deferLater(self._reactor, delay, lambda: None)
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
        ref = DataStream.fresh(size)
        sent: list[_HashingReader] = []

        def opener() -> Any:
            # Hashed as it is sent (each try afresh), not read twice.
            reader = _HashingReader(local.open("rb"), size, progress)
            sent.append(reader)
            return reader

        # Storing the same bytes at the same path again changes nothing, and
        # the agent drops an interrupted upload's temp file: safe to resend.
        result, _ = await self.call_idempotent(
            "IFileTransferService", "UploadFile", remote, ref, payloads={ref.id: opener}, long_running=True
        )
        assert isinstance(result, UploadResult)
        ours = sent[-1].hexdigest() if sent else hashlib.sha1(b"").hexdigest()
        if result.length != size or result.hash.lower() != ours:
            raise TransferError(
                f"the agent stored {result.length} bytes with SHA-1 {result.hash}; "
                f"we sent {size} bytes with SHA-1 {ours}"
            )
        return result

    async def download(self, remote: str, local: Path, progress: Progress | None = None) -> tuple[int, str]:
        """
        Fetch a file into C{local} (written to a temp file, then renamed).

        @return: its length and SHA-1.
        @raise RemoteError: the file does not exist on the agent.
        """
        if not local.parent.is_dir():
            raise TransferError(f"cannot save the download: {local.parent} is not a folder")

        def sink(message: Any, stream: ExpectedStream) -> StreamSink:
            # Straight into a temp file beside the destination, hashed on
            # the way: no spool, no second copy.
            return _DownloadSink(local, stream.length, progress)

        result, streams = await self.call_idempotent(
            "IFileTransferService", "DownloadFile", remote, long_running=True, sinks=sink
        )
        if result is None or not isinstance(result, DataStream) or [s.id for s in streams] != [result.id]:
            for stream in streams:
                stream.sink.discard()
            if result is None:
                raise RemoteError(ServerError(f"{remote} does not exist on the agent"))
            raise TransferError(f"the agent answered the download of {remote} with {len(streams)} data stream(s), "
                                "not the one file")
        [stream] = streams
        if isinstance(stream.sink, _DownloadSink):
            return await self._commit(stream.sink)
        # Through a polling server: the stream was spooled there.  Copied
        # into the same private temp file a direct download gets.
        try:
            copy = _DownloadSink(local, stream.length, progress)
            try:
                for chunk in stream.sink.read_chunks():  # type: ignore[attr-defined]
                    copy.write(chunk)
            except BaseException:
                copy.discard()
                raise
        finally:
            stream.sink.discard()
        return await self._commit(copy)

    async def _commit(self, sink: _DownloadSink) -> tuple[int, str]:
        """
        A downloaded file made durable (fsync, in a thread: little is left
        to write back) and put in place.
        """
        from twisted.internet.threads import deferToThreadPool

        try:
            await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), sink.commit)
        finally:
            sink.discard()
        return sink.received, sink.hexdigest()
