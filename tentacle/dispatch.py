"""
Service dispatch: a request's (service, method, params) to a Python call, and
its outcome (or failure) to a Halibut response.

The registry is public API.  An application that embeds the agent can
register its own services next to Tentacle's::

    from tentacle.contracts import Operation, Parameter, ServiceContract

    ECHO = ServiceContract("IEchoService", "MyApp.IEchoService, MyApp", (
        Operation("SayHello", (Parameter("name", str),), str),
    ))

    class Echo:
        async def say_hello(self, name: str) -> str:
            return f"Hello {name}"

    dispatcher.register(ECHO, Echo())

Each operation is served by the implementation's method of the same name in
snake case (C{SayHello} -> C{say_hello}), plain or C{async}.  A method that
takes a keyword-only C{context} parameter also receives the L{CallContext}:
the caller's identity and the request's data streams.

By default a received data stream is spooled (memory, then a temp file)
before the method runs.  An operation that knows better where the bytes
belong, such as an upload, can say so with a C{<method>_sink} method: it is
called with the request's arguments and C{stream=} (an L{ExpectedStream})
as soon as the request message is decoded, before the payload arrives, and
returns the L{StreamSink} to write it to.  If it raises, the payload is
read and dropped, and the error is the answer.
"""

from __future__ import annotations

import hashlib
import inspect
import re
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tentacle.contracts import Operation, ServiceContract
from tentacle.halibut.failures import (
    AMBIGUOUS_METHOD,
    METHOD_NOT_FOUND,
    SERVICE_NOT_FOUND,
    ambiguous_method,
    dotnet_short_name,
    invocation_failure,
    method_not_found,
    service_not_found,
)
from tentacle.halibut.rpc import CallContext, IRequestHandler, PayloadOpener
from tentacle.halibut.serializer import RequestMessage, ResponseMessage
from tentacle.halibut.streams import ExpectedStream, StreamSink


class RequestError(Exception):
    """
    A request that cannot be carried out as asked (a bad path, a bad name):
    answered with its message and logged as a warning, without a traceback,
    since the agent is working as it should.  The Server sees it as a
    C{System.ArgumentException} (or as the OS error it was raised from).
    """

    dotnet_exception_type = "System.ArgumentException"


def snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


@attrs.frozen
class _Bound:
    operation: Operation
    call: Callable[..., Any]
    wants_context: bool
    sink: Callable[..., StreamSink] | None


