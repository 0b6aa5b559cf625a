"""How the relay's messages go on py-amqp's wire: a batch in few socket writes, its properties encoded in one pass.

Two costs of py-amqp's publish are paid once per message where the relay needs them once
per batch, or not at all; on the relay's own channel only, and only on py-amqp (RabbitMQ):

- :func:`coalesced_writes`: the frames of a batch's messages are held and written
  together, and py-amqp's look for a broker notification before each publish (a read of
  the socket that cannot wait) is made once per batch: nothing of the batch reaches the
  broker before its end, so nothing the broker says can change in between;
- :class:`LeanMessage`: a message's properties (Celery's twenty-odd headers among them)
  are encoded by one pass over their values instead of py-amqp's generic serializer, into
  the same bytes (``tests/unit/test_amqpwire.py`` checks them against py-amqp's); a value
  of any other type than the relay writes leaves the whole message to py-amqp's encoder.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from struct import Struct, pack
from typing import Any

import amqp
from kombu.transport import pyamqp

#: Most bytes of messages held back before they are sent anyway (a batch of large messages goes in several writes).
COALESCE_BYTES = 256 * 1024

_U8, _U16, _U32 = Struct("B"), Struct(">H"), Struct(">I")
_LONG_STR, _INT, _LONG, _DOUBLE = Struct(">cI"), Struct(">ci"), Struct(">cq"), Struct(">cd")
#: py-amqp's bounds of a table's 32-bit integer (wider ones go as 64-bit)
_INT_MAX = 2147483647


class _Unusual(Exception):
    """A value the one-pass writer does not write (or not as py-amqp would): the message goes to py-amqp's encoder."""


