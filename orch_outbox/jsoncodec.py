"""Strict JSON for inputs and outputs, with typed round trips.

Encoding turns a value into plain JSON data (dict, list, str, int, float, bool, None) or
raises :class:`~orch_outbox.errors.InvalidInput` naming where the bad value sits. It is
stricter than ``json.dumps``: no NaN or infinity, no NUL characters (PostgreSQL's jsonb
refuses them), no naive datetimes, no non-string keys, no bytes, nothing it would have to
guess at. Dataclasses, pydantic models, enums, UUIDs, decimals and aware datetimes are
turned into JSON; :func:`decode` rebuilds them from a type annotation.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import functools
import inspect
import json
import math
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

from .errors import InvalidInput

JSON = Any
#: Largest integer stored (about 1000 decimal digits; Python refuses to print more than 4300).
MAX_INT_BITS = 3322


def encode(value: Any, where: str = "value") -> JSON:
    """Plain JSON data for ``value``, or :class:`InvalidInput` saying what is wrong and where."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInput(f"{where}: NUL characters cannot be stored")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{where}: not valid Unicode text ({exc.reason} at {exc.start})") from None
        return value
    if isinstance(value, int) and not isinstance(value, enum.Enum):
        if value.bit_length() > MAX_INT_BITS:
            raise InvalidInput(f"{where}: an integer of {value.bit_length()} bits is too large to store as JSON")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInput(f"{where}: {value!r} is not valid JSON")
        return value
    if isinstance(value, enum.Enum):
        return encode(value.value, where)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInput(f"{where}: mapping key {key!r} is not a string")
            out[encode(key, where)] = encode(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, type):
        raise InvalidInput(f"{where}: the class {value.__name__} was given where an instance belongs")
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic v2
        _refuse_naive(value.model_dump(), where)  # the JSON dump would hide a naive datetime
        return encode(value.model_dump(mode="json"), where)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise InvalidInput(f"{where}: naive datetime {value!r}; pass a timezone-aware one")
        return value.isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidInput(f"{where}: {value!r} is not valid JSON")
        return str(value)
    raise InvalidInput(f"{where}: a {type(value).__name__} cannot be stored as JSON")


def _refuse_naive(value: Any, where: str) -> None:
    if isinstance(value, dt.datetime) and (value.tzinfo is None or value.utcoffset() is None):
        raise InvalidInput(f"{where}: naive datetime {value!r}; pass a timezone-aware one")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_naive(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_naive(item, f"{where}[{i}]")


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(data: JSON) -> str:
    """Compact JSON text of already-encoded data."""
    return _COMPACT.encode(data)


def check_size(data: JSON, limit: int, where: str) -> str:
    """Refuse encoded data larger than ``limit`` bytes; returns its JSON text."""
    text = dumps(data)
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes in UTF-8
        return text
    size = len(text.encode())
    if size > limit:
        raise InvalidInput(f"{where} is {size} bytes encoded; the limit (outbox_max_input_bytes) is {limit}")
    return text


class Arguments(dict[str, JSON]):
    """Encoded arguments that keep their JSON text once it was computed (a bulk push writes it as is)."""

    __slots__ = ("text",)

    text: str


#: JSON's own scalar types: a value of exactly the annotated one is returned as stored.
_PLAIN = frozenset({str, int, float, bool})


def decode(data: JSON, annotation: Any) -> Any:
    """Rebuild a typed value from JSON data, guided by a type annotation."""
    if annotation in (inspect.Parameter.empty, Any, None, object) or data is None:
        return data
    if type(data) is annotation and annotation in _PLAIN:  # a str for a str, an int for an int...: as stored
        return data
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _decode_union(data, typing.get_args(annotation))
    if origin is typing.Literal or isinstance(annotation, typing.TypeVar):
        return data
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple, set, frozenset):
        args = typing.get_args(annotation)
        container = origin or annotation
        if container is tuple and args and args[-1] is not Ellipsis:
            return tuple(decode(v, a) for v, a in zip(data, args, strict=False))
        item = args[0] if args else Any
        return container(decode(v, item) for v in data)
    if origin in (dict, Mapping) or annotation is dict:
        args = typing.get_args(annotation)
        value_type = args[1] if len(args) == 2 else Any
        return {k: decode(v, value_type) for k, v in data.items()}
    if not isinstance(annotation, type):
        return data
    if dataclasses.is_dataclass(annotation):
        hints = typing.get_type_hints(annotation)
        fields = {f.name for f in dataclasses.fields(annotation) if f.init}
        return annotation(**{k: decode(v, hints.get(k, Any)) for k, v in data.items() if k in fields})
    validate = getattr(annotation, "model_validate", None)
    if callable(validate):
        return validate(data)
    return _decode_scalar(data, annotation)


def _decode_union(data: JSON, members: tuple[Any, ...]) -> Any:
    candidates = [m for m in members if m is not type(None)]
    for member in candidates:
        try:
            return decode(data, member)
        except (TypeError, ValueError, KeyError):
            continue
    return data


_SCALARS: dict[type, Callable[[Any], Any]] = {
    dt.datetime: dt.datetime.fromisoformat,
    dt.date: dt.date.fromisoformat,
    dt.time: dt.time.fromisoformat,
    uuid.UUID: uuid.UUID,
    Decimal: Decimal,
}


