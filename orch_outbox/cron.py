"""Cron expressions for the schedules table, parsed and validated by Celery's own ``crontab``.

An expression has five whitespace-separated fields in standard cron order:
``minute hour day_of_month month_of_year day_of_week``. The semantics are Celery's: day_of_week
counts from 0 = Sunday (``sun``..``sat`` also work), and a day fires only when its day of month
AND its day of week both match (Vixie cron would OR them when both are restricted).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from celery.schedules import ParseException, crontab

from .errors import InvalidOption

MAX_LENGTH = 100
_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
_HORIZON_DAYS = 366 * 30  # every day/month/weekday combination Celery accepts recurs well within 30 years


def parse(expression: str) -> crontab:
    """Return the ``crontab`` for a five-field cron expression such as ``"0 9 * * mon-fri"``.

    Celery's parser validates the fields. Raises :class:`InvalidOption` for a non-str, an expression longer
    than :data:`MAX_LENGTH`, a field count other than five, non-ASCII text, a name (``mon``, ``jan``) in
    the minute, hour or day_of_month field, an out-of-range or malformed field, or a day_of_month /
    month_of_year pair that never exists (``"0 0 31 2 *"``).
    """
    if not isinstance(expression, str):
        raise InvalidOption(f"cron expression must be a str, got {type(expression).__name__}")
    if len(expression) > MAX_LENGTH:
        raise InvalidOption(f"cron expression {expression[:MAX_LENGTH]!r}... is longer than {MAX_LENGTH} characters")
    fields = expression.split()
    if not expression.isascii() or len(fields) != len(_FIELDS):
        raise InvalidOption(
            f"cron expression {expression!r} must be five ASCII fields: minute hour day_of_month month_of_year"
            " day_of_week"
        )
    if any(char.isalpha() for field in fields[:3] for char in field):
        # Celery would read any weekday/month name as its number, e.g. minute "mon" as 1.
        raise InvalidOption(f"cron expression {expression!r}: names are allowed only in month and day_of_week")
    try:
        return crontab(**dict(zip(_FIELDS, fields, strict=True)))
    except (ValueError, ParseException) as exc:  # ParseException is not a ValueError
        raise InvalidOption(f"invalid cron expression {expression!r}: {exc}") from exc


def zone(name: str) -> ZoneInfo:
    """Return the IANA time zone ``name`` (``"UTC"``, ``"Europe/Paris"``) as a ``ZoneInfo``.

    Raises :class:`InvalidOption` for a non-str, an empty or non-ASCII name, a path (absolute, ``..``,
    backslash), the host-dependent ``localtime``, or a name with no time zone data.
    """
    if not isinstance(name, str):
        raise InvalidOption(f"time zone must be a str, got {type(name).__name__}")
    bad = not name or not name.isascii() or "\\" in name or "\x00" in name or name == "localtime"
    if bad or name.startswith("/") or ".." in name.split("/"):
        raise InvalidOption(f"invalid time zone {name!r}")
    try:
        return ZoneInfo(name)
    except (ValueError, KeyError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise InvalidOption(f"unknown time zone {name!r}") from exc


def next_fire(expression: str | crontab, tz: str | ZoneInfo, after: datetime) -> datetime:
    """Return the first fire time strictly after ``after``, as an aware UTC datetime on a whole minute.

    ``expression`` is a cron string (see :func:`parse`) or a ``crontab``; its fields are matched against the
    wall clock of ``tz``. ``after`` must be aware (any zone). DST: a local time that falls in a
    spring-forward gap fires at the instant ``zoneinfo`` maps it to with ``fold=0``, i.e. read with the offset
    in force before the gap (Europe/Paris 02:30 on a spring-forward day fires at 03:30 CEST = 01:30 UTC); an
    ambiguous fall-back local time fires once, at its first occurrence. Local times that map to the same
    instant fire once. Raises :class:`InvalidOption` for a naive ``after``, an invalid expression or zone,
    or an expression that does not fire within 30 years.
    """
    cron = expression if isinstance(expression, crontab) else parse(expression)
    tzinfo = tz if isinstance(tz, ZoneInfo) else zone(tz)
    if not isinstance(after, datetime) or after.utcoffset() is None:
        raise InvalidOption(f"after must be an aware datetime, got {after!r}")
    hours, minutes = sorted(cron.hour), sorted(cron.minute)
    try:
        day = after.astimezone(tzinfo).date()
        end = day + timedelta(days=_HORIZON_DAYS)
        while day <= end:
            if day.month not in cron.month_of_year:
                day = (day.replace(day=1) + timedelta(days=32)).replace(day=1)
                continue
            if day.day in cron.day_of_month and day.isoweekday() % 7 in cron.day_of_week:
                local = [datetime(day.year, day.month, day.day, h, m, tzinfo=tzinfo) for h in hours for m in minutes]
                # The minimum, not the first: a gap that is not a whole hour makes the mapping non-monotonic.
                fires = [instant for instant in (t.astimezone(UTC) for t in local) if instant > after]
                if fires:
                    return min(fires)
            day += timedelta(days=1)
    except OverflowError:  # walked past datetime.max
        pass
    shown = expression if isinstance(expression, str) else repr(cron)
    raise InvalidOption(f"cron expression {shown!r} never fires after {after.isoformat()} in {tzinfo.key}")
