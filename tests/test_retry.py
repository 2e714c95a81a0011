"""Retries and timeouts, as a specification: after.retry (pure, no server)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from after.retry import (
    HARD_MAX_DELAY,
    Retry,
    RetryError,
    next_attempt,
    parse_retry,
    parse_timeout,
)

FAILED_AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def waits(retry: Retry, attempts: range, rng: random.Random | None = None) -> list[timedelta]:
    """The wait after each failed attempt (None-free: attempts must have a retry left)."""
    found = []
    for attempt in attempts:
        following = next_attempt(retry, attempt, FAILED_AT, rng)
        assert following is not None
        found.append(following - FAILED_AT)
    return found


# -- parsing -------------------------------------------------------------------------


def test_only_the_limit_is_required_and_the_defaults_are_documented() -> None:
    assert parse_retry({"limit": 3}) == Retry(
        limit=3,
        delay=timedelta(seconds=10),
        backoff=2.0,
        max_delay=timedelta(hours=1),
        jitter=True,
    )


def test_every_field_is_read() -> None:
    retry = parse_retry(
        {"limit": 5, "delay": "PT30S", "backoff": 3, "max_delay": "PT2H", "jitter": False}
    )
    assert retry == Retry(
        limit=5,
        delay=timedelta(seconds=30),
        backoff=3.0,
        max_delay=timedelta(hours=2),
        jitter=False,
    )
    assert isinstance(retry.backoff, float)


def test_null_fields_take_their_defaults_but_a_null_max_delay_means_uncapped() -> None:
    retry = parse_retry({"limit": 1, "delay": None, "backoff": None, "jitter": None})
    assert retry == Retry(limit=1)
    assert parse_retry({"limit": 1, "max_delay": None}).max_delay is None


def test_limit_zero_means_never_retry() -> None:
    assert next_attempt(parse_retry({"limit": 0}), 1, FAILED_AT) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, 'retry: expected an object such as {"limit": 3, "delay": "PT30S"}, got 3'),
        (
            {"limit": 3, "tries": 1},
            "retry: unknown field 'tries' (known: limit, delay, backoff, max_delay, jitter)",
        ),
        ({}, "retry.limit: required, a whole number from 0 to 1000"),
        ({"limit": None}, "retry.limit: required, a whole number from 0 to 1000"),
        ({"limit": -1}, "retry.limit: must be a whole number from 0 to 1000, got -1"),
        ({"limit": 1001}, "retry.limit: must be a whole number from 0 to 1000, got 1001"),
        ({"limit": 2.5}, "retry.limit: must be a whole number from 0 to 1000, got 2.5"),
        ({"limit": True}, "retry.limit: must be a whole number from 0 to 1000, got True"),
        (
            {"limit": 3, "delay": "soon"},
            "retry.delay: 'soon' is not an ISO 8601 duration such as 'PT30S' or 'P1D'",
        ),
        (
            {"limit": 3, "delay": 30},
            "retry.delay: expected an ISO 8601 duration such as 'PT30S', got 30",
        ),
        ({"limit": 3, "delay": "-PT1S"}, "retry.delay: must not be negative, got '-PT1S'"),
        (
            {"limit": 3, "delay": "P1M"},
            "retry.delay: months and years have no fixed length; use W, D, H, M or S",
        ),
        ({"limit": 3, "backoff": 0.5}, "retry.backoff: must be a number >= 1, got 0.5"),
        ({"limit": 3, "backoff": "2"}, "retry.backoff: must be a number >= 1, got '2'"),
        ({"limit": 3, "backoff": True}, "retry.backoff: must be a number >= 1, got True"),
        ({"limit": 3, "backoff": float("inf")}, "retry.backoff: must be a number >= 1, got inf"),
        (
            {"limit": 3, "max_delay": "PT5S"},
            "retry.max_delay: must not be shorter than retry.delay (PT10S), got PT5S",
        ),
        (
            {"limit": 3, "max_delay": "an hour"},
            "retry.max_delay: 'an hour' is not an ISO 8601 duration such as 'PT30S' or 'P1D'",
        ),
        ({"limit": 3, "jitter": "yes"}, "retry.jitter: must be true or false, got 'yes'"),
    ],
)
def test_each_invalid_retry_is_refused_with_its_field_path(value: object, message: str) -> None:
    with pytest.raises(RetryError) as caught:
        parse_retry(value)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


# -- delays ----------------------------------------------------------------------------


def test_delays_grow_by_the_backoff_factor() -> None:
    retry = Retry(limit=4, delay=timedelta(seconds=30), backoff=2.0, jitter=False)
    assert waits(retry, range(1, 5)) == [
        timedelta(seconds=30),
        timedelta(seconds=60),
        timedelta(seconds=120),
        timedelta(seconds=240),
    ]


def test_delays_stop_growing_at_max_delay() -> None:
    retry = Retry(
        limit=6,
        delay=timedelta(minutes=10),
        backoff=3.0,
        max_delay=timedelta(hours=1),
        jitter=False,
    )
    assert waits(retry, range(1, 5)) == [
        timedelta(minutes=10),
        timedelta(minutes=30),
        timedelta(hours=1),  # 90 min, capped
        timedelta(hours=1),
    ]


def test_a_backoff_of_one_keeps_the_delay_constant() -> None:
    retry = Retry(limit=3, delay=timedelta(seconds=45), backoff=1, jitter=False)
    assert waits(retry, range(1, 4)) == [timedelta(seconds=45)] * 3


def test_an_uncapped_delay_still_stops_at_the_hard_maximum_without_overflow() -> None:
    retry = Retry(limit=1000, delay=timedelta(seconds=10), max_delay=None, jitter=False)
    assert waits(retry, range(1000, 1001)) == [HARD_MAX_DELAY]


def test_attempts_run_out_after_the_limit() -> None:
    # limit 3: the first run and three retries, so four runs at most
    retry = Retry(limit=3, jitter=False)
    assert next_attempt(retry, 1, FAILED_AT) == FAILED_AT + timedelta(seconds=10)
    assert next_attempt(retry, 3, FAILED_AT) == FAILED_AT + timedelta(seconds=40)
    assert next_attempt(retry, 4, FAILED_AT) is None
    assert next_attempt(retry, 50, FAILED_AT) is None


def test_jitter_draws_between_half_and_all_of_the_delay() -> None:
    retry = Retry(limit=1000, delay=timedelta(seconds=30), backoff=2.0, jitter=True)
    rng = random.Random(7)
    for attempt in range(1, 9):
        full = min(timedelta(seconds=30) * 2 ** (attempt - 1), timedelta(hours=1))
        following = next_attempt(retry, attempt, FAILED_AT, rng)
        assert following is not None
        assert full / 2 <= following - FAILED_AT <= full


def test_jitter_is_reproducible_with_a_seeded_rng() -> None:
    retry = Retry(limit=3, delay=timedelta(seconds=30), jitter=True)
    first = next_attempt(retry, 1, FAILED_AT, random.Random(7))
    assert first == next_attempt(retry, 1, FAILED_AT, random.Random(7))
    expected = random.Random(7).uniform(15, 30)
    assert first == FAILED_AT + timedelta(seconds=expected)
    assert first != next_attempt(retry, 1, FAILED_AT, random.Random(8))


def test_jitter_leaves_the_random_modules_state_alone() -> None:
    """A worker runs inside someone's program (and beside Hypothesis in the fuzz tests):
    its jitter must not move the global generator their seeded runs rely on."""
    retry = Retry(limit=3, delay=timedelta(seconds=30), jitter=True)
    random.seed(11)
    state = random.getstate()
    assert next_attempt(retry, 1, FAILED_AT) is not None
    assert random.getstate() == state


def test_jitter_spreads_retries_that_failed_together() -> None:
    retry = Retry(limit=3, delay=timedelta(minutes=1), jitter=True)
    rng = random.Random(1)
    dates = {next_attempt(retry, 1, FAILED_AT, rng) for _ in range(50)}
    assert len(dates) == 50


def test_next_attempt_is_in_utc_and_wants_sound_arguments() -> None:
    retry = Retry(limit=3, jitter=False)
    paris_noon = datetime.fromisoformat("2026-06-01T14:00+02:00")
    following = next_attempt(retry, 1, paris_noon)
    assert following == FAILED_AT + timedelta(seconds=10)
    assert following is not None and following.tzinfo is UTC
    with pytest.raises(ValueError, match=r"^failed_at: expected an aware datetime"):
        next_attempt(retry, 1, datetime(2026, 6, 1, 12, 0))
    with pytest.raises(ValueError, match=r"^attempt: expected a whole number >= 1"):
        next_attempt(retry, 0, FAILED_AT)


# -- timeout -----------------------------------------------------------------------------


def test_timeout_is_a_positive_fixed_duration() -> None:
    assert parse_timeout("PT30S") == timedelta(seconds=30)
    assert parse_timeout("PT1H30M") == timedelta(minutes=90)
    assert parse_timeout("P1D") == timedelta(days=1)
    assert parse_timeout("PT0.5S") == timedelta(milliseconds=500)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("PT0S", "timeout: must be greater than zero, got 'PT0S'"),
        ("-PT5M", "timeout: must not be negative, got '-PT5M'"),
        ("P1M", "timeout: months and years have no fixed length; use W, D, H, M or S"),
        ("5 minutes", "timeout: '5 minutes' is not an ISO 8601 duration such as 'PT30S' or 'P1D'"),
        (30, "timeout: expected an ISO 8601 duration such as 'PT30S', got 30"),
        (None, "timeout: expected an ISO 8601 duration such as 'PT30S', got None"),
    ],
)
def test_each_invalid_timeout_is_refused(value: object, message: str) -> None:
    with pytest.raises(RetryError) as caught:
        parse_timeout(value)
    assert str(caught.value) == message
