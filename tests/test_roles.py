"""
The listening-service role and the dispatcher, in memory: bytes in, bytes out, fake clock.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tentacle.contracts import Operation, Parameter, ServiceContract, tentacle_registry
from tentacle.dispatch import (
    AMBIGUOUS_METHOD,
    METHOD_NOT_FOUND,
    SERVICE_NOT_FOUND,
    CallContext,
    Dispatcher,
    snake_case,
)
from tentacle.halibut import bson
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.connection import ExchangeSettings, HalibutConnection
from tentacle.halibut.roles import ListeningService
from tentacle.observe import ObservedHandler
from tentacle.halibut.serializer import (
    DataStream,
    RequestMessage,
    ResponseMessage,
    ServerError,
    decode_message,
    encode_message,
)
from tentacle.halibut.streams import stream_header, stream_trailer
from tests.support import LogCapture
from tests.wire_client import request

SERVICE = ServiceContract(
    "IThingService",
    "Tests.IThingService, Tests",
    (
        Operation("Echo", (Parameter("text", str),), str),
        Operation("Boom", (Parameter("text", str),), str),
        Operation("Later", (Parameter("text", str),), str),
        Operation("LaterBoom", (Parameter("text", str),), str),
        Operation("Wrong", (), str),
        Operation("Nothing", (), None),
        Operation("Download", (Parameter("size", str),), DataStream),
        Operation("Short", (), DataStream),
        Operation("Length", (Parameter("data", DataStream),), str),
        Operation("Store", (Parameter("name", str), Parameter("data", DataStream)), str),
    ),
)


class ListSink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.finished = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def finish(self) -> None:
        self.finished = True

    def discard(self) -> None:
        pass


STORED: dict[str, ListSink] = {}


class Things:
    def echo(self, text: str) -> str:
        return text

    def boom(self, text: str) -> str:
        raise ValueError(f"no {text} today")

    async def later(self, text: str) -> str:
        return text.upper()

    async def later_boom(self, text: str) -> str:
        raise ValueError(f"no {text} later either")

    def wrong(self) -> str:
        return 42  # type: ignore[return-value]

    def nothing(self) -> None:
        return None

    def download(self, size: str, *, context: CallContext) -> DataStream:
        return context.send(int(size), lambda: io.BytesIO(b"z" * int(size)))

    def short(self, *, context: CallContext) -> DataStream:
        return context.send(10, lambda: io.BytesIO(b"z" * 5))

    def length(self, data: DataStream, *, context: CallContext) -> str:
        return str(len(context.payload(data).read()))

    def store_sink(self, name: str, data: DataStream, *, stream: Any) -> ListSink:
        if name == "forbidden":
            raise PermissionError(f"may not store {name}")
        sink = STORED[name] = ListSink()
        return sink

    def store(self, name: str, data: DataStream, *, context: CallContext) -> str:
        sink = context.received[data.id].sink
        assert isinstance(sink, ListSink) and sink.finished
        return str(b"".join(sink.chunks))


def encode_request(message: RequestMessage) -> bytes:
    data, _ = encode_message(message)
    return compress(data)


class Harness:
    def __init__(self, settings: ExchangeSettings = ExchangeSettings()) -> None:
        self.clock = Clock()
        dispatcher = Dispatcher()
        dispatcher.register(SERVICE, Things())
        handler = ObservedHandler(
            dispatcher, self.clock, Logger(),
            address="192.168.1.1:54321", thumbprint="?", summarize=Dispatcher.summarize,
        )
        self.exchange = HalibutConnection(
            self.clock, tentacle_registry(), settings, role=ListeningService(handler)
        )
        self.transport = StringTransport()
        self.exchange.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.exchange.dataReceived(data)
        # StringTransport never pulls from a producer; do what the reactor would.
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()

    def responses(self) -> list[ResponseMessage]:
        """
        Every response written so far (and forget them).
        """
        data = self.transport.value()
        self.transport.clear()
        found = []
        while data.startswith(b"PROCEED\r\n"):
            data = data[len(b"PROCEED\r\n") :]
        while data:
            inflater = Inflater()
            payload = inflater.feed(data)
            assert payload is not None, "incomplete response"
            message, _ = decode_message(payload, tentacle_registry(), expected=ResponseMessage)
            assert isinstance(message, ResponseMessage)
            found.append(message)
            data = inflater.unused
            while data.startswith(b"PROCEED\r\n"):
                data = data[len(b"PROCEED\r\n") :]
        return found

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting or getattr(self.transport, "disconnected", False))


class DispatchErrorTests(SynchronousTestCase):
    """
    Errors become responses, field by field, and the connection goes on.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.harness = Harness()

    def call(self, message: RequestMessage) -> ResponseMessage:
        self.harness.send(encode_request(message))
        [response] = self.harness.responses()
        self.assertEqual(response.id, message.id)
        self.assertFalse(self.harness.closed)
        return response

    def test_unknown_service(self) -> None:
        response = self.call(request("INoService", "Echo", "x"))
        self.assertIsNone(response.result)
        message = "Service not found: INoService"
        self.assertEqual(
            response.error,
            ServerError(message, f"{SERVICE_NOT_FOUND}: {message}", SERVICE_NOT_FOUND),
        )

    def test_unknown_method(self) -> None:
        """
        Halibut's text, naming the contract's .NET interface and the async
        method it looked for.
        """
        response = self.call(request("IThingService", "Nope", "x"))
        message = "Method Tests.IThingService::NopeAsync not found"
        self.assertEqual(response.error, ServerError(message, f"{METHOD_NOT_FOUND}: {message}", METHOD_NOT_FOUND))

    def test_wrong_argument_count_and_type(self) -> None:
        response = self.call(request("IThingService", "Echo"))
        message = (
            "Could not decide which candidate to call out of the following methods:\n"
            " - EchoAsync(str text)\n"
            "The request arguments were:\n"
            "\n"
        )
        assert response.error is not None
        self.assertEqual(response.error.message, message)
        self.assertEqual(response.error.halibut_error_type, AMBIGUOUS_METHOD)
        self.harness.send(b"NEXT\r\n")
        response = self.call(request("IThingService", "Echo", True))
        assert response.error is not None
        self.assertIn("The request arguments were:\nBoolean\n", response.error.message)

    def test_raising_method(self) -> None:
        """
        As a .NET service method that threw: the message, then the
        TargetInvocationException around a .NET exception of a fitting type.
        The Python traceback goes to the log, never to the peer.
        """
        response = self.call(request("IThingService", "Boom", "cake"))
        assert response.error is not None
        self.assertEqual(response.error.message, "no cake today")
        self.assertEqual(
            response.error.details,
            "System.Reflection.TargetInvocationException: Exception has been thrown by the "
            "target of an invocation.\n"
            " ---> System.ArgumentException: no cake today\n"
            "   --- End of inner exception stack trace ---",
        )
        self.assertIsNone(response.error.halibut_error_type)
        self.assertIsNone(response.result)
        [logged] = self.flushLoggedErrors(ValueError)
        self.assertIn("no cake today", logged.getTraceback())

    def test_wrong_return_type(self) -> None:
        response = self.call(request("IThingService", "Wrong"))
        assert response.error is not None
        self.assertIn("returned the wrong type", response.error.message)

    def test_method_names_ignore_case(self) -> None:
        self.assertEqual(self.call(request("IThingService", "echo", "hi")).result, "hi")


class ExchangeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logs = LogCapture.install(self)

    def test_request_next_proceed_end(self) -> None:
        h = Harness()
        h.send(encode_request(request("IThingService", "Echo", "one")))
        self.assertEqual([r.result for r in h.responses()], ["one"])
        h.send(b"\r\n\r\nNEXT\r\n")  # blank lines are skipped
        self.assertEqual(h.transport.value(), b"PROCEED\r\n")
        h.send(encode_request(request("IThingService", "Later", "two")))
        self.assertEqual([r.result for r in h.responses()], ["TWO"])
        h.send(b"END\r\n")
        self.assertTrue(h.closed)

    def test_each_request_is_logged_without_secrets(self) -> None:
        from tentacle.contracts import ScriptIsolationLevel, ScriptTicket, StartScriptCommandV2
        from tentacle.halibut.dotnet import TimeSpan

        h = Harness()
        h.send(encode_request(request("IThingService", "Echo", "one")))
        [event] = self.logs.matching(event="request_served")
        self.assertEqual(
            (event["service"], event["method"], event["outcome"], event["peer"]),
            ("IThingService", "Echo", "ok", "192.168.1.1:54321"),
        )
        command = StartScriptCommandV2(
            script_ticket=ScriptTicket("T1"), script_body="export PASSWORD=hunter2", task_id="ServerTasks-1",
            duration_to_wait_for_script_to_finish=None, isolation=ScriptIsolationLevel.NoIsolation,
            script_isolation_mutex_timeout=TimeSpan(0), isolation_mutex_name=None, scripts={}, files=(),
            arguments=(),
        )
        h.send(b"NEXT\r\n" + encode_request(request("IScriptServiceV2", "StartScript", command)))
        event = self.logs.matching(event="request_served")[-1]
        self.assertEqual((event["outcome"], event["ticket"]), ("error", "T1"))
        self.assertEqual(event["script_body_length"], len("export PASSWORD=hunter2"))
        self.assertNotIn("hunter2", repr(event))

    def test_logged_once_the_answer_is_written(self) -> None:
        """
        The request's event comes after its answer was handed to the
        connection, so the peer does not wait for it.
        """
        from twisted.logger import globalLogPublisher

        h = Harness()
        written: list[bytes] = []

        def observe(event: Any) -> None:
            if event.get("event") == "request_served":
                written.append(h.transport.value())

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        h.send(encode_request(request("IThingService", "Echo", "one")))
        [before_the_event] = written
        self.assertEqual(before_the_event, h.transport.value())  # the whole answer
        self.assertEqual([r.result for r in h.responses()], ["one"])

    def test_an_idle_connection_keeps_no_coroutine(self) -> None:
        """
        Between requests (a pooled connection waits minutes for NEXT) the
        role is not suspended in a coroutine; NEXT starts it again.
        """
        import gc
        import types

        def suspended_roles() -> int:
            return sum(
                1 for o in gc.get_objects()
                if isinstance(o, types.CoroutineType) and o.cr_frame is not None
                and o.cr_code is ListeningService.__call__.__code__
                and o.cr_frame.f_locals.get("connection") is h.exchange
            )

        h = Harness()
        self.assertEqual(suspended_roles(), 1)  # waiting for the first request
        h.send(encode_request(request("IThingService", "Echo", "one")))
        self.assertEqual([r.result for r in h.responses()], ["one"])
        self.assertEqual(suspended_roles(), 0)
        h.send(b"NEXT\r\n")
        self.assertEqual(h.transport.value(), b"PROCEED\r\n")
        self.assertEqual(suspended_roles(), 1)
        h.transport.clear()
        h.send(encode_request(request("IThingService", "Echo", "two")))
        self.assertEqual([r.result for r in h.responses()], ["two"])

    def test_void_method(self) -> None:
        h = Harness()
        h.send(encode_request(request("IThingService", "Nothing")))
        [response] = h.responses()
        self.assertEqual((response.error, response.result), (None, None))

    def test_request_in_single_bytes(self) -> None:
        h = Harness()
        for byte in encode_request(request("IThingService", "Echo", "slow")) + b"NEXT\r\n":
            h.send(bytes([byte]))
        self.assertEqual([r.result for r in h.responses()], ["slow"])

    def test_next_sent_ahead_waits_for_the_response(self) -> None:
        h = Harness()
        h.send(encode_request(request("IThingService", "Echo", "a")) + b"NEXT\r\n")
        self.assertEqual(h.transport.value().count(b"PROCEED"), 1)
        self.assertEqual([r.result for r in h.responses()], ["a"])

    def test_data_stream_in_and_out(self) -> None:
        h = Harness()
        ref = DataStream.fresh(3)
        data, streams = encode_message(request("IThingService", "Length", ref))
        self.assertEqual(streams, [ref])
        h.send(compress(data) + stream_header(ref.id, 3) + b"abc" + stream_trailer(3))
        self.assertEqual([r.result for r in h.responses()], ["3"])
        h.send(b"NEXT\r\n" + encode_request(request("IThingService", "Download", "70000")))
        out = h.transport.value()[len(b"PROCEED\r\n") :]
        inflater = Inflater()
        payload = inflater.feed(out)
        assert payload is not None
        message, [stream] = decode_message(payload, tentacle_registry(), expected=ResponseMessage)
        rest = inflater.unused
        self.assertEqual(rest[:24], stream_header(stream.id, 70000))
        self.assertEqual(rest[24:-8], b"z" * 70000)
        self.assertEqual(rest[-8:], stream_trailer(70000))

    def test_operation_chooses_the_sink(self) -> None:
        h = Harness()
        ref = DataStream.fresh(6)
        data, _ = encode_message(request("IThingService", "Store", "mine", ref))
        h.send(compress(data) + stream_header(ref.id, 6) + b"abc" + b"def" + stream_trailer(6))
        self.assertEqual([r.result for r in h.responses()], ["b'abcdef'"])
        self.assertEqual(b"".join(STORED["mine"].chunks), b"abcdef")

    def test_refused_sink_is_the_answer(self) -> None:
        h = Harness()
        ref = DataStream.fresh(3)
        data, _ = encode_message(request("IThingService", "Store", "forbidden", ref))
        h.send(compress(data) + stream_header(ref.id, 3) + b"abc" + stream_trailer(3))
        [response] = h.responses()
        assert response.error is not None
        self.assertEqual(response.error.message, "may not store forbidden")
        self.assertEqual(
            response.error.details,
            "System.Reflection.TargetInvocationException: Exception has been thrown by the "
            "target of an invocation.\n"
            " ---> System.UnauthorizedAccessException: may not store forbidden\n"
            "   --- End of inner exception stack trace ---",
        )
        self.assertIsNone(response.result)
        [logged] = self.flushLoggedErrors(PermissionError)
        self.assertIn("store_sink", logged.getTraceback())
        h.send(b"NEXT\r\n" + encode_request(request("IThingService", "Echo", "after")))
        self.assertEqual([r.result for r in h.responses()], ["after"])

    def test_short_outgoing_stream_aborts(self) -> None:
        h = Harness()
        h.send(encode_request(request("IThingService", "Short")))
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(self.logs.matching(why="a data stream ended 5 bytes short"))

    def test_trailer_mismatch_aborts(self) -> None:
        h = Harness()
        ref = DataStream.fresh(3)
        data, _ = encode_message(request("IThingService", "Length", ref))
        h.send(compress(data) + stream_header(ref.id, 3) + b"abc" + stream_trailer(4))
        self.assertEqual(h.transport.value(), b"")
        self.assertTrue(h.transport.disconnecting)

    def test_unknown_control_word(self) -> None:
        h = Harness()
        h.send(encode_request(request("IThingService", "Echo", "a")))
        h.responses()
        h.send(b"HELLO\r\n")
        self.assertTrue(h.transport.disconnecting)
        self.assertTrue(self.logs.matching(why="unexpected control message 'HELLO'"))

    def test_garbage_instead_of_a_request(self) -> None:
        h = Harness()
        h.send(b"\xff" * 100)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.transport.value(), b"")

    def test_unknown_type_is_answered_then_closed(self) -> None:
        h = Harness()
        tree = {
            "Message": {
                "$type": "Halibut.Transport.Protocol.RequestMessage, Halibut",
                "id": "call-1",
                "activityId": uuid.uuid4(),
                "endpoint": None,
                "service": "IThingService",
                "method": "Echo",
                "params": [{"$type": "System.Diagnostics.Process, System", "StartInfo": {}}],
            }
        }
        h.send(compress(bson.encode_document(tree)))
        [response] = h.responses()
        self.assertEqual(response.id, "call-1")
        assert response.error is not None
        self.assertIn("System.Diagnostics.Process", response.error.message)
        self.assertTrue(h.closed)

    def test_a_big_answer_is_compressed_a_slice_at_a_time(self) -> None:
        """
        A big message gives the reactor a turn between slices (a
        5,000-line status page would otherwise hold it for milliseconds).
        """
        import os as _os

        h = Harness()
        text = _os.urandom(300_000).hex()  # 600 KB of BSON string, ten slices
        h.send(encode_request(request("IThingService", "Echo", text)))
        self.assertIsNone(Inflater().feed(h.transport.value()), "not whole yet: it waits for the reactor")
        h.clock.advance(0)
        while h.transport.producer is not None:
            h.transport.producer.resumeProducing()
        data = h.transport.value()
        inflater = Inflater()
        payload = inflater.feed(data)
        assert payload is not None
        message, _ = decode_message(payload, tentacle_registry(), expected=ResponseMessage)
        assert isinstance(message, ResponseMessage)
        self.assertEqual(message.result, text)

    def test_oversized_message_is_refused(self) -> None:
        from tentacle.halibut.errors import CodecLimits

        h = Harness(ExchangeSettings(limits=CodecLimits(max_message_bytes=1024)))
        h.send(encode_request(request("IThingService", "Echo", "x" * 5000)))
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(h.transport.value(), b"")


