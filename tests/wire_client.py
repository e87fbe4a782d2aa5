"""
A small blocking Halibut client for tests: it speaks the wire protocol the
way Octopus Server does (MX, identity, DEFLATE'd BSON, data streams,
NEXT/PROCEED/END) over a plain socket, so tests exercise the agent
independently of any client code in the package.
"""

from __future__ import annotations

import socket
import ssl
import uuid
from typing import Iterable

from tentacle.contracts import tentacle_registry
from tentacle.halibut.deflate import Inflater, compress
from tentacle.halibut.serializer import (
    RequestMessage,
    ResponseMessage,
    TypeRegistry,
    decode_message,
    encode_message,
)
from tentacle.halibut.streams import (
    DataStreamReader,
    ExpectedStream,
    ReceivedStream,
    stream_header,
    stream_trailer,
)

Payload = Iterable[bytes]


def request(service: str, method: str, *params: object) -> RequestMessage:
    call = uuid.uuid4()
    return RequestMessage(
        id=f"{service}::{method}[1] / {call}",
        activity_id=call,
        service=service,
        method=method,
        params=params,
    )


class WireClient:
    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        registry: TypeRegistry | None = None,
        timeout: float = 30.0,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw)
        self.registry = registry or tentacle_registry()
        self.buffer = b""
        self.sock.sendall(b"MX\r\n\r\n")
        self.sock.sendall(b"MX-CLIENT 1.0\r\n\r\n")
        answer = self._read_exactly(len(b"MX-SERVER 1.0\r\n\r\n"))
        if answer != b"MX-SERVER 1.0\r\n\r\n":
            raise AssertionError(f"unexpected identity answer {answer!r}")

    def _recv(self) -> bytes:
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the agent closed the connection")
        return data

    def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            data += self._recv()
        self.buffer = data[n:] + self.buffer
        return data[:n]

    def send_request(
        self, message: RequestMessage, payloads: dict[uuid.UUID, Payload] | None = None,
        trailer_override: int | None = None,
    ) -> None:
        data, streams = encode_message(message)
        self.sock.sendall(compress(data))
        for stream in streams:
            self.sock.sendall(stream_header(stream.id, stream.length))
            for chunk in (payloads or {})[stream.id]:
                self.sock.sendall(chunk)
            self.sock.sendall(
                stream_trailer(stream.length if trailer_override is None else trailer_override)
            )

    def read_response(self) -> tuple[ResponseMessage, list[ReceivedStream]]:
        inflater = Inflater()
        payload = None
        while payload is None:
            payload = inflater.feed(self._recv())
        self.buffer = inflater.unused + self.buffer
        message, refs = decode_message(payload, self.registry, expected=ResponseMessage)
        assert isinstance(message, ResponseMessage)
        reader = DataStreamReader([ExpectedStream(r.id, r.length) for r in refs])
        while not reader.done:
            rest = reader.feed(self._recv())
            if rest is not None:
                self.buffer = rest + self.buffer
        return message, reader.received

    def call(
        self, message: RequestMessage, payloads: dict[uuid.UUID, Payload] | None = None
    ) -> tuple[ResponseMessage, list[ReceivedStream]]:
        self.send_request(message, payloads)
        return self.read_response()

    def next(self) -> None:
        self.sock.sendall(b"NEXT\r\n")
        answer = self._read_exactly(len(b"PROCEED\r\n"))
        if answer != b"PROCEED\r\n":
            raise AssertionError(f"unexpected answer to NEXT: {answer!r}")

    def end(self) -> None:
        self.sock.sendall(b"END\r\n")
        self.close()

    def close(self) -> None:
        self.sock.close()