def _text(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value


def _item(value: Any, out: list[bytes]) -> None:
    """``value`` as py-amqp's ``_write_item`` writes it into a field table or array, for the types the relay uses."""
    kind = type(value)
    if kind is str or kind is bytes:
        data = _text(value)
        out += (_LONG_STR.pack(b"S", len(data)), data)
    elif value is None:
        out.append(b"V")
    elif kind is bool:
        out.append(b"t\x01" if value else b"t\x00")
    elif kind is int:
        out.append(_LONG.pack(b"L", value) if value > _INT_MAX or value < -_INT_MAX else _INT.pack(b"I", value))
    elif kind is float:
        out.append(_DOUBLE.pack(b"d", value))
    elif kind is dict:
        out.append(b"F")
        _table(value, out)
    elif kind is list or kind is tuple:
        items: list[bytes] = []
        for one in value:
            _item(one, items)
        data = b"".join(items)
        out += (b"A", _U32.pack(len(data)), data)
    else:  # Decimal, datetime, subclasses of the above: py-amqp's own rules
        raise _Unusual(kind)


def _table(table: dict[Any, Any], out: list[bytes]) -> None:
    items: list[bytes] = []
    for key, value in table.items():
        name = _text(key)
        if len(name) > 255:
            raise _Unusual(key)
        items += (_U8.pack(len(name)), name)
        _item(value, items)
    data = b"".join(items)
    out += (_U32.pack(len(data)), data)


def _short(value: Any, out: list[bytes]) -> None:
    data = _text(value or "")
    if len(data) > 255:
        raise _Unusual(value)
    out += (_U8.pack(len(data)), data)


def _headers(value: Any, out: list[bytes]) -> None:
    _table(value or {}, out)


def _octet(value: Any, out: list[bytes]) -> None:
    out.append(_U8.pack(value))


def _timestamp(value: Any, out: list[bytes]) -> None:
    out.append(pack(">Q", value))


#: The writer of each property type of py-amqp's ``Message.PROPERTIES``.
_PROPERTY: dict[str, Callable[[Any, list[bytes]], None]] = {"s": _short, "F": _headers, "o": _octet, "L": _timestamp}


class LeanMessage(amqp.Message):  # type: ignore[misc]
    """py-amqp's message whose properties are encoded in one pass (see the module docstring)."""

    def _serialize_properties(self) -> bytes:
        out: list[bytes] = []
        flags, shift = 0, 15
        props = self.properties
        try:
            for key, kind in self.PROPERTIES:
                value = props.get(key)
                if value is not None:
                    if shift == 0:  # more than fifteen properties: py-amqp's continuation words
                        raise _Unusual(key)
                    flags |= 1 << shift
                    _PROPERTY[kind](value, out)
                shift -= 1
        except Exception:  # _Unusual, or a value py-amqp refuses too: its encoder decides, and raises its own error
            return bytes(super()._serialize_properties())  # type: ignore[no-untyped-call]
        return _U16.pack(flags) + b"".join(out)


def lean_messages(channel: Any) -> None:
    """Messages prepared on ``channel`` (kombu's py-amqp channel) are :class:`LeanMessage`; any other is left."""
    if isinstance(channel, pyamqp.Channel):
        channel.prepare_message = functools.partial(channel.prepare_message, _Message=LeanMessage)  # type: ignore[method-assign]


@contextlib.contextmanager
def coalesced_writes(connection: Any) -> Iterator[None]:
    """On py-amqp, the frames of the messages published inside the block go out in as few socket writes as
    possible, at its end, instead of one write per message (a system call, and a wake-up of the broker, each).

    Anything that waits for the broker (a queue declared on the way, a confirm awaited) first sends what is
    held, so a request is never left waiting behind its own frames. py-amqp's look for a broker notification
    before each publish (a read that cannot wait) is made once in the block: what the broker could say between
    two of the block's messages it says about nothing sent yet, and the next batch (or the wait for confirms)
    reads it. If the block raises, what it held is not sent: its messages are as unpublished as those the relay
    did not reach (they stay pending). Any other transport (Redis, memory) is left as it is.
    """
    amqp_connection = getattr(connection, "connection", None)
    transport: Any = getattr(amqp_connection, "transport", None)
    send = getattr(transport, "_write", None)
    read_frame = getattr(transport, "read_frame", None)
    drain_events = getattr(amqp_connection, "drain_events", None)
    if send is None or read_frame is None or drain_events is None:
        yield
        return
    held: list[bytes] = []
    size = 0
    looked = False

    def flush() -> None:
        nonlocal size
        if held:
            data = b"".join(held)
            held.clear()
            size = 0
            send(data)

    def hold(data: Any) -> None:
        nonlocal size
        held.append(bytes(data))  # py-amqp hands a view of a buffer it reuses for the next frame
        size += len(data)
        if size >= COALESCE_BYTES:
            flush()

    def read_after_flush(*args: Any, **kwargs: Any) -> Any:
        sock = getattr(transport, "sock", None)
        # A read that may wait sends what is held first; a look that cannot wait needs nothing sent.
        if sock is None or sock.gettimeout() != 0:
            flush()
        return read_frame(*args, **kwargs)

    def drain_once(timeout: float | None = None) -> Any:
        nonlocal looked
        if timeout == 0:  # py-amqp's look before a publish: the first one in the block reads, the rest skip
            if looked:
                return None
            looked = True
        return drain_events(timeout=timeout)

    patches: tuple[tuple[Any, dict[str, Any]], ...] = (
        (transport, {"_write": hold, "read_frame": read_after_flush}),
        (amqp_connection, {"drain_events": drain_once}),
    )
    own = [{name: vars(obj)[name] for name in patched if name in vars(obj)} for obj, patched in patches]
    for obj, patched in patches:
        for name, replacement in patched.items():
            setattr(obj, name, replacement)
    try:
        yield
    except BaseException:
        held.clear()
        raise
    finally:
        for (target, patched), before in zip(patches, own, strict=True):
            for name in patched:  # back to what the instance had: its own attribute, or its class's method
                if name in before:
                    setattr(target, name, before[name])
                else:
                    delattr(target, name)
    flush()
