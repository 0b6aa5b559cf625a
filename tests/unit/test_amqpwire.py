"""The relay's message properties, encoded in one pass by ``LeanMessage``, are the bytes py-amqp's encoder writes.

RabbitMQ reads what py-amqp writes; a byte of difference would be a malformed or altered
message. Each case builds the same properties both ways and compares the bytes; values the
one-pass encoder does not write (a ``Decimal``, a ``datetime``, a ``str`` subclass, a key
longer than a short string) go to py-amqp's encoder whole, and a value py-amqp refuses is
refused with py-amqp's own error.
"""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from decimal import Decimal
from typing import Any

import amqp
import pytest

from orch_outbox.amqpwire import LeanMessage


def _both(**properties: Any) -> tuple[bytes, bytes]:
    expected = amqp.Message(b"{}", **properties)._serialize_properties()
    return bytes(expected), LeanMessage(b"{}", **properties)._serialize_properties()


def _relay_headers(task_id: str) -> dict[str, Any]:
    """The headers of a command's message (``Messages.publish``), a trace context among them."""
    return {
        "lang": "py",
        "task": "send_email",
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": "2026-12-07T10:00:00+00:00",
        "group": None,
        "group_index": None,
        "retries": 2,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{'to': 'ada@example.com'}",
        "origin": "gen4242@host",
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        "outbox": [task_id, 3, 60.0],
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }


def test_a_relay_message_encodes_to_py_amqps_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Proves the properties of a command's message (content type, encoding, Celery's headers, delivery mode,
    priority, correlation id, reply-to, a TTL) encode to exactly py-amqp's bytes, by the one-pass encoder itself:
    py-amqp's is out of reach once the expected bytes are taken."""
    task_id = str(uuid.uuid4())
    properties = dict(
        content_type="application/json",
        content_encoding="utf-8",
        application_headers=_relay_headers(task_id),
        delivery_mode=1,
        priority=3,
        correlation_id=task_id,
        reply_to="d9f3c6a2-3b1e-3e0f-9c0e-5c8e0b1a2f34",
        expiration="3600000",
    )
    expected = bytes(amqp.Message(b"{}", **properties)._serialize_properties())

    def refused(self: Any) -> bytes:
        raise AssertionError("py-amqp's encoder was used")

    monkeypatch.setattr(amqp.Message, "_serialize_properties", refused)
    assert LeanMessage(b"{}", **properties)._serialize_properties() == expected


VALUES = [
    pytest.param("", id="empty-string"),
    pytest.param("naïve ✓ \udcff", id="unicode-and-lone-surrogate"),
    pytest.param(b"\x00\xffraw", id="bytes"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param(0, id="zero"),
    pytest.param(2147483647, id="int32-max"),
    pytest.param(2147483648, id="past-int32"),
    pytest.param(-2147483647, id="int32-min-as-py-amqp-bounds-it"),
    pytest.param(-2147483648, id="past-int32-negative"),
    pytest.param(2**62, id="int64"),
    pytest.param(1.5, id="float"),
    pytest.param(float("inf"), id="infinity"),
    pytest.param(None, id="none"),
    pytest.param([], id="empty-list"),
    pytest.param((1, "a", None, [True, {"k": 2.5}]), id="nested-tuple"),
    pytest.param({}, id="empty-table"),
    pytest.param({"a": {"b": {"c": [1, 2, {"d": None}]}}, "é": "x" * 300}, id="nested-table"),
]


@pytest.mark.parametrize("value", VALUES)
def test_every_header_value_the_relay_writes_encodes_to_py_amqps_bytes(value: Any) -> None:
    """Proves each kind of value a header can hold (strings, bytes, booleans, integers on both sides of the 32-bit
    bound, floats, None, lists, tuples, tables, nested) is written as py-amqp writes it."""
    expected, lean = _both(application_headers={"value": value, "after": "still aligned"}, priority=0)
    assert lean == expected


class _Name(str):
    pass


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"when": dt.datetime(2026, 12, 7, 9, 30, tzinfo=dt.UTC)}, id="datetime"),
        pytest.param({"price": Decimal("12.50")}, id="decimal"),
        pytest.param({"name": _Name("subclass")}, id="str-subclass"),
    ],
)
def test_values_it_does_not_write_go_to_py_amqps_encoder_whole(headers: dict[str, Any]) -> None:
    """Proves a message holding a value outside the one-pass encoder's types still gets py-amqp's exact bytes:
    nothing is written half one way, half the other."""
    expected, lean = _both(application_headers=headers)
    assert lean == expected


@pytest.mark.parametrize(
    "properties",
    [
        pytest.param({"correlation_id": "x" * 256}, id="short-string-past-255-bytes"),
        pytest.param({"application_headers": {"k" * 256: 1}}, id="header-name-past-255-bytes"),
        pytest.param({"priority": 256}, id="octet-past-255"),
    ],
)
def test_a_property_py_amqp_refuses_is_refused_with_its_error(properties: dict[str, Any]) -> None:
    """Proves what AMQP cannot carry (a short string or a header name past 255 bytes, an octet past 255) is
    refused as py-amqp refuses it (struct.error), not sent cut short."""
    with pytest.raises(struct.error):
        amqp.Message(b"", **properties)._serialize_properties()
    with pytest.raises(struct.error):
        LeanMessage(b"", **properties)._serialize_properties()


def test_a_message_without_properties_encodes_as_py_amqps() -> None:
    """Proves the edge of no property at all (flags only) matches too."""
    expected, lean = _both()
    assert lean == expected
