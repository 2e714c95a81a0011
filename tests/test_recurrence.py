"""Repeating tasks, as a specification: after.recurrence (pure, no server).

Times are written with their UTC offset ("2026-03-29T03:00+02:00") so each
expectation reads as the local time it stands for.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest

from after.recurrence import (
    COUNT_CAP,
    DEFAULT_GRACE,
    MAX_CATCH_UP,
    Misfire,
    Plan,
    Repeat,
    RepeatError,
    next_occurrence,
    occurrences_missed,
    parse_misfire,
    parse_overlap,
    parse_repeat,
    plan_after_run,
    plan_overdue,
)


def at(text: str) -> datetime:
    """An aware datetime from ISO text (an offset is required)."""
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None, text
    return moment


def series(repeat: Repeat, anchor: datetime, after: datetime, count: int) -> list[datetime]:
    """The next ``count`` occurrences after ``after``, by repeated next_occurrence."""
    found: list[datetime] = []
    moment = after
    for _ in range(count):
        following = next_occurrence(repeat, anchor, moment)
        if following is None:
            break
        found.append(following)
        moment = following
    return found


EPOCH = at("2026-01-01T00:00+00:00")  # an anchor long before the times looked at


# -- parsing the repeat field ----------------------------------------------------


def test_a_five_field_cron_defaults_to_utc_without_limit_or_end() -> None:
    repeat = parse_repeat({"cron": "*/5 * * * *"})
    assert repeat == Repeat(cron="*/5 * * * *", timezone="UTC", limit=None, until=None)


def test_every_field_is_read() -> None:
    repeat = parse_repeat(
        {
            "interval": "PT1H",
            "timezone": "Europe/Paris",
            "limit": 10,
            "until": "2026-12-31T23:00:00+01:00",
        }
    )
    assert repeat.interval == "PT1H"
    assert repeat.timezone == "Europe/Paris"
    assert repeat.limit == 10
    assert repeat.until == at("2026-12-31T22:00+00:00")


def test_until_follows_the_task_date_rules() -> None:
    # A date alone is midnight UTC; no offset means UTC.
    assert parse_repeat({"cron": "@daily", "until": "2027-01-01"}).until == at(
        "2027-01-01T00:00+00:00"
    )
    assert parse_repeat({"cron": "@daily", "until": "2027-01-01T09:30"}).until == at(
        "2027-01-01T09:30+00:00"
    )


def test_null_fields_count_as_absent() -> None:
    repeat = parse_repeat(
        {"cron": "0 9 * * *", "interval": None, "timezone": None, "limit": None, "until": None}
    )
    assert repeat == Repeat(cron="0 9 * * *")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "PT1H",
            'repeat: expected an object such as {"cron": "*/5 * * * *"} or '
            '{"interval": "PT1H"}, got \'PT1H\'',
        ),
        ({}, "repeat: needs exactly one of cron or interval"),
        ({"timezone": "UTC"}, "repeat: needs exactly one of cron or interval"),
        (
            {"cron": "* * * * *", "interval": "PT1H"},
            "repeat: needs exactly one of cron or interval",
        ),
        (
            {"cron": "* * * * *", "timzone": "UTC"},
            "repeat: unknown field 'timzone' (known: cron, interval, timezone, limit, until)",
        ),
        ({"cron": 5}, "repeat.cron: expected a cron expression such as '*/5 * * * *', got 5"),
        ({"cron": "  "}, "repeat.cron: expected a cron expression such as '*/5 * * * *', got '  '"),
        (
            {"cron": "* * * *"},
            "repeat.cron: expected 5 fields (minute hour day-of-month month day-of-week) "
            "or 6 with the seconds first, got 4 in '* * * *'",
        ),
        (
            {"cron": "0 0 0 * * * 2026"},
            "repeat.cron: expected 5 fields (minute hour day-of-month month day-of-week) "
            "or 6 with the seconds first, got 7 in '0 0 0 * * * 2026'",
        ),
        ({"cron": "61 * * * *"}, "repeat.cron: bad minute field in '61 * * * *'"),
        ({"cron": "0 24 * * *"}, "repeat.cron: bad hour field in '0 24 * * *'"),
        ({"cron": "60 * * * * *"}, "repeat.cron: bad second field in '60 * * * * *'"),
        ({"cron": "0 0 30 2 *"}, "repeat.cron: bad day-of-month field in '0 0 30 2 *'"),
        ({"cron": "0 0 * 13 *"}, "repeat.cron: bad month field in '0 0 * 13 *'"),
        ({"cron": "0 0 * * FUN"}, "repeat.cron: bad day-of-week field in '0 0 * * FUN'"),
        (
            {"interval": 3600},
            "repeat.interval: expected an ISO 8601 duration such as 'PT1H', got 3600",
        ),
        (
            {"interval": "1h"},
            "repeat.interval: '1h' is not an ISO 8601 duration such as 'PT30S' or 'P1D'",
        ),
        (
            {"interval": "PT"},
            "repeat.interval: 'PT' is not an ISO 8601 duration such as 'PT30S' or 'P1D'",
        ),
        (
            {"interval": "P0001-00-00"},
            "repeat.interval: 'P0001-00-00' is not an ISO 8601 duration such as 'PT30S' or 'P1D'",
        ),
        ({"interval": "PT0S"}, "repeat.interval: must be greater than zero, got 'PT0S'"),
        ({"interval": "-PT1H"}, "repeat.interval: must not be negative, got '-PT1H'"),
        (
            {"interval": "P1.5M"},
            "repeat.interval: years and months must be whole numbers, got 'P1.5M'",
        ),
        (
            {"interval": "P1.5D"},
            "repeat.interval: weeks and days must be whole numbers, got 'P1.5D'",
        ),
        ({"interval": "P99999999999D"}, "repeat.interval: 'P99999999999D' is too large"),
        (
            {"cron": "@daily", "timezone": "Mars/Base"},
            "repeat.timezone: unknown time zone 'Mars/Base'",
        ),
        (
            {"cron": "@daily", "timezone": 1},
            "repeat.timezone: expected an IANA name such as 'Europe/Paris', got 1",
        ),
        ({"cron": "@daily", "limit": 0}, "repeat.limit: must be a whole number >= 1, got 0"),
        ({"cron": "@daily", "limit": 2.0}, "repeat.limit: must be a whole number >= 1, got 2.0"),
        ({"cron": "@daily", "limit": True}, "repeat.limit: must be a whole number >= 1, got True"),
        ({"cron": "@daily", "limit": "3"}, "repeat.limit: must be a whole number >= 1, got '3'"),
        (
            {"cron": "@daily", "until": "next year"},
            "repeat.until: expected an ISO 8601 date such as '2026-12-01T09:30:00Z', "
            "got 'next year'",
        ),
        (
            {"cron": "@daily", "until": 20261231},
            "repeat.until: expected an ISO 8601 date such as '2026-12-01T09:30:00Z', got 20261231",
        ),
        (
            {"cron": "@daily", "until": "2026-02-30"},
            "repeat.until: '2026-02-30' is not a real calendar date",
        ),
    ],
)
def test_each_invalid_repeat_is_refused_with_its_field_path(value: object, message: str) -> None:
    with pytest.raises(RepeatError) as caught:
        parse_repeat(value)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_building_a_repeat_directly_validates_it_too() -> None:
    with pytest.raises(RepeatError, match=r"^repeat\.timezone: unknown time zone 'Mars/Base'$"):
        Repeat(cron="@daily", timezone="Mars/Base")
    with pytest.raises(RepeatError, match=r"^repeat\.until: must be an aware datetime"):
        Repeat(cron="@daily", until=datetime(2027, 1, 1))


def test_naive_datetimes_are_refused() -> None:
    repeat = Repeat(interval="PT1H")
    with pytest.raises(ValueError, match=r"^after: expected an aware datetime"):
        next_occurrence(repeat, EPOCH, datetime(2026, 6, 1))


# -- cron ---------------------------------------------------------------------


def test_five_field_cron_runs_on_its_minutes() -> None:
    repeat = Repeat(cron="*/5 * * * *")
    assert series(repeat, EPOCH, at("2026-06-01T10:02:30+00:00"), 3) == [
        at("2026-06-01T10:05+00:00"),
        at("2026-06-01T10:10+00:00"),
        at("2026-06-01T10:15+00:00"),
    ]


def test_six_field_cron_has_the_seconds_first() -> None:
    every_ten_seconds = Repeat(cron="*/10 * * * * *")
    assert series(every_ten_seconds, EPOCH, at("2026-06-01T10:00:05+00:00"), 3) == [
        at("2026-06-01T10:00:10+00:00"),
        at("2026-06-01T10:00:20+00:00"),
        at("2026-06-01T10:00:30+00:00"),
    ]
    at_2_30_15 = Repeat(cron="15 30 2 * * *")
    assert next_occurrence(at_2_30_15, EPOCH, at("2026-06-01T00:00+00:00")) == at(
        "2026-06-01T02:30:15+00:00"
    )


def test_a_six_field_cron_with_second_zero_is_the_five_field_one() -> None:
    after = at("2026-06-01T00:00+00:00")
    five = series(Repeat(cron="30 2 * * 1-5"), EPOCH, after, 10)
    assert series(Repeat(cron="0 30 2 * * 1-5"), EPOCH, after, 10) == five
    assert len(five) == 10


def test_cron_macros() -> None:
    after = at("2026-06-03T10:00+00:00")  # a Wednesday
    assert next_occurrence(Repeat(cron="@hourly"), EPOCH, after) == at("2026-06-03T11:00+00:00")
    assert next_occurrence(Repeat(cron="@daily"), EPOCH, after) == at("2026-06-04T00:00+00:00")
    assert next_occurrence(Repeat(cron="@weekly"), EPOCH, after) == at("2026-06-07T00:00+00:00")
    assert next_occurrence(Repeat(cron="@monthly"), EPOCH, after) == at("2026-07-01T00:00+00:00")
    assert next_occurrence(Repeat(cron="@yearly"), EPOCH, after) == at("2027-01-01T00:00+00:00")


def test_cron_fields_are_read_in_the_repeat_time_zone() -> None:
    nine_in_paris = Repeat(cron="0 9 * * *", timezone="Europe/Paris")
    assert next_occurrence(nine_in_paris, EPOCH, at("2026-06-01T00:00+00:00")) == at(
        "2026-06-01T09:00+02:00"
    )
    assert next_occurrence(nine_in_paris, EPOCH, at("2026-12-01T00:00+00:00")) == at(
        "2026-12-01T09:00+01:00"
    )


def test_a_cron_series_starts_with_its_anchor_then_follows_the_grid() -> None:
    repeat = Repeat(cron="0 * * * *")
    anchor = at("2026-06-01T10:17:42+00:00")  # the task's first date, off the grid
    assert next_occurrence(repeat, anchor, at("2026-06-01T09:00+00:00")) == anchor
    assert series(repeat, anchor, anchor, 2) == [
        at("2026-06-01T11:00+00:00"),
        at("2026-06-01T12:00+00:00"),
    ]


def test_results_are_in_utc() -> None:
    repeat = Repeat(cron="0 9 * * *", timezone="America/New_York")
    following = next_occurrence(repeat, EPOCH, at("2026-06-01T00:00-04:00"))
    assert following is not None
    assert following.tzinfo is UTC
    assert following == at("2026-06-01T13:00+00:00")


# -- intervals ------------------------------------------------------------------


def test_an_interval_series_is_anchor_plus_k_intervals() -> None:
    repeat = Repeat(interval="PT1H")
    anchor = at("2026-06-01T10:17+00:00")
    assert next_occurrence(repeat, anchor, at("2026-06-01T09:00+00:00")) == anchor
    assert next_occurrence(repeat, anchor, anchor) == at("2026-06-01T11:17+00:00")
    assert next_occurrence(repeat, anchor, at("2026-06-01T13:05+00:00")) == at(
        "2026-06-01T13:17+00:00"
    )
    # exactly on an occurrence: the next one is strictly after
    assert next_occurrence(repeat, anchor, at("2026-06-01T14:17+00:00")) == at(
        "2026-06-01T15:17+00:00"
    )


def test_a_fixed_interval_is_computed_directly_not_by_walking_missed_slots() -> None:
    repeat = Repeat(interval="PT1S")
    anchor = at("2026-01-01T00:00:00.250+00:00")
    started = time.perf_counter()
    following = next_occurrence(repeat, anchor, at("2036-01-01T00:00+00:00"))
    elapsed = time.perf_counter() - started
    assert following == at("2036-01-01T00:00:00.250+00:00")
    assert elapsed < 0.05  # about 315 million slots were not walked


def test_months_step_from_the_anchor_and_clamp_to_the_month_end() -> None:
    monthly = Repeat(interval="P1M")
    anchor = at("2026-01-31T08:00+00:00")
    assert series(monthly, anchor, anchor, 4) == [
        at("2026-02-28T08:00+00:00"),
        at("2026-03-31T08:00+00:00"),  # not the 28th: each step counts from the anchor
        at("2026-04-30T08:00+00:00"),
        at("2026-05-31T08:00+00:00"),
    ]


def test_years_keep_february_29_when_there_is_one() -> None:
    yearly = Repeat(interval="P1Y")
    anchor = at("2024-02-29T12:00+00:00")
    assert series(yearly, anchor, anchor, 4) == [
        at("2025-02-28T12:00+00:00"),
        at("2026-02-28T12:00+00:00"),
        at("2027-02-28T12:00+00:00"),
        at("2028-02-29T12:00+00:00"),
    ]


def test_a_monthly_interval_far_from_its_anchor_is_found_quickly() -> None:
    monthly = Repeat(interval="P1M", timezone="Europe/Paris")
    anchor = at("2000-01-15T09:00+01:00")
    started = time.perf_counter()
    following = next_occurrence(monthly, anchor, at("2090-06-20T00:00+00:00"))
    assert following == at("2090-07-15T09:00+02:00")
    assert time.perf_counter() - started < 0.05


# -- no drift -------------------------------------------------------------------


def test_a_late_run_does_not_shift_the_next_one() -> None:
    hourly = Repeat(interval="PT1H")
    anchor = at("2026-06-01T10:00+00:00")
    # the 11:00 run started late and ended at 11:20: the next run is still at 12:00
    plan = plan_after_run(
        hourly, Misfire(), anchor, at("2026-06-01T11:00+00:00"), at("2026-06-01T11:20+00:00"), 2
    )
    assert plan == Plan(at("2026-06-01T12:00+00:00"))


def test_a_cron_run_that_ended_late_keeps_the_grid() -> None:
    repeat = Repeat(cron="*/15 * * * *")
    plan = plan_after_run(
        repeat, Misfire(), EPOCH, at("2026-06-01T10:15+00:00"), at("2026-06-01T10:22+00:00"), 5
    )
    assert plan == Plan(at("2026-06-01T10:30+00:00"))


# -- limit and until ---------------------------------------------------------------


def test_limit_counts_runs_and_ends_the_repeat() -> None:
    three_runs = Repeat(interval="PT1H", limit=3)
    anchor = at("2026-06-01T10:00+00:00")
    first = plan_after_run(three_runs, Misfire(), anchor, anchor, anchor + timedelta(minutes=1), 1)
    assert first.next_date == at("2026-06-01T11:00+00:00")
    second = plan_after_run(
        three_runs, Misfire(), anchor, first.next_date, at("2026-06-01T11:01+00:00"), 2
    )
    assert second.next_date == at("2026-06-01T12:00+00:00")
    third = plan_after_run(
        three_runs, Misfire(), anchor, second.next_date, at("2026-06-01T12:01+00:00"), 3
    )
    assert third == Plan(None)


def test_until_is_the_last_instant_an_occurrence_may_have() -> None:
    repeat = Repeat(interval="PT1H", until=at("2026-06-01T12:00+00:00"))
    anchor = at("2026-06-01T10:00+00:00")
    assert series(repeat, anchor, anchor, 5) == [
        at("2026-06-01T11:00+00:00"),
        at("2026-06-01T12:00+00:00"),  # exactly at until: still runs
    ]
    plan = plan_after_run(
        repeat, Misfire(), anchor, at("2026-06-01T12:00+00:00"), at("2026-06-01T12:01+00:00"), 3
    )
    assert plan == Plan(None)


def test_until_ends_a_cron_series_too() -> None:
    repeat = Repeat(cron="0 9 * * *", until=at("2026-06-03T00:00+00:00"))
    assert series(repeat, EPOCH, at("2026-06-01T00:00+00:00"), 5) == [
        at("2026-06-01T09:00+00:00"),
        at("2026-06-02T09:00+00:00"),
    ]


# -- daylight saving time ----------------------------------------------------------
#
# 2026 transitions: Europe/Paris springs forward on 03-29 (02:00 -> 03:00) and
# falls back on 10-25 (03:00 -> 02:00); America/New_York springs forward on 03-08
# (02:00 -> 03:00) and falls back on 11-01 (02:00 -> 01:00).


@pytest.mark.parametrize(
    ("zone", "after", "expected"),
    [
        pytest.param(
            "Europe/Paris",
            "2026-03-27T12:00+00:00",
            ["2026-03-28T02:30+01:00", "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"],
            id="paris-spring: 02:30 does not exist, runs once right after the gap",
        ),
        pytest.param(
            "Europe/Paris",
            "2026-10-23T12:00+00:00",
            ["2026-10-24T02:30+02:00", "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"],
            id="paris-fall: 02:30 happens twice, runs once at the first",
        ),
        pytest.param(
            "America/New_York",
            "2026-03-06T12:00+00:00",
            ["2026-03-07T02:30-05:00", "2026-03-08T03:00-04:00", "2026-03-09T02:30-04:00"],
            id="new-york-spring: 02:30 does not exist, runs once right after the gap",
        ),
        pytest.param(
            "America/New_York",
            "2026-10-30T12:00+00:00",
            ["2026-10-31T02:30-04:00", "2026-11-01T02:30-05:00", "2026-11-02T02:30-05:00"],
            id="new-york-fall: 02:30 is after the repeated hour, once a day (a 25 h day)",
        ),
    ],
)
def test_fixed_time_daily_cron_across_dst(zone: str, after: str, expected: list[str]) -> None:
    for expression in ("30 2 * * *", "0 30 2 * * *"):  # 5 and 6 fields alike
        repeat = Repeat(cron=expression, timezone=zone)
        assert series(repeat, EPOCH, at(after), 3) == [at(text) for text in expected]


def test_fixed_time_in_new_yorks_repeated_hour_runs_once_at_the_first_pass() -> None:
    repeat = Repeat(cron="30 1 * * *", timezone="America/New_York")
    assert series(repeat, EPOCH, at("2026-10-30T12:00+00:00"), 3) == [
        at("2026-10-31T01:30-04:00"),
        at("2026-11-01T01:30-04:00"),  # not again at 01:30-05:00
        at("2026-11-02T01:30-05:00"),
    ]


def test_several_fixed_times_inside_the_gap_collapse_into_one_run() -> None:
    repeat = Repeat(cron="0,30 2 * * *", timezone="Europe/Paris")
    assert series(repeat, EPOCH, at("2026-03-28T12:00+00:00"), 3) == [
        at("2026-03-29T03:00+02:00"),
        at("2026-03-30T02:00+02:00"),
        at("2026-03-30T02:30+02:00"),
    ]


@pytest.mark.parametrize(
    ("zone", "after", "expected"),
    [
        pytest.param(
            "Europe/Paris",
            "2026-03-29T00:50+01:00",
            ["01:00+01:00", "01:30+01:00", "03:00+02:00", "03:30+02:00"],
            id="paris-spring",
        ),
        pytest.param(
            "Europe/Paris",
            "2026-10-25T01:50+02:00",
            ["02:00+02:00", "02:30+02:00", "02:00+01:00", "02:30+01:00", "03:00+01:00"],
            id="paris-fall",
        ),
        pytest.param(
            "America/New_York",
            "2026-03-08T00:50-05:00",
            ["01:00-05:00", "01:30-05:00", "03:00-04:00", "03:30-04:00"],
            id="new-york-spring",
        ),
        pytest.param(
            "America/New_York",
            "2026-11-01T00:50-04:00",
            ["01:00-04:00", "01:30-04:00", "01:00-05:00", "01:30-05:00", "02:00-05:00"],
            id="new-york-fall",
        ),
    ],
)
def test_every_30_minutes_follows_real_time_across_dst(
    zone: str, after: str, expected: list[str]
) -> None:
    repeat = Repeat(cron="*/30 * * * *", timezone=zone)
    day = after[:11]
    got = series(repeat, EPOCH, at(after), len(expected))
    assert got == [at(day + text) for text in expected]
    assert {b - a for a, b in pairwise(got)} == {timedelta(minutes=30)}


@pytest.mark.parametrize(
    ("zone", "after", "expected"),
    [
        pytest.param(
            "Europe/Paris",
            "2026-03-29T00:30+01:00",
            ["01:00+01:00", "03:00+02:00", "04:00+02:00"],
            id="paris-spring: no run lost",
        ),
        pytest.param(
            "Europe/Paris",
            "2026-10-25T01:30+02:00",
            ["02:00+02:00", "02:00+01:00", "03:00+01:00"],
            id="paris-fall: both real 02:00",
        ),
        pytest.param(
            "America/New_York",
            "2026-03-08T00:30-05:00",
            ["01:00-05:00", "03:00-04:00", "04:00-04:00"],
            id="new-york-spring: no run lost",
        ),
        pytest.param(
            "America/New_York",
            "2026-11-01T00:30-04:00",
            ["01:00-04:00", "01:00-05:00", "02:00-05:00"],
            id="new-york-fall: both real 01:00",
        ),
    ],
)
def test_hourly_cron_runs_once_each_real_hour_across_dst(
    zone: str, after: str, expected: list[str]
) -> None:
    repeat = Repeat(cron="0 * * * *", timezone=zone)
    day = after[:11]
    got = series(repeat, EPOCH, at(after), len(expected))
    assert got == [at(day + text) for text in expected]
    assert {b - a for a, b in pairwise(got)} == {timedelta(hours=1)}


@pytest.mark.parametrize(
    ("zone", "anchor", "expected"),
    [
        pytest.param(
            "Europe/Paris",
            "2026-03-27T02:30+01:00",
            ["2026-03-28T02:30+01:00", "2026-03-29T03:00+02:00", "2026-03-30T02:30+02:00"],
            id="paris-spring",
        ),
        pytest.param(
            "Europe/Paris",
            "2026-10-23T02:30+02:00",
            ["2026-10-24T02:30+02:00", "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00"],
            id="paris-fall",
        ),
        pytest.param(
            "America/New_York",
            "2026-03-06T02:30-05:00",
            ["2026-03-07T02:30-05:00", "2026-03-08T03:00-04:00", "2026-03-09T02:30-04:00"],
            id="new-york-spring",
        ),
        pytest.param(
            "America/New_York",
            "2026-10-30T01:30-04:00",
            ["2026-10-31T01:30-04:00", "2026-11-01T01:30-04:00", "2026-11-02T01:30-05:00"],
            id="new-york-fall",
        ),
    ],
)
def test_a_daily_interval_keeps_the_local_time_across_dst(
    zone: str, anchor: str, expected: list[str]
) -> None:
    repeat = Repeat(interval="P1D", timezone=zone)
    assert series(repeat, at(anchor), at(anchor), 3) == [at(text) for text in expected]


def test_an_hourly_interval_is_3600_real_seconds_whatever_the_clocks_do() -> None:
    repeat = Repeat(interval="PT1H", timezone="Europe/Paris")
    anchor = at("2026-10-25T01:00+02:00")
    assert series(repeat, anchor, anchor, 3) == [
        at("2026-10-25T02:00+02:00"),
        at("2026-10-25T02:00+01:00"),
        at("2026-10-25T03:00+01:00"),
    ]


# -- missed occurrences --------------------------------------------------------------

HOURLY_ANCHOR = at("2026-06-01T00:00+00:00")


def test_occurrences_missed_lists_those_in_the_window() -> None:
    hourly = Repeat(interval="PT1H")
    missed, truncated = occurrences_missed(
        hourly, HOURLY_ANCHOR, at("2026-06-01T02:00+00:00"), at("2026-06-01T12:30+00:00")
    )
    assert missed == [HOURLY_ANCHOR + timedelta(hours=h) for h in range(3, 13)]
    assert truncated is False


def test_occurrences_missed_includes_now_and_excludes_last() -> None:
    hourly = Repeat(interval="PT1H")
    missed, truncated = occurrences_missed(
        hourly, HOURLY_ANCHOR, at("2026-06-01T02:00+00:00"), at("2026-06-01T04:00+00:00")
    )
    assert missed == [at("2026-06-01T03:00+00:00"), at("2026-06-01T04:00+00:00")]
    assert truncated is False


def test_occurrences_missed_is_capped_and_says_so() -> None:
    every_second = Repeat(cron="* * * * * *")
    last, now = at("2026-06-01T00:00+00:00"), at("2026-06-02T00:00+00:00")
    missed, truncated = occurrences_missed(every_second, EPOCH, last, now, limit=4)
    assert missed == [last + timedelta(seconds=s) for s in range(1, 5)]
    assert truncated is True
    exactly, truncated = occurrences_missed(
        every_second, EPOCH, last, last + timedelta(seconds=4), 4
    )
    assert len(exactly) == 4
    assert truncated is False


# -- misfire and overlap fields ------------------------------------------------------


def test_misfire_defaults_to_skip_with_a_minute_of_grace() -> None:
    assert parse_misfire(None) == Misfire(policy="skip", grace=timedelta(minutes=1))


def test_misfire_is_a_policy_name_or_an_object() -> None:
    assert parse_misfire("once") == Misfire(policy="once")
    assert parse_misfire("all") == Misfire(policy="all")
    assert parse_misfire({"policy": "all", "grace": "PT30S"}) == Misfire(
        policy="all", grace=timedelta(seconds=30)
    )
    assert parse_misfire({"grace": "PT0S"}) == Misfire(policy="skip", grace=timedelta(0))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sometimes", "misfire: unknown policy 'sometimes' (expected skip, once or all)"),
        ({"policy": 3}, "misfire: unknown policy 3 (expected skip, once or all)"),
        (
            5,
            "misfire: expected 'skip', 'once', 'all' or an object such as "
            '{"policy": "once", "grace": "PT30S"}, got 5',
        ),
        ({"when": "now"}, "misfire: unknown field 'when' (known: policy, grace)"),
        (
            {"grace": "P1M"},
            "misfire.grace: months and years have no fixed length; use W, D, H, M or S",
        ),
        ({"grace": "-PT1S"}, "misfire.grace: must not be negative, got '-PT1S'"),
        ({"grace": 30}, "misfire.grace: expected an ISO 8601 duration such as 'PT30S', got 30"),
    ],
)
def test_each_invalid_misfire_is_refused(value: object, message: str) -> None:
    with pytest.raises(RepeatError) as caught:
        parse_misfire(value)
    assert str(caught.value) == message


def test_overlap_is_skip_unless_allowed() -> None:
    assert parse_overlap(None) == "skip"
    assert parse_overlap("skip") == "skip"
    assert parse_overlap("allow") == "allow"
    with pytest.raises(RepeatError) as caught:
        parse_overlap("never")
    assert str(caught.value) == "overlap: expected 'skip' or 'allow', got 'never'"


# -- plans: a downtime of 10 occurrences -----------------------------------------------
#
# An hourly task anchored at 00:00 ran at 00:00, 01:00 and 02:00, then the worker
# was down until 12:30: the occurrences 03:00 ... 12:00 (ten) were missed.

DUE = at("2026-06-01T03:00+00:00")
BACK = at("2026-06-01T12:30+00:00")
MISSED = [HOURLY_ANCHOR + timedelta(hours=h) for h in range(3, 13)]
HOURLY = [
    pytest.param(Repeat(interval="PT1H"), id="interval"),
    pytest.param(Repeat(cron="0 * * * *"), id="cron"),
]


def catch_up(
    repeat: Repeat,
    misfire: Misfire,
    due: datetime = DUE,
    now: datetime = BACK,
    runs_done: int = 3,
    run_time: timedelta = timedelta(seconds=5),
) -> tuple[list[datetime], int, datetime | None]:
    """The worker's loop at start-up: plan the overdue task, run what is due,
    plan again after each run. Returns the runs, the skipped count recorded and
    the next (future) date."""
    runs: list[datetime] = []
    skipped = 0
    plan = plan_overdue(repeat, misfire, HOURLY_ANCHOR, due, now, runs_done)
    while True:
        skipped += plan.skipped
        if plan.next_date is None or plan.next_date > now:
            return runs, skipped, plan.next_date
        runs.append(plan.next_date)
        runs_done += 1
        now += run_time
        plan = plan_after_run(repeat, misfire, HOURLY_ANCHOR, plan.next_date, now, runs_done)


@pytest.mark.parametrize("repeat", HOURLY)
def test_skip_runs_nothing_late_and_records_ten_skipped(repeat: Repeat) -> None:
    plan = plan_overdue(repeat, Misfire("skip"), HOURLY_ANCHOR, DUE, BACK, 3)
    assert plan == Plan(at("2026-06-01T13:00+00:00"), skipped=10, last_skipped=MISSED[-1])
    assert catch_up(repeat, Misfire("skip")) == ([], 10, at("2026-06-01T13:00+00:00"))


@pytest.mark.parametrize("repeat", HOURLY)
def test_once_runs_one_catch_up_for_the_latest_then_continues(repeat: Repeat) -> None:
    plan = plan_overdue(repeat, Misfire("once"), HOURLY_ANCHOR, DUE, BACK, 3)
    assert plan == Plan(MISSED[-1], skipped=9, last_skipped=MISSED[-2])
    assert catch_up(repeat, Misfire("once")) == ([MISSED[-1]], 9, at("2026-06-01T13:00+00:00"))


@pytest.mark.parametrize("repeat", HOURLY)
def test_all_runs_each_missed_occurrence_oldest_first(repeat: Repeat) -> None:
    assert plan_overdue(repeat, Misfire("all"), HOURLY_ANCHOR, DUE, BACK, 3) == Plan(DUE)
    assert catch_up(repeat, Misfire("all")) == (MISSED, 0, at("2026-06-01T13:00+00:00"))


@pytest.mark.parametrize("repeat", HOURLY)
def test_a_run_within_grace_counts_as_on_time(repeat: Repeat) -> None:
    # back at 12:00:30: the 12:00 run is 30 s late, within the default minute
    back = at("2026-06-01T12:00:30+00:00")
    runs, skipped, following = catch_up(repeat, Misfire("skip"), now=back)
    assert (runs, skipped, following) == ([MISSED[-1]], 9, at("2026-06-01T13:00+00:00"))
    # with once, the late ones (03:00 ... 11:00) collapse into one catch-up at 11:00
    runs, skipped, following = catch_up(repeat, Misfire("once"), now=back)
    assert (runs, skipped) == ([MISSED[-2], MISSED[-1]], 8)


def test_a_long_grace_keeps_every_missed_occurrence_on_time() -> None:
    generous = Misfire("skip", grace=timedelta(hours=10))
    assert catch_up(Repeat(interval="PT1H"), generous) == (
        MISSED,
        0,
        at("2026-06-01T13:00+00:00"),
    )


def test_zero_grace_makes_any_lateness_a_misfire() -> None:
    strict = Misfire("skip", grace=timedelta(0))
    plan = plan_overdue(
        Repeat(interval="PT1H"), strict, HOURLY_ANCHOR, DUE, DUE + timedelta(seconds=1), 3
    )
    assert plan == Plan(at("2026-06-01T04:00+00:00"), skipped=1, last_skipped=DUE)


def test_all_is_bounded_by_the_repeat_limit() -> None:
    eight_runs = Repeat(interval="PT1H", limit=8)
    runs, skipped, following = catch_up(eight_runs, Misfire("all"))
    assert runs == MISSED[:5]  # 3 before the downtime + 5 catch-ups = 8
    assert (skipped, following) == (0, None)


def test_all_replays_at_most_max_catch_up_and_skips_the_older_ones() -> None:
    every_second = Repeat(interval="PT1S")
    anchor = at("2026-06-01T00:00+00:00")
    due = anchor + timedelta(seconds=1)
    now = anchor + timedelta(seconds=MAX_CATCH_UP + 500, minutes=2)
    cutoff = now - DEFAULT_GRACE  # older than this is late
    late = (cutoff - due) // timedelta(seconds=1)  # due, due + 1 s, ... cutoff - 1 s
    plan = plan_overdue(every_second, Misfire("all"), anchor, due, now, 1)
    oldest_kept = cutoff - timedelta(seconds=MAX_CATCH_UP)
    assert plan == Plan(
        oldest_kept, skipped=late - MAX_CATCH_UP, last_skipped=oldest_kept - timedelta(seconds=1)
    )
    runs, skipped, following = catch_up(
        every_second, Misfire("all"), due=due, now=now, runs_done=1, run_time=timedelta(0)
    )
    assert skipped == late - MAX_CATCH_UP
    # the kept late ones plus those within the minute of grace, each exactly once
    assert len(runs) == MAX_CATCH_UP + 60 + 1
    assert runs == sorted(set(runs))
    assert following == now + timedelta(seconds=1)


def test_until_reached_during_the_downtime_ends_the_repeat() -> None:
    until_eight = Repeat(interval="PT1H", until=at("2026-06-01T08:00+00:00"))
    assert catch_up(until_eight, Misfire("skip")) == ([], 6, None)  # 03:00 ... 08:00
    assert catch_up(until_eight, Misfire("all")) == (MISSED[:6], 0, None)
    assert catch_up(until_eight, Misfire("once")) == ([MISSED[5]], 5, None)


def test_a_task_that_is_not_overdue_keeps_its_date() -> None:
    plan = plan_overdue(Repeat(interval="PT1H"), Misfire(), HOURLY_ANCHOR, DUE, DUE, 3)
    assert plan == Plan(DUE)
    early = plan_overdue(Repeat(interval="PT1H"), Misfire(), HOURLY_ANCHOR, DUE, HOURLY_ANCHOR, 3)
    assert early == Plan(DUE)


def test_a_repeat_whose_limit_is_reached_is_finished() -> None:
    done = plan_overdue(Repeat(interval="PT1H", limit=3), Misfire(), HOURLY_ANCHOR, DUE, BACK, 3)
    assert done == Plan(None)


# -- plans: a run that outlasts the next occurrences ----------------------------------------


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("skip", Plan(at("2026-06-01T13:00+00:00"), 2, at("2026-06-01T12:00+00:00"))),
        ("once", Plan(at("2026-06-01T12:00+00:00"), 1, at("2026-06-01T11:00+00:00"))),
        ("all", Plan(at("2026-06-01T11:00+00:00"))),
    ],
)
def test_occurrences_that_pass_during_a_long_run_are_misfires(policy: str, expected: Plan) -> None:
    # the 10:00 run lasted until 12:30: 11:00 and 12:00 went by
    plan = plan_after_run(
        Repeat(interval="PT1H"),
        parse_misfire(policy),
        HOURLY_ANCHOR,
        at("2026-06-01T10:00+00:00"),
        at("2026-06-01T12:30+00:00"),
        11,
    )
    assert plan == expected


def test_a_run_that_ends_just_after_the_next_occurrence_lets_it_run_on_time() -> None:
    plan = plan_after_run(
        Repeat(interval="PT1H"),
        Misfire("skip"),
        HOURLY_ANCHOR,
        at("2026-06-01T10:00+00:00"),
        at("2026-06-01T11:00:20+00:00"),
        11,
    )
    assert plan == Plan(at("2026-06-01T11:00+00:00"))  # 20 s late: within grace, runs now


def test_cron_skip_counts_saturate_at_count_cap() -> None:
    every_second = Repeat(cron="* * * * * *")
    due = at("2026-06-01T00:00:01+00:00")
    now = at("2026-06-02T00:00+00:00")  # 86 400 occurrences later
    plan = plan_overdue(every_second, Misfire("skip"), EPOCH, due, now, 1)
    assert plan.next_date == now - timedelta(minutes=1)  # the first within grace
    assert plan.skipped == COUNT_CAP
    assert plan.last_skipped == now - timedelta(minutes=1, seconds=1)


def test_interval_skip_counts_are_exact_however_many() -> None:
    every_second = Repeat(interval="PT1S")
    anchor = at("2026-06-01T00:00+00:00")
    now = at("2026-06-11T00:00+00:00")
    plan = plan_overdue(every_second, Misfire("skip", timedelta(0)), anchor, anchor, now, 0)
    assert plan.skipped == 10 * 86_400  # 00:00:00 ... 23:59:59 ten times over
    assert plan.next_date == now


def test_no_drift_over_a_thousand_computed_occurrences() -> None:
    """Each next date comes from the anchor and the schedule, never from the last one
    plus a step that could accumulate an error."""
    anchor = datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    hourly = parse_repeat({"interval": "PT1H"})
    every_five = parse_repeat({"cron": "*/5 * * * *"})
    moment, cron_moment = anchor, datetime(2026, 1, 1, tzinfo=UTC)
    for k in range(1, 1001):
        moment = next_occurrence(hourly, anchor, moment)
        assert moment == anchor + timedelta(hours=k)
        cron_moment = next_occurrence(every_five, cron_moment, cron_moment)
        assert cron_moment == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=5 * k)
