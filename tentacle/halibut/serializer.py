"""
The object layer of a Halibut message: attrs objects <-> BSON-ready trees.

Halibut serializes C{MessageEnvelope<object> {Message}} with Json.NET set to
C{TypeNameHandling.Auto} and simple assembly names. That puts a C{"$type"}
member exactly where an object's runtime type differs from the declared
type: on the envelope's C{Message}, on each complex element of
C{RequestMessage.params} (C{object[]}) and on C{ResponseMessage.result}
(C{object}); never on a property whose declared type is the concrete class.
Primitives in C{object} slots carry no type (a C{long} stays BSON int64, an
C{int} or enum int32, a C{Guid} binary subtype 4, a C{TimeSpan} its string).
Collections in C{object} slots would be C{{"$type", "$values"}}, naming
runtime-specific assemblies (C{mscorlib} vs C{System.Private.CoreLib});
no Tentacle contract puts one there, so they are rejected.

Reading is the security boundary Halibut added in its "Securing the
Protocol" change: a C{"$type"} is looked up in a L{TypeRegistry} of
declared classes and anything else is a L{UnknownTypeError}; nothing is
ever constructed from a name. Members we do not model (such as the
C{endpoint} of a request from Octopus Server) are ignored, as Json.NET
ignores them.

Each class says how it is written with L{dotnet_type} and, per attribute,
with L{wire} metadata giving the JSON name and a L{WireType}. Attribute
order is wire order: Json.NET writes properties in declaration order, and
tests compare bytes.

With a compiled core (L{tentacle.halibut.accel}), L{encode_message} goes
from objects straight to BSON and L{decode_envelope} builds the objects,
both from a per-class "plan" compiled here once from the wire schema. The
core handles the well-formed common case and declines anything else, and
then the pure-Python code below runs, which is also where every error
comes from.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import IntEnum
from types import MemberDescriptorType, ModuleType
from typing import Any, ClassVar, TypeVar

import attrs

from tentacle.halibut import accel, bson
from tentacle.halibut.dotnet import TimeSpan
from tentacle.halibut.errors import CodecError, CodecLimits

__all__ = [
    "BOOLEAN",
    "DATETIMEOFFSET",
    "GUID",
    "INT32",
    "INT64",
    "OBJECT",
    "RAW",
    "STRING",
    "TIMESPAN",
    "Complex",
    "DataStream",
    "DotNetType",
    "EnumKeyedDict",
    "EnumOf",
    "ListOf",
    "Message",
    "Nullable",
    "RequestMessage",
    "ResponseMessage",
    "ServerError",
    "TypeRegistry",
    "UnknownTypeError",
    "WireField",
    "WireType",
    "decode_envelope",
    "decode_envelope_python",
    "decode_message",
    "dotnet_type",
    "dotnet_type_of",
    "encode_envelope",
    "encode_message",
    "encode_message_python",
    "fields_of",
    "from_tree",
    "require_aware",
    "to_tree",
    "wire",
]

T = TypeVar("T")

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_TYPE_KEY = "$type"
_WIRE_KEY = "tentacle.halibut.wire"
_DOTNET_KEY = "__halibut_dotnet_type__"
_DEFAULT_LIMITS = CodecLimits()


class UnknownTypeError(CodecError):
    """
    A C{"$type"} that is not registered, or not allowed where it appears.
    """


# --- .NET type names ----------------------------------------------------------


def _split_type_name(name: str) -> tuple[str, str | None]:
    """
    C{("Ns.Type", "Assembly")} from C{"Ns.Type, Assembly[, Version=...]"}.

    The first comma outside generic brackets separates the type from the
    assembly; anything after the assembly's simple name (version, culture,
    key token) is ignored, as Json.NET's binder ignores it for lookup.
    """
    depth = 0
    for index, char in enumerate(name):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "," and depth == 0:
            assembly = name[index + 1 :].split(",", 1)[0].strip()
            return name[:index].strip(), assembly or None
    return name.strip(), None


@attrs.frozen
class DotNetType:
    """
    How a Python class is named on the wire.

    @ivar name: The CLR type as C{"Namespace.Type, Assembly"}.
    @ivar write_as: The name written in C{"$type"} when it is not C{name}
        (Tentacle writes its oldest contracts under their legacy names).
    @ivar aliases: Further names accepted when reading.
    """

    name: str
    write_as: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def wire_name(self) -> str:
        return self.write_as if self.write_as is not None else self.name

    def all_names(self) -> tuple[str, ...]:
        return (self.name,) + ((self.write_as,) if self.write_as else ()) + self.aliases


def dotnet_type(
    name: str, *, write_as: str | None = None, aliases: Sequence[str] = ()
) -> Callable[[type[T]], type[T]]:
    """
    Class decorator: attach the .NET name(s) of a wire class.
    """

    def decorate(cls: type[T]) -> type[T]:
        setattr(cls, _DOTNET_KEY, DotNetType(name, write_as, tuple(aliases)))
        return cls

    return decorate


def dotnet_type_of(cls: type) -> DotNetType:
    """
    @raise TypeError: C{cls} was not decorated with L{dotnet_type}.
    """
    info = cls.__dict__.get(_DOTNET_KEY)
    if not isinstance(info, DotNetType):
        raise TypeError(f"{cls.__qualname__} has no .NET type name")
    return info


class TypeRegistry:
    """
    The allow-list of classes a C{"$type"} may name (Halibut's
    C{RegisteredSerializationBinder}).

    The Halibut protocol classes are always present, as in Halibut.
    """

    def __init__(self, classes: Iterable[type] = ()) -> None:
        self._by_name: dict[tuple[str, str | None], type] = {}
        # Each registered name exactly as written, for the compiled core's
        # lookups; any other spelling goes through resolve().
        self._exact: dict[str, type] = {}
        for cls in (RequestMessage, ResponseMessage, ServerError, DataStream, *classes):
            self.register(cls)

    def register(self, cls: type) -> None:
        """
        Allow C{cls} under each of its names.

        @raise TypeError: C{cls} is not a wire class (no schema or no name).
        @raise ValueError: a name is already taken by another class.
        """
        fields_of(cls)
        for name in dotnet_type_of(cls).all_names():
            key = _split_type_name(name)
            existing = self._by_name.setdefault(key, cls)
            if existing is not cls:
                raise ValueError(f"{name!r} is already registered to {existing.__qualname__}")
            self._exact[name] = cls

    def resolve(self, name: object) -> type:
        """
        The class registered under C{name}.

        @raise UnknownTypeError: it is not a registered name.
        """
        if not isinstance(name, str):
            raise UnknownTypeError(f"$type must be a string, not {type(name).__name__}")
        cls = self._by_name.get(_split_type_name(name))
        if cls is None:
            raise UnknownTypeError(f"type not allowed: {name[:200]!r}")
        return cls

    def __contains__(self, cls: object) -> bool:
        return cls in self._by_name.values()

    def classes(self) -> frozenset[type]:
        return frozenset(self._by_name.values())


# --- wire types ---------------------------------------------------------------


@attrs.frozen
class _EncodeContext:
    streams: list[DataStream] = attrs.field(factory=list)


@attrs.frozen
class _DecodeContext:
    registry: TypeRegistry
    streams: list[DataStream] = attrs.field(factory=list)


class WireType:
    """
    How one declared .NET type maps between Python values and BSON trees.

    Decoders see peer input and raise only L{CodecError}; encoders see our
    own values and raise C{TypeError}/C{ValueError} for programming errors.
    """

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        raise NotImplementedError

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


def _expect(condition: bool, where: str, wanted: str, tree: Any) -> None:
    if not condition:
        raise CodecError(f"{where}: expected {wanted}, got {_kind(tree)}")


def _kind(tree: Any) -> str:
    return "null" if tree is None else type(tree).__name__


class _String(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, str):
            raise TypeError(f"expected str, got {_kind(value)}")
        return value

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, str), where, "a string", tree)
        return tree

    def describe(self) -> str:
        return "string"


class _Boolean(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, bool):
            raise TypeError(f"expected bool, got {_kind(value)}")
        return value

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, bool), where, "a boolean", tree)
        return tree

    def describe(self) -> str:
        return "bool"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Int32(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not _is_int(value):
            raise TypeError(f"expected int, got {_kind(value)}")
        if not _INT32_MIN <= value <= _INT32_MAX:
            raise ValueError(f"{value} does not fit a .NET int")
        return int(value)

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(_is_int(tree), where, "an integer", tree)
        if not _INT32_MIN <= tree <= _INT32_MAX:
            raise CodecError(f"{where}: {int(tree)} does not fit a .NET int")
        return int(tree)

    def describe(self) -> str:
        return "int"


class _Int64(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not _is_int(value):
            raise TypeError(f"expected int, got {_kind(value)}")
        return bson.Int64(value)

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(_is_int(tree), where, "an integer", tree)
        return int(tree)

    def describe(self) -> str:
        return "long"


class _Guid(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, uuid.UUID):
            raise TypeError(f"expected UUID, got {_kind(value)}")
        return value

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        if isinstance(tree, str):
            # Json.NET also reads a Guid from its string form.
            try:
                return uuid.UUID(tree)
            except ValueError:
                raise CodecError(f"{where}: not a Guid: {tree[:64]!r}") from None
        _expect(isinstance(tree, uuid.UUID), where, "a Guid", tree)
        return tree

    def describe(self) -> str:
        return "Guid"


class _TimeSpan(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if isinstance(value, timedelta):
            value = TimeSpan.from_timedelta(value)
        if not isinstance(value, TimeSpan):
            raise TypeError(f"expected TimeSpan, got {_kind(value)}")
        return value.format()

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, str), where, "a TimeSpan string", tree)
        try:
            return TimeSpan.parse(tree)
        except CodecError as e:
            raise CodecError(f"{where}: {e}") from None

    def describe(self) -> str:
        return "TimeSpan"


class _DateTimeOffset(WireType):
    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise TypeError(f"expected an aware datetime, got {value!r}")
        return value

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, datetime), where, "a UTC datetime", tree)
        return tree

    def describe(self) -> str:
        return "DateTimeOffset"


class _Raw(WireType):
    """
    An uninterpreted subtree, kept so it can be written back unchanged.

    Nothing in it is resolved or constructed, so it is safe for members we
    carry but never act on.
    """

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        return value

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        return tree

    def describe(self) -> str:
        return "raw"


_E = TypeVar("_E", bound=IntEnum)
_INTEGER = re.compile(r"-?[0-9]{1,10}")


def _enum_member(cls: type[_E], tree: Any, where: str) -> _E:
    if _is_int(tree):
        try:
            return cls(tree)
        except ValueError:
            raise CodecError(f"{where}: {int(tree)} is not a {cls.__name__}") from None
    if isinstance(tree, str):
        # Json.NET parses names (case-insensitively) and integer strings too.
        text = tree.strip()
        for member in cls:
            if member.name == text:
                return member
        for member in cls:
            if member.name.lower() == text.lower():
                return member
        if _INTEGER.fullmatch(text):
            return _enum_member(cls, int(text), where)
        raise CodecError(f"{where}: {tree[:64]!r} is not a {cls.__name__}")
    raise CodecError(f"{where}: expected a {cls.__name__}, got {_kind(tree)}")


@attrs.frozen
class EnumOf(WireType):
    """
    A .NET enum: written as its integer (no C{StringEnumConverter} is set).
    """

    cls: type[IntEnum]

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, self.cls):
            raise TypeError(f"expected {self.cls.__name__}, got {_kind(value)}")
        return int(value)

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        return _enum_member(self.cls, tree, where)

    def describe(self) -> str:
        return self.cls.__name__


@attrs.frozen
class Nullable(WireType):
    """
    A .NET nullable: C{Nullable<T>}, or a reference type annotated C{T?}.

    Anything not wrapped in this rejects C{null}.
    """

    inner: WireType

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        return None if value is None else self.inner.encode(value, ctx)

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        return None if tree is None else self.inner.decode(tree, ctx, where)

    def describe(self) -> str:
        return self.inner.describe() + "?"


@attrs.frozen
class ListOf(WireType):
    """
    C{List<T>} or C{T[]} in a slot declared as that type: a plain array.
    """

    item: WireType

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a tuple or list, got {_kind(value)}")
        return [self.item.encode(item, ctx) for item in value]

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, list), where, "an array", tree)
        return tuple(
            self.item.decode(item, ctx, f"{where}[{index}]") for index, item in enumerate(tree)
        )

    def describe(self) -> str:
        return f"List<{self.item.describe()}>"


@attrs.frozen
class EnumKeyedDict(WireType):
    """
    C{Dictionary<TEnum, TValue>}: Json.NET keys it by the enum member's name.
    """

    key: type[IntEnum]
    value: WireType

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a mapping, got {_kind(value)}")
        tree = {}
        for key, item in value.items():
            if not isinstance(key, self.key):
                raise TypeError(f"expected {self.key.__name__} keys, got {_kind(key)}")
            tree[key.name] = self.value.encode(item, ctx)
        return tree

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, dict), where, "a document", tree)
        if _TYPE_KEY in tree:
            raise UnknownTypeError(f"{where}: unexpected $type on a dictionary")
        result = {}
        for name, item in tree.items():
            here = f"{where}[{name[:64]!r}]"
            result[_enum_member(self.key, name, here)] = self.value.decode(item, ctx, here)
        return result

    def describe(self) -> str:
        return f"Dictionary<{self.key.__name__}, {self.value.describe()}>"


@attrs.frozen
class Complex(WireType):
    """
    A property declared as a concrete class: no C{"$type"} is written, and
    one that is read must name that same class.
    """

    cls: type

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if type(value) is not self.cls:
            raise TypeError(f"expected {self.cls.__qualname__}, got {_kind(value)}")
        return _object_tree(value, ctx, with_type=False)

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        _expect(isinstance(tree, dict), where, f"a {self.cls.__name__} document", tree)
        if _TYPE_KEY in tree and ctx.registry.resolve(tree[_TYPE_KEY]) is not self.cls:
            raise UnknownTypeError(
                f"{where}: $type {str(tree[_TYPE_KEY])[:200]!r} where {self.cls.__name__} is declared"
            )
        return _object_from_tree(self.cls, tree, ctx, where)

    def describe(self) -> str:
        return self.cls.__name__


class _Object(WireType):
    """
    A slot declared as C{object}: complex values carry C{"$type"}, primitives
    are written bare and read back as the BSON decoder gives them (so an
    C{Int64} stays an C{Int64} and re-encodes identically).
    """

    _PRIMITIVES: ClassVar[tuple[type, ...]] = (str, bool, int, float, bytes, uuid.UUID, datetime)

    def encode(self, value: Any, ctx: _EncodeContext) -> Any:
        if value is None or isinstance(value, self._PRIMITIVES):
            return int(value) if isinstance(value, IntEnum) else value
        if isinstance(value, (TimeSpan, timedelta)):
            return TIMESPAN.encode(value, ctx)
        if attrs.has(type(value)):
            return _object_tree(value, ctx, with_type=True)
        raise TypeError(f"cannot write {_kind(value)} in an object slot")

    def decode(self, tree: Any, ctx: _DecodeContext, where: str) -> Any:
        if tree is None or isinstance(tree, self._PRIMITIVES):
            return tree
        if isinstance(tree, dict):
            if _TYPE_KEY not in tree:
                raise UnknownTypeError(f"{where}: object without $type")
            cls = ctx.registry.resolve(tree[_TYPE_KEY])
            if cls in _ENVELOPE_CLASSES:
                raise UnknownTypeError(f"{where}: {cls.__name__} is not allowed here")
            return _object_from_tree(cls, tree, ctx, where)
        raise UnknownTypeError(f"{where}: untyped {_kind(tree)} in an object slot")

    def describe(self) -> str:
        return "object"


STRING: WireType = _String()
BOOLEAN: WireType = _Boolean()
INT32: WireType = _Int32()
INT64: WireType = _Int64()
GUID: WireType = _Guid()
TIMESPAN: WireType = _TimeSpan()
DATETIMEOFFSET: WireType = _DateTimeOffset()
OBJECT: WireType = _Object()
RAW: WireType = _Raw()


def require_aware(instance: object, attribute: attrs.Attribute[datetime], value: datetime) -> None:
    """
    attrs validator for a field declared L{DATETIMEOFFSET}: a .NET
    C{DateTimeOffset} always has an offset, so a naive datetime is a bug.

    The compiled core knows this validator and skips the call for the UTC
    datetimes the BSON decoder produces, which it always accepts.
    """
    if value.utcoffset() is None:
        raise ValueError(f"{attribute.name} must be timezone-aware (a .NET DateTimeOffset)")


# --- per-class schemas --------------------------------------------------------


@attrs.frozen
class WireField:
    """
    One serialized property: attribute name, JSON name and declared type.
    """

    attribute: str
    name: str
    type: WireType


def wire(name: str, wire_type: WireType) -> dict[str, Any]:
    """
    Field metadata naming the JSON property and its declared .NET type; use
    as C{attrs.field(metadata=wire("TaskId", STRING))}.
    """
    return {_WIRE_KEY: (name, wire_type)}


_schemas: dict[type, tuple[WireField, ...]] = {}


def fields_of(cls: type) -> tuple[WireField, ...]:
    """
    The wire schema of an attrs class, in wire order.

    @raise TypeError: C{cls} is not an attrs class whose every field has
        L{wire} metadata.
    """
    schema = _schemas.get(cls)
    if schema is None:
        if not attrs.has(cls):
            raise TypeError(f"{cls!r} is not an attrs class")
        found = []
        for field in attrs.fields(cls):
            spec = field.metadata.get(_WIRE_KEY)
            if spec is None:
                raise TypeError(f"{cls.__qualname__}.{field.name} has no wire metadata")
            found.append(WireField(field.name, spec[0], spec[1]))
        order = getattr(cls, "__wire_order__", None)
        if order is not None:
            by_name = {field.name: field for field in found}
            if sorted(order) != sorted(by_name):
                raise TypeError(f"{cls.__qualname__}.__wire_order__ does not match its fields")
            found = [by_name[name] for name in order]
        schema = _schemas[cls] = tuple(found)
    return schema


def _object_tree(value: Any, ctx: _EncodeContext, with_type: bool) -> dict[str, Any]:
    cls = type(value)
    tree: dict[str, Any] = {}
    if with_type:
        tree[_TYPE_KEY] = dotnet_type_of(cls).wire_name
    for field in fields_of(cls):
        item = getattr(value, field.attribute)
        try:
            tree[field.name] = field.type.encode(item, ctx)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{cls.__qualname__}.{field.attribute}: {e}") from None
    if cls is DataStream:
        ctx.streams.append(value)
    return tree


def _object_from_tree(cls: type[T], tree: dict[str, Any], ctx: _DecodeContext, where: str) -> T:
    folded: dict[str, str] | None = None
    kwargs: dict[str, Any] = {}
    for field in fields_of(cls):
        name = field.name
        if name not in tree:
            # Json.NET falls back to a case-insensitive match.
            if folded is None:
                folded = {key.lower(): key for key in reversed(list(tree))}
            found = folded.get(name.lower())
            if found is None:
                # Absent: the attribute's default applies, as .NET leaves
                # an unset member at its initial value.
                continue
            name = found
        kwargs[field.attribute] = field.type.decode(tree[name], ctx, f"{where}.{field.name}")
    try:
        value = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CodecError(f"{where}: cannot build {cls.__name__}: {e}") from None
    if cls is DataStream:
        ctx.streams.append(value)  # type: ignore[arg-type]
    return value


def to_tree(value: Any, wire_type: WireType = OBJECT) -> tuple[Any, list[DataStream]]:
    """
    The BSON-ready tree for C{value} in a slot of C{wire_type}, and the
    DataStreams met on the way, in serialization order.
    """
    ctx = _EncodeContext()
    return wire_type.encode(value, ctx), ctx.streams


def from_tree(
    tree: Any, registry: TypeRegistry, wire_type: WireType = OBJECT
) -> tuple[Any, list[DataStream]]:
    """
    Inverse of L{to_tree}.

    @raise CodecError: the tree does not fit C{wire_type}, or names a type
        C{registry} does not allow (L{UnknownTypeError}).
    """
    ctx = _DecodeContext(registry)
    return wire_type.decode(tree, ctx, "$"), ctx.streams


# --- Halibut's own types ------------------------------------------------------


@dotnet_type("Halibut.DataStream, Halibut")
@attrs.frozen
class DataStream:
    """
    A reference to a payload that follows the message on the connection.

    Only C{{id, length}} is inside the message; the bytes come after it, in
    the order the references were serialized.
    """

    id: uuid.UUID = attrs.field(metadata=wire("id", GUID))
    length: int = attrs.field(metadata=wire("length", INT64))

    @classmethod
    def fresh(cls, length: int) -> DataStream:
        """
        A new reference with a random id, as C{new DataStream(length, ...)}.
        """
        return cls(uuid.uuid4(), length)


@dotnet_type("Halibut.Transport.Protocol.ServerError, Halibut")
@attrs.frozen
class ServerError:
    """
    Why a call failed on the far side.

    @ivar halibut_error_type: The full .NET name of a Halibut exception (for
        example C{"Halibut.Exceptions.ServiceNotFoundHalibutClientException"}),
        which clients test to tell a missing service from a failing one.
    """

    message: str = attrs.field(metadata=wire("message", STRING))
    details: str | None = attrs.field(default=None, metadata=wire("details", Nullable(STRING)))
    halibut_error_type: str | None = attrs.field(
        default=None, metadata=wire("HalibutErrorType", Nullable(STRING))
    )


def _params(values: Iterable[Any] | None) -> tuple[Any, ...]:
    # Halibut's ServiceInvoker treats null params as no arguments.
    return () if values is None else tuple(values)


@dotnet_type("Halibut.Transport.Protocol.RequestMessage, Halibut")
@attrs.frozen
class RequestMessage:
    """
    One call: which contract interface, which (synchronous) method name, and
    the arguments in order.

    @ivar id: Echoed in the response, e.g.
        C{"IScriptServiceV2::StartScriptAsync[7] / <guid>"}.
    @ivar endpoint: The caller's C{ServiceEndPoint} exactly as received,
        uninterpreted and only kept so a message re-encodes unchanged;
        C{None} writes C{null}, which Halibut services never read.
    """

    # Halibut declares endpoint third; it is last here so callers can omit it.
    __wire_order__: ClassVar[tuple[str, ...]] = (
        "id", "activityId", "endpoint", "service", "method", "params"
    )

    id: str = attrs.field(metadata=wire("id", STRING))
    activity_id: uuid.UUID = attrs.field(metadata=wire("activityId", GUID))
    service: str = attrs.field(metadata=wire("service", STRING))
    method: str = attrs.field(metadata=wire("method", STRING))
    params: tuple[Any, ...] = attrs.field(
        factory=tuple, converter=_params, metadata=wire("params", Nullable(ListOf(OBJECT)))
    )
    endpoint: Any = attrs.field(default=None, metadata=wire("endpoint", RAW))


@dotnet_type("Halibut.Transport.Protocol.ResponseMessage, Halibut")
@attrs.frozen
class ResponseMessage:
    """
    The outcome of one call: a C{result} (C{None} for C{void}) or an C{error}.
    """

    id: str = attrs.field(metadata=wire("id", STRING))
    error: ServerError | None = attrs.field(
        default=None, metadata=wire("error", Nullable(Complex(ServerError)))
    )
    result: Any = attrs.field(default=None, metadata=wire("result", OBJECT))


Message = RequestMessage | ResponseMessage
_ENVELOPE_CLASSES: tuple[type, ...] = (RequestMessage, ResponseMessage)


# --- the envelope -------------------------------------------------------------


def encode_envelope(message: Message | None) -> tuple[dict[str, Any], list[DataStream]]:
    """
    C{{"Message": ...}} for C{message}, with C{"$type"} on the message as
    Halibut writes it (its envelope is declared C{MessageEnvelope<object>}).
    """
    if message is not None and not isinstance(message, _ENVELOPE_CLASSES):
        raise TypeError(f"expected a RequestMessage or ResponseMessage, got {_kind(message)}")
    ctx = _EncodeContext()
    body = None if message is None else _object_tree(message, ctx, with_type=True)
    return {"Message": body}, ctx.streams


def decode_envelope(
    tree: Mapping[str, Any],
    registry: TypeRegistry,
    expected: type[RequestMessage] | type[ResponseMessage] | None = None,
) -> tuple[Message | None, list[DataStream]]:
    """
    The message in an envelope tree, and its DataStream references in order.

    @param expected: The kind this side reads. Halibut's reader declares the
        envelope as C{MessageEnvelope<T>}, so a message without C{"$type"}
        is accepted as C{expected}; with C{None}, C{"$type"} is required.
    @raise CodecError: the tree is not a valid envelope.
    """
    core = accel.core
    # A registry of another class may resolve names its own way.
    if core is not None and type(registry) is TypeRegistry:
        decoded: tuple[Message | None, list[DataStream]] | None = core.decode_envelope(
            tree, registry._exact, expected, not attrs.validators.get_disabled()
        )
        if decoded is not None:
            return decoded
    return decode_envelope_python(tree, registry, expected)


def decode_envelope_python(
    tree: Mapping[str, Any],
    registry: TypeRegistry,
    expected: type[RequestMessage] | type[ResponseMessage] | None = None,
) -> tuple[Message | None, list[DataStream]]:
    """
    L{decode_envelope} in pure Python.
    """
    body = tree.get("Message")
    if body is None:
        return None, []
    _expect(isinstance(body, dict), "$.Message", "a document", body)
    cls: type
    if _TYPE_KEY in body:
        cls = registry.resolve(body[_TYPE_KEY])
        if cls not in _ENVELOPE_CLASSES or (expected is not None and cls is not expected):
            raise UnknownTypeError(f"$.Message: {cls.__name__} is not an expected message")
    elif expected is not None:
        cls = expected
    else:
        raise UnknownTypeError("$.Message: message without $type")
    ctx = _DecodeContext(registry)
    message: object = _object_from_tree(cls, body, ctx, "$.Message")
    assert isinstance(message, (RequestMessage, ResponseMessage))
    return message, ctx.streams


def encode_message(message: Message | None) -> tuple[bytes, list[DataStream]]:
    """
    The BSON of one message (before DEFLATE) and the DataStreams whose
    payloads must follow it, in that order.

    @raise TypeError: a value does not fit its declared wire type.
    @raise ValueError: a value is out of range for its .NET type.
    """
    core = accel.core
    if core is not None:
        encoded: tuple[bytes, list[DataStream]] | None = core.encode_message(
            message, _DEFAULT_LIMITS.max_depth
        )
        if encoded is not None:
            return encoded
    return encode_message_python(message)


def encode_message_python(message: Message | None) -> tuple[bytes, list[DataStream]]:
    """
    L{encode_message} in pure Python: the envelope tree, then BSON.
    """
    tree, streams = encode_envelope(message)
    return bson.encode_document_python(tree), streams


def decode_message(
    data: bytes,
    registry: TypeRegistry,
    limits: CodecLimits = _DEFAULT_LIMITS,
    expected: type[RequestMessage] | type[ResponseMessage] | None = None,
) -> tuple[Message | None, list[DataStream]]:
    """
    Inverse of L{encode_message}: the message and its DataStream references
    in the order their payloads follow on the wire.

    @raise CodecError: malformed BSON, a disallowed C{"$type"}
        (L{UnknownTypeError}), or values that do not fit the contract.
    """
    return decode_envelope(bson.decode_document(data, limits), registry, expected)


# --- plans for the compiled core ------------------------------------------------
#
# A plan is how the core walks one class, as plain tuples:
#   plan      = (cls, type_element | None, fields, construction)
#   field     = (attribute, key_bytes, key_str, spec)
#   spec      = (tag, ...)               the tags below; _codec.c has the same
#   construction = (_CALL,) | (_SLOTS, setters, validators)
# type_element is the BSON of the class's "$type" member, ready to copy.

_T_STRING, _T_BOOLEAN, _T_INT32, _T_INT64, _T_GUID, _T_TIMESPAN = range(6)
_T_DATETIMEOFFSET, _T_OBJECT, _T_RAW, _T_ENUM, _T_NULLABLE, _T_LIST = range(6, 12)
_T_ENUMDICT, _T_COMPLEX, _T_UNSUPPORTED = range(12, 15)
_CALL, _SLOTS = 0, 1

_SIMPLE_SPECS: dict[type, int] = {
    _String: _T_STRING,
    _Boolean: _T_BOOLEAN,
    _Int32: _T_INT32,
    _Int64: _T_INT64,
    _Guid: _T_GUID,
    _TimeSpan: _T_TIMESPAN,
    _DateTimeOffset: _T_DATETIMEOFFSET,
    _Object: _T_OBJECT,
    _Raw: _T_RAW,
}

_FROZEN_SETATTR: Any
try:  # how attrs marks frozen classes; without it, they are simply called
    from attr._make import _frozen_setattrs as _FROZEN_SETATTR
except ImportError:  # pragma: no cover - another attrs
    _FROZEN_SETATTR = None

_plans: dict[type, tuple[Any, ...] | None] = {}


def _int_enum(cls: object) -> bool:
    return (
        isinstance(cls, type)
        and issubclass(cls, IntEnum)
        and all(type(member.value) is int for member in cls)
    )


def _spec(wire_type: WireType) -> tuple[Any, ...]:
    """
    The core's view of a wire type; anything it does not know (a WireType
    defined elsewhere) makes it decline, so the type's own code runs.
    """
    kind = type(wire_type)
    if kind in _SIMPLE_SPECS:
        return (_SIMPLE_SPECS[kind],)
    if kind is EnumOf and _int_enum(wire_type.cls):  # type: ignore[attr-defined]
        enum_cls: type[IntEnum] = wire_type.cls  # type: ignore[attr-defined]
        return (_T_ENUM, enum_cls, {member.value: member for member in enum_cls})
    if kind is Nullable:
        return (_T_NULLABLE, _spec(wire_type.inner))  # type: ignore[attr-defined]
    if kind is ListOf:
        return (_T_LIST, _spec(wire_type.item))  # type: ignore[attr-defined]
    if kind is EnumKeyedDict and _int_enum(wire_type.key):  # type: ignore[attr-defined]
        key: type[IntEnum] = wire_type.key  # type: ignore[attr-defined]
        return (
            _T_ENUMDICT,
            key,
            _spec(wire_type.value),  # type: ignore[attr-defined]
            {member: member.name for member in key},
            {member.name: member for member in key},
        )
    if kind is Complex:
        return (_T_COMPLEX, wire_type.cls)  # type: ignore[attr-defined]
    return (_T_UNSUPPORTED,)


def _string_element(key: str, value: str) -> bytes:
    text = value.encode("utf-8")
    return b"\x02" + key.encode("utf-8") + b"\x00" + struct.pack("<i", len(text) + 1) + text + b"\x00"


def _construction(cls: type, schema: tuple[WireField, ...]) -> tuple[Any, ...]:
    """
    How the core builds C{cls}: slot by slot, exactly as the attrs-generated
    C{__init__} does (converters, slots, then validators), when the class is
    a plain slotted attrs class whose C{__init__} does nothing else; by
    calling C{cls(**kwargs)} otherwise.
    """
    call = (_CALL,)
    init = cls.__dict__.get("__init__")
    code = getattr(init, "__code__", None)
    if (
        cls.__mro__ != (cls, object)
        or cls.__new__ is not object.__new__
        or "__attrs_pre_init__" in cls.__dict__
        or "__attrs_post_init__" in cls.__dict__
        or code is None
        or not code.co_filename.startswith("<attrs generated")
        or cls.__setattr__ not in (object.__setattr__, _FROZEN_SETATTR)
    ):
        return call
    fields = attrs.fields(cls)
    index = {field.attribute: i for i, field in enumerate(schema)}
    names = {field.name for field in fields}
    slots = cls.__dict__.get("__slots__")
    if (
        set(index) != names
        or not isinstance(slots, tuple)
        or not set(slots) <= names | {"__weakref__"}
    ):
        return call
    converter_class = getattr(attrs, "Converter", None)
    setters = []
    validators = []
    for field in fields:
        descriptor = cls.__dict__.get(field.name)
        converter = field.converter
        if (
            not field.init
            or field.alias != field.name
            or type(descriptor) is not MemberDescriptorType
            or (converter is not None and not callable(converter))
            or (converter_class is not None and isinstance(converter, converter_class))
        ):
            return call
        setters.append((index[field.name], descriptor, converter))
        if field.validator is not None:
            validators.append((index[field.name], field.validator, field))
    return (_SLOTS, tuple(setters), tuple(validators))


def _plan(cls: type) -> tuple[Any, ...] | None:
    try:
        schema = fields_of(cls)
    except TypeError:
        return None  # not a wire class: the pure code says why
    if any("\x00" in field.name for field in schema):
        return None
    info = cls.__dict__.get(_DOTNET_KEY)
    type_element = None
    if isinstance(info, DotNetType):
        try:
            type_element = _string_element(_TYPE_KEY, info.wire_name)
        except UnicodeEncodeError:
            pass
    try:
        fields = tuple(
            (field.attribute, field.name.encode("utf-8"), field.name, _spec(field.type))
            for field in schema
        )
    except UnicodeEncodeError:
        return None
    return (cls, type_element, fields, _construction(cls, schema))


def _plan_for(cls: type) -> tuple[Any, ...] | None:
    """
    The plan of C{cls}, made once; C{None} for a class the pure code handles.
    """
    # Never replaced once stored: the core holds plans as borrowed
    # references, and two threads may make the same plan at once.
    return _plans.setdefault(cls, _plan(cls))


def _configure(core: ModuleType) -> None:
    core.configure_objects(
        timespan=TimeSpan,
        timespan_ticks=TimeSpan.__dict__["ticks"],
        timespan_parse=TimeSpan.parse,
        datastream=DataStream,
        request=RequestMessage,
        response=ResponseMessage,
        plans=_plans,
        plan_for=_plan_for,
        require_aware=require_aware,
    )


accel.register(_configure)