def _decode_scalar(data: JSON, annotation: type) -> Any:
    if isinstance(data, annotation) and not issubclass(annotation, enum.Enum):
        return data
    for kind, parse in _SCALARS.items():
        if issubclass(annotation, kind):
            return parse(data)
    if issubclass(annotation, enum.Enum):
        return annotation(data)
    if annotation is float and isinstance(data, int):
        return float(data)
    return data


def encode_arguments(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, JSON]:
    """Bind a call to a handler's signature and encode it as a JSON object, one key per parameter."""
    return _encode_bound(signature, _plain_names(signature), args, kwargs)


def argument_encoder(signature: inspect.Signature) -> Callable[[tuple[Any, ...], dict[str, Any]], Arguments]:
    """:func:`encode_arguments` for one signature, with the signature's analysis done once (bulk pushes)."""
    names = _plain_names(signature)
    return lambda args, kwargs: _encode_bound(signature, names, args, kwargs)


def _encode_bound(
    signature: inspect.Signature, names: tuple[str, ...] | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Arguments:
    arguments = _quick_bind(names, args, kwargs)
    if arguments is None:
        try:
            arguments = signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise InvalidInput(f"arguments do not match the handler: {exc}") from None
    return Arguments([(name, encode(value, name)) for name, value in arguments.items()])


@functools.lru_cache(maxsize=512)
def _plain_parameters(signature: inspect.Signature) -> tuple[str, ...] | None:
    """The parameter names of a signature made only of required positional-or-keyword parameters, else None."""
    names = []
    for param in signature.parameters.values():
        if param.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or param.default is not inspect.Parameter.empty:
            return None
        names.append(param.name)
    return tuple(names)


#: :func:`_names_of` per signature object, looked up by identity (hashing a signature costs more than decoding).
_BY_SIGNATURE: dict[int, tuple[inspect.Signature, tuple[str, ...] | None]] = {}


def _plain_names(signature: inspect.Signature) -> tuple[str, ...] | None:
    """:func:`_names_of` for a handler's signature, kept per signature object (a worker decodes per command, a
    caller encodes per push)."""
    entry = _BY_SIGNATURE.get(id(signature))
    if entry is None or entry[0] is not signature:
        entry = (signature, _names_of(signature))
        if len(_BY_SIGNATURE) < 4096:  # bounded: a process has as many as it has handlers
            _BY_SIGNATURE[id(signature)] = entry
    return entry[1]


def _names_of(signature: inspect.Signature) -> tuple[str, ...] | None:
    try:
        return _plain_parameters(signature)
    except TypeError:  # an unhashable annotation: no cache for this one
        return _plain_parameters.__wrapped__(signature)


def _quick_bind(names: tuple[str, ...] | None, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The common case bound without ``Signature.bind`` (a bulk push binds thousands); None: use ``bind``."""
    if names is None or len(args) + len(kwargs) != len(names):
        return None
    if not kwargs:
        return dict(zip(names, args, strict=True))
    arguments = dict(zip(names, args, strict=False))
    for name, value in kwargs.items():
        if name in arguments or name not in names:
            return None
        arguments[name] = value
    return {name: arguments[name] for name in names}


_RESULT: Any = object()


def encode_arguments_with_result(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[dict[str, JSON], str]:
    """Like :func:`encode_arguments`, with the first positional parameter left for a result to come.

    Returns the encoded arguments and the name of the parameter that will receive the
    previous step's result (as Celery passes a chain's result as the first argument).
    """
    try:
        bound = signature.bind(_RESULT, *args, **kwargs)
    except TypeError as exc:
        raise InvalidInput(
            f"arguments do not match the handler, whose first parameter takes the result: {exc}"
        ) from None
    pass_as = next((name for name, value in bound.arguments.items() if value is _RESULT), None)
    if pass_as is None:
        raise InvalidInput("the handler needs a named first parameter to receive the previous result (not *args)")
    encoded = {name: encode(value, name) for name, value in bound.arguments.items() if name != pass_as}
    return encoded, pass_as


def decode_arguments(
    signature: inspect.Signature, hints: Mapping[str, Any], data: Mapping[str, JSON]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments for a handler, rebuilt from its stored input."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"stored input must be a JSON object of arguments, not {type(data).__name__}")
    names = _plain_names(signature)
    if names is not None and len(names) == len(data) and all(name in data for name in names):
        # every parameter required, positional-or-keyword, and given: positional, in order (as bind would have it)
        return tuple(decode(data[name], hints.get(name, Any)) for name in names), {}
    arguments: dict[str, Any] = {}
    for name, value in data.items():
        param = signature.parameters.get(name)
        if param is None:
            raise InvalidInput(f"stored input names an unknown parameter {name!r}")
        hint = hints.get(name, Any)
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            arguments[name] = tuple(decode(v, hint) for v in value)
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments[name] = {k: decode(v, hint) for k, v in value.items()}
        else:
            arguments[name] = decode(value, hint)
    bound = inspect.BoundArguments(signature, arguments)  # type: ignore[arg-type]
    return bound.args, bound.kwargs
