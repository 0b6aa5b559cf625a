"""Checks of push options, names, keys, times and pages: bad input fails early, before anything is written."""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from collections.abc import Iterable
from typing import Any

from celery.canvas import Signature

from .celery_meaning import MAX_RETRIES
from .errors import (
    CommandNotFound,
    ConfigurationError,
    InvalidInput,
    InvalidOption,
    OutboxError,
)
from .settings import validate_target

log = logging.getLogger("orch_outbox")


PUSH_OPTIONS = frozenset(
    {
        "target",
        "queue",
        "delay",
        "countdown",
        "scheduled_at",
        "eta",
        "expires_at",
        "expires",
        "retries",
        "timeout",
        "priority",
        "unique_key",
        "tenant",
    }
)


MAX_UNIQUE_KEY = 200


MAX_NAME = 200


MAX_TIMEOUT = 7 * 24 * 3600.0


MAX_PAGE = 10_000


#: Longest delay or expiry accepted at push (ten years), so a due time always fits a timestamp.
MAX_DELAY = 10 * 365 * 24 * 3600.0


def _check_page(limit: Any, offset: Any) -> None:
    for what, value, low in (("limit", limit, 1), ("offset", offset, 0)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not low <= value <= (MAX_PAGE if what == "limit" else 2**62)
        ):
            raise InvalidOption(
                f"{what} must be an integer >= {low}" + (f" and <= {MAX_PAGE}" if what == "limit" else "")
            )


def _scope(target: str | None, tenant: str | None) -> tuple[str, str]:
    if target is not None and tenant is not None:
        raise InvalidOption("pause one target or one tenant at a time, not both")
    if target is not None:
        try:
            return "target", validate_target(target)
        except ConfigurationError as exc:
            raise InvalidOption(str(exc)) from None
    if tenant is not None:
        return "tenant", _tenant(tenant) or ""
    return "all", ""


def _selection(
    verb: str, ids: Iterable[uuid.UUID | str] | None, name: Any, target: Any, tenant: Any, everything: bool
) -> list[uuid.UUID] | None:
    """The ids of a requeue or purge; refuses a call that names nothing (a typo must not select every row)."""
    id_list = None if ids is None else [_as_uuid(i) for i in ids]
    if id_list is None and name is None and target is None and tenant is None and not everything:
        raise InvalidOption(f"{verb} needs ids, a filter (name, target, tenant) or all=True")
    return id_list


def _schedule_name(value: Any) -> str:
    return _text(value, "a schedule name", MAX_NAME)


def command_name(func_name: str) -> str:
    """``SendEmailCommand`` / ``send_email`` → ``send_email``."""
    base = func_name[: -len("Command")] if func_name.endswith("Command") and func_name != "Command" else func_name
    out = []
    for i, ch in enumerate(base):
        if ch.isupper() and i and (base[i - 1].islower() or (i + 1 < len(base) and base[i + 1].islower())):
            out.append("_")
        out.append(ch.lower())
    return "".join(out).replace("__", "_")


def _template_key(call: Any) -> Any:
    """What makes two signatures' rows equal but for their arguments (None: do not share)."""
    if type(call) is not Signature or call.get("immutable"):
        return None
    try:  # the signature's own dict: its properties cost more than the rest of a bulk row
        key = (call["task"], tuple(sorted(call["options"].items())))
        hash(key)
    except TypeError:
        return None
    return key


def _pick(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _as_uuid(value: uuid.UUID | str, missing: type[OutboxError] = CommandNotFound) -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise missing(f"{value!r} is not an id") from None


def _tenant(value: Any) -> str | None:
    return None if value is None else _text(value, "tenant", MAX_NAME)


def _unique_key(value: Any) -> str | None:
    return None if value is None else _text(value, "unique_key", MAX_UNIQUE_KEY)


def _text(value: Any, what: str, limit: int, error: type[OutboxError] = InvalidOption) -> str:
    """A name or key stored as text: 1..``limit`` characters, no NUL, valid Unicode; else ``error``."""
    if not isinstance(value, str) or not 1 <= len(value) <= limit or not _storable_text(value):
        raise error(f"{what} must be valid text of 1..{limit} characters without NUL, got {value!r}")
    return value


def _storable_text(value: str) -> bool:
    """No NUL (PostgreSQL text refuses it) and valid Unicode (no lone surrogates)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_command_name(name: Any) -> str:
    """A command name must fit its column and be plain text; refused before anything is written."""
    return _text(name, "a command name", MAX_NAME, ConfigurationError)


def _check_timeout(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidOption(f"timeout must be a number of seconds, got {value!r}")
    if not 0 < value <= MAX_TIMEOUT:
        raise InvalidOption(f"timeout must be > 0 and <= {MAX_TIMEOUT:g} seconds, got {value!r}")


def _check_retries(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise InvalidOption(f"retries must be an integer in 0..{MAX_RETRIES}, got {value!r}")


def _check_priority(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise InvalidOption(f"priority must be an integer in 0..255, got {value!r}")


def _seconds(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= MAX_DELAY
    ):
        raise InvalidOption(f"{what} must be a number of seconds in 0..{MAX_DELAY:.0f} (ten years), got {value!r}")
    return float(value)


def _delay(options: dict[str, Any]) -> float | None:
    value = options.get("delay", options.get("countdown"))
    return None if value is None else _seconds(value, "delay")


def _aware(value: Any, what: str) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise InvalidOption(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} is a naive datetime; pass a timezone-aware one")
    return value


def _expiry(options: dict[str, Any]) -> dict[str, Any]:
    """``expires_at`` (an aware datetime) or ``expires`` (seconds after the push, stamped with the push's time)."""
    value = options.get("expires_at", options.get("expires"))
    if value is None or isinstance(value, dt.datetime):
        return {"expires_at": _aware(value, "expires_at")}
    return {"expires_at": None, "expires": _seconds(value, "expires")}
