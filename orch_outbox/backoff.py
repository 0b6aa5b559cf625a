"""Delays between retries: fixed, exponential with full jitter, or a callable per command."""

from __future__ import annotations

import random
from collections.abc import Callable

from celery.utils.time import get_exponential_backoff_interval
from kombu.utils.imports import symbol_by_name

from .errors import ConfigurationError
from .settings import Settings

#: ``backoff(retry_number, error_type) -> seconds``; retry_number counts from 1.
Backoff = Callable[[int, str], float]


def resolve(settings: Settings) -> Backoff:
    """The backoff policy the settings name."""
    base, cap, jitter = settings.retry_backoff_base, settings.retry_backoff_max, settings.retry_jitter
    if settings.retry_backoff == "fixed":
        return lambda _n, _err: base
    if settings.retry_backoff == "exponential":
        if not jitter:
            # Celery's own helper: base * 2**(n-1), capped.
            return lambda n, _err: float(get_exponential_backoff_interval(base, n - 1, cap, False))
        # Full jitter. Celery's helper jitters with random.randrange(countdown + 1), which needs
        # an int countdown: a sub-second base breaks it (TypeError on Python >= 3.12).
        return lambda n, _err: random.uniform(0.0, min(cap, base * 2.0 ** min(n - 1, 64)))
    try:
        policy = symbol_by_name(settings.retry_backoff)  # type: ignore[no-untyped-call]
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigurationError(f"outbox_retry_backoff: cannot import {settings.retry_backoff!r}: {exc}") from None
    if not callable(policy):
        raise ConfigurationError(f"outbox_retry_backoff: {settings.retry_backoff!r} is not callable")
    return policy  # type: ignore[no-any-return]


def delay_for(policy: Backoff, retry_number: int, error_type: str, cap: float) -> float:
    """Seconds to wait before retry ``retry_number``, clamped to ``[0, cap]``."""
    value = float(policy(retry_number, error_type))
    if value != value:
        return cap
    return min(max(value, 0.0), cap)
