"""
Failures as a .NET Tentacle answers them, and as Octopus Server reads them.

The C{failure_*} vectors were written by Json.NET under Mono from real .NET
exceptions (C{tests/vectors/generate/Failures.cs}); our answers must be the
same bytes.
"""

from __future__ import annotations

import asyncio
import errno

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import tentacle_registry
from tentacle.dispatch import RequestError
from tentacle.halibut.failures import (
    AMBIGUOUS_METHOD,
    METHOD_NOT_FOUND,
    SERVICE_INVOCATION,
    SERVICE_NOT_FOUND,
    TARGET_INVOCATION_PREFIX,
    Classification,
    DotNetException,
    Retry,
    ambiguous_method,
    classify,
    dotnet_exception_name,
    dotnet_short_name,
    invocation_failure,
    method_not_found,
    retry_delay,
    service_not_found,
)
from tentacle.halibut.serializer import ResponseMessage, ServerError, decode_message, encode_message

VECTORS = FilePath(__file__).sibling("vectors")


def message_id(counter: int) -> str:
    return f"IFileTransferService::UploadFileAsync[{counter}] / 0b3f1c6e-2d4a-4b8e-9c1d-5e6f7a8b9c0d"


def refusal_from_permission_error() -> RequestError:
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied")
        except OSError:
            raise RequestError("Could not write /etc/x: Permission denied") from None
    except RequestError as e:
        return e


AMBIGUOUS = (
    "UploadFileAsync(String remotePath, DataStream upload, CancellationToken cancellationToken)"
)

#: vector -> (counter, what our code answers for the same failure).
OURS: dict[str, tuple[int, ServerError]] = {
    "failure_file_not_found_response": (
        100, invocation_failure(FileNotFoundError("Could not find file '/srv/app/missing.txt'."))
    ),
    "failure_unauthorized_response": (
        101, invocation_failure(PermissionError("Access to the path '/etc/shadow' is denied."))
    ),
    "failure_argument_response": (102, invocation_failure(RequestError("/etc is a folder, not a file"))),
    "failure_io_response": (
        103, invocation_failure(OSError("Could not write /srv/app/x: No space left on device"))
    ),
    "failure_invalid_operation_response": (
        104,
        invocation_failure(RuntimeError("first line\nsecond: \u00e9t\u00e9 \u2603 'quoted' \"too\"")),
    ),
    "failure_empty_message_response": (105, invocation_failure("System.InvalidOperationException", "")),
    "failure_service_not_found_response": (106, service_not_found("IScriptServiceV9")),
    "failure_method_not_found_response": (
        107, method_not_found("Octopus.Tentacle.Contracts.IFileTransferService", "Frobnicate")
    ),
    "failure_ambiguous_method_response": (
        108,
        ambiguous_method([AMBIGUOUS], [dotnet_short_name(v) for v in ("path", None, 5)]),
    ),
}


class VectorTests(SynchronousTestCase):
    """
    Our failure answers are the bytes Json.NET writes for .NET's.
    """

    def test_every_failure_vector_is_covered(self) -> None:
        on_disk = {p.basename()[: -len(".bson")] for p in VECTORS.globChildren("failure_*.bson")}
        self.assertEqual(on_disk, set(OURS))

    def test_byte_identical(self) -> None:
        for name, (counter, error) in OURS.items():
            data, _ = encode_message(ResponseMessage(message_id(counter), error))
            self.assertEqual(data, VECTORS.child(name + ".bson").getContent(), name)

    def test_decoded(self) -> None:
        for name, (counter, error) in OURS.items():
            message, _ = decode_message(VECTORS.child(name + ".bson").getContent(), tentacle_registry())
            self.assertEqual(message, ResponseMessage(message_id(counter), error), name)

    def test_what_the_server_concludes(self) -> None:
        """
        A failing service method is not retried, and neither is a missing
        service or method.
        """
        expected = {
            "failure_service_not_found_response": SERVICE_NOT_FOUND,
            "failure_method_not_found_response": METHOD_NOT_FOUND,
            "failure_ambiguous_method_response": AMBIGUOUS_METHOD,
        }
        for name, (_, error) in OURS.items():
            self.assertEqual(
                classify(error),
                Classification(expected.get(name, SERVICE_INVOCATION), Retry.NOT_RETRYABLE),
                name,
            )


