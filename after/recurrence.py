"""Repeating tasks: when the next run is due, and what to do about missed ones.

Pure functions, no I/O: the worker parses a task's ``repeat``, ``misfire`` and
``overlap`` fields with the ``parse_*`` functions and, after each run (or when it
finds an overdue task at start-up), asks :func:`plan_after_run` or
:func:`plan_overdue` for the task's next ``date``. All datetimes in and out are
aware; results are in UTC.

The ``repeat`` field
--------------------

Exactly one of ``cron`` or ``interval``, and optionally ``timezone``, ``limit``
and ``until``::

    {"cron": "*/5 * * * *"}
    {"cron": "0 30 2 * * *", "timezone": "Europe/Paris"}
    {"interval": "PT1H", "limit": 10}
    {"interval": "P1M", "timezone": "America/New_York", "until": "2027-01-01"}

- ``cron``: 5 fields ``minute hour day-of-month month day-of-week`` (cron as
  everyone knows it), or 6 fields with the SECONDS FIRST, as in Quartz and Spring:
  ``second minute hour day-of-month month day-of-week``. So ``*/10 * * * * *``
  runs every 10 seconds and ``0 30 2 * * *`` is ``30 2 * * *``. The macros
  ``@yearly @annually @monthly @weekly @daily @midnight @hourly`` work too.
  Names (``MON``, ``JAN``), ``L``, ``W`` and ``#`` are those of cronsim; ``?`` and
  a year field are not supported. Fields are matched in the repeat's time zone.
- ``interval``: an ISO 8601 duration in the designator form
  (``PnYnMnWnDTnHnMnS``), greater than zero; years, months, weeks and days must
  be whole numbers. Occurrences are ``anchor + k * interval``.
- ``timezone``: an IANA name (default ``"UTC"``), from the ``tzdata`` package
  when the system has no zone files.
- ``limit``: the total number of runs (the first one included), at least 1.
  Skipped occurrences are not runs.
- ``until``: no occurrence after this instant (an occurrence exactly at it still
  runs). Same format as a task's ``date``: a date alone is midnight UTC, no
  offset means UTC.

A null value counts as an absent field; unknown fields are refused.

The series of a task
--------------------

The *anchor* is the task's first date: the first run happens at the anchor
whatever the schedule says. For an interval the series is ``anchor + k *
interval`` for k = 0, 1, 2 ...; for cron it is the anchor followed by every
cron time after it. Each next date is computed from the anchor and the series,
never as "end of the last run + interval", so a run that started or ended late
does not shift the runs after it (no drift).

Daylight saving time
--------------------

Cron fields and calendar intervals are wall-clock times in the repeat's zone. On
the days the clocks change we follow cronie (man cron(8), "clock changes of
less than 3 hours"):

- A *fixed-time* cron schedule is one whose hour field holds neither ``*`` nor
  ``/`` (``30 2 * * *``, ``0 9,17 * * 1-5``). A time in the hour that is skipped
  when clocks spring forward runs once, right after the gap: ``30 2 * * *`` in
  Europe/Paris runs on 2026-03-29 at 03:00 local (01:00 UTC). Several times
  inside one gap collapse into that one run. A time in the hour that is
  repeated when clocks fall back runs once, at its first pass (02:30 +02:00 on
  2026-10-25 in Paris, not again at 02:30 +01:00).
- A schedule with ``*`` or ``/`` in the hour field (hourly or more often:
  ``*/30 * * * *``, ``0 * * * *``, ``0 */2 * * *``) follows real elapsed time: it
  matches the local clock as it really runs, so it loses no run in the skipped
  hour (there is no such local time to match) and runs in both passes of the
  repeated hour (they are different real times): ``*/30 * * * *`` runs every 30
  real minutes across both transitions, ``0 * * * *`` once each real hour.
  Unlike cronie we look at the hour field only: ``*/10 2 * * *`` is a fixed-time
  schedule, so on the spring-forward day it still runs (once, at 03:00) instead
  of not at all. Write an hourly schedule with ``*``, not ``0-23``.
- An interval without a calendar part (``PT1H``, ``PT90M``) is plain elapsed
  time: ``PT1H`` is 3600 s, whatever the clocks do.
- An interval with a calendar part (years, months, weeks or days: ``P1D``,
  ``P1M``, ``P1DT2H``) steps the local wall-clock time from the anchor's
  (months clamp to the month's last day: Jan 31 + P1M is Feb 28, + P2M is
  Mar 31); a result in a skipped hour moves forward to the end of the gap, one in
  a repeated hour takes the first pass, as for fixed-time cron.

Misfires
--------

An occurrence is *missed* when its run could not start on time (the worker was
down, or the previous run was still going). ``misfire.grace`` (default one
minute, Quartz's misfire threshold) is how late a run may start and still count
as on time. The policy decides about the occurrences later than that:

- ``skip`` (the default): record them as skipped and wait for the next
  occurrence that is not late;
- ``once``: run one catch-up now, standing for all of them (the latest one), then
  continue with the series;
- ``all``: run each of them, oldest first, one after the other; bounded by
  ``repeat.limit`` and by :data:`MAX_CATCH_UP`: when more are late, only the
  latest ``MAX_CATCH_UP`` run and the older ones are skipped.

Library choice
--------------

Cron expressions come from ``cronsim`` rather than ``croniter``. Both were run on
the 2026 transitions of Europe/Paris and America/New_York: both handle the
spring-forward gap and wildcard-hour schedules alike, but croniter 7.0 runs a
fixed-time job twice in the repeated hour (``30 2 * * *`` fires at 00:30 and
01:30 UTC on 2026-10-25 in Paris) while cronsim 2.8 runs it once, as cronie does.
cronsim is also typed, has no dependencies (croniter pulls python-dateutil), and
iterates backwards, which lets misfire handling find the latest missed
occurrence without walking every missed one. cronsim applies its own
Debian-style DST fix-up only to 5-field expressions whose minute and hour fields
are not wildcards; we always hand it the 6-field form (which turns that off),
and apply the rule above ourselves for 5- and 6-field expressions alike:
fixed-time schedules iterate over naive wall-clock times that we then place on
the time line, the others iterate over aware times in the zone. ISO 8601
durations come from ``isodate`` (its designator-form regex and parser), months
arithmetic from its ``Duration``; time zones from ``zoneinfo`` and ``tzdata``.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from itertools import chain, count, islice
from typing import Final, Literal, cast
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import isodate
from cronsim import CronSim, CronSimError
from isodate.isoduration import ISO8601_PERIOD_REGEX

__all__ = [
    "COUNT_CAP",
    "DEFAULT_GRACE",
    "MAX_CATCH_UP",
    "Misfire",
    "MisfirePolicy",
    "Overlap",
    "Plan",
    "Repeat",
    "RepeatError",
    "Span",
    "next_occurrence",
    "occurrences_missed",
    "parse_date",
    "parse_misfire",
    "parse_overlap",
    "parse_repeat",
    "parse_span",
    "plan_after_run",
    "plan_overdue",
]

MisfirePolicy = Literal["skip", "once", "all"]
Overlap = Literal["skip", "allow"]

DEFAULT_GRACE: Final = timedelta(minutes=1)
"""How late a run may start and still count as on time, unless ``misfire.grace`` says."""

MAX_CATCH_UP: Final = 1000
"""Policy ``all`` replays at most this many missed occurrences; older ones are skipped."""

COUNT_CAP: Final = 10_000
"""Skipped counts of cron schedules are exact up to this number and saturate there
(counting means walking the occurrences); counts of interval schedules are always exact."""

_TICK: Final = timedelta(microseconds=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_POLICIES: Final = ("skip", "once", "all")
_OVERLAPS: Final = ("skip", "allow")
_REPEAT_FIELDS: Final = ("cron", "interval", "timezone", "limit", "until")
_MISFIRE_FIELDS: Final = ("policy", "grace")
_MACROS: Final = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# The same pattern as the `date` rule in designdocs/after/lib/rules.json, so that
# `until` accepts exactly what a task's `date` accepts.
_DATE: Final = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?$"
)


class RepeatError(ValueError):
    """An invalid ``repeat``, ``misfire`` or ``overlap`` field.

    The message starts with the field's path: ``repeat.cron: ...``,
    ``misfire.grace: ...``, ``overlap: ...``.
    """


# -- durations ------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """An ISO 8601 duration split the way scheduling needs it.

    ``months`` holds the Y and M components (12 per year), ``days`` the W and D
    components, ``clock`` the H, M and S components.
    """

    months: int = 0
    days: timedelta = timedelta(0)
    clock: timedelta = timedelta(0)

    @property
    def calendar(self) -> bool:
        """True when the duration has years, months, weeks or days (wall-clock steps)."""
        return self.months != 0 or self.days != timedelta(0)

    def fixed(self) -> timedelta:
        """The duration as elapsed time; ``ValueError`` if it has months or years."""
        if self.months:
            raise ValueError("months and years have no fixed length; use W, D, H, M or S")
        return self.days + self.clock


def parse_span(value: object) -> Span:
    """Parse an ISO 8601 duration in the designator form ``PnYnMnWnDTnHnMnS``.

    Raises ``ValueError`` with a message that has no field prefix (callers add
    theirs). Negative durations, the alternative form (``P0000-00-01``),
    fractional years or months are refused; zero is allowed (callers decide).
    """
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO 8601 duration such as 'PT30S', got {_show(value)}")
    match = ISO8601_PERIOD_REGEX.match(value)
    groups = match.groupdict() if match else {}
    date_parts = [groups.get(k) for k in ("years", "months", "weeks", "days")]
    time_parts = [groups.get(k) for k in ("hours", "minutes", "seconds")]
    if (
        match is None
        or not any(date_parts + time_parts)
        or (groups.get("separator") and not any(time_parts))
    ):
        raise ValueError(f"{value!r} is not an ISO 8601 duration such as 'PT30S' or 'P1D'")
    if groups.get("sign") == "-":
        raise ValueError(f"must not be negative, got {value!r}")
    text = value.lstrip("+")
    try:
        whole = isodate.parse_duration(text, as_timedelta_if_possible=False)
        split = text.find("T")
        clock = isodate.parse_duration("P" + text[split:]) if split >= 0 else timedelta(0)
    except (ValueError, OverflowError, ArithmeticError):
        raise ValueError(f"{value!r} is too large") from None
    if not (float(whole.years).is_integer() and float(whole.months).is_integer()):
        raise ValueError(f"years and months must be whole numbers, got {value!r}")
    months = int(whole.years) * 12 + int(whole.months)
    return Span(months=months, days=whole.tdelta - clock, clock=clock)


# -- the repeat field -----------------------------------------------------------


@dataclass(frozen=True)
class _Cron:
    expr6: str  # seconds-first 6-field form handed to cronsim
    wall_clock: bool  # fixed-time schedule (no * or / in the hour field)


@lru_cache(maxsize=512)
def _compile_cron(expr: str) -> _Cron:
    text = _MACROS.get(expr.strip().lower(), expr)
    fields = text.split()
    if len(fields) == 5:
        fields.insert(0, "0")
    elif len(fields) != 6:
        raise RepeatError(
            f"repeat.cron: expected 5 fields (minute hour day-of-month month day-of-week) "
            f"or 6 with the seconds first, got {len(fields)} in {expr!r}"
        )
    expr6 = " ".join(fields)
    try:
        CronSim(expr6, datetime(2000, 1, 1))
    except CronSimError as error:
        raise RepeatError(f"repeat.cron: {str(error).lower()} field in {expr!r}") from None
    hour = fields[2]
    return _Cron(expr6=expr6, wall_clock="*" not in hour and "/" not in hour)


@lru_cache(maxsize=512)
def _compile_interval(text: str) -> Span:
    try:
        span = parse_span(text)
    except ValueError as error:
        raise RepeatError(f"repeat.interval: {error}") from None
    if span.months == 0 and span.days + span.clock <= timedelta(0):
        raise RepeatError(f"repeat.interval: must be greater than zero, got {text!r}")
    if span.days % timedelta(days=1):
        raise RepeatError(f"repeat.interval: weeks and days must be whole numbers, got {text!r}")
    return span


@lru_cache(maxsize=512)
def _zone(name: str) -> tzinfo:
    if name == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise RepeatError(f"repeat.timezone: unknown time zone {name!r}") from None


@dataclass(frozen=True)
class Repeat:
    """A parsed ``repeat`` field; build it with :func:`parse_repeat`.

    Constructing it directly validates it the same way (``RepeatError``).
    ``until`` is stored in UTC.
    """

    cron: str | None = None
    interval: str | None = None
    timezone: str = "UTC"
    limit: int | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval is None):
            raise RepeatError("repeat: needs exactly one of cron or interval")
        if self.cron is not None:
            if not isinstance(self.cron, str) or not self.cron.strip():
                raise RepeatError(
                    "repeat.cron: expected a cron expression such as '*/5 * * * *', "
                    f"got {_show(self.cron)}"
                )
            _compile_cron(self.cron)
        if self.interval is not None:
            if not isinstance(self.interval, str):
                raise RepeatError(
                    "repeat.interval: expected an ISO 8601 duration such as 'PT1H', "
                    f"got {_show(self.interval)}"
                )
            _compile_interval(self.interval)
        if not isinstance(self.timezone, str) or not self.timezone:
            raise RepeatError(
                "repeat.timezone: expected an IANA name such as 'Europe/Paris', "
                f"got {_show(self.timezone)}"
            )
        _zone(self.timezone)
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise RepeatError(f"repeat.limit: must be a whole number >= 1, got {self.limit!r}")
        if self.until is not None:
            if not isinstance(self.until, datetime) or self.until.utcoffset() is None:
                raise RepeatError(f"repeat.until: must be an aware datetime, got {self.until!r}")
            object.__setattr__(self, "until", self.until.astimezone(UTC))


def parse_date(value: object, field: str = "date") -> datetime:
    """An aware UTC datetime from a task-style ISO 8601 string.

    ``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|+HH:MM]``: a date alone is
    midnight UTC, no offset means UTC. Errors are ``RepeatError`` prefixed with
    ``field``.
    """
    if not isinstance(value, str) or not _DATE.match(value):
        raise RepeatError(
            f"{field}: expected an ISO 8601 date such as '2026-12-01T09:30:00Z', got {_show(value)}"
        )
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise RepeatError(f"{field}: {value!r} is not a real calendar date") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_repeat(value: object) -> Repeat:
    """Parse a task's ``repeat`` field (a JSON object) into a :class:`Repeat`.

    Raises ``RepeatError`` whose message starts with the field path, e.g.
    ``repeat.cron: bad minute field in '61 * * * *'``,
    ``repeat.timezone: unknown time zone 'Mars/Base'``,
    ``repeat: needs exactly one of cron or interval``.
    """
    if not isinstance(value, dict):
        raise RepeatError(
            'repeat: expected an object such as {"cron": "*/5 * * * *"} or '
            f'{{"interval": "PT1H"}}, got {_show(value)}'
        )
    for key in value:
        if key not in _REPEAT_FIELDS:
            raise RepeatError(f"repeat: unknown field {key!r} (known: {', '.join(_REPEAT_FIELDS)})")
    zone = value.get("timezone")
    until = value.get("until")
    return Repeat(
        cron=value.get("cron"),
        interval=value.get("interval"),
        timezone="UTC" if zone is None else zone,
        limit=value.get("limit"),
        until=None if until is None else parse_date(until, "repeat.until"),
    )


# -- placing wall-clock times on the time line ----------------------------------


def _resolve(wall: datetime, zone: tzinfo) -> datetime:
    """The UTC instant of a naive local time: the first pass of a repeated time,
    the end of the gap for a skipped one."""
    if zone is UTC:
        return wall.replace(tzinfo=UTC)
    instant = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    if instant.astimezone(zone).replace(tzinfo=None) == wall:
        return instant
    return _gap_end(wall, zone)


def _gap_end(wall: datetime, zone: tzinfo) -> datetime:
    """The instant the clocks jumped over the skipped local time ``wall``."""
    # fold=1 reads an imaginary time with the offset after the jump (an instant
    # before it), fold=0 with the offset before it (an instant after it).
    before = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    after = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    while after - before > _TICK:  # local(before) <= wall < local(after)
        middle = before + (after - before) // 2
        if middle.astimezone(zone).replace(tzinfo=None) > wall:
            after = middle
        else:
            before = middle
    return after


# -- the series of occurrences --------------------------------------------------


def _instants(wall: datetime, zone: tzinfo) -> list[datetime]:
    """Every real instant at which the local clock reads ``wall``: none in a
    skipped hour, two in a repeated one, else one."""
    found = []
    for fold in (0, 1):
        instant = wall.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) == wall and instant not in found:
            found.append(instant)
    return sorted(found)


def _fold_length(wall: datetime, zone: tzinfo) -> timedelta:
    """How long the local time ``wall`` repeats (zero when it happens once)."""
    first = cast(timedelta, wall.replace(tzinfo=zone, fold=0).utcoffset())
    second = cast(timedelta, wall.replace(tzinfo=zone, fold=1).utcoffset())
    return max(first - second, timedelta(0))


def _cron_forward(cron: _Cron, zone: tzinfo, after: datetime) -> Iterator[datetime]:
    """Cron times strictly after ``after``, in order.

    cronsim walks naive wall-clock times; we place each on the time line: the
    first pass or the end of the gap for fixed-time schedules, every real instant
    that reads that time for the others.
    """
    if zone is UTC:
        for instant in CronSim(cron.expr6, after):
            yield instant.astimezone(UTC)
        return
    local = after.astimezone(zone)
    start = local.replace(tzinfo=None)
    last = after
    if cron.wall_clock:
        # A wall time at or before local(after) never lands after `after`.
        for wall in CronSim(cron.expr6, start):
            instant = _resolve(wall, zone)
            if instant > last:
                yield instant
                last = instant
        return
    if not local.fold:
        # In the first pass of a repeated hour, earlier wall times still have
        # their second pass ahead.
        start -= _fold_length(start, zone)
    pending: list[datetime] = []  # a heap: second passes come after later first passes
    for wall in CronSim(cron.expr6, start):
        instants = _instants(wall, zone)
        if not instants:
            continue
        for instant in instants:
            heapq.heappush(pending, instant)
        # First passes grow with the wall time: nothing later can come before this one.
        while pending and pending[0] <= instants[0]:
            instant = heapq.heappop(pending)
            if instant > last:
                yield instant
                last = instant
    while pending:
        instant = heapq.heappop(pending)
        if instant > last:
            yield instant
            last = instant


def _cron_backward(cron: _Cron, zone: tzinfo, before: datetime) -> Iterator[datetime]:
    """Cron times strictly before ``before``, latest first (the mirror of _cron_forward)."""
    if zone is UTC:
        for instant in CronSim(cron.expr6, before, reverse=True):
            yield instant.astimezone(UTC)
        return
    local = before.astimezone(zone)
    start = local.replace(tzinfo=None)
    if local.fold:
        # In the second pass of a repeated hour, later wall times still have
        # their first pass behind.
        start += _fold_length(start, zone)
    last = before
    if cron.wall_clock:
        for wall in CronSim(cron.expr6, start, reverse=True):
            instant = _resolve(wall, zone)
            if instant < last:
                yield instant
                last = instant
        return
    pending: list[tuple[timedelta, datetime]] = []  # a max-heap keyed on -(instant - epoch)
    for wall in CronSim(cron.expr6, start, reverse=True):
        instants = _instants(wall, zone)
        if not instants:
            continue
        for instant in instants:
            heapq.heappush(pending, (_EPOCH - instant, instant))
        while pending and pending[0][1] >= instants[-1]:
            _, instant = heapq.heappop(pending)
            if instant < last:
                yield instant
                last = instant
    while pending:
        _, instant = heapq.heappop(pending)
        if instant < last:
            yield instant
            last = instant


def _interval_at(span: Span, zone: tzinfo, anchor: datetime, k: int) -> datetime:
    """Occurrence number ``k`` of an interval series (0 is the anchor)."""
    if k == 0:
        return anchor
    if not span.calendar:
        return anchor + k * span.clock
    wall = anchor.astimezone(zone).replace(tzinfo=None)
    if span.months:
        wall = cast(datetime, wall + isodate.Duration(months=k * span.months))
    return _resolve(wall + k * (span.days + span.clock), zone)


def _interval_index(span: Span, zone: tzinfo, anchor: datetime, t: datetime) -> int:
    """The number of occurrences at or before ``t`` (= the index of the first after it)."""
    if t < anchor:
        return 0
    if not span.calendar:
        return (t - anchor) // span.clock + 1
    # Estimate with an average month, then correct: the estimate is off by at most
    # a step or two (calendar months stay within a few days of the average).
    average = timedelta(days=30.436875) * span.months + span.days + span.clock
    k = max(1, int((t - anchor) / average))
    while k > 1 and _interval_at(span, zone, anchor, k - 1) > t:
        k -= 1
    while _interval_at(span, zone, anchor, k) <= t:
        k += 1
    return k


def _parts(repeat: Repeat) -> tuple[tzinfo, _Cron | Span]:
    zone = _zone(repeat.timezone)
    if repeat.cron is not None:
        return zone, _compile_cron(repeat.cron)
    return zone, _compile_interval(cast(str, repeat.interval))


def _forward(repeat: Repeat, anchor: datetime, after: datetime) -> Iterator[datetime]:
    """Occurrences strictly after ``after``, in order, none after ``until``."""
    zone, rule = _parts(repeat)
    source: Iterator[datetime]
    try:
        if isinstance(rule, Span):
            start = _interval_index(rule, zone, anchor, after)
            source = (_interval_at(rule, zone, anchor, k) for k in count(start))
        elif after < anchor:
            source = chain([anchor], _cron_forward(rule, zone, anchor))
        else:
            source = _cron_forward(rule, zone, after)
        last = after
        for occurrence in source:
            if repeat.until is not None and occurrence > repeat.until:
                return
            if occurrence > last:
                yield occurrence
                last = occurrence
    except OverflowError:  # past year 9999
        return


def _backward(repeat: Repeat, anchor: datetime, before: datetime) -> Iterator[datetime]:
    """Occurrences strictly before ``before``, latest first, ending with the anchor."""
    if repeat.until is not None:
        before = min(before, repeat.until + _TICK)
    if before <= anchor:
        return
    zone, rule = _parts(repeat)
    if isinstance(rule, Span):
        last = before
        for k in range(_interval_index(rule, zone, anchor, before - _TICK) - 1, -1, -1):
            occurrence = _interval_at(rule, zone, anchor, k)
            if occurrence < last:
                yield occurrence
                last = occurrence
        return
    for occurrence in _cron_backward(rule, zone, before):
        if occurrence <= anchor:
            break
        yield occurrence
    yield anchor


def _count(
    repeat: Repeat, anchor: datetime, low: datetime, high: datetime, cap: int = COUNT_CAP
) -> int:
    """How many occurrences lie in (low, high]; cron counts saturate at ``cap``."""
    if repeat.until is not None:
        high = min(high, repeat.until)
    if high <= low:
        return 0
    zone, rule = _parts(repeat)
    if isinstance(rule, Span):
        return max(
            0,
            _interval_index(rule, zone, anchor, high) - _interval_index(rule, zone, anchor, low),
        )
    found = 0
    for occurrence in _forward(repeat, anchor, low):
        if occurrence > high or found >= cap:
            break
        found += 1
    return found


def next_occurrence(repeat: Repeat, anchor: datetime, after: datetime) -> datetime | None:
    """The first occurrence strictly after ``after``, in UTC; None when the series
    has ended (past ``until``). ``anchor`` is the task's first date (itself the
    first occurrence). ``limit`` is not looked at here (it counts runs, see the
    ``plan_*`` functions)."""
    anchor, after = _aware(anchor, "anchor"), _aware(after, "after")
    return next(_forward(repeat, anchor, after), None)


def occurrences_missed(
    repeat: Repeat,
    anchor: datetime,
    last: datetime,
    now: datetime,
    limit: int = MAX_CATCH_UP,
) -> tuple[list[datetime], bool]:
    """The occurrences in (``last``, ``now``], oldest first, at most ``limit`` of
    them, and whether more were left out."""
    anchor, last, now = _aware(anchor, "anchor"), _aware(last, "last"), _aware(now, "now")
    found: list[datetime] = []
    for occurrence in _forward(repeat, anchor, last):
        if occurrence > now:
            return found, False
        if len(found) == limit:
            return found, True
        found.append(occurrence)
    return found, False


# -- misfires, overlap, plans ---------------------------------------------------


@dataclass(frozen=True)
class Misfire:
    """What to do about occurrences whose run could not start on time.

    ``grace``: a run starting at most this late still counts as on time.
    """

    policy: MisfirePolicy = "skip"
    grace: timedelta = DEFAULT_GRACE

    def __post_init__(self) -> None:
        if self.policy not in _POLICIES:
            raise RepeatError(
                f"misfire: unknown policy {self.policy!r} (expected skip, once or all)"
            )
        if not isinstance(self.grace, timedelta) or self.grace < timedelta(0):
            raise RepeatError(f"misfire.grace: must not be negative, got {_show(self.grace)}")


def parse_misfire(value: object) -> Misfire:
    """Parse a task's ``misfire`` field: absent/null (skip, grace one minute), a
    policy name (``"skip"``, ``"once"``, ``"all"``) or
    ``{"policy": "once", "grace": "PT30S"}`` (both keys optional).

    Errors start with ``misfire:`` or ``misfire.grace:``.
    """
    if value is None:
        return Misfire()
    if isinstance(value, str):
        return Misfire(policy=cast(MisfirePolicy, value))
    if not isinstance(value, dict):
        raise RepeatError(
            "misfire: expected 'skip', 'once', 'all' or an object such as "
            f'{{"policy": "once", "grace": "PT30S"}}, got {_show(value)}'
        )
    for key in value:
        if key not in _MISFIRE_FIELDS:
            raise RepeatError(f"misfire: unknown field {key!r} (known: policy, grace)")
    policy = value.get("policy")
    if policy is None:
        policy = "skip"
    if not isinstance(policy, str):
        raise RepeatError(f"misfire: unknown policy {_show(policy)} (expected skip, once or all)")
    grace = DEFAULT_GRACE
    if value.get("grace") is not None:
        try:
            grace = parse_span(value["grace"]).fixed()
        except ValueError as error:
            raise RepeatError(f"misfire.grace: {error}") from None
    return Misfire(policy=cast(MisfirePolicy, policy), grace=grace)


def parse_overlap(value: object) -> Overlap:
    """Parse a task's ``overlap`` field: ``"skip"`` (the default: an occurrence
    due while the previous run is still going is a misfire) or ``"allow"``
    (runs may overlap)."""
    if value is None:
        return "skip"
    if value not in _OVERLAPS:
        raise RepeatError(f"overlap: expected 'skip' or 'allow', got {_show(value)}")
    return value


@dataclass(frozen=True)
class Plan:
    """The worker's next step for a repeating task.

    ``next_date``: the task's next date; at or before now means "run now" (on
    time within grace, or a catch-up); None means the repeat is finished (limit
    reached or past ``until``). ``skipped``: how many occurrences were given up
    (record it); ``last_skipped``: the latest of them.
    """

    next_date: datetime | None
    skipped: int = 0
    last_skipped: datetime | None = None


def plan_after_run(
    repeat: Repeat,
    misfire: Misfire,
    anchor: datetime,
    scheduled_for: datetime,
    now: datetime,
    runs_done: int,
) -> Plan:
    """What follows a run that was scheduled for ``scheduled_for`` and has just
    ended at ``now``; ``runs_done`` counts the runs so far, this one included.

    Normally the next occurrence after ``scheduled_for`` (not after ``now``: no
    drift). Occurrences that went by while the run was going are missed and
    handled by ``misfire``, as in :func:`plan_overdue`.
    """
    anchor, scheduled_for = _aware(anchor, "anchor"), _aware(scheduled_for, "scheduled_for")
    now = _aware(now, "now")
    first = next(_forward(repeat, anchor, scheduled_for), None)
    return _plan(repeat, misfire, anchor, first, now, runs_done)


def plan_overdue(
    repeat: Repeat,
    misfire: Misfire,
    anchor: datetime,
    due: datetime,
    now: datetime,
    runs_done: int,
) -> Plan:
    """What to do with a task found waiting for ``due`` when it is already ``now``
    (e.g. at start-up after downtime); ``runs_done`` counts the runs so far.

    The late occurrences are ``due`` and those of the series after it that are
    more than ``misfire.grace`` old. ``skip``: next_date is the first occurrence
    that is not late (maybe within grace, to run now; maybe in the future), and
    all late ones are skipped. ``once``: next_date is the latest late occurrence,
    to run now, the others are skipped. ``all``: next_date is ``due`` (or, when more
    than MAX_CATCH_UP are late, the oldest of the latest MAX_CATCH_UP). A ``due``
    within grace simply runs now.
    """
    anchor, due, now = _aware(anchor, "anchor"), _aware(due, "due"), _aware(now, "now")
    return _plan(repeat, misfire, anchor, due, now, runs_done)


def _plan(
    repeat: Repeat,
    misfire: Misfire,
    anchor: datetime,
    first: datetime | None,
    now: datetime,
    runs_done: int,
) -> Plan:
    """``first`` is the earliest pending occurrence; the later ones are the series'."""
    if repeat.limit is not None and runs_done >= repeat.limit:
        return Plan(None)
    cutoff = now - misfire.grace  # occurrences before this are late
    if first is None or first >= cutoff:
        return Plan(first)
    late = 1 + _count(repeat, anchor, first, cutoff - _TICK, COUNT_CAP - 1)
    if misfire.policy == "all":
        if late <= MAX_CATCH_UP:
            return Plan(first)
        latest = list(islice(_backward(repeat, anchor, cutoff), MAX_CATCH_UP + 1))
        oldest_kept = latest[MAX_CATCH_UP - 1]
        newest_dropped = latest[MAX_CATCH_UP] if len(latest) > MAX_CATCH_UP else first
        return Plan(oldest_kept, late - MAX_CATCH_UP, max(newest_dropped, first))
    # The late occurrences, latest first: those of the series after `first`, then `first`.
    tail = [t for t in islice(_backward(repeat, anchor, cutoff), 2) if t > first]
    tail.append(first)
    if misfire.policy == "once":
        return Plan(tail[0], late - 1, tail[1] if late > 1 else None)
    return Plan(next(_forward(repeat, anchor, cutoff - _TICK), None), late, tail[0])


# -- helpers --------------------------------------------------------------------


def _aware(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{name}: expected an aware datetime, got {value!r}")
    return value.astimezone(UTC)


def _show(value: object) -> str:
    text = isodate.duration_isoformat(value) if isinstance(value, timedelta) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
