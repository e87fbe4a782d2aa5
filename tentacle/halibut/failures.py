"""
Failures as .NET and Octopus Server see them: the C{ServerError} a real
Tentacle answers, and whether the Server retries the call that got it.

Octopus Server retries, with backoff, every failed call it cannot tell is
hopeless (Halibut C{HalibutProxyWithAsync.ThrowExceptionFromReceivedError},
C{ExceptionReturnedByHalibutProxyExtensionMethod.IsRetryableError}; Tentacle
C{RpcCallRetryPolicyBuilder}).  A service that fails must therefore answer
the way Halibut's C{ResponseMessage.FromException} does when a service method
throws: C{message} is the exception's own message and C{details} is .NET's
C{ToString()} of the C{TargetInvocationException} that wraps it.  Anything
else reads as a possibly passing fault, and a refused upload or a bad script
is re-sent for minutes.

C{details} here is the shape .NET 5 and later give on Linux (where a current
Tentacle runs) for exceptions that carry no stack trace: the Python traceback
belongs in our own log, not on the wire.  The shape is checked byte for byte
against strings .NET writes (C{tests/vectors/failure_*}).

Pure: no I/O, nothing above L{tentacle.halibut}.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Iterable, Sequence

import attrs

from tentacle.halibut.serializer import ServerError

__all__ = [
    "AMBIGUOUS_METHOD",
    "METHOD_NOT_FOUND",
    "SERVICE_NOT_FOUND",
    "SERVICE_INVOCATION",
    "TARGET_INVOCATION_PREFIX",
    "Classification",
    "DotNetException",
    "Retry",
    "ambiguous_method",
    "classify",
    "dotnet_exception_name",
    "dotnet_short_name",
    "invocation_failure",
    "method_not_found",
    "retry_delay",
    "service_not_found",
    "RPC_RETRY_WINDOW",
]

SERVICE_NOT_FOUND = "Halibut.Exceptions.ServiceNotFoundHalibutClientException"
METHOD_NOT_FOUND = "Halibut.Exceptions.MethodNotFoundHalibutClientException"
AMBIGUOUS_METHOD = "Halibut.Exceptions.AmbiguousMethodMatchHalibutClientException"
SERVICE_INVOCATION = "Halibut.Exceptions.ServiceInvocationHalibutClientException"
HALIBUT_CLIENT_EXCEPTION = "Halibut.HalibutClientException"

TARGET_INVOCATION = "System.Reflection.TargetInvocationException"
TARGET_INVOCATION_MESSAGE = "Exception has been thrown by the target of an invocation."
#: What Octopus Server looks for at the start of C{details} to know a
#: service method threw, and that trying again will not help.
TARGET_INVOCATION_PREFIX = f"{TARGET_INVOCATION}: {TARGET_INVOCATION_MESSAGE}"

#: .NET 5+ C{Exception.ToString()} pieces (dotnet/runtime
#: C{System.Private.CoreLib/src/System/Exception.cs}); C{Environment.NewLine}
#: is C{"\\n"} on Linux.  .NET Framework and Mono put the inner exception on
#: the same line instead (C{" ---> "} without the newline before it).
NEWLINE = "\n"
INNER_EXCEPTION_PREFIX = " ---> "
END_OF_INNER_EXCEPTION = "   --- End of inner exception stack trace ---"


@attrs.frozen
class DotNetException:
    """
    A .NET exception that was never thrown, so it has no stack trace: all
    its C{ToString()} needs.

    @ivar type_name: the full type name (C{GetType().ToString()}).
    @ivar message: its C{Message}; empty leaves the C{": "} out, as .NET does.
    """

    type_name: str
    message: str
    inner: DotNetException | None = None

    def to_string(self, newline_before_inner: bool = True) -> str:
        """
        What C{Exception.ToString()} gives: on .NET 5+ by default, or as
        .NET Framework and Mono print it.
        """
        text = self.type_name
        if self.message:
            text += ": " + self.message
        if self.inner is not None:
            text += (NEWLINE if newline_before_inner else "") + INNER_EXCEPTION_PREFIX
            text += self.inner.to_string(newline_before_inner) + NEWLINE + END_OF_INNER_EXCEPTION
        return text


# --- naming Python exceptions the .NET way ---------------------------------------

#: Most specific first: the first match names the exception.
_DOTNET_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (FileNotFoundError, "System.IO.FileNotFoundException"),
    (NotADirectoryError, "System.IO.DirectoryNotFoundException"),
    (PermissionError, "System.UnauthorizedAccessException"),
    (IsADirectoryError, "System.UnauthorizedAccessException"),
    (TimeoutError, "System.TimeoutException"),
    (OSError, "System.IO.IOException"),
    (asyncio.CancelledError, "System.OperationCanceledException"),
    (NotImplementedError, "System.NotImplementedException"),
    (KeyError, "System.Collections.Generic.KeyNotFoundException"),
    (IndexError, "System.IndexOutOfRangeException"),
    (ZeroDivisionError, "System.DivideByZeroException"),
    (OverflowError, "System.OverflowException"),
    (MemoryError, "System.OutOfMemoryException"),
    (UnicodeError, "System.Text.DecoderFallbackException"),
    (ValueError, "System.ArgumentException"),
    (TypeError, "System.ArgumentException"),
)
_DEFAULT_NAME = "System.InvalidOperationException"


def _underlying_os_error(error: BaseException) -> OSError | None:
    """
    The OS error a refusal was raised from, even with C{from None}: it names
    the failure better than the refusal's own class does.
    """
    for linked in (error.__cause__, error.__context__):
        if isinstance(linked, OSError):
            return linked
    return None


def dotnet_exception_name(error: BaseException) -> str:
    """
    The .NET exception type a Tentacle would have thrown for C{error}.

    A class may name its own with a C{dotnet_exception_type} attribute (the
    dispatcher's C{RequestError} says C{System.ArgumentException}); when
    such an exception was raised from an C{OSError}, the OS error decides.
    """
    declared = getattr(error, "dotnet_exception_type", None)
    if isinstance(declared, str) and declared:
        underlying = _underlying_os_error(error)
        return dotnet_exception_name(underlying) if underlying is not None else declared
    for python_type, name in _DOTNET_NAMES:
        if isinstance(error, python_type):
            return name
    return _DEFAULT_NAME


def _own_message(error: BaseException) -> str:
    return str(error) or type(error).__name__


def invocation_failure(error: BaseException | str, message: str | None = None) -> ServerError:
    """
    The answer Halibut gives when a service method throws: C{message} is the
    exception's own message, C{details} the C{TargetInvocationException}
    around it, no C{HalibutErrorType}.

    @param error: the Python exception, or a .NET exception type name.
    @param message: the message; by default C{str(error)} (or its class
        name when that is empty).
    """
    if isinstance(error, BaseException):
        type_name = dotnet_exception_name(error)
        text = _own_message(error) if message is None else message
    else:
        type_name, text = error, message or ""
    wrapped = DotNetException(TARGET_INVOCATION, TARGET_INVOCATION_MESSAGE, DotNetException(type_name, text))
    return ServerError(text, wrapped.to_string())


def _halibut_failure(type_name: str, message: str, inner: DotNetException | None = None) -> ServerError:
    """
    Halibut's own client exceptions travel with their type in
    C{HalibutErrorType}, so the Server rebuilds them exactly.
    """
    return ServerError(message, DotNetException(type_name, message, inner).to_string(), type_name)


def service_not_found(service: str) -> ServerError:
    """
    Halibut's answer for a service name nobody registered.
    """
    return _halibut_failure(SERVICE_NOT_FOUND, f"Service not found: {service}")


def method_not_found(interface: str, method: str) -> ServerError:
    """
    Halibut's answer for a method the service lacks: C{interface} is the
    contract's full .NET name, C{method} the name the request carried.
    """
    return _halibut_failure(METHOD_NOT_FOUND, f"Method {interface}::{method}Async not found")


def ambiguous_method(candidates: Iterable[str], argument_types: Sequence[str]) -> ServerError:
    """
    Halibut's answer when no overload takes the arguments sent (the Server
    does not retry it).

    @param candidates: the methods of that name, as .NET prints a method.
    @param argument_types: the short .NET type names of the arguments (see
        L{dotnet_short_name}).
    """
    lines = ["Could not decide which candidate to call out of the following methods:"]
    lines += [f" - {candidate}" for candidate in candidates]
    lines += ["The request arguments were:", ", ".join(argument_types)]
    message = "".join(line + NEWLINE for line in lines)
    return _halibut_failure(
        AMBIGUOUS_METHOD, message, DotNetException("System.Reflection.AmbiguousMatchException", message)
    )


_SHORT_NAMES = {str: "String", bool: "Boolean", int: "Int32", float: "Double", bytes: "Byte[]"}


def dotnet_short_name(value: object) -> str:
    """
    How Halibut names an argument's type in L{ambiguous_method}: C{Type.Name},
    or C{<null>}.
    """
    if value is None:
        return "<null>"
    return _SHORT_NAMES.get(type(value), type(value).__name__)


# --- what Octopus Server makes of an error ----------------------------------------

#: Octopus Server's default window for retrying a failed call, in seconds.
RPC_RETRY_WINDOW = 150.0


class Retry(enum.Enum):
    """
    Halibut's C{HalibutRetryableErrorType}, as the Server's retry policy
    reads it: only C{NOT_RETRYABLE} stops the retries.
    """

    NOT_RETRYABLE = "not retryable"
    RETRYABLE = "retryable"
    UNKNOWN = "unknown"

    @property
    def retried(self) -> bool:
        return self is not Retry.NOT_RETRYABLE


@attrs.frozen
class Classification:
    """
    What the Server concludes from a C{ServerError}.

    @ivar exception: the .NET exception type the Server's Halibut raises.
    @ivar retry: whether its retry policy tries the call again.
    """

    exception: str
    retry: Retry

    @property
    def retried(self) -> bool:
        return self.retry.retried


#: Halibut exception types that C{Type.GetType} resolves from a
#: C{HalibutErrorType} and that end the retries.
_NOT_RETRYABLE_TYPES = frozenset({
    SERVICE_NOT_FOUND,
    METHOD_NOT_FOUND,
    AMBIGUOUS_METHOD,
    SERVICE_INVOCATION,
    "Halibut.Exceptions.NoMatchingServiceOrMethodHalibutClientException",
})
#: Request cancellations are rebuilt too, but are no C{HalibutClientException},
#: which is all the retry policy handles: they end the call at once.
_CANCELLED_TYPES = frozenset({
    "Halibut.Exceptions.ConnectingRequestCancelledException",
    "Halibut.Exceptions.TransferringRequestCancelledException",
})
#: C{HalibutClientException} messages that Halibut takes for network faults.
_NETWORK_FAULT_TEXTS = (
    "System.IO.EndOfStreamException",
    "System.Net.Sockets.SocketException (110): Connection timed out",
    "An existing connection was forcibly closed by the remote host.",
    "The I/O operation has been aborted because of either a thread exit or an application request",
    "A connection attempt failed because the connected party did not properly respond after a "
    "period of time, or established connection failed because connected host has failed to respond.",
    "The remote party closed the WebSocket connection without completing the close handshake.",
    "Unable to read data from the transport connection: Operation timed out.",
    "Unable to write data to the transport connection: Operation timed out.",
)
#: Messages Halibut's Redis queue uses for requests worth sending again.
_QUEUE_FAULT_TEXTS = (
    "The request was abandoned, possibly because the node processing the request shutdown or "
    "redis lost all of its data.",
    "The node processing the request did not send a heartbeat for long enough, and so the node "
    "is now assumed to be offline.",
    "Error occured when reading data from the queue",
    "error occured when preparing request for queue",
)


def classify(error: ServerError) -> Classification:
    """
    Which exception Octopus Server's Halibut raises for C{error}, and whether
    its retry policy calls again: the rules of C{ThrowExceptionFromReceivedError}
    followed by C{IsRetryableError}, in their order.
    """
    details = error.details
    kind = error.halibut_error_type
    if kind in _NOT_RETRYABLE_TYPES:
        return Classification(kind, Retry.NOT_RETRYABLE)
    if kind in _CANCELLED_TYPES:
        return Classification(kind, Retry.NOT_RETRYABLE)
    # Any other name is HalibutClientException itself or (we assume) names
    # no type Halibut can build with (message, details): on to the texts.
    message = error.message
    if message.startswith("Service not found: "):
        return Classification(SERVICE_NOT_FOUND, Retry.NOT_RETRYABLE)
    if message.startswith("Service ") and message.endswith(" not found"):
        return Classification(METHOD_NOT_FOUND, Retry.NOT_RETRYABLE)
    if details is not None:
        # (A null details makes Halibut's own check throw; it then falls
        # back to a plain HalibutClientException, as below.)
        if details.startswith("System.Reflection.AmbiguousMatchException: "):
            return Classification(AMBIGUOUS_METHOD, Retry.NOT_RETRYABLE)
        if details.startswith(TARGET_INVOCATION_PREFIX):
            return Classification(SERVICE_INVOCATION, Retry.NOT_RETRYABLE)
    # A HalibutClientException whose Message is the error's message, two
    # newlines, "Server exception: ", a newline and the details.
    text = f"{message}{NEWLINE}{NEWLINE}Server exception: {NEWLINE}{details or ''}"
    if "System.IO.FileNotFoundException" in text:
        network = False
    elif any(fault in text for fault in _NETWORK_FAULT_TEXTS):
        return Classification(HALIBUT_CLIENT_EXCEPTION, Retry.RETRYABLE)
    else:
        network = None
    if any(fault in text for fault in _QUEUE_FAULT_TEXTS):
        return Classification(HALIBUT_CLIENT_EXCEPTION, Retry.RETRYABLE)
    if network is False:
        return Classification(HALIBUT_CLIENT_EXCEPTION, Retry.NOT_RETRYABLE)
    return Classification(HALIBUT_CLIENT_EXCEPTION, Retry.UNKNOWN)


def retry_delay(attempt: int) -> float:
    """
    Seconds the Server waits before retry number C{attempt} (1, 2, ...):
    C{min(attempt, 10)}.
    """
    if attempt < 1:
        raise ValueError(f"retries are counted from 1, not {attempt}")
    return float(min(attempt, 10))
