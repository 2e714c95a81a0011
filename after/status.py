"""What `after status` shows: the state of a tasks database at a glance.

`summary(db)` reads it from the design document's views and the worker records
(a handful of small requests, whatever the number of tasks): counts by status
and by worker, the late tasks, the recent failures, what is running and every
worker instance with the age of its heartbeat. The result is plain JSON data
(`to_json`), and `render` turns it into rich tables for the terminal; `watch`
redraws them in place until interrupted.

The dashboard (designdocs/after/_attachments/) shows the same things, live.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from after import records
from after.couch import Database
from after.tasks import STATUSES, Doc, iso, now, parse_date

DDOC = "after"
# Statuses in which a task past its date is late: nobody has run it yet.
LATE_STATUSES = ("waiting", "scheduled", "reschedule")
LIST_LIMIT = 20
MAX_TEXT = 300  # characters of an error message kept in the summary


def summary(db: Database, at: datetime | None = None, limit: int = LIST_LIMIT) -> dict[str, Any]:
    """The state of `db` at `at` (default: now), as JSON-ready data.

    Raises `after.couch.NotFound` when the database or its design document is
    missing (`after push` creates both), and any other `CouchError` as it comes.
    """
    at = at or now()
    moment = iso(at)

    by_worker: dict[str, dict[str, int]] = {}
    for row in db.view(DDOC, "by_worker", group_level=2)["rows"]:
        worker, status = row["key"]
        by_worker.setdefault(worker, {})[status] = row["value"]

    by_status = dict.fromkeys(STATUSES, 0)
    for row in db.view(DDOC, "by_status", group_level=1)["rows"]:
        by_status[row["key"][0]] = row["value"]

    late_count = 0
    late: list[Doc] = []
    for status in LATE_STATUSES:
        bounds = {"startkey": [status], "endkey": [status, moment]}
        rows = db.view(DDOC, "by_status", reduce=True, **bounds)["rows"]
        late_count += rows[0]["value"] if rows else 0
        found = db.view(DDOC, "by_status", reduce=False, include_docs=True, limit=limit, **bounds)
        late += [row["doc"] for row in found["rows"] if row.get("doc")]
    late.sort(key=lambda doc: _due(doc) or at)

    failed_rows = db.view(
        DDOC,
        "by_status",
        reduce=False,
        include_docs=True,
        descending=True,
        startkey=["err", {}],
        endkey=["err"],
        limit=limit,
    )["rows"]
    failed = sorted(
        (row["doc"] for row in failed_rows if row.get("doc")),
        key=lambda doc: str(doc.get("finished_at") or doc.get("date") or ""),
        reverse=True,
    )

    running_rows = db.view(
        DDOC,
        "by_status",
        reduce=False,
        include_docs=True,
        startkey=["running"],
        endkey=["running", {}],
        limit=limit,
    )["rows"]
    running = [row["doc"] for row in running_rows if row.get("doc")]

    record_rows = db.all_docs(include_docs=True, **records.all_range())["rows"]
    instances = [
        _instance(row["doc"], at)
        for row in record_rows
        if row.get("doc") and row["doc"].get("type") == "worker"
    ]
    instances.sort(key=lambda item: (item["state"] != "live", item["name"], item["instance"]))

    return {
        "database": db.name,
        "at": moment,
        "counts": {**by_status, "total": sum(by_status.values()), "late": late_count},
        "workers": by_worker,
        "late": [_late(doc, at) for doc in late[:limit]],
        "failed": [_failed(doc) for doc in failed],
        "running": [_running(doc, at) for doc in running],
        "instances": instances,
    }


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True)


# -- the pieces of a summary ------------------------------------------------------------


def _due(doc: Doc) -> datetime | None:
    try:
        return parse_date(doc["date"])
    except (KeyError, TypeError, ValueError):
        return None


def moment_of(value: Any) -> datetime | None:
    try:
        return parse_date(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _task(doc: Doc) -> dict[str, Any]:
    job = doc.get("job") if isinstance(doc.get("job"), dict) else {}
    task = {
        "id": doc.get("_id"),
        "worker": doc.get("worker"),
        "job": job.get("name"),
        "arguments": job.get("arguments", []),
        "status": doc.get("status"),
        "date": doc.get("date"),
    }
    if doc.get("repeat"):
        task["repeat"] = doc["repeat"]
    return task


def seconds_of(delta: timedelta) -> float:
    return round(delta.total_seconds(), 3)


def _late(doc: Doc, at: datetime) -> dict[str, Any]:
    due = _due(doc)
    return {
        **_task(doc),
        "owner": doc.get("owner"),
        "late_seconds": seconds_of(at - due) if due else None,
    }


def _failed(doc: Doc) -> dict[str, Any]:
    error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
    message = str(error.get("message", ""))
    if len(message) > MAX_TEXT:
        message = message[: MAX_TEXT - 1] + "…"
    return {
        **_task(doc),
        "attempt": doc.get("attempt"),
        "finished_at": doc.get("finished_at"),
        "error": {"type": error.get("type"), "message": message},
    }


def _running(doc: Doc, at: datetime) -> dict[str, Any]:
    started = moment_of(doc.get("started_at"))
    return {
        **_task(doc),
        "owner": doc.get("owner"),
        "attempt": doc.get("attempt"),
        "started_at": doc.get("started_at"),
        "running_seconds": seconds_of(at - started) if started else None,
    }


def instance_state(record: Doc, at: datetime) -> str:
    """live (its lease holds), stale (it stopped renewing), lost (taken over) or stopped."""
    if record.get("state") == "running":
        return "live" if records.is_live(record, at) else "stale"
    return str(record.get("state") or "unknown")


def _instance(record: Doc, at: datetime) -> dict[str, Any]:
    seen = moment_of(record.get("last_seen"))
    return {
        "instance": record.get("instance"),
        "name": record.get("name"),
        "host": record.get("host"),
        "pid": record.get("pid"),
        "node": record.get("node"),
        "state": instance_state(record, at),
        "last_seen": record.get("last_seen"),
        "heartbeat_age_seconds": seconds_of(at - seen) if seen else None,
        "lease_until": record.get("lease_until"),
        "held": record.get("held"),
        "done": record.get("done"),
        "failed": record.get("failed"),
    }


# -- the terminal view -----------------------------------------------------------------------

STATUS_STYLES = {
    "waiting": "bright_black",
    "scheduled": "blue",
    "running": "magenta",
    "reschedule": "yellow",
    "cancel": "dark_orange",
    "canceled": "bright_black",
    "done": "green",
    "err": "red",
}
STATE_STYLES = {"live": "green", "stale": "red", "lost": "red", "stopped": "bright_black"}
COUNTERS = ("held", "done", "failed")  # what a worker record counts


def format_age(seconds: float | None) -> str:
    """3s, 4m 05s, 2h 10m, 3d 4h."""
    if seconds is None:
        return "-"
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"


def _job(task: dict[str, Any]) -> Text:
    text = Text(str(task.get("job") or "?"), style="bold")
    arguments = task.get("arguments")
    if arguments:
        shown = json.dumps(arguments)
        text.append(" " + (shown if len(shown) <= 40 else shown[:39] + "…"), style="dim")
    return text


def _status(status: Any) -> Text:
    return Text(str(status), style=STATUS_STYLES.get(str(status), ""))


def render(data: dict[str, Any], title: str | None = None) -> RenderableType:
    """The summary as tables: counts, late, failed, running, worker instances.

    `title` names the database in the first table (default: its name), e.g.
    the server URL with the password masked and the database name.
    """
    counts = data["counts"]
    where = title or data["database"]

    by_status = Table(title=f"tasks in {where}", title_justify="left", expand=False)
    by_status.add_column("worker")
    for status in STATUSES:
        by_status.add_column(_status(status), justify="right")
    by_status.add_column("total", justify="right")
    for worker, per_status in sorted(data["workers"].items()):
        by_status.add_row(
            worker,
            *(str(per_status.get(s, 0)) if per_status.get(s) else "·" for s in STATUSES),
            str(sum(per_status.values())),
        )
    by_status.add_row(
        Text("all", style="bold"),
        *(Text(str(counts.get(s, 0)), style="bold") for s in STATUSES),
        Text(str(counts.get("total", 0)), style="bold"),
        end_section=True,
    )

    parts: list[RenderableType] = [by_status]

    late_title = f"late: {counts.get('late', 0)}"
    if counts.get("late", 0) > len(data["late"]):
        late_title += f" (the {len(data['late'])} oldest shown)"
    if data["late"]:
        late = Table(title=late_title, title_justify="left")
        for column in ("task", "worker", "status", "due", "late by", "id"):
            late.add_column(column)
        for task in data["late"]:
            late.add_row(
                _job(task),
                task["worker"],
                _status(task["status"]),
                str(task["date"]),
                Text(format_age(task["late_seconds"]), style="red"),
                Text(str(task["id"]), style="dim"),
            )
        parts.append(late)
    else:
        parts.append(Text("nothing is late", style="green"))

    if data["failed"]:
        failed = Table(title=f"failed: {counts.get('err', 0)}", title_justify="left")
        for column in ("task", "worker", "finished", "attempt"):
            failed.add_column(column)
        failed.add_column("error", min_width=30, overflow="fold")
        failed.add_column("id", overflow="fold")
        for task in data["failed"]:
            error = task["error"]
            failed.add_row(
                _job(task),
                task["worker"],
                str(task.get("finished_at") or "-"),
                str(task.get("attempt") if task.get("attempt") is not None else "-"),
                Text(f"{error.get('type') or 'Error'}: {error.get('message') or ''}", style="red"),
                Text(str(task["id"]), style="dim"),
            )
        parts.append(failed)

    if data["running"]:
        running = Table(title=f"running: {counts.get('running', 0)}", title_justify="left")
        for column in ("task", "worker", "for", "owner", "id"):
            running.add_column(column)
        for task in data["running"]:
            running.add_row(
                _job(task),
                task["worker"],
                format_age(task["running_seconds"]),
                str(task.get("owner") or "-"),
                Text(str(task["id"]), style="dim"),
            )
        parts.append(running)

    if data["instances"]:
        instances = Table(title="worker instances", title_justify="left")
        columns = ("worker", "instance", "node", "state", "heartbeat", "held", "done", "failed")
        for column in columns:
            instances.add_column(
                column, justify="right" if column in ("held", "done", "failed") else "left"
            )
        for item in data["instances"]:
            age = item["heartbeat_age_seconds"]
            instances.add_row(
                item["name"],
                Text(str(item["instance"]), style="dim"),
                Text(str(item.get("node") or "-"), style="dim"),
                Text(item["state"], style=STATE_STYLES.get(item["state"], "")),
                f"{format_age(age)} ago" if age is not None else "never",
                *(
                    str(item[key]) if item[key] is not None else "-"
                    for key in ("held", "done", "failed")
                ),
            )
        parts.append(instances)
    else:
        parts.append(Text("no worker instance has written a record yet", style="dim"))

    return Group(*parts)


def watch(
    read: Callable[[], dict[str, Any]],
    interval: float = 2.0,
    *,
    title: str | None = None,
    console: Console | None = None,
    stop: threading.Event | None = None,
    on_error: Callable[[Exception], RenderableType] | None = None,
) -> None:
    """Redraw `render(read())` every `interval` seconds until `stop` is set or Ctrl-C.

    An error while reading (the server restarting, say) is shown in place of
    the tables by `on_error` and the next round tries again; without `on_error`
    it propagates.
    """
    from rich.live import Live

    stop = stop or threading.Event()
    console = console or Console()

    def frame() -> RenderableType:
        try:
            return render(read(), title)
        except Exception as exc:
            if on_error is None:
                raise
            return on_error(exc)

    try:
        with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
            while not stop.wait(interval):
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass
