"""Cron expressions: parsing through Celery's ``crontab``, time zones, and the next fire time (DST included)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from celery.schedules import crontab

from orch_outbox import cron
from orch_outbox.errors import InvalidOption

PARIS = ZoneInfo("Europe/Paris")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def paris(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=PARIS)


def fires(expression: str, tz: str, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` fire times, each computed from the previous one."""
    out: list[datetime] = []
    for _ in range(count):
        after = cron.next_fire(expression, tz, after)
        out.append(after)
    return out


# --- parse -------------------------------------------------------------------------------------------------------


def test_parse_maps_standard_cron_order_onto_celery_fields() -> None:
    """Fields are minute hour day_of_month month_of_year day_of_week, expanded by Celery (0 = Sunday)."""
    c = cron.parse("*/15 9-11 1,15 jan-mar mon-fri")
    assert isinstance(c, crontab)
    assert c.minute == {0, 15, 30, 45}
    assert c.hour == {9, 10, 11}
    assert c.day_of_month == {1, 15}
    assert c.month_of_year == {1, 2, 3}
    assert c.day_of_week == {1, 2, 3, 4, 5}
    assert cron.parse("0 0 * * sun").day_of_week == {0}
    assert cron.parse("0 0 * * sat").day_of_week == {6}
    assert cron.parse("  30\t2  1 * *  ").minute == {30}


@pytest.mark.parametrize(
    "expression",
    [
        "* * * *",  # four fields
        "* * * * * *",  # six fields
        "",
        "61 * * * *",
        "* 24 * * *",
        "* * 0 * *",
        "* * 32 * *",
        "* * * 13 *",
        "* * * * 7",  # Celery numbers day_of_week 0..6
        "a b c d e",
        "*/0 * * * *",
        "-1 * * * *",  # Celery raises ParseException here, which is not a ValueError
        "1,,2 * * * *",
        "*/ * * * *",
        "mon * * * *",  # Celery alone would read it as minute 1
        "0 0 31 2 *",  # never exists
        "0 0 30,31 2 *",
        "0 0 31 4,6,9,11 *",
        "\u0663 * * * *",  # Arabic-Indic digit three, which int() would accept
        "* * * * " + "1," * 60 + "1",  # too long
    ],
)
def test_parse_rejects_invalid_expressions(expression: str) -> None:
    with pytest.raises(InvalidOption) as info:
        cron.parse(expression)
    assert "cron expression" in str(info.value)


@pytest.mark.parametrize("value", [None, 12, b"* * * * *", ["*"] * 5])
def test_parse_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidOption, match="must be a str"):
        cron.parse(value)


def test_invalid_expression_message_names_the_expression() -> None:
    with pytest.raises(InvalidOption, match=r"'61 \* \* \* \*'"):
        cron.parse("61 * * * *")
    with pytest.raises(InvalidOption, match=r"'0 0 31 2 \*'"):
        cron.parse("0 0 31 2 *")


def test_invalid_option_is_a_value_error_and_chains_celerys_error() -> None:
    with pytest.raises(ValueError) as info:
        cron.parse("61 * * * *")
    assert isinstance(info.value, InvalidOption)
    assert isinstance(info.value.__cause__, ValueError)


# --- zone --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"])
def test_zone_accepts_iana_names(name: str) -> None:
    assert cron.zone(name) == ZoneInfo(name)


@pytest.mark.parametrize(
    "name",
    ["Mars/Base", "", "../etc/passwd", "/etc/passwd", "Europe/../UTC", "Europe", "utc ", "a\x00b", "zone.tab",
     "localtime", "Europe\\Paris", "Europe/Pari\u00df"],
)  # fmt: skip
def test_zone_rejects_bad_names(name: str) -> None:
    with pytest.raises(InvalidOption, match="time zone"):
        cron.zone(name)


@pytest.mark.parametrize("value", [None, 0, PARIS])
def test_zone_rejects_non_strings(value: Any) -> None:
    with pytest.raises(InvalidOption, match="must be a str"):
        cron.zone(value)


# --- next_fire: basics -------------------------------------------------------------------------------------------


def test_every_five_minutes() -> None:
    assert cron.next_fire("*/5 * * * *", "UTC", utc(2027, 1, 1, 10, 2, 30)) == utc(2027, 1, 1, 10, 5)


def test_result_is_aware_utc_on_a_whole_minute() -> None:
    got = cron.next_fire("*/5 * * * *", "Europe/Paris", paris(2027, 1, 1, 10, 2, 30, 123456))
    assert got.tzinfo is UTC
    assert (got.second, got.microsecond) == (0, 0)
    assert got == utc(2027, 1, 1, 9, 5)


def test_strictly_after_a_fire_time() -> None:
    assert cron.next_fire("*/5 * * * *", "UTC", utc(2027, 1, 1, 10, 5)) == utc(2027, 1, 1, 10, 10)
    assert cron.next_fire("*/5 * * * *", "UTC", utc(2027, 1, 1, 10, 4, 59) + timedelta(microseconds=999999)) == utc(
        2027, 1, 1, 10, 5
    )
    assert cron.next_fire("0 0 * * *", "UTC", utc(2027, 1, 1)) == utc(2027, 1, 2)


def test_rolls_over_hour_day_month_and_year() -> None:
    assert cron.next_fire("*/5 * * * *", "UTC", utc(2027, 12, 31, 23, 58)) == utc(2028, 1, 1, 0, 0)
    assert cron.next_fire("15 * * * *", "UTC", utc(2027, 1, 31, 23, 15)) == utc(2027, 2, 1, 0, 15)


def test_accepts_a_crontab_and_a_zoneinfo() -> None:
    c = crontab(minute="0", hour="9")
    assert cron.next_fire(c, PARIS, utc(2027, 1, 1, 12)) == utc(2027, 1, 2, 8)


def test_after_in_any_zone_is_the_same_instant() -> None:
    instant = utc(2027, 1, 1, 10, 2)
    for tz in ("UTC", "Asia/Tokyo", "America/Los_Angeles"):
        assert cron.next_fire("*/5 * * * *", "UTC", instant.astimezone(ZoneInfo(tz))) == utc(2027, 1, 1, 10, 5)


def test_weekdays_in_paris_from_friday_to_monday_winter_and_summer() -> None:
    # 2027-01-15 and 2027-07-16 are Fridays.
    assert cron.next_fire("0 9 * * mon-fri", "Europe/Paris", paris(2027, 1, 15, 10)) == utc(2027, 1, 18, 8)
    assert cron.next_fire("0 9 * * mon-fri", "Europe/Paris", paris(2027, 7, 16, 10)) == utc(2027, 7, 19, 7)
    # Before 09:00 on the Friday it still fires that Friday.
    assert cron.next_fire("0 9 * * mon-fri", "Europe/Paris", paris(2027, 1, 15, 8, 59)) == utc(2027, 1, 15, 8)


def test_sunday_is_day_zero() -> None:
    # 2027-01-03 is a Sunday, 2027-01-09 a Saturday.
    assert cron.next_fire("0 12 * * 0", "UTC", utc(2027, 1, 1)) == utc(2027, 1, 3, 12)
    assert cron.next_fire("0 12 * * 6", "UTC", utc(2027, 1, 1)) == utc(2027, 1, 2, 12)
    assert cron.next_fire("0 12 * * sun", "UTC", utc(2027, 1, 4)) == utc(2027, 1, 10, 12)


def test_monthly() -> None:
    assert fires("30 2 1 * *", "UTC", utc(2027, 1, 15), 3) == [
        utc(2027, 2, 1, 2, 30),
        utc(2027, 3, 1, 2, 30),
        utc(2027, 4, 1, 2, 30),
    ]
    assert cron.next_fire("30 2 1 * *", "UTC", utc(2027, 2, 1, 2, 29)) == utc(2027, 2, 1, 2, 30)


def test_day_31_skips_short_months() -> None:
    assert fires("0 0 31 * *", "UTC", utc(2027, 1, 31), 3) == [utc(2027, 3, 31), utc(2027, 5, 31), utc(2027, 7, 31)]


def test_month_set() -> None:
    assert fires("0 0 1 jan,jul *", "UTC", utc(2027, 1, 1), 2) == [utc(2027, 7, 1), utc(2028, 1, 1)]


def test_day_of_month_and_day_of_week_must_both_match() -> None:
    """Celery's AND rule: "1-7 ... mon" is the first Monday of the month, not "days 1-7 or any Monday"."""
    # 2027-01-04 and 2027-02-01 are the first Mondays of January and February; 2027-03-01 is a Monday too.
    assert fires("0 0 1-7 * mon", "UTC", utc(2027, 1, 1), 4) == [
        utc(2027, 1, 4),
        utc(2027, 2, 1),
        utc(2027, 3, 1),
        utc(2027, 4, 5),
    ]


def test_leap_day() -> None:
    assert cron.next_fire("0 0 29 2 *", "UTC", utc(2027, 3, 1)) == utc(2028, 2, 29)
    assert cron.next_fire("0 0 29 2 *", "UTC", utc(2028, 2, 29)) == utc(2032, 2, 29)


def test_rare_combination_is_found_within_the_horizon() -> None:
    # The next 29 February that is a Monday after 2027 is in 2044.
    assert cron.next_fire("0 0 29 2 mon", "UTC", utc(2027, 1, 1)) == utc(2044, 2, 29)


def test_zone_changes_the_utc_result() -> None:
    after = utc(2027, 1, 1)
    assert cron.next_fire("0 9 * * *", "UTC", after) == utc(2027, 1, 1, 9)
    assert cron.next_fire("0 9 * * *", "Europe/Paris", after) == utc(2027, 1, 1, 8)
    assert cron.next_fire("0 9 * * *", "Asia/Kolkata", after) == utc(2027, 1, 1, 3, 30)
    assert cron.next_fire("0 9 * * *", "America/New_York", after) == utc(2027, 1, 1, 14)


def test_local_day_is_that_of_the_zone_not_utc() -> None:
    # 2027-01-01 23:30 UTC is already Saturday 2 January in Tokyo; a Friday-only 08:00 Tokyo fires on the 8th.
    assert cron.next_fire("0 8 * * fri", "Asia/Tokyo", utc(2027, 1, 1, 23, 30)) == utc(2027, 1, 7, 23)
    # ... and Friday 1 January 08:00 Tokyo was 2026-12-31 23:00 UTC, before ``after``.
    assert cron.next_fire("0 8 * * fri", "Asia/Tokyo", utc(2026, 12, 31, 22)) == utc(2026, 12, 31, 23)
    # 2027-01-01 01:00 UTC is still 31 December 20:00 in New York: 21:00 New York that evening comes first.
    assert cron.next_fire("0 21 * * *", "America/New_York", utc(2027, 1, 1, 1)) == utc(2027, 1, 1, 2)


# --- next_fire: DST ----------------------------------------------------------------------------------------------


def test_spring_forward_gap_fires_once_at_the_mapped_instant() -> None:
    # 2027-03-28 in Paris: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist. With fold=0 it is read
    # at +01:00, i.e. 01:30 UTC (= 03:30 CEST).
    assert fires("30 2 * * *", "Europe/Paris", paris(2027, 3, 27, 12), 3) == [
        utc(2027, 3, 28, 1, 30),
        utc(2027, 3, 29, 0, 30),
        utc(2027, 3, 30, 0, 30),
    ]
    # The day before, still in winter time.
    assert cron.next_fire("30 2 * * *", "Europe/Paris", paris(2027, 3, 26, 12)) == utc(2027, 3, 27, 1, 30)


def test_fall_back_ambiguous_time_fires_once_at_its_first_occurrence() -> None:
    # 2027-10-31 in Paris: 03:00 CEST falls back to 02:00 CET, so 02:30 happens twice (00:30 and 01:30 UTC).
    assert fires("30 2 * * *", "Europe/Paris", paris(2027, 10, 30, 12), 3) == [
        utc(2027, 10, 31, 0, 30),
        utc(2027, 11, 1, 1, 30),
        utc(2027, 11, 2, 1, 30),
    ]
    # After the first occurrence, the second one (01:30 UTC) is not a fire time.
    assert cron.next_fire("30 2 * * *", "Europe/Paris", utc(2027, 10, 31, 1)) == utc(2027, 11, 1, 1, 30)


def test_fall_back_hourly_does_not_repeat_the_ambiguous_hour() -> None:
    # Every local hour on the fall-back day: 02:00 is taken at CEST (00:00 UTC), then 03:00 CET (02:00 UTC);
    # 01:00 UTC (the second 02:00) is not a fire time.
    assert fires("0 * * * *", "Europe/Paris", utc(2027, 10, 30, 22, 30), 4) == [
        utc(2027, 10, 30, 23),
        utc(2027, 10, 31, 0),
        utc(2027, 10, 31, 2),
        utc(2027, 10, 31, 3),
    ]


def test_gap_candidates_mapping_to_the_same_instant_fire_once_and_move_forward() -> None:
    # On 2027-03-28 in Paris, 02:00/02:30 (gap, fold=0) map to the same instants as 03:00/03:30 CEST.
    assert fires("0,30 2,3 * * *", "Europe/Paris", utc(2027, 3, 28), 4) == [
        utc(2027, 3, 28, 1),
        utc(2027, 3, 28, 1, 30),
        utc(2027, 3, 29, 0),  # next day, 02:00 CEST
        utc(2027, 3, 29, 0, 30),
    ]


def test_hourly_over_spring_forward() -> None:
    # 01:00 CET = 00:00 UTC; 02:00 (gap) and 03:00 CEST are both 01:00 UTC and fire once; then 04:00 CEST.
    assert fires("0 * * * *", "Europe/Paris", utc(2027, 3, 27, 23, 30), 3) == [
        utc(2027, 3, 28, 0),
        utc(2027, 3, 28, 1),
        utc(2027, 3, 28, 2),
    ]


def test_half_hour_gap_returns_the_earliest_instant_not_the_first_local_time() -> None:
    # Lord Howe Island springs forward 30 minutes: on 2027-10-03, 02:00 (+10:30) becomes 02:30 (+11:00).
    # 02:10 is in the gap and maps (fold=0, +10:30) to 15:40 UTC; 02:30 is 15:30 UTC, which comes first.
    assert fires("10,30 2 * * *", "Australia/Lord_Howe", utc(2027, 10, 2, 15, 20), 3) == [
        utc(2027, 10, 2, 15, 30),
        utc(2027, 10, 2, 15, 40),
        utc(2027, 10, 3, 15, 10),
    ]


# --- next_fire: errors -------------------------------------------------------------------------------------------


def test_naive_after_is_rejected() -> None:
    with pytest.raises(InvalidOption, match="aware"):
        cron.next_fire("* * * * *", "UTC", datetime(2027, 1, 1))


def test_invalid_expression_and_zone_are_rejected() -> None:
    with pytest.raises(InvalidOption):
        cron.next_fire("0 0 31 2 *", "UTC", utc(2027, 1, 1))
    with pytest.raises(InvalidOption):
        cron.next_fire("* * * * *", "Mars/Base", utc(2027, 1, 1))


def test_gives_up_after_the_horizon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cron, "_HORIZON_DAYS", 300)
    with pytest.raises(InvalidOption, match=r"'0 0 29 2 \*' never fires"):
        cron.next_fire("0 0 29 2 *", "UTC", utc(2027, 3, 1))


def test_gives_up_at_the_end_of_the_calendar() -> None:
    with pytest.raises(InvalidOption, match="never fires"):
        cron.next_fire("0 0 29 2 *", "UTC", utc(9996, 3, 1))
    with pytest.raises(InvalidOption, match="never fires"):
        cron.next_fire("59 23 31 12 *", "America/New_York", utc(9999, 12, 1))


# --- next_fire against references --------------------------------------------------------------------------------

EXPRESSIONS = [
    "*/5 * * * *",
    "7 * * * *",
    "0 9 * * mon-fri",
    "30 2 1 * *",
    "0 0 1-7 * mon",
    "15 10,22 */10 * *",
    "0 12 * jun-aug sat,sun",
    "45 23 31 * *",
    "0 0 29 2 *",
]


def minutes(start: datetime, end: datetime) -> Iterator[datetime]:
    t = start
    while t < end:
        yield t
        t += timedelta(minutes=1)


@pytest.mark.parametrize("tz", ["UTC", "Asia/Kolkata"])  # zones without DST
@pytest.mark.parametrize("expression", EXPRESSIONS[:7])
def test_matches_a_brute_force_scan(expression: str, tz: str) -> None:
    """Every minute in a window whose local fields match the crontab's sets, and no other, is a fire time."""
    c, zi = cron.parse(expression), ZoneInfo(tz)
    # Over a year end and a leap February; a shorter window for the frequent expression.
    start, end = (
        (utc(2027, 12, 31, 20), utc(2028, 1, 1, 4)) if len(c.minute) > 1 else (utc(2027, 12, 20), utc(2028, 3, 10))
    )
    expected = [
        t
        for t in minutes(start, end)
        if (local := t.astimezone(zi)).minute in c.minute
        and local.hour in c.hour
        and local.day in c.day_of_month
        and local.month in c.month_of_year
        and local.isoweekday() % 7 in c.day_of_week
    ]
    got: list[datetime] = []
    after = start - timedelta(microseconds=1)
    while (after := cron.next_fire(c, zi, after)) < end:
        got.append(after)
    assert got == expected


@pytest.mark.parametrize("expression", EXPRESSIONS)
@pytest.mark.parametrize(
    "after", [utc(2027, 1, 1), utc(2027, 1, 15, 9, 0), utc(2027, 2, 28, 23, 59, 30), utc(2027, 6, 30, 12, 7)]
)
def test_agrees_with_celerys_own_remaining_delta_in_utc(expression: str, after: datetime) -> None:
    c = cron.parse(expression)
    last_run_at, delta, _now = c.remaining_delta(after, tz=UTC)
    assert cron.next_fire(c, "UTC", after) == last_run_at + delta
