"""`after status`: the summary read from the views and worker records, its JSON
and its tables."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import new_task, wait_for
from rich.console import Console
from rich.text import Text

from after import status
from after.couch import CouchError, Database, NotFound, Server
from after.tasks import STATUSES, iso

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)


def put_through(db: Database, task: dict[str, Any], *steps: dict[str, Any]) -> dict[str, Any]:
    """Create a task, then write each step as a worker would (each write checked by
    validate_doc_update)."""
    task_id, rev = db.post(task)
    doc = {**task, "_id": task_id, "_rev": rev}
    for fields in steps:
        doc.update(fields)
        db.put(doc)
    return doc


def failed_task(db: Database, message: str, finished: datetime, **fields: Any) -> dict[str, Any]:
    owner = "beta@host:1:aaaa"
    return put_through(
        db,
        new_task(worker="beta", date=iso(finished - timedelta(seconds=2)), **fields),
        {"status": "scheduled", "owner": owner},
        {"status": "running", "attempt": 1, "started_at": iso(finished - timedelta(seconds=1))},
        {
            "status": "err",
            "finished_at": iso(finished),
            "duration_ms": 1000.0,
            "error": {"type": "RuntimeError", "message": message, "traceback": "Traceback ..."},
        },
    )


def record(instance: str, last_seen: datetime, lease: timedelta, **fields: Any) -> dict[str, Any]:
    name = instance.split("@", 1)[0]
    return {
        "_id": f"after-worker:{instance}",
        "type": "worker",
        "name": name,
        "instance": instance,
        "host": "host",
        "pid": 42,
        "last_seen": iso(last_seen),
        "lease_until": iso(last_seen + lease),
        "state": "running",
        **fields,
    }


@pytest.fixture
def db(one_copy_db: Database) -> Database:
    """What is checked here is how the views are summed up, not a cluster's
    consistency: on a cluster a view is read from one copy of each shard, which may
    lack the writes just made (docs/couchdb.md). One copy, as on a single node."""
    return one_copy_db


@pytest.fixture
def populated(db: Database) -> dict[str, Any]:
    """A database with something in every part of the summary, as of NOW."""
    ids: dict[str, Any] = {}
    ids["future"] = db.post(new_task(worker="alpha", date="2030-01-01"))[0]
    ids["oldest_late"] = db.post(new_task(worker="alpha", date="2026-06-01T11:00:00Z"))[0]
    ids["held_late"] = put_through(
        db,
        new_task(worker="beta", date="2026-06-01T11:59:30Z"),
        {"status": "scheduled", "owner": "beta@host:1:aaaa"},
    )["_id"]
    ids["running"] = put_through(
        db,
        new_task(
            worker="beta", date="2026-06-01T11:58:00Z", job={"name": "sleep", "arguments": [60]}
        ),
        {"status": "scheduled", "owner": "beta@host:1:aaaa"},
        {"status": "running", "attempt": 1, "started_at": "2026-06-01T11:58:00.000Z"},
    )["_id"]
    ids["older_failure"] = failed_task(db, "first failure", NOW - timedelta(hours=1))["_id"]
    ids["newer_failure"] = failed_task(db, "disk full", NOW - timedelta(minutes=1))["_id"]
    db.put(record("beta@host:1:aaaa", NOW - timedelta(seconds=3), timedelta(seconds=30), held=2))
    db.put(record("beta@gone:2:bbbb", NOW - timedelta(minutes=5), timedelta(seconds=30)))
    return ids


def test_summary_of_an_empty_database(db: Database) -> None:
    data = status.summary(db, at=NOW)
    assert data["database"] == db.name
    assert data["at"] == "2026-06-01T12:00:00.000Z"
    assert data["counts"] == {**dict.fromkeys(STATUSES, 0), "total": 0, "late": 0}
    assert data["workers"] == {}
    assert data["late"] == data["failed"] == data["running"] == data["instances"] == []


def test_summary_counts_by_status_and_by_worker(db: Database, populated: dict[str, Any]) -> None:
    data = status.summary(db, at=NOW)
    counts = data["counts"]
    assert counts["waiting"] == 2 and counts["scheduled"] == 1 and counts["running"] == 1
    assert counts["err"] == 2 and counts["done"] == 0
    assert counts["total"] == 6
    # The same shape as before: only the statuses a worker has.
    assert data["workers"] == {
        "alpha": {"waiting": 2},
        "beta": {"scheduled": 1, "running": 1, "err": 2},
    }


def test_late_tasks_are_waiting_or_held_past_their_date_oldest_first(
    db: Database, populated: dict[str, Any]
) -> None:
    data = status.summary(db, at=NOW)
    assert data["counts"]["late"] == 2
    late = data["late"]
    assert [task["id"] for task in late] == [populated["oldest_late"], populated["held_late"]]
    assert late[0]["late_seconds"] == 3600.0
    assert late[1]["late_seconds"] == 30.0
    assert late[1]["owner"] == "beta@host:1:aaaa" and late[1]["status"] == "scheduled"
    assert late[0]["job"] == "echo" and late[0]["arguments"] == [2, 3, "test"]
    # The running task and the one due in 2030 are not late.
    assert populated["running"] not in {task["id"] for task in late}


def test_failures_newest_first_with_their_error(db: Database, populated: dict[str, Any]) -> None:
    failed = status.summary(db, at=NOW)["failed"]
    assert [task["id"] for task in failed] == [
        populated["newer_failure"],
        populated["older_failure"],
    ]
    assert failed[0]["error"] == {"type": "RuntimeError", "message": "disk full"}
    assert failed[0]["attempt"] == 1
    assert "traceback" not in failed[0]["error"]  # the summary stays short; the task has it


def test_running_tasks_and_worker_instances_with_their_heartbeat_age(
    db: Database, populated: dict[str, Any]
) -> None:
    data = status.summary(db, at=NOW)
    assert [task["id"] for task in data["running"]] == [populated["running"]]
    assert data["running"][0]["running_seconds"] == 120.0
    instances = {item["instance"]: item for item in data["instances"]}
    live, gone = instances["beta@host:1:aaaa"], instances["beta@gone:2:bbbb"]
    assert live["state"] == "live" and live["heartbeat_age_seconds"] == 3.0 and live["held"] == 2
    assert gone["state"] == "stale" and gone["heartbeat_age_seconds"] == 300.0
    assert [item["state"] for item in data["instances"]] == ["live", "stale"]  # live first


def test_lists_are_capped_but_counts_are_not(db: Database) -> None:
    db.bulk_docs([new_task(date=f"2026-05-0{day}") for day in range(1, 6)])
    data = status.summary(db, at=NOW, limit=2)
    assert data["counts"]["late"] == 5
    assert [task["date"] for task in data["late"]] == ["2026-05-01", "2026-05-02"]


def test_a_long_error_message_is_shortened(db: Database) -> None:
    failed_task(db, "x" * 5000, NOW - timedelta(minutes=1))
    message = status.summary(db, at=NOW)["failed"][0]["error"]["message"]
    assert len(message) == status.MAX_TEXT and message.endswith("…")


@pytest.mark.parametrize("pushed", [False, True], ids=["no-database", "no-design-doc"])
def test_a_database_that_was_never_pushed_raises_not_found(
    server: Server, db_name: str, pushed: bool
) -> None:
    database = server.database(db_name)
    if pushed:
        database.create()
    try:
        with pytest.raises(NotFound):
            status.summary(database)
    finally:
        if pushed:
            database.delete()


def test_the_summary_is_json(db: Database, populated: dict[str, Any]) -> None:
    data = status.summary(db, at=NOW)
    text = status.to_json(data)
    assert json.loads(text) == data
    assert text.startswith("{\n  ")  # indented for people, sorted keys for diffs


# -- rendering -----------------------------------------------------------------------------


def rendered(data: dict[str, Any], title: str | None = None, width: int = 200) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    console.print(status.render(data, title))
    return console.export_text()


def test_render_shows_counts_late_failed_running_and_instances(
    db: Database, populated: dict[str, Any]
) -> None:
    text = rendered(status.summary(db, at=NOW), title="http://127.0.0.1:5984/tasks")
    assert "tasks in http://127.0.0.1:5984/tasks" in text
    lines = text.splitlines()
    alpha = next(line for line in lines if line.strip("│ ").startswith("alpha"))
    assert alpha.split("│")[-2].strip() == "2"  # alpha's total
    total = next(line for line in lines if line.strip("│ ").startswith("all"))
    assert total.split("│")[-2].strip() == "6"
    assert "late: 2" in text and "1h 00m" in text and "30s" in text
    assert "failed: 2" in text and "RuntimeError: disk full" in text
    assert "running: 1" in text and "sleep [60]" in text and "2m 00s" in text
    assert "beta@host:1:aaaa" in text and "live" in text and "3s ago" in text
    assert "beta@gone:2:bbbb" in text and "stale" in text and "5m 00s ago" in text


def test_render_of_an_empty_database_says_so(db: Database) -> None:
    text = rendered(status.summary(db, at=NOW))
    assert f"tasks in {db.name}" in text
    assert "nothing is late" in text
    assert "no worker instance has written a record yet" in text
    assert "failed:" not in text and "running:" not in text


def test_render_says_when_only_the_oldest_late_tasks_are_listed() -> None:
    data = {
        "database": "tasks",
        "at": iso(NOW),
        "counts": {**dict.fromkeys(STATUSES, 0), "waiting": 30, "total": 30, "late": 30},
        "workers": {"alpha": {"waiting": 30}},
        "late": [
            {
                "id": f"t{i}",
                "worker": "alpha",
                "job": "echo",
                "arguments": [],
                "status": "waiting",
                "date": "2026-01-01",
                "owner": None,
                "late_seconds": 86400.0 * 151,
            }
            for i in range(20)
        ],
        "failed": [],
        "running": [],
        "instances": [],
    }
    text = rendered(data)
    assert "late: 30 (the 20 oldest shown)" in text
    assert "151d 0h" in text


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (None, "-"),
        (0.4, "0s"),
        (59, "59s"),
        (61, "1m 01s"),
        (3600, "1h 00m"),
        (47 * 3600 + 59 * 60, "47h 59m"),
        (49 * 3600, "2d 1h"),
        (-5, "0s"),
    ],
)
def test_format_age(seconds: float | None, shown: str) -> None:
    assert status.format_age(seconds) == shown


def test_instance_state() -> None:
    live = record("a@h:1:x", NOW - timedelta(seconds=1), timedelta(seconds=30))
    assert status.instance_state(live, NOW) == "live"
    assert status.instance_state(live, NOW + timedelta(minutes=1)) == "stale"
    assert status.instance_state({**live, "state": "stopped"}, NOW) == "stopped"
    assert status.instance_state({**live, "state": "lost"}, NOW) == "lost"
    assert status.instance_state({}, NOW) == "unknown"


# -- watch ---------------------------------------------------------------------------------


def test_watch_redraws_until_stopped(db: Database) -> None:
    reads: list[dict[str, Any]] = []
    stop = threading.Event()

    def read() -> dict[str, Any]:
        data = status.summary(db)
        reads.append(data)
        if len(reads) == 2:
            db.post(new_task(worker="gamma", date="2030-01-01"))
        if len(reads) >= 4:
            stop.set()
        return data

    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    thread = threading.Thread(
        target=status.watch,
        args=(read,),
        kwargs={"interval": 0.01, "console": console, "stop": stop, "title": "T"},
        daemon=True,
    )
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert len(reads) >= 4
    assert reads[0]["workers"] == {} and reads[-1]["workers"] == {"gamma": {"waiting": 1}}
    assert "gamma" in out.getvalue() and "tasks in T" in out.getvalue()


def test_watch_shows_a_read_error_in_place_and_keeps_going() -> None:
    calls = {"n": 0}
    stop = threading.Event()
    empty = {
        "database": "tasks",
        "at": iso(NOW),
        "counts": {**dict.fromkeys(STATUSES, 0), "total": 0, "late": 0},
        "workers": {},
        "late": [],
        "failed": [],
        "running": [],
        "instances": [],
    }

    def read() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise CouchError(0, "unreachable", "the server did not accept the connection")
        stop.set()
        return empty

    out = io.StringIO()
    status.watch(
        read,
        interval=0.01,
        console=Console(file=out, width=120, force_terminal=True, color_system=None),
        stop=stop,
        on_error=lambda exc: Text(f"not read: {exc}"),
    )
    assert calls["n"] == 2
    assert "not read: 0 unreachable" in out.getvalue()


def test_watch_without_an_error_handler_lets_the_error_through() -> None:
    def read() -> dict[str, Any]:
        raise CouchError(404, "not_found", "missing")

    with pytest.raises(CouchError):
        status.watch(read, interval=0.01, console=Console(file=io.StringIO()))


def test_summary_follows_the_database(db: Database) -> None:
    """The same call later sees later writes (no caching)."""
    assert status.summary(db)["counts"]["total"] == 0
    db.post(new_task(date="2030-01-01"))
    wait_for(lambda: status.summary(db)["counts"]["total"] == 1)
