# The compiled core of the codec (_codec.c); see tentacle/halibut/accel.py.
from typing import Any

SOURCE_SHA256: str
INTERFACE: int

def configure_values(
    *,
    int64: type,
    uuid: type,
    uuid_int: Any,
    uuid_is_safe: Any,
    safe_unknown: Any,
    utc: Any,
    int_enum: type,
) -> None: ...
def configure_objects(
    *,
    timespan: type,
    timespan_ticks: Any,
    timespan_parse: Any,
    datastream: type,
    request: type,
    response: type,
    plans: dict[type, Any],
    plan_for: Any,
) -> None: ...
def encode_document(doc: object, max_depth: int, /) -> bytes | None: ...
def decode_document(
    data: object, max_message_bytes: int, max_depth: int, max_string_bytes: int, /
) -> dict[str, Any] | None: ...
def encode_message(message: object, max_depth: int, /) -> tuple[bytes, list[Any]] | None: ...
def decode_envelope(
    tree: object, names: dict[str, type], expected: object, run_validators: bool, /
) -> tuple[Any, list[Any]] | None: ...
