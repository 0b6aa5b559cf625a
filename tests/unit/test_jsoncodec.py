"""The strict JSON codec: typed round trips, and loud refusals that say where the bad value is."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import inspect
import json
import math
import typing
import uuid
from decimal import Decimal
from typing import Any

import pydantic
import pytest

from orch_outbox import InvalidInput
from orch_outbox.jsoncodec import check_size, decode, decode_arguments, dumps, encode, encode_arguments

UTC = dt.UTC
PARIS_SUMMER = dt.timezone(dt.timedelta(hours=2), "CEST")


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 5


@dataclasses.dataclass
class Attachment:
    filename: str
    size: int


@dataclasses.dataclass
class Email:
    to: str
    subject: str
    attachments: list[Attachment] = dataclasses.field(default_factory=list)
    reply_to: str | None = None
    color: Color = Color.RED
    sent_at: dt.datetime | None = None


@dataclasses.dataclass
class Envelope:
    email: Email
    cc: list[Email]
    note: typing.Optional[Attachment] = None  # noqa: UP045 - the old spelling must work too
    tags: dict[str, int] = dataclasses.field(default_factory=dict)


class Customer(pydantic.BaseModel):
    id: uuid.UUID
    name: str
    balance: Decimal
    since: dt.date
    level: Level = Level.LOW


class Order(pydantic.BaseModel):
    customer: Customer
    lines: list[Attachment]
    placed_at: dt.datetime


def roundtrip(value: Any, annotation: Any) -> Any:
    """Encode, pass through real JSON text, decode with the annotation."""
    data = json.loads(dumps(encode(value)))
    return decode(data, annotation)


# -- round trips -----------------------------------------------------------------------


def test_nested_dataclass_round_trip() -> None:
    """Nested dataclasses, list[dataclass] fields, Optional fields and enums come back equal and typed."""
    email = Email(
        "a@example.com",
        "hi",
        attachments=[Attachment("a.pdf", 10), Attachment("b.png", 20)],
        reply_to=None,
        color=Color.BLUE,
        sent_at=dt.datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
    )
    env = Envelope(email=email, cc=[Email("c@example.com", "cc")], note=Attachment("n.txt", 1), tags={"x": 1})
    back = roundtrip(env, Envelope)
    assert back == env
    assert isinstance(back.email.attachments[0], Attachment)
    assert isinstance(back.cc[0], Email)
    assert back.email.color is Color.BLUE
    assert isinstance(back.note, Attachment)
    assert back.email.sent_at.tzinfo is not None


def test_dataclass_encodes_to_plain_json_object() -> None:
    """A dataclass becomes a JSON object keyed by field names, with enums as their values."""
    data = encode(Email("a@b", "s", [Attachment("f", 1)], color=Color.BLUE))
    assert data == {
        "to": "a@b",
        "subject": "s",
        "attachments": [{"filename": "f", "size": 1}],
        "reply_to": None,
        "color": "blue",
        "sent_at": None,
    }


def test_optional_none_round_trip() -> None:
    """Optional fields left as None stay None."""
    env = Envelope(email=Email("a", "b"), cc=[], note=None)
    assert roundtrip(env, Envelope) == env


def test_pydantic_model_round_trip() -> None:
    """pydantic v2 models (with UUID, Decimal, date, IntEnum, nested models) round-trip through JSON."""
    order = Order(
        customer=Customer(
            id=uuid.uuid4(), name="Ann", balance=Decimal("10.25"), since=dt.date(2020, 2, 29), level=Level.HIGH
        ),
        lines=[Attachment("x", 3)],
        placed_at=dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=PARIS_SUMMER),
    )
    back = roundtrip(order, Order)
    assert isinstance(back, Order)
    assert back == order
    assert back.placed_at.utcoffset() == dt.timedelta(hours=2)


@pytest.mark.parametrize(
    ("value", "annotation"),
    [
        (Color.BLUE, Color),
        (Level.HIGH, Level),
        (uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID),
        (Decimal("3.14159265358979323846264338327950288"), Decimal),
        (Decimal("-0.10"), Decimal),
        (dt.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC), dt.datetime),
        (dt.datetime(2024, 6, 1, 8, 0, tzinfo=PARIS_SUMMER), dt.datetime),
        (dt.date(1999, 12, 31), dt.date),
        (1.5, float),
        (3, int),
        ("text with ünïcode ✓", str),
        (True, bool),
        ([1, 2, 3], list[int]),
        ((1, "a"), tuple[int, str]),
        ((1, 2, 3), tuple[int, ...]),
        ({"a": Color.RED}, dict[str, Color]),
        ([uuid.UUID(int=1), None], list[uuid.UUID | None]),
    ],
)
def test_scalar_round_trips(value: Any, annotation: Any) -> None:
    """Each supported scalar type comes back equal and of the same type."""
    back = roundtrip(value, annotation)
    assert back == value
    assert type(back) is type(value)


def test_decimal_keeps_precision_and_exponent() -> None:
    """Decimals are stored as strings, so no digit is lost to float conversion."""
    value = Decimal("0.1000000000000000000000001")
    assert encode(value) == "0.1000000000000000000000001"
    assert roundtrip(value, Decimal) == value


def test_datetime_keeps_offset() -> None:
    """An aware datetime keeps its instant and offset."""
    value = dt.datetime(2024, 6, 1, 8, 0, tzinfo=PARIS_SUMMER)
    back = roundtrip(value, dt.datetime)
    assert back == value and back.utcoffset() == dt.timedelta(hours=2)


def test_int_for_float_annotation_becomes_float() -> None:
    """JSON has one number type; ``1`` for a float parameter is decoded as ``1.0``."""
    back = decode(1, float)
    assert back == 1.0 and type(back) is float


def test_unannotated_values_pass_through_as_json() -> None:
    """Without an annotation a value comes back as plain JSON data."""
    assert decode({"a": [1, "x"]}, inspect.Parameter.empty) == {"a": [1, "x"]}
    assert decode({"a": 1}, Any) == {"a": 1}


def test_dataclass_decode_ignores_unknown_keys() -> None:
    """A stored object with an extra key (an older/newer field set) still decodes."""
    assert decode({"filename": "f", "size": 2, "legacy": True}, Attachment) == Attachment("f", 2)


# -- arguments -------------------------------------------------------------------------


def handler(a: int, /, b: Email, *args: Color, flag: bool = False, **kwargs: Decimal) -> None:
    """Positional-only, regular, *args, keyword-only and **kwargs parameters."""


def test_encode_arguments_is_a_json_object_per_parameter() -> None:
    """Arguments are bound to the signature: one key per parameter, *args as a list, **kwargs as an object."""
    sig = inspect.signature(handler)
    data = encode_arguments(sig, (1, Email("t", "s"), Color.RED, Color.BLUE), {"flag": True, "x": Decimal("1.5")})
    assert data == {
        "a": 1,
        "b": encode(Email("t", "s")),
        "args": ["red", "blue"],
        "flag": True,
        "kwargs": {"x": "1.5"},
    }
    json.loads(dumps(data))  # valid JSON text


def test_arguments_round_trip_with_all_parameter_kinds() -> None:
    """decode_arguments rebuilds the exact call, typed, from the stored JSON."""
    sig = inspect.signature(handler)
    hints = typing.get_type_hints(handler)
    email = Email("t", "s", [Attachment("a", 1)])
    data = json.loads(dumps(encode_arguments(sig, (7, email, Color.BLUE), {"flag": True, "y": Decimal("2.50")})))
    args, kwargs = decode_arguments(sig, hints, data)
    assert args == (7, email, Color.BLUE)
    assert isinstance(args[1], Email) and args[2] is Color.BLUE
    assert kwargs == {"flag": True, "y": Decimal("2.50")}
    assert isinstance(kwargs["y"], Decimal)


def test_defaults_are_not_stored() -> None:
    """Parameters left at their default are not written (the handler's default applies on the worker)."""
    sig = inspect.signature(handler)
    assert encode_arguments(sig, (1, Email("t", "s")), {}) == {"a": 1, "b": encode(Email("t", "s"))}
    args, kwargs = decode_arguments(sig, typing.get_type_hints(handler), {"a": 1, "b": encode(Email("t", "s"))})
    assert args == (1, Email("t", "s")) and kwargs == {}


def test_positional_only_passed_by_keyword_is_refused() -> None:
    """A positional-only parameter given by name does not bind: InvalidInput."""
    with pytest.raises(InvalidInput, match="do not match"):
        encode_arguments(inspect.signature(handler), (), {"a": 1, "b": Email("t", "s")})


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((), {}), ((1,), {}), ((1, 2, 3), {"b": 4}), ((1, 2), {"c": 3})],
)
def test_arguments_not_matching_signature_refused(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Missing, duplicated or unexpected arguments raise InvalidInput naming the mismatch."""

    def two(a: int, b: int) -> None: ...

    with pytest.raises(InvalidInput, match="arguments do not match the handler"):
        encode_arguments(inspect.signature(two), args, kwargs)


def test_a_plain_signature_is_rebuilt_positionally_and_typed() -> None:
    """The common handler (every parameter required, positional-or-keyword) is called with every argument in
    order and typed as before: an int stored for a float comes back a float, a dataclass a dataclass, an
    unannotated value as stored; a stored input missing one of them still binds the general way."""

    def plain(a: int, b: float, c: str, d: Email, e) -> None:  # type: ignore[no-untyped-def]
        ...

    sig, hints = inspect.signature(plain), typing.get_type_hints(plain)
    email = Email("t", "s")
    args, kwargs = decode_arguments(sig, hints, {"a": 1, "b": 2, "c": "x", "d": encode(email), "e": [1]})
    assert args == (1, 2.0, "x", email, [1]) and kwargs == {}
    assert type(args[1]) is float and isinstance(args[3], Email)
    assert decode_arguments(sig, hints, {"a": 1, "c": "x"}) == ((1,), {"c": "x"})


def test_decode_arguments_refuses_unknown_stored_parameter() -> None:
    """A hand-written row naming a parameter the handler lacks is refused (no blind **splat)."""

    def one(a: int) -> None: ...

    with pytest.raises(InvalidInput, match="unknown parameter 'evil'"):
        decode_arguments(inspect.signature(one), {}, {"a": 1, "evil": 2})


# -- refusals --------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (math.nan, "nan"),
        (math.inf, "inf"),
        (-math.inf, "inf"),
        (Decimal("NaN"), "NaN"),
        (Decimal("Infinity"), "Infinity"),
        ("a\x00b", "NUL"),
        (dt.datetime(2024, 1, 1, 12, 0), "naive"),
        (b"bytes", "bytes"),
        (bytearray(b"x"), "bytearray"),
        ({1, 2}, "set"),
        (frozenset({1}), "frozenset"),
        (object(), "object"),
        (Opaque(), "Opaque"),
        (1 + 2j, "complex"),
        (lambda: 1, "function"),
        ({1: "a"}, "not a string"),
        ({("t",): 1}, "not a string"),
        ({"a\x00": 1}, "NUL"),
    ],
)
def test_refused_values(value: Any, fragment: str) -> None:
    """Values JSON (or PostgreSQL's jsonb) cannot hold faithfully raise InvalidInput, not a generic error."""
    with pytest.raises(InvalidInput) as info:
        encode(value, "arg")
    assert fragment in str(info.value)
    assert str(info.value).startswith("arg")


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (Email("x\x00", "s"), "email.to"),
        (Email("x", "s", [Attachment("ok", 1), Attachment("f", math.nan)]), "email.attachments[1].size"),
        (Email("x", "s", sent_at=dt.datetime(2024, 1, 1)), "email.sent_at"),
        ({"k": [1, {"deep": b"x"}]}, "email['k'][1]['deep']"),
        ([0, {1, 2}], "email[1]"),
        ({"meta": {3: "x"}}, "email['meta']"),
    ],
)
def test_error_names_where_the_bad_value_is(value: Any, where: str) -> None:
    """The message starts with the path to the bad value inside the argument."""
    with pytest.raises(InvalidInput) as info:
        encode(value, "email")
    assert str(info.value).startswith(where + ":"), str(info.value)