@implementer(IRequestHandler)
class Dispatcher:
    """
    The services this agent offers, by contract name and wire method name:
    the L{IRequestHandler} the agent's connections hand requests to.
    """

    log = Logger()

    def __init__(self) -> None:
        self._services: dict[str, dict[str, _Bound]] = {}
        self._interfaces: dict[str, str] = {}
        self._implementations: tuple[object, ...] = ()

    @property
    def implementations(self) -> tuple[object, ...]:
        """
        The objects serving the registered contracts (kept up to date by
        L{register}: log observers ask for it on every event).
        """
        return self._implementations

    @property
    def contracts(self) -> frozenset[str]:
        """
        The names of the registered contracts, e.g. for a capabilities answer.
        """
        return frozenset(self._services)

    def register(self, contract: ServiceContract, implementation: object) -> None:
        """
        Serve C{contract} with C{implementation}'s methods.

        @raise TypeError: when a method is missing, so a half-implemented
            service fails at start-up rather than at the first call.
        """
        bound: dict[str, _Bound] = {}
        for operation in contract.operations:
            name = snake_case(operation.name)
            call = getattr(implementation, name, None)
            if not callable(call):
                raise TypeError(
                    f"{type(implementation).__name__} does not implement "
                    f"{contract.name}.{operation.name} (expected a method {name!r})"
                )
            parameters = inspect.signature(call).parameters
            wants_context = (
                "context" in parameters
                and parameters["context"].kind is inspect.Parameter.KEYWORD_ONLY
            )
            sink = getattr(implementation, f"{name}_sink", None)
            bound[operation.name.lower()] = _Bound(operation, call, wants_context, sink)
        self._services[contract.name] = bound
        self._interfaces[contract.name] = contract.dotnet_type.split(",")[0]
        if not any(implementation is known for known in self._implementations):
            self._implementations += (implementation,)

    @staticmethod
    def summarize(request: RequestMessage) -> dict[str, Any]:
        """
        What a log may say about a request's arguments: a script ticket,
        and a script body's length and SHA-256, never the body (it may hold
        secrets).
        """
        summary: dict[str, Any] = {}
        for argument in request.params:
            for name in ("ticket", "script_ticket"):
                ticket = getattr(argument, name, None)
                if ticket is not None and "ticket" not in summary:
                    summary["ticket"] = str(getattr(ticket, "task_id", ticket))
            body = getattr(argument, "script_body", None)
            if isinstance(body, str):
                encoded = body.encode("utf-8")
                summary["script_body_length"] = len(encoded)
                summary["script_body_sha256"] = hashlib.sha256(encoded).hexdigest()
        return summary

    def _bound(self, request: RequestMessage) -> _Bound | None:
        bound = self._services.get(request.service, {}).get(request.method.lower())
        if bound is None or not bound.operation.accepts(request.params):
            return None
        return bound

    def sink_for(self, request: RequestMessage, stream: ExpectedStream) -> StreamSink | None:
        """
        Where the operation wants this stream's payload written, or C{None}
        for the default spool.

        @raise Exception: whatever the operation's sink method raises, to be
            answered once the payload has been read past.
        """
        bound = self._bound(request)
        if bound is None or bound.sink is None:
            return None
        return bound.sink(*request.params, stream=stream)

    def handle(self, request: RequestMessage, context: CallContext) -> Deferred[ResponseMessage]:
        """
        Run one request.  Never fails: every error becomes a response with
        C{error} set, so the caller can answer it and keep the connection.

        A method that answers at once (C{GetCapabilities}, say) is answered
        by an already-fired Deferred, with no coroutine to drive; only one
        that returns an awaitable is awaited.
        """
        try:
            started = self._start(request, context)
        except BaseException:
            return fail()
        if isinstance(started, ResponseMessage):
            return succeed(started)
        operation, pending = started
        return ensureDeferred(self._finish(request, operation, pending))

    def _start(
        self, request: RequestMessage, context: CallContext
    ) -> ResponseMessage | tuple[Operation, Awaitable[Any]]:
        """
        The response, when the method gave it at once; else the operation
        and what to await for its result.
        """
        if context.refusal is not None:
            return self._failed(request, request.method, context.refusal, "refused its data stream")
        service = self._services.get(request.service)
        if service is None:
            return ResponseMessage(request.id, service_not_found(request.service))
        bound = service.get(request.method.lower())
        if bound is None:
            interface = self._interfaces[request.service]
            return ResponseMessage(request.id, method_not_found(interface, request.method))
        operation = bound.operation
        if not operation.accepts(request.params):
            expected = ", ".join(f"{p.type.__name__} {p.name}" for p in operation.parameters)
            got = [dotnet_short_name(a) for a in request.params]
            candidate = f"{operation.name}Async({expected})"
            return ResponseMessage(request.id, ambiguous_method([candidate], got))
        kwargs = {"context": context} if bound.wants_context else {}
        try:
            result = bound.call(*request.params, **kwargs)
        except Exception as e:
            return self._failed(request, operation.name, e, "raised")
        if inspect.isawaitable(result):
            return operation, result
        return self._answer(request, operation, result)

    async def _finish(self, request: RequestMessage, operation: Operation, pending: Awaitable[Any]) -> ResponseMessage:
        try:
            result = await pending
        except Exception as e:
            return self._failed(request, operation.name, e, "raised")
        return self._answer(request, operation, result)

    def _answer(self, request: RequestMessage, operation: Operation, result: Any) -> ResponseMessage:
        if operation.returns is None:
            result = None
        elif result is not None and not isinstance(result, operation.returns):
            self.log.error(
                "{service}.{method} returned a {got}, not a {expected}",
                service=request.service,
                method=operation.name,
                got=type(result).__name__,
                expected=operation.returns.__name__,
            )
            return ResponseMessage(request.id, invocation_failure(
                "System.InvalidOperationException",
                f"Internal error: {request.service}.{operation.name} returned the wrong type",
            ))
        return ResponseMessage(request.id, None, result)

    def _failed(self, request: RequestMessage, method: str, error: BaseException, what: str) -> ResponseMessage:
        """
        The answer to a method (or a stream sink) that raised, shaped as
        .NET reports an exception thrown by a service method, so Octopus
        Server does not retry it.  A L{RequestError} is the agent working as
        it should, logged as a warning; anything else is logged with its
        traceback (which never goes on the wire).
        """
        if isinstance(error, RequestError):
            self.log.warn(
                "{service}.{method} refused: {error}", service=request.service, method=method, error=str(error)
            )
        else:
            self.log.failure(
                "{service}.{method} " + what, Failure(error), service=request.service, method=method
            )
        return ResponseMessage(request.id, invocation_failure(error))


__all__ = [
    "AMBIGUOUS_METHOD",
    "METHOD_NOT_FOUND",
    "SERVICE_NOT_FOUND",
    "RequestError",
    "CallContext",
    "Dispatcher",
    "PayloadOpener",
    "snake_case",
]
