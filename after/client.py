"""What a client does to tasks: the operations behind `after schedule`, `cancel`,
`reschedule`, `show` and `history`.

Plain functions over a `Database`. Every write goes through CouchDB's rules
(validate_doc_update), so a refusal comes back as the server's 403 and its
reason; we check here only what gives a clearer message before the round trip
(durations, dates, cron expressions, zones: the meaning the design document
cannot check).

Steering a task (cancel, reschedule) is a compare-and-set on the revision we
read: a 409 (or, on PouchDB Server, a 403 for a revision that has moved on)
means someone, usually the worker, wrote since, so we read the task again and
decide again from its new status, never overwrite it with our stale copy. A
task whose status cannot take the move now but soon will (a reschedule that no
worker has taken up yet) is re-read for a few seconds before we give up.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import isodate
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from after.couch import Conflict, Database, Forbidden
from after.recurrence import RepeatError, next_occurrence, parse_repeat, parse_span
from after.recurrence import parse_date as parse_task_date
from after.retry import RetryError, parse_retry, parse_timeout
from after.tasks import FINAL, TRANSITIONS, Doc, iso, now, parse_date, worker_name_problem

DDOC = "after"
UPCOMING = 5  # next occurrences `after show` lists
STEER_TRIES = 20  # writes attempted before giving up on a task that keeps changing
SETTLE = 5.0  # seconds we wait for a worker to take up a pending reschedule
ERROR_SUMMARY = 120  # characters of an error message in a listing

# Simple durations: 30s, 5m, 1h, 2d, 1w and their combinations (1h30m). `m` is
# minutes here; months exist only in the ISO form (P1M).
_SIMPLE = re.compile(r"(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


class ClientError(ValueError):
    """A request that cannot be carried out; the message says why and what to do."""


# -- reading the command line ----------------------------------------------------------


def parse_duration(text: str, option: str = "duration") -> str:
    """An ISO 8601 duration from `PT30S`, `P1D` ... or a simple `30s`, `5m`, `1h`, `2d`, `1w`,
    `1h30m`; returned in the ISO form the task stores."""
    value = text.strip()
    match = _SIMPLE.fullmatch(value.lower())
    if value and match and any(match.groups()):
        weeks, days, hours, minutes, seconds = match.groups()
        date = (f"{weeks}W" if weeks else "") + (f"{days}D" if days else "")
        clock = "".join(
            f"{amount}{unit}"
            for amount, unit in ((hours, "H"), (minutes, "M"), (seconds, "S"))
            if amount
        )
        value = "P" + date + (f"T{clock}" if clock else "")
    try:
        parse_span(value.upper())
    except ValueError:
        raise ClientError(
            f"{option}: {text!r} is not a duration: use ISO 8601 (PT30S, PT1H, P1D) or a "
            "simple form (30s, 5m, 1h, 2d, 1w, 1h30m)"
        ) from None
    return value.upper()


def zone(name: str, option: str = "--tz") -> tzinfo:
    """The time zone of an IANA name, or a ClientError naming the option."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ClientError(
            f"{option}: unknown time zone {name!r} (an IANA name such as 'Europe/Paris')"
        ) from None


def parse_when(text: str, zone_name: str | None = None, option: str = "--at") -> datetime:
    """A date as a task takes it (ISO 8601; a date alone is midnight), read in `zone_name`
    when it has no offset (UTC without one, as in a task document); `now` is now."""
    if text.strip().lower() == "now":
        return now()
    try:
        moment = parse_task_date(text, option)  # the `date` rule of the design document
    except RepeatError as exc:
        raise ClientError(str(exc)) from None
    if zone_name and datetime.fromisoformat(text).tzinfo is None:
        # fold=0: a wall time repeated when clocks fall back is its first pass.
        moment = datetime.fromisoformat(text).replace(tzinfo=zone(zone_name))
    return moment


def parse_argument(text: str) -> Any:
    """A job argument: its JSON value where it parses (3, true, null, [1], {"a": 1},
    "quoted"), else the text itself."""

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # 1e400: not a number JSON can carry
            raise ValueError(number)
        return value

    try:
        return json.loads(text, parse_constant=_refuse, parse_float=finite)
    except ValueError:
        return text


def _refuse(constant: str) -> Any:
    raise ValueError(constant)  # NaN, Infinity: Python reads them, JSON has no such values


