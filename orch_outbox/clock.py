"""The one source of wall-clock time in Python code.

Deadlines and due times are computed by the database (``now()``) on PostgreSQL; this
clock is used where the database has no usable clock (SQLite) and by tests, which
replace it with a frozen or stepping clock through ``Store(clock=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)