class ShapeTests(SynchronousTestCase):
    def test_net_core_shape(self) -> None:
        error = invocation_failure(PermissionError("Access to the path '/etc/x' is denied."))
        self.assertEqual(error.message, "Access to the path '/etc/x' is denied.")
        self.assertEqual(
            error.details,
            TARGET_INVOCATION_PREFIX
            + "\n ---> System.UnauthorizedAccessException: Access to the path '/etc/x' is denied."
            + "\n   --- End of inner exception stack trace ---",
        )
        self.assertIsNone(error.halibut_error_type)

    def test_framework_shape(self) -> None:
        """
        What Mono 6.8 printed for the same exception (the .NET Framework
        shape, inner exception on the first line).
        """
        wrapped = DotNetException(
            "System.Reflection.TargetInvocationException",
            "Exception has been thrown by the target of an invocation.",
            DotNetException("System.UnauthorizedAccessException", "Access to the path '/etc/x' is denied."),
        )
        self.assertEqual(
            wrapped.to_string(newline_before_inner=False),
            "System.Reflection.TargetInvocationException: Exception has been thrown by the target "
            "of an invocation. ---> System.UnauthorizedAccessException: Access to the path "
            "'/etc/x' is denied.\n   --- End of inner exception stack trace ---",
        )

    def test_message_defaults_to_the_class_name(self) -> None:
        error = invocation_failure(RuntimeError())
        self.assertEqual(error.message, "RuntimeError")
        assert error.details is not None
        self.assertIn("\n ---> System.InvalidOperationException: RuntimeError\n", error.details)

    def test_no_traceback_on_the_wire(self) -> None:
        try:
            raise ValueError("bad")
        except ValueError as e:
            error = invocation_failure(e)
        assert error.details is not None
        self.assertNotIn("Traceback", error.details)
        self.assertNotIn(__file__, error.details)


class NameTests(SynchronousTestCase):
    def test_python_to_dotnet(self) -> None:
        cases: list[tuple[BaseException, str]] = [
            (FileNotFoundError(errno.ENOENT, "No such file"), "System.IO.FileNotFoundException"),
            (PermissionError(errno.EACCES, "Denied"), "System.UnauthorizedAccessException"),
            (IsADirectoryError(errno.EISDIR, "Is a folder"), "System.UnauthorizedAccessException"),
            (NotADirectoryError(errno.ENOTDIR, "Not a folder"), "System.IO.DirectoryNotFoundException"),
            (OSError(errno.ENOSPC, "No space"), "System.IO.IOException"),
            (TimeoutError(), "System.TimeoutException"),
            (ValueError("x"), "System.ArgumentException"),
            (TypeError("x"), "System.ArgumentException"),
            (KeyError("x"), "System.Collections.Generic.KeyNotFoundException"),
            (NotImplementedError(), "System.NotImplementedException"),
            (asyncio.CancelledError(), "System.OperationCanceledException"),
            (RuntimeError("x"), "System.InvalidOperationException"),
            (Exception("x"), "System.InvalidOperationException"),
            (RequestError("refused"), "System.ArgumentException"),
        ]
        for error, name in cases:
            self.assertEqual(dotnet_exception_name(error), name, repr(error))

    def test_refusal_named_after_its_os_error(self) -> None:
        self.assertEqual(
            dotnet_exception_name(refusal_from_permission_error()),
            "System.UnauthorizedAccessException",
        )

    def test_declared_name(self) -> None:
        class Quota(Exception):
            dotnet_exception_type = "MyApp.QuotaExceededException"

        self.assertEqual(dotnet_exception_name(Quota()), "MyApp.QuotaExceededException")

    def test_short_names(self) -> None:
        self.assertEqual(
            [dotnet_short_name(v) for v in ("s", True, 1, 1.5, None, ServerError("x"))],
            ["String", "Boolean", "Int32", "Double", "<null>", "ServerError"],
        )