def add_duration(moment: datetime, iso_duration: str) -> datetime:
    """`moment` + an ISO duration; months and years step the calendar (Jan 31 + P1M is Feb 28)."""
    span = parse_span(iso_duration)
    if span.months:
        moment = moment + isodate.Duration(months=span.months)
    return moment + span.days + span.clock


# -- creating a task -------------------------------------------------------------------


def build_task(
    worker: str,
    job: str,
    arguments: Sequence[str] = (),
    *,
    at: str | None = None,
    in_: str | None = None,
    cron: str | None = None,
    every: str | None = None,
    tz: str | None = None,
    limit: int | None = None,
    until: str | None = None,
    retry: int | None = None,
    timeout: str | None = None,
    misfire: str | None = None,
    at_time: datetime | None = None,
) -> Doc:
    """The task document for `after schedule` (not written yet).

    The first run is at `at`, or `in_` from now; without either a `cron` task
    starts at the cron's next time after now (in `tz`), an `every` task now.
    `at_time` stands for the current time (tests).
    """
    current = at_time or now()
    if problem := worker_name_problem(worker):
        raise ClientError(problem)
    if at is not None and in_ is not None:
        raise ClientError("give the first run with --at or --in, not both")
    if cron is not None and every is not None:
        raise ClientError("repeat with --cron or --every, not both")
    if at is None and in_ is None and cron is None and every is None:
        raise ClientError("say when: --at DATE, --in DURATION, --cron EXPR or --every DURATION")
    repeating = cron is not None or every is not None
    for option, value in (("--limit", limit), ("--until", until), ("--misfire", misfire)):
        if value is not None and not repeating:
            raise ClientError(f"{option} applies to repeating tasks (--cron or --every)")
    if tz is not None:
        zone(tz)
        if not repeating and at is None:
            raise ClientError("--tz applies to --cron, --every, --at and --until")

    doc: Doc = {
        "worker": worker,
        "job": {"name": job, "arguments": [parse_argument(a) for a in arguments]},
        "status": "waiting",
    }
    if repeating:
        repeat: dict[str, Any] = {"cron": cron} if cron is not None else {}
        if every is not None:
            repeat["interval"] = parse_duration(every, "--every")
        if tz is not None:
            repeat["timezone"] = tz
        if limit is not None:
            repeat["limit"] = limit
        if until is not None:
            repeat["until"] = iso(parse_when(until, tz, "--until"))
        try:
            parsed = parse_repeat(repeat)
        except RepeatError as exc:
            raise ClientError(str(exc)) from None
        doc["repeat"] = repeat
        if misfire is not None:
            doc["misfire"] = misfire

    if at is not None:
        start = parse_when(at, tz)
    elif in_ is not None:
        start = add_duration(current, parse_duration(in_, "--in"))
    elif cron is not None:
        # The series starts at the cron's next time: the first run is a cron time too.
        first = next_occurrence(parsed, current, current)
        if first is None:
            raise ClientError(f"--cron {cron!r} has no time after now before --until")
        start = first
    else:
        start = current
    doc["date"] = iso(start)

    if retry is not None:
        try:
            parse_retry({"limit": retry})
        except RetryError as exc:
            raise ClientError(f"--retry: {str(exc).split(': ', 1)[1]}") from None
        doc["retry"] = {"limit": retry}
    if timeout is not None:
        doc["timeout"] = parse_duration(timeout, "--timeout")
        try:
            parse_timeout(doc["timeout"])
        except RetryError as exc:
            raise ClientError(f"--{exc}") from None
    return doc


def create_task(db: Database, doc: Doc) -> str:
    """Write a new task; its id. A refusal is the server's Forbidden (403 + reason)."""
    task_id, _ = db.post(doc)
    return task_id


# -- steering a task -------------------------------------------------------------------


class _Wait(Exception):
    """The task cannot take the move yet but should soon: read it again."""


@dataclass(frozen=True)
class Move:
    """What a cancel or reschedule did: the status it found and the one it left."""

    task_id: str
    found: str
    status: str
    changed: bool
    doc: Doc


def read_task(db: Database, task_id: str) -> Doc:
    doc = db.get(task_id)
    if doc is None or doc.get("type", "task") != "task":
        raise ClientError(f"no task {task_id!r} in {db.name}")
    return doc


def steer(
    db: Database,
    task_id: str,
    decide: Callable[[Doc], Doc | None],
    doc: Doc | None = None,
    *,
    tries: int = STEER_TRIES,
    settle: float = SETTLE,
) -> Move:
    """Write decide(doc) over the revision it was decided on; on a 409, read again and
    decide again. `decide` returns the new document, None when there is nothing to do,
    or raises ClientError (refused) or _Wait (re-read until `settle` seconds passed).

    `doc` is a version already read (it may be stale: the write then conflicts and
    the task is read again).
    """
    deadline = time.monotonic() + settle
    for _ in range(tries):
        if doc is None:
            doc = read_task(db, task_id)
        found = str(doc.get("status"))
        try:
            wanted = decide(doc)
        except _Wait as wait:
            if time.monotonic() >= deadline:
                raise ClientError(str(wait)) from None
            time.sleep(0.2)
            doc = None
            continue
        if wanted is None:
            return Move(task_id, found, found, False, doc)
        try:
            db.put(wanted)  # carries doc's _rev: a compare-and-set
        except Conflict:
            doc = None  # someone wrote since we read: read again, decide again
            continue
        except Forbidden:
            # PouchDB Server validates a stale write against the current revision
            # before it checks the revision, so a write based on an old one may come
            # back 403 (about the new state) where CouchDB says 409: the same case.
            latest = read_task(db, task_id)
            if latest.get("_rev") == doc.get("_rev"):
                raise  # refused on the revision we decided on: a real refusal
            doc = latest
            continue
        return Move(task_id, found, str(wanted["status"]), True, wanted)
    raise ClientError(f"task {task_id} kept changing while we wrote it ({tries} tries); try again")


def _can_move(status: str, to: str) -> bool:
    return TRANSITIONS.get(status, {}).get(to) == "client"


def cancel_decision(doc: Doc) -> Doc | None:
    """`cancel` for a task that may still run; nothing for one already canceled."""
    status, task_id = doc.get("status"), doc["_id"]
    if status in ("cancel", "canceled"):
        return None
    if _can_move(status, "cancel"):
        return {**doc, "status": "cancel"}
    if status == "reschedule":
        raise _Wait(
            f"task {task_id} is being rescheduled and no worker has taken it up yet; "
            "cancel it once it is scheduled or waiting again (is its worker running?)"
        )
    if status == "done":
        raise ClientError(f"task {task_id} is done: nothing is left to cancel")
    if status == "err":
        raise ClientError(
            f"task {task_id} failed (err) and does not run: nothing to cancel "
            "(reschedule it to run it again)"
        )
    raise ClientError(f"task {task_id} is {status}: it cannot be canceled")


def reschedule_decision(date: datetime) -> Callable[[Doc], Doc | None]:
    """`reschedule` with the new date, for a task nobody runs right now."""

    def decide(doc: Doc) -> Doc | None:
        status, task_id = doc.get("status"), doc["_id"]
        if status == "reschedule" or _can_move(status, "reschedule"):
            return {**doc, "status": "reschedule", "date": iso(date)}
        if status == "running":
            raise ClientError(
                f"task {task_id} is running: its date cannot move while it runs "
                "(cancel it, or reschedule it when the run has ended)"
            )
        if status == "cancel":
            raise ClientError(f"task {task_id} is being canceled: it cannot be rescheduled")
        raise ClientError(f"task {task_id} is {status}, which is final: create a new task instead")

    return decide


def cancel_task(db: Database, task_id: str, doc: Doc | None = None, settle: float = SETTLE) -> Move:
    """Ask the worker to drop a task (`cancel`); the worker confirms with `canceled`."""
    return steer(db, task_id, cancel_decision, doc, settle=settle)


def reschedule_task(
    db: Database, task_id: str, date: datetime, doc: Doc | None = None, settle: float = SETTLE
) -> Move:
    """Move a task to `date` (`reschedule`); the worker takes it up with its new date."""
    return steer(db, task_id, reschedule_decision(date), doc, settle=settle)


# -- showing a task --------------------------------------------------------------------


