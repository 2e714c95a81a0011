"""Retrying failed runs, and the run timeout: pure functions, no I/O.

The ``retry`` field of a task::

    {"limit": 3, "delay": "PT30S", "backoff": 2.0, "max_delay": "PT1H", "jitter": true}

- ``limit`` (required): how many retries after the first run, a whole number
  0..1000; a task gets at most ``1 + limit`` runs.
- ``delay`` (default ``"PT10S"``): the wait before the first retry, an ISO 8601
  duration >= 0 (no months or years: they have no fixed length).
- ``backoff`` (default ``2.0``): the factor applied to the wait at each further
  retry, a number >= 1 (1 means a constant delay).
- ``max_delay`` (default ``"PT1H"``): the longest wait, a duration >= ``delay``;
  null means no cap other than :data:`HARD_MAX_DELAY`.
- ``jitter`` (default ``true``): randomise each wait, see :func:`next_attempt`.

A null value counts as an absent field (except ``max_delay``, where null means
uncapped); unknown fields are refused. Errors are
``RetryError`` whose message starts with the field path (``retry.limit: ...``).

The ``timeout`` field is an ISO 8601 duration > 0 (:func:`parse_timeout`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import isodate

from after.recurrence import parse_span

# Jitter draws from a generator of its own: a worker inside someone's program leaves
# the `random` module's state (which their seeded runs may rely on) alone.
_JITTER = random.Random()

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_DELAY",
    "DEFAULT_MAX_DELAY",
    "HARD_MAX_DELAY",
    "MAX_LIMIT",
    "Retry",
    "RetryError",
    "next_attempt",
    "parse_retry",
    "parse_timeout",
]

DEFAULT_DELAY: Final = timedelta(seconds=10)
DEFAULT_BACKOFF: Final = 2.0
DEFAULT_MAX_DELAY: Final = timedelta(hours=1)
HARD_MAX_DELAY: Final = timedelta(days=365)
"""No wait is longer than this, even with ``max_delay`` null."""
MAX_LIMIT: Final = 1000

_FIELDS: Final = ("limit", "delay", "backoff", "max_delay", "jitter")


class RetryError(ValueError):
    """An invalid ``retry`` or ``timeout`` field; the message starts with the field path."""


@dataclass(frozen=True)
class Retry:
    """A parsed ``retry`` field; build it with :func:`parse_retry` (constructing
    it directly validates it the same way)."""

    limit: int
    delay: timedelta = DEFAULT_DELAY
    backoff: float = DEFAULT_BACKOFF
    max_delay: timedelta | None = DEFAULT_MAX_DELAY
    jitter: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.limit, bool)
            or not isinstance(self.limit, int)
            or not 0 <= self.limit <= MAX_LIMIT
        ):
            raise RetryError(
                f"retry.limit: must be a whole number from 0 to {MAX_LIMIT}, "
                f"got {_show(self.limit)}"
            )
        if not isinstance(self.delay, timedelta) or self.delay < timedelta(0):
            raise RetryError(f"retry.delay: must not be negative, got {_show(self.delay)}")
        if (
            isinstance(self.backoff, bool)
            or not isinstance(self.backoff, int | float)
            or not math.isfinite(self.backoff)
            or self.backoff < 1
        ):
            raise RetryError(f"retry.backoff: must be a number >= 1, got {_show(self.backoff)}")
        object.__setattr__(self, "backoff", float(self.backoff))
        if self.max_delay is not None and (
            not isinstance(self.max_delay, timedelta) or self.max_delay < self.delay
        ):
            raise RetryError(
                f"retry.max_delay: must not be shorter than retry.delay ({_show(self.delay)}), "
                f"got {_show(self.max_delay)}"
            )
        if not isinstance(self.jitter, bool):
            raise RetryError(f"retry.jitter: must be true or false, got {_show(self.jitter)}")


def parse_retry(value: object) -> Retry:
    """Parse a task's ``retry`` field (a JSON object) into a :class:`Retry`.

    Raises ``RetryError``: ``retry: ...``, ``retry.limit: ...``,
    ``retry.delay: ...``, ``retry.backoff: ...``, ``retry.max_delay: ...``,
    ``retry.jitter: ...``.
    """
    if not isinstance(value, dict):
        raise RetryError(
            'retry: expected an object such as {"limit": 3, "delay": "PT30S"}, '
            f"got {_show(value)}"
        )
    for key in value:
        if key not in _FIELDS:
            raise RetryError(f"retry: unknown field {key!r} (known: {', '.join(_FIELDS)})")
    if value.get("limit") is None:
        raise RetryError(f"retry.limit: required, a whole number from 0 to {MAX_LIMIT}")
    delay, backoff, jitter = value.get("delay"), value.get("backoff"), value.get("jitter")
    if "max_delay" not in value:
        max_delay: timedelta | None = DEFAULT_MAX_DELAY
    elif value["max_delay"] is None:
        max_delay = None  # explicitly uncapped (HARD_MAX_DELAY still applies)
    else:
        max_delay = _duration(value["max_delay"], "retry.max_delay")
    return Retry(
        limit=value["limit"],
        delay=DEFAULT_DELAY if delay is None else _duration(delay, "retry.delay"),
        backoff=DEFAULT_BACKOFF if backoff is None else backoff,
        max_delay=max_delay,
        jitter=True if jitter is None else jitter,
    )


def next_attempt(
    retry: Retry,
    attempt: int,
    failed_at: datetime,
    rng: random.Random | None = None,
) -> datetime | None:
    """When to run again after run number ``attempt`` (1 for the first run)
    failed at ``failed_at``; None when no retry is left (``attempt > limit``).

    The wait is ``min(delay * backoff ** (attempt - 1), max_delay)``: with the
    defaults 10 s, 20 s, 40 s ... up to an hour. With ``jitter`` it is drawn
    uniformly between half of that and all of it ("equal jitter": retries of many
    tasks that failed together spread out, yet none comes back sooner than half
    the backoff). ``rng`` (default: a generator of its own) makes it reproducible.
    The result is in UTC.
    """
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt: expected a whole number >= 1, got {attempt!r}")
    if failed_at.utcoffset() is None:
        raise ValueError(f"failed_at: expected an aware datetime, got {failed_at!r}")
    if attempt > retry.limit:
        return None
    cap = HARD_MAX_DELAY if retry.max_delay is None else min(retry.max_delay, HARD_MAX_DELAY)
    seconds = retry.delay.total_seconds()
    try:
        seconds *= retry.backoff ** (attempt - 1)
    except OverflowError:
        seconds = math.inf
    seconds = min(seconds, cap.total_seconds())
    if retry.jitter:
        seconds = (rng or _JITTER).uniform(seconds / 2, seconds)
    return failed_at.astimezone(UTC) + timedelta(seconds=seconds)


def parse_timeout(value: object) -> timedelta:
    """Parse a task's ``timeout`` field: an ISO 8601 duration greater than zero,
    without months or years (``"PT30S"``, ``"PT2H"``, ``"P1D"``).

    Raises ``RetryError`` starting with ``timeout:``.
    """
    timeout = _duration(value, "timeout")
    if timeout <= timedelta(0):
        raise RetryError(f"timeout: must be greater than zero, got {value!r}")
    return timeout


def _duration(value: object, field: str) -> timedelta:
    try:
        return parse_span(value).fixed()
    except ValueError as error:
        raise RetryError(f"{field}: {error}") from None


def _show(value: object) -> str:
    text = isodate.duration_isoformat(value) if isinstance(value, timedelta) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