def test_encode_arguments_error_names_the_parameter() -> None:
    """A bad value in an argument is reported under the parameter's name (``email.to``)."""

    def send(email: Email, retries: int = 0) -> None: ...

    with pytest.raises(InvalidInput, match=r"^email\.to: NUL"):
        encode_arguments(inspect.signature(send), (Email("a\x00", "s"),), {})


def test_naive_datetime_inside_pydantic_model_refused() -> None:
    """A pydantic model is encoded via its JSON dump, yet a naive datetime inside it is still refused."""

    class Event(pydantic.BaseModel):
        at: dt.datetime

    with pytest.raises(InvalidInput, match="naive"):
        encode(Event(at=dt.datetime(2024, 1, 1)), "event")


def test_lone_surrogate_refused() -> None:
    """A lone UTF-16 surrogate cannot be encoded as UTF-8 nor stored in jsonb: InvalidInput naming where."""
    with pytest.raises(InvalidInput) as info:
        encode({"s": "\ud800"}, "note")
    assert str(info.value).startswith("note")


def test_model_class_instead_of_instance_refused() -> None:
    """Passing a pydantic model *class* (a common slip) is a clear InvalidInput, not a TypeError from pydantic."""
    with pytest.raises(InvalidInput, match="customer"):
        encode(Customer, "customer")


def test_dataclass_class_instead_of_instance_refused() -> None:
    """Passing a dataclass *class* is refused rather than encoded as something."""
    with pytest.raises(InvalidInput):
        encode(Attachment, "att")


def test_check_size_counts_utf8_bytes() -> None:
    """The size limit is on UTF-8 bytes of the compact JSON text, not on characters."""
    data = encode({"s": "é" * 600})  # 600 characters, 1200 bytes
    check_size(data, 2000, "input")
    with pytest.raises(InvalidInput, match="outbox_max_input_bytes"):
        check_size(data, 1100, "input of cmd")


def test_dumps_is_strict_and_compact() -> None:
    """dumps never writes NaN and uses no spaces."""
    assert dumps({"a": [1, 2]}) == '{"a":[1,2]}'
    with pytest.raises(ValueError):
        dumps({"a": math.nan})