def upcoming(doc: Doc, count: int = UPCOMING) -> list[datetime]:
    """The next runs of a task: its date, then (for a repeat) the series' next
    occurrences within `limit` and `until`. None for a task that will not run again.
    A ValueError (naming the field) for a repeat the worker could not schedule either.
    """
    status = doc.get("status")
    if status in FINAL or status in ("cancel", "err") or not isinstance(doc.get("date"), str):
        return []
    date = parse_date(doc["date"])
    if not doc.get("repeat"):
        return [] if status == "running" else [date]
    repeat = parse_repeat(doc["repeat"])
    anchor = parse_date(doc.get("anchor") or doc["date"])
    base = parse_date(doc.get("occurrence") or doc["date"])  # a retry moves date, not this
    left = None if repeat.limit is None else repeat.limit - int(doc.get("runs", 0))
    found: list[datetime] = []
    if status == "running":
        left = None if left is None else left - 1  # the run going on counts when it ends
    elif repeat.until is None or date <= repeat.until:
        found.append(date)
    while len(found) < count and (left is None or len(found) < left):
        following = next_occurrence(repeat, anchor, base)
        if following is None:
            break
        found.append(following)
        base = following
    return found[:count] if left is None else found[: max(0, min(count, left))]


def show_data(doc: Doc, count: int = UPCOMING) -> dict[str, Any]:
    """What `after show --json` prints: the task as stored and its next runs."""
    try:
        runs = [iso(moment) for moment in upcoming(doc, count)]
        problem = None
    except ValueError as exc:
        runs, problem = [], str(exc)
    return {"task": doc, "next": runs, **({"problem": problem} if problem else {})}


def _local(moment: datetime, zone_name: str | None) -> str:
    if not zone_name or zone_name == "UTC":
        return ""
    try:
        return moment.astimezone(ZoneInfo(zone_name)).isoformat(timespec="seconds")
    except (ZoneInfoNotFoundError, ValueError):
        return ""


def _when(value: Any, timespec: str = "seconds") -> str:
    if not isinstance(value, str):
        return ""
    try:
        return parse_date(value).isoformat(timespec=timespec).replace("+00:00", "Z")
    except ValueError:
        return value


def _compact(value: Any, width: int = 200) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 3] + "..."


# Rows of `after show`, in this order; anything else a task carries follows.
_SHOWN = (
    "status",
    "worker",
    "job",
    "date",
    "repeat",
    "misfire",
    "overlap",
    "retry",
    "timeout",
    "owner",
    "claimed_at",
    "attempt",
    "runs",
    "anchor",
    "occurrence",
    "skipped",
    "last_skipped",
    "started_at",
    "finished_at",
    "duration_ms",
    "result",
    "error",
    "canceled_at",
)
_HIDDEN = ("_id", "_rev", "history", "takeovers", "conflicts_resolved")