class EndOfConversationTests(SynchronousTestCase):
    """
    Octopus Server may say END, or simply close, wherever NEXT may come;
    neither is an error, and PROCEED answers NEXT at once.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.h = Harness()
        self.h.send(encode_request(request("IThingService", "Echo", "one")))
        self.assertEqual([r.result for r in self.h.responses()], ["one"])

    def assert_quiet(self) -> None:
        complaints = [e for e in self.logs.events if "log_failure" in e or e.get("event") == "protocol_error"]
        self.assertEqual(complaints, [])

    def test_proceed_at_once(self) -> None:
        self.h.send(b"NEXT\r\n")
        self.assertEqual(self.h.transport.value(), b"PROCEED\r\n", "no clock needed")

    def test_end(self) -> None:
        self.h.send(b"END\r\n")
        self.assertTrue(self.h.transport.disconnecting)
        self.assertFalse(getattr(self.h.transport, "aborted", False), "closed politely")
        self.assert_quiet()

    def test_eof(self) -> None:
        self.h.exchange.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.h.exchange.closed.called)
        self.assert_quiet()

    def test_eof_after_the_next_request(self) -> None:
        self.h.send(b"NEXT\r\n" + encode_request(request("IThingService", "Echo", "two")))
        self.assertEqual([r.result for r in self.h.responses()], ["two"])
        self.h.exchange.connectionLost(Failure(ConnectionDone()))
        self.assert_quiet()

    def test_null_instead_of_a_request(self) -> None:
        self.h.send(b"NEXT\r\n")
        self.h.transport.clear()
        data, _ = encode_message(None)
        self.h.send(compress(data))
        self.assertTrue(self.h.transport.disconnecting)
        self.assertEqual(self.h.transport.value(), b"")
        self.assert_quiet()


class TimeoutTests(SynchronousTestCase):
    def test_idle_between_requests(self) -> None:
        h = Harness(ExchangeSettings(idle_timeout=600, heartbeat_timeout=60))
        h.send(encode_request(request("IThingService", "Echo", "a")))
        h.responses()
        h.clock.advance(599)
        self.assertFalse(h.closed)
        h.clock.advance(1)
        self.assertTrue(h.closed)

    def test_stalled_request(self) -> None:
        h = Harness(ExchangeSettings(idle_timeout=600, heartbeat_timeout=60))
        data = encode_request(request("IThingService", "Echo", "a"))
        h.send(data[:5])
        h.clock.advance(59)
        h.send(data[5:6])  # progress resets the heartbeat
        h.clock.advance(59)
        self.assertFalse(h.closed)
        h.clock.advance(1)
        self.assertTrue(h.closed)

    def test_stalled_control_line(self) -> None:
        h = Harness(ExchangeSettings(idle_timeout=600, heartbeat_timeout=60))
        h.send(encode_request(request("IThingService", "Echo", "a")))
        h.responses()
        h.send(b"NE")
        h.clock.advance(60)
        self.assertTrue(h.closed)


class SnakeCaseTests(SynchronousTestCase):
    def test_names(self) -> None:
        self.assertEqual(snake_case("StartScript"), "start_script")
        self.assertEqual(snake_case("GetCapabilities"), "get_capabilities")
        self.assertEqual(snake_case("UploadFile"), "upload_file")


class DispatcherTests(SynchronousTestCase):
    """
    L{Dispatcher.handle} answers a method that returns at once with a
    Deferred that has fired already, and one that returns an awaitable once
    it is done; either way a method that raises becomes an error response.
    """

    def setUp(self) -> None:
        self.logs = LogCapture.install(self)
        self.dispatcher = Dispatcher()
        self.dispatcher.register(SERVICE, Things())

    def handle(self, method: str, *params: object) -> Deferred[ResponseMessage]:
        message = request("IThingService", method, *params)
        return self.dispatcher.handle(message, CallContext(None, message, {}))

    def test_an_answer_at_once_is_a_fired_deferred(self) -> None:
        response = self.successResultOf(self.handle("Echo", "hi"))
        self.assertEqual((response.result, response.error), ("hi", None))

    def test_an_awaitable_answer_waits(self) -> None:
        waiting: Deferred[str] = Deferred()
        dispatcher = Dispatcher()

        class Slow(Things):
            def later(self, text: str) -> Deferred[str]:  # type: ignore[override]
                return waiting

        dispatcher.register(SERVICE, Slow())
        message = request("IThingService", "Later", "x")
        d = dispatcher.handle(message, CallContext(None, message, {}))
        self.assertNoResult(d)
        waiting.callback("done")
        self.assertEqual(self.successResultOf(d).result, "done")

    def test_raising_at_once_or_later_is_an_error_response(self) -> None:
        now = self.successResultOf(self.handle("Boom", "cake"))
        later = self.successResultOf(self.handle("LaterBoom", "pie"))
        self.assertIsNotNone(now.error)
        self.assertIsNotNone(later.error)
        assert now.error is not None and later.error is not None
        self.assertIn("no cake today", now.error.message)
        self.assertIn("no pie later either", later.error.message)
        self.assertEqual(len(self.logs.matching(log_level=LogLevel.critical)), 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)


class RegisterTests(SynchronousTestCase):
    def test_missing_method_fails_at_registration(self) -> None:
        e = self.assertRaises(TypeError, Dispatcher().register, SERVICE, object())
        self.assertIn("does not implement IThingService.Echo (expected a method 'echo')", str(e))

    def test_contracts(self) -> None:
        d = Dispatcher()
        d.register(SERVICE, Things())
        self.assertEqual(d.contracts, {"IThingService"})