class ClassifyTests(SynchronousTestCase):
    """
    The Server's reading of errors it did not get from us, rule by rule.
    """

    def check(self, error: ServerError, exception: str, retry: Retry) -> None:
        self.assertEqual(classify(error), Classification(exception, retry))

    def test_plain_error_is_retried(self) -> None:
        """
        What this agent used to answer: message and details alike, no type.
        """
        text = "/etc is a folder, not a file"
        self.check(ServerError(text, text), "Halibut.HalibutClientException", Retry.UNKNOWN)
        self.assertTrue(classify(ServerError(text, text)).retried)
        self.check(ServerError("boom"), "Halibut.HalibutClientException", Retry.UNKNOWN)

    def test_halibut_types(self) -> None:
        for kind in (SERVICE_NOT_FOUND, METHOD_NOT_FOUND, AMBIGUOUS_METHOD, SERVICE_INVOCATION):
            self.check(ServerError("x", "y", kind), kind, Retry.NOT_RETRYABLE)
        self.check(
            ServerError("x", "y", "Halibut.Exceptions.TransferringRequestCancelledException"),
            "Halibut.Exceptions.TransferringRequestCancelledException",
            Retry.NOT_RETRYABLE,
        )
        self.check(ServerError("x", "y", "Halibut.HalibutClientException"),
                   "Halibut.HalibutClientException", Retry.UNKNOWN)

    def test_message_texts(self) -> None:
        self.check(ServerError("Service not found: IX"), SERVICE_NOT_FOUND, Retry.NOT_RETRYABLE)
        self.check(ServerError("Service IX has no Y, not found"), METHOD_NOT_FOUND, Retry.NOT_RETRYABLE)
        self.check(
            ServerError("x", "System.Reflection.AmbiguousMatchException: x"),
            AMBIGUOUS_METHOD,
            Retry.NOT_RETRYABLE,
        )
        self.check(
            ServerError("x", TARGET_INVOCATION_PREFIX + " ---> System.Exception: x"),
            SERVICE_INVOCATION,
            Retry.NOT_RETRYABLE,
        )

    def test_network_and_file_texts(self) -> None:
        self.check(
            ServerError("x", "System.IO.FileNotFoundException: gone"),
            "Halibut.HalibutClientException",
            Retry.NOT_RETRYABLE,
        )
        self.check(
            ServerError("System.IO.EndOfStreamException: eof"),
            "Halibut.HalibutClientException",
            Retry.RETRYABLE,
        )
        # The file rule comes first.
        self.check(
            ServerError("System.IO.EndOfStreamException", "System.IO.FileNotFoundException"),
            "Halibut.HalibutClientException",
            Retry.NOT_RETRYABLE,
        )
        # A queue fault is retried even when a file is missing.
        self.check(
            ServerError("Error occured when reading data from the queue", "System.IO.FileNotFoundException"),
            "Halibut.HalibutClientException",
            Retry.RETRYABLE,
        )

    def test_vectors_written_before(self) -> None:
        """
        The older vectors: a typed ServiceNotFound, and a message alone.
        """
        registry = tentacle_registry()
        for name, retry in (("error_response", Retry.NOT_RETRYABLE), ("error_minimal_response", Retry.UNKNOWN)):
            message, _ = decode_message(VECTORS.child(name + ".bson").getContent(), registry)
            assert isinstance(message, ResponseMessage) and message.error is not None
            self.assertEqual(classify(message.error).retry, retry, name)


class RetryDelayTests(SynchronousTestCase):
    def test_backoff(self) -> None:
        self.assertEqual([retry_delay(n) for n in (1, 2, 9, 10, 11, 500)], [1, 2, 9, 10, 10, 10])
        self.assertRaises(ValueError, retry_delay, 0)