def render_task(data: dict[str, Any], now_: datetime | None = None) -> RenderableType:
    """`after show`: the task's fields as a table, then its next runs."""
    doc = data["task"]
    table = Table(title=f"task {doc['_id']}", title_justify="left", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    keys = [k for k in _SHOWN if k in doc] + sorted(
        k for k in doc if k not in _SHOWN and k not in _HIDDEN
    )
    for key in keys:
        value = doc[key]
        if key == "job":
            text = f"{value.get('name')} {_compact(value.get('arguments', []))}"
        elif key == "error" and isinstance(value, dict):
            text = f"{value.get('type', '')}: {_first_line(value.get('message', ''), 300)}"
        elif isinstance(value, str):
            text = (
                _when(value)
                if key.endswith(("_at", "date")) or key in ("anchor", "occurrence", "last_skipped")
                else value
            )
        else:
            text = _compact(value)
        table.add_row(key, Text(text))
    if doc.get("history"):
        table.add_row("history", f"{len(doc['history'])} runs kept (after history {doc['_id']})")
    parts: list[RenderableType] = [table]
    zone_name = (
        (doc.get("repeat") or {}).get("timezone") if isinstance(doc.get("repeat"), dict) else None
    )
    if data.get("problem"):
        parts.append(Text(f"cannot compute its next runs: {data['problem']}", style="red"))
    elif data["next"]:
        current = now_ or now()
        title = "next runs" if doc.get("repeat") else "next run"
        upcoming_table = Table(title=title, title_justify="left")
        upcoming_table.add_column("#", justify="right")
        upcoming_table.add_column("UTC")
        if zone_name and zone_name != "UTC":
            upcoming_table.add_column(zone_name)
        upcoming_table.add_column("in")
        for number, value in enumerate(data["next"], 1):
            moment = parse_date(value)
            cells = [str(number), _when(value)]
            if zone_name and zone_name != "UTC":
                cells.append(_local(moment, zone_name))
            cells.append(_relative(moment - current))
            upcoming_table.add_row(*cells)
        parts.append(upcoming_table)
    else:
        parts.append(Text("no further runs"))
    return Group(*parts)


def _relative(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 0:
        return f"overdue by {format_duration(-seconds)}"
    return format_duration(seconds)


def format_duration(seconds: float) -> str:
    """A short, human span: "2d 3h", "4h 5m", "6m 7s"."""
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s"


# -- run history -----------------------------------------------------------------------


def _first_line(text: Any, width: int = ERROR_SUMMARY) -> str:
    line = str(text or "").strip().split("\n", 1)[0]
    return line if len(line) <= width else line[: width - 3] + "..."


def _error_summary(error: Any) -> str | None:
    if error is None:
        return None
    if isinstance(error, dict):
        return _first_line(error.get("message") or error.get("type"))
    return _first_line(error)


def task_runs(doc: Doc) -> list[dict[str, Any]]:
    """The runs a task keeps, newest first: its `history` (repeats keep the last
    ones), or for a one-off task its last run."""
    if isinstance(doc.get("history"), list):
        entries = [e for e in doc["history"] if isinstance(e, dict)]
    elif not doc.get("repeat") and doc.get("finished_at"):
        if doc.get("error"):
            outcome = "err"
        else:
            outcome = "canceled" if doc.get("status") == "canceled" else "done"
        entries = [
            {
                "occurrence": doc.get("occurrence") or doc.get("date"),
                "attempt": doc.get("attempt"),
                "status": outcome,
                "started_at": doc.get("started_at"),
                "finished_at": doc.get("finished_at"),
                "duration_ms": doc.get("duration_ms"),
                "error": doc.get("error"),
                "instance": doc.get("owner"),
            }
        ]
    else:
        entries = []
    runs = []
    for entry in reversed(entries):
        run = {
            key: entry.get(key)
            for key in (
                "started_at",
                "finished_at",
                "duration_ms",
                "status",
                "instance",
                "attempt",
                "occurrence",
            )
        }
        run["error"] = _error_summary(entry.get("error"))
        runs.append(run)
    return runs


def recent_runs(
    db: Database, *, worker: str | None = None, job: str | None = None, limit: int = 20
) -> list[dict[str, Any]]:
    """The last runs of a worker or of a job, newest first, from the `runs` view."""
    if (worker is None) == (job is None):
        raise ClientError("give --worker NAME or --job NAME")
    kind, name = ("worker", worker) if worker is not None else ("job", job)
    # Newest first: descending, so the range starts at the high end ({} sorts after
    # every string) and ends at the low one.
    rows = db.view(
        DDOC, "runs", startkey=[kind, name, {}], endkey=[kind, name], descending=True, limit=limit
    )["rows"]
    return [{"finished_at": row["key"][2], **row["value"]} for row in rows]


def _duration(ms: Any) -> str:
    if not isinstance(ms, int | float):
        return ""
    if ms < 1000:
        return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2f} ms"
    return f"{ms / 1000:.1f} s" if ms < 60_000 else format_duration(int(ms / 1000))


def _outcome(status: Any) -> Text:
    style = {"done": "green", "err": "red", "canceled": "yellow"}.get(str(status), "")
    return Text(str(status or ""), style=style)


def render_runs(runs: list[dict[str, Any]], title: str, extra: Sequence[str] = ()) -> Table:
    """Runs as a table; `extra` columns (job, worker, task of each run) come first."""
    table = Table(title=title, title_justify="left")
    columns = ["start", "end", "duration", "outcome", "error", "instance", "attempt", "occurrence"]
    for column in [*extra, *columns]:
        table.add_column(column, overflow="fold")
    for run in runs:
        table.add_row(
            *(str(run.get(column) or "") for column in extra),
            _when(run.get("started_at"), "milliseconds"),
            _when(run.get("finished_at"), "milliseconds"),
            _duration(run.get("duration_ms")),
            _outcome(run.get("status")),
            Text(run.get("error") or ""),
            str(run.get("instance") or ""),
            str(run.get("attempt") or ""),
            _when(run.get("occurrence")),
        )
    return table
