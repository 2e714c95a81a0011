"""The task contract, as `_design/after` enforces it inside the database.

Every test here is one clause of the specification and runs against a real
CouchDB-compatible server: a write either lands, or is refused with a 403
whose reason starts with the field it is about and says the rule. The status
tests are derived from `designdocs/after/lib/rules.json`, the one table of
statuses and transitions, so that the JavaScript and the table cannot drift
apart unnoticed.

These tests write as a server admin (the admin party of the embedded test
server, or the admin credentials of AFTER_TEST_COUCHDB_URL), who may do what a
client or a worker may; who may do what is tested with real users in
tests/test_roles.py.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from conftest import new_task, settled_write

from after import records
from after.couch import Conflict, Database, Forbidden, Server
from after.feed import feed_filter
from after.push import load_rules, push
from after.security import is_pouchdb_server
from after.tasks import claim_update

RULES = load_rules()
STATUSES: list[str] = RULES["statuses"]
INITIAL: str = RULES["initial"]
FINAL: list[str] = RULES["final"]
TRANSITIONS: dict[str, dict[str, str]] = RULES["transitions"]
DELETABLE: list[str] = RULES["deletable"]
# Neither new nor final: a task somebody may be holding.
HELD = [status for status in STATUSES if status != INITIAL and status not in FINAL]

MISSING = object()  # a field left out of the document


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tasks(server: Server) -> Iterator[Database]:
    """One database for the whole module, design docs deployed (creating one per test is slower)."""
    database = server.database(f"after-test-designdoc-{uuid.uuid4().hex[:12]}")
    push(database)
    yield database
    database.delete()


def task(**fields: Any) -> dict[str, Any]:
    """A valid task with `fields` overridden; a field given as MISSING is left out."""
    doc = new_task(**fields)
    for name, value in fields.items():
        if value is MISSING:
            del doc[name]
    return doc


def create(db: Database, **fields: Any) -> dict[str, Any]:
    doc = task(**fields)
    doc["_id"], doc["_rev"] = db.post(doc)
    return doc


def update(db: Database, doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Write `doc` with `changes` on top of the revision it carries; return the new version."""
    new = copy.deepcopy(doc)
    new.update(changes)
    db.put(new)
    return new


def delete(db: Database, doc: dict[str, Any]) -> None:
    """`DELETE /db/id?rev=...`, as any HTTP client would."""
    db.server.json("DELETE", f"{db.path}/{doc['_id']}", params={"rev": doc["_rev"]})


def refusal(write: Callable[[], object]) -> str:
    """Run a write the design doc must refuse; return the 403's reason."""
    with pytest.raises(Forbidden) as caught:
        settled_write(write)
    assert caught.value.status == 403, caught.value
    return caught.value.reason


def path_to(status: str) -> list[str]:
    """The shortest chain of allowed moves that takes a new task to `status` (BFS on the table)."""
    previous: dict[str, str | None] = {INITIAL: None}
    queue = deque([INITIAL])
    while queue:
        here = queue.popleft()
        for there in TRANSITIONS[here]:
            if there not in previous:
                previous[there] = here
                queue.append(there)
    assert status in previous, f"{status} cannot be reached from {INITIAL}"
    chain: list[str] = []
    step: str | None = status
    while step != INITIAL:
        assert step is not None
        chain.append(step)
        step = previous[step]
    return chain[::-1]


def task_in(db: Database, status: str, **fields: Any) -> dict[str, Any]:
    """A task driven to `status` through allowed transitions only."""
    doc = create(db, **fields)
    for step in path_to(status):
        doc = update(db, doc, status=step)
    return doc


def pairs(statuses: list[str]) -> list[Any]:
    return [pytest.param(a, b, id=f"{a}->{b}") for a in statuses for b in statuses]


# -- the table itself ----------------------------------------------------------------------


def test_the_table_is_consistent() -> None:
    assert len(set(STATUSES)) == len(STATUSES)
    assert INITIAL in STATUSES
    assert set(FINAL) <= set(STATUSES)
    assert set(DELETABLE) <= set(STATUSES)
    assert set(TRANSITIONS) == set(STATUSES), "every status has a row of transitions"
    for source, targets in TRANSITIONS.items():
        assert set(targets) <= set(STATUSES), source
        assert source not in targets, f"{source}: a same-status edit is not a transition"
        assert set(targets.values()) <= {"client", "worker"}, source
    for status in FINAL:
        assert TRANSITIONS[status] == {}, f"{status} is final: nothing leaves it"


def test_the_role_columns_of_the_table_are_consistent() -> None:
    assert set(RULES["roles"]) == {"client", "worker", "replicator"}
    task_fields = {"_id", "_rev", "type", "worker", "date", "job", "status"}
    worker_fields = RULES["worker_fields"]
    assert len(set(worker_fields)) == len(worker_fields)
    assert not set(worker_fields) & task_fields, "a client must be able to send its own fields"
    assert RULES["force_field"] not in set(worker_fields) | task_fields


def test_the_table_says_what_the_design_says() -> None:
    original = {"waiting", "scheduled", "done", "err", "reschedule", "cancel", "canceled"}
    assert set(STATUSES) == original | {"running"}
    assert INITIAL == "waiting"
    assert set(FINAL) == {"done", "canceled"}
    assert set(DELETABLE) == {"done", "canceled", "err"}


def test_the_architecture_picture_draws_the_table() -> None:
    """docs/architecture.md draws the moves; the picture must not drift from the table."""
    text = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    diagram = text.split("stateDiagram-v2", 1)[1].split("```", 1)[0]
    drawn = set(re.findall(r"^\s*(\w+) --> (\w+) : (\w+)", diagram, re.MULTILINE))
    table = {(s, t, role) for s, targets in TRANSITIONS.items() for t, role in targets.items()}
    assert drawn == table
    ends = set(re.findall(r"^\s*(\w+) --> \[\*\]", diagram, re.MULTILINE))
    assert ends == set(FINAL)


@pytest.mark.parametrize("status", STATUSES)
def test_every_status_can_be_reached_from_the_initial_one(status: str) -> None:
    chain = [INITIAL, *path_to(status)]
    assert chain[-1] == status
    for source, target in pairwise(chain):
        assert target in TRANSITIONS[source]


def test_the_deployed_design_doc_carries_the_same_table(tasks: Database) -> None:
    module = tasks.get("_design/after")["lib"]["rules"]
    prefix, suffix = "module.exports = ", ";"
    assert module.startswith(prefix) and module.endswith(suffix)
    assert json.loads(module[len(prefix) : -len(suffix)]) == RULES


# -- worker --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("worker", "rule"),
    [
        pytest.param(MISSING, "1 to 64", id="missing"),
        pytest.param(42, "1 to 64", id="number"),
        pytest.param(None, "1 to 64", id="null"),
        pytest.param(["manobi"], "1 to 64", id="array"),
        pytest.param("", "1 to 64", id="empty"),
        pytest.param("man obi", "1 to 64", id="space"),
        pytest.param("ma/nobi", "1 to 64", id="slash"),
        pytest.param("manobi\n", "1 to 64", id="trailing-newline"),
        pytest.param("manobí", "1 to 64", id="non-ascii"),
        pytest.param("_manobi", "1 to 64", id="leading-underscore"),
        pytest.param(".manobi", "1 to 64", id="leading-dot"),
        pytest.param("-manobi", "1 to 64", id="leading-dash"),
        pytest.param("w" * 65, "1 to 64", id="65-chars"),
        # PouchDB Server reads ?worker=1.0 as the number 1: such a name would
        # follow the tasks of worker "1" and never its own.
        pytest.param("1.0", "query string", id="reads-as-1"),
        pytest.param("1e3", "query string", id="reads-as-1000"),
        pytest.param("12345678901234567890", "query string", id="reads-as-rounded-int"),
    ],
)
def test_worker_refused(tasks: Database, worker: Any, rule: str) -> None:
    reason = refusal(lambda: tasks.post(task(worker=worker)))
    assert reason.startswith("worker:")
    assert rule in reason


@pytest.mark.parametrize(
    "worker",
    ["manobi", "W", "42", "007", "true", "eu-west.worker_1", "host.example.com", "w" * 64],
)
def test_worker_accepted(tasks: Database, worker: str) -> None:
    doc = create(tasks, worker=worker)
    assert tasks.get(doc["_id"])["worker"] == worker


# -- date ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "rule"),
    [
        pytest.param(MISSING, "must be an ISO 8601 date string", id="missing"),
        pytest.param(20261201, "must be an ISO 8601 date string", id="number"),
        pytest.param(None, "must be an ISO 8601 date string", id="null"),
        pytest.param("", "is not an ISO 8601 date", id="empty"),
        pytest.param("tomorrow", "is not an ISO 8601 date", id="words"),
        pytest.param("12/01/2026", "is not an ISO 8601 date", id="us-format"),
        pytest.param("2026-12-1", "is not an ISO 8601 date", id="one-digit-day"),
        pytest.param("2026-12-01T9:30", "is not an ISO 8601 date", id="one-digit-hour"),
        pytest.param("2026-12-01T09", "is not an ISO 8601 date", id="hour-only"),
        pytest.param(
            "2026-12-01T09:30:00.1234567Z", "is not an ISO 8601 date", id="7-digit-fraction"
        ),
        pytest.param("2026-12-01T09:30:00+0200", "is not an ISO 8601 date", id="offset-hhmm"),
        pytest.param("2011-13-01", "not a real calendar date", id="month-13"),
        pytest.param("2026-00-10", "not a real calendar date", id="month-0"),
        pytest.param("2026-12-00", "not a real calendar date", id="day-0"),
        pytest.param("2011-02-30", "not a real calendar date", id="february-30"),
        pytest.param("2026-04-31", "not a real calendar date", id="april-31"),
        pytest.param("2026-02-29", "not a real calendar date", id="february-29-common-year"),
        pytest.param("2100-02-29", "not a real calendar date", id="february-29-century"),
        pytest.param("2026-12-01T24:00:00Z", "out of range", id="hour-24"),
        pytest.param("2026-12-01T09:60:00Z", "out of range", id="minute-60"),
        pytest.param("2026-12-01T09:30:60Z", "out of range", id="second-60"),
        pytest.param("2026-12-01T09:30:00+25:00", "UTC offset out of range", id="offset-hour-25"),
        pytest.param("2026-12-01T09:30:00+02:60", "UTC offset out of range", id="offset-minute-60"),
    ],
)
def test_date_refused(tasks: Database, date: Any, rule: str) -> None:
    reason = refusal(lambda: tasks.post(task(date=date)))
    assert reason.startswith("date:")
    assert rule in reason


@pytest.mark.parametrize(
    "date",
    [
        pytest.param("2011-10-12", id="date-alone"),
        pytest.param("2028-02-29", id="february-29-leap-year"),
        pytest.param("2000-02-29", id="february-29-400-year"),
        pytest.param("2026-12-01T09:30", id="no-seconds-no-offset"),
        pytest.param("2026-12-01T09:30:00Z", id="utc"),
        pytest.param("2026-12-01T09:30:00-05:00", id="negative-offset"),
        pytest.param("2026-12-01T09:30:00.123456+02:00", id="microseconds-and-offset"),
        pytest.param("2026-12-01T23:59:59.999Z", id="last-millisecond"),
        pytest.param("2026-12-01 09:30:00", id="space-separator"),
    ],
)
def test_date_accepted_and_stored_as_written(tasks: Database, date: str) -> None:
    doc = create(tasks, date=date)
    assert tasks.get(doc["_id"])["date"] == date


# -- job -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "field"),
    [
        pytest.param(MISSING, "job:", id="missing"),
        pytest.param("start_replication", "job:", id="string"),
        pytest.param(["start_replication"], "job:", id="array"),
        pytest.param(None, "job:", id="null"),
        pytest.param({"arguments": [2, 3]}, "job.name:", id="name-missing"),
        pytest.param({"name": 42}, "job.name:", id="name-number"),
        pytest.param({"name": ""}, "job.name:", id="name-empty"),
        pytest.param({"name": "os.path"}, "job.name:", id="name-dotted"),
        pytest.param({"name": "../x"}, "job.name:", id="name-path"),
        pytest.param({"name": "jobs/x"}, "job.name:", id="name-slash"),
        pytest.param({"name": "__import__"}, "job.name:", id="name-dunder"),
        pytest.param({"name": "1abc"}, "job.name:", id="name-leading-digit"),
        pytest.param({"name": "start-replication"}, "job.name:", id="name-dash"),
        pytest.param({"name": "a" * 65}, "job.name:", id="name-65-chars"),
        pytest.param({"name": "ok", "arguments": {"a": 1}}, "job.arguments:", id="arguments-dict"),
        pytest.param({"name": "ok", "arguments": "2, 3"}, "job.arguments:", id="arguments-string"),
        pytest.param({"name": "ok", "arguments": 2}, "job.arguments:", id="arguments-number"),
        pytest.param({"name": "ok", "arguments": None}, "job.arguments:", id="arguments-null"),
    ],
)
def test_job_refused(tasks: Database, job: Any, field: str) -> None:
    reason = refusal(lambda: tasks.post(task(job=job)))
    assert reason.startswith(field)


@pytest.mark.parametrize(
    "job",
    [
        pytest.param({"name": "start_replication"}, id="arguments-absent"),
        pytest.param({"name": "start_replication", "arguments": []}, id="arguments-empty"),
        pytest.param({"name": "start_replication", "arguments": [2, 3, "test"]}, id="arguments"),
        pytest.param({"name": "report", "arguments": [{"to": ["a"]}, [1], None]}, id="nested-args"),
        pytest.param({"name": "_private"}, id="name-single-underscore"),
        pytest.param({"name": "Job2"}, id="name-mixed-case"),
        pytest.param({"name": "a" * 64}, id="name-64-chars"),
    ],
)
def test_job_accepted(tasks: Database, job: dict[str, Any]) -> None:
    doc = create(tasks, job=job)
    assert tasks.get(doc["_id"])["job"] == job


# -- status and type -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(MISSING, id="missing"),
        pytest.param(None, id="null"),
        pytest.param("sleeping", id="unknown"),
        pytest.param("Waiting", id="wrong-case"),
        pytest.param(["waiting"], id="array"),
    ],
)
def test_status_must_be_one_of_the_table(tasks: Database, status: Any) -> None:
    reason = refusal(lambda: tasks.post(task(status=status)))
    assert reason.startswith("status:")
    assert "must be one of " + ", ".join(STATUSES) in reason


@pytest.mark.parametrize("status", [s for s in STATUSES if s != INITIAL])
def test_a_new_task_starts_as_the_initial_status(tasks: Database, status: str) -> None:
    reason = refusal(lambda: tasks.post(task(status=status)))
    assert reason.startswith("status:")
    assert f'must start as "{INITIAL}"' in reason


def test_a_document_of_another_type_is_refused(tasks: Database) -> None:
    reason = refusal(lambda: tasks.post(task(type="note")))
    assert reason.startswith("type:")
    assert '"note"' in reason


def test_a_task_cannot_turn_into_another_type(tasks: Database) -> None:
    doc = create(tasks)
    reason = refusal(lambda: update(tasks, doc, type="note"))
    assert reason.startswith("type:")


def test_type_task_is_a_task(tasks: Database) -> None:
    doc = create(tasks, type="task")
    assert tasks.get(doc["_id"])["type"] == "task"
    # ... and is checked like one.
    reason = refusal(lambda: tasks.post(task(type="task", date="2026-02-29")))
    assert reason.startswith("date:")


def test_design_documents_are_not_subject_to_task_rules(tasks: Database) -> None:
    ddoc = {"_id": "_design/not-a-task", "status": "bogus", "worker": 42, "views": {}}
    tasks.put(ddoc)
    assert tasks.get("_design/not-a-task")["status"] == "bogus"
    delete(tasks, ddoc)
    assert tasks.get("_design/not-a-task") is None


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"worker": ""}, id="worker"),
        pytest.param({"date": "2026-02-29"}, id="date"),
        pytest.param({"job": {"name": "os.path"}}, id="job"),
        pytest.param({"status": "sleeping"}, id="status"),
    ],
)
def test_every_write_is_checked_not_only_creation(tasks: Database, change: dict[str, Any]) -> None:
    doc = create(tasks)
    field = next(iter(change))
    reason = refusal(lambda: update(tasks, doc, **change))
    assert reason.startswith(f"{field}:") or reason.startswith(f"{field}.")
    assert tasks.get(doc["_id"])["_rev"] == doc["_rev"], "a refused write leaves the task as it was"


# -- status transitions: every pair, from the table ----------------------------------------


@pytest.mark.parametrize(("source", "target"), pairs(STATUSES))
def test_status_transition(tasks: Database, source: str, target: str) -> None:
    doc = task_in(tasks, source)
    allowed = target in TRANSITIONS[source] or (target == source and source not in FINAL)
    if allowed:
        moved = update(tasks, doc, status=target)
        assert tasks.get(doc["_id"]) == moved
        return
    reason = refusal(lambda: update(tasks, doc, status=target))
    assert reason.startswith("status:")
    if source in FINAL:
        assert f"{source} is final" in reason
    else:
        assert f"cannot change from {source} to {target}" in reason
        named = reason.split("only to ", 1)[1]
        assert all(allowed in named for allowed in TRANSITIONS[source]), "it says what is allowed"
    assert tasks.get(doc["_id"]) == doc, "a refused move leaves the task as it was"


# -- deletion ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", STATUSES)
def test_deletion(tasks: Database, status: str) -> None:
    doc = task_in(tasks, status)
    if status in DELETABLE:
        delete(tasks, doc)
        assert tasks.get(doc["_id"]) is None
        return
    reason = refusal(lambda: delete(tasks, doc))
    assert reason.startswith("status:")
    assert f"a {status} task cannot be deleted" in reason
    assert 'set status to "cancel"' in reason
    assert tasks.get(doc["_id"])["status"] == status


def test_deletion_through_a_deleted_flag_follows_the_same_rule(tasks: Database) -> None:
    running = task_in(tasks, "running")
    reason = refusal(lambda: tasks.put({**running, "_deleted": True}))
    assert reason.startswith("status:")
    done = task_in(tasks, "done")
    tasks.put({"_id": done["_id"], "_rev": done["_rev"], "_deleted": True})
    assert tasks.get(done["_id"]) is None


def test_a_deleted_task_id_can_be_used_again_by_a_new_waiting_task(tasks: Database) -> None:
    doc = task_in(tasks, "canceled")
    delete(tasks, doc)
    again = {key: value for key, value in doc.items() if key != "_rev"}
    reason = refusal(lambda: tasks.put({**again, "status": "done"}))
    assert reason.startswith("status:")
    tasks.put({**again, "status": INITIAL})
    assert tasks.get(doc["_id"])["status"] == INITIAL


# -- what may change once a task left waiting ----------------------------------------------

FIELD_CHANGES = [
    pytest.param({"worker": "someone_else"}, id="worker"),
    pytest.param({"job": {"name": "other_job", "arguments": [2, 3, "test"]}}, id="job.name"),
    pytest.param({"job": {"name": "start_replication", "arguments": [9]}}, id="job.arguments"),
    pytest.param({"job": {"name": "start_replication"}}, id="job.arguments-dropped"),
]


@pytest.mark.parametrize("change", FIELD_CHANGES)
def test_worker_and_job_can_change_while_waiting(tasks: Database, change: dict[str, Any]) -> None:
    doc = create(tasks)
    moved = update(tasks, doc, **change)
    assert tasks.get(doc["_id"]) == moved


@pytest.mark.parametrize("change", FIELD_CHANGES)
@pytest.mark.parametrize("status", HELD)
def test_worker_and_job_are_fixed_once_the_task_left_waiting(
    tasks: Database, status: str, change: dict[str, Any]
) -> None:
    doc = task_in(tasks, status)
    reason = refusal(lambda: update(tasks, doc, **change))
    assert reason.startswith("worker, job:")
    assert "only while a task is waiting" in reason


def date_may_change(source: str, target: str) -> bool:
    """The date moves only with a task nobody holds, or along with a (re)schedule request."""
    return source in (INITIAL, "reschedule") or target in (INITIAL, "reschedule")


MOVES = [
    pytest.param(a, b, id=f"{a}->{b}")
    for a in STATUSES
    for b in STATUSES
    if b in TRANSITIONS[a] or (a == b and a not in FINAL)
]


@pytest.mark.parametrize(("source", "target"), MOVES)
def test_date_changes_only_while_waiting_or_rescheduling(
    tasks: Database, source: str, target: str
) -> None:
    doc = task_in(tasks, source)
    later = "2027-01-01T08:00:00Z"
    if date_may_change(source, target):
        moved = update(tasks, doc, status=target, date=later)
        assert tasks.get(doc["_id"])["date"] == later
        assert moved["status"] == target
        return
    reason = refusal(lambda: update(tasks, doc, status=target, date=later))
    assert reason.startswith("date:")
    assert 'set status to "reschedule"' in reason
    # The same move keeping the date is fine.
    update(tasks, doc, status=target)
    assert tasks.get(doc["_id"])["status"] == target


# -- _bulk_docs ----------------------------------------------------------------------------


def test_bulk_docs_gives_each_document_its_own_result(tasks: Database) -> None:
    valid, invalid = task(), task(date="2011-02-30")
    scheduled = task_in(tasks, "scheduled")
    waiting = task_in(tasks, "waiting")
    stale = task_in(tasks, "waiting")
    update(tasks, stale, status="cancel")  # `stale` keeps the revision it had before
    rows = tasks.bulk_docs(
        [
            valid,
            invalid,
            {**scheduled, "status": "running"},
            {**waiting, "status": "done"},
            # A stale write of a move allowed from the current status: a 409 on both
            # servers (PouchDB Server validates against the current revision before
            # it checks `_rev`, so a stale *forbidden* move is a 403 there, a 409 on CouchDB).
            {**stale, "status": "canceled"},
        ]
    )
    ok, bad_date, started, skipped, conflict = rows
    assert ok.get("ok") is True and ok["id"] == valid["_id"]
    assert bad_date["error"] == "forbidden" and bad_date["reason"].startswith("date:")
    assert started.get("ok") is True
    assert skipped["error"] == "forbidden"
    assert "cannot change from waiting to done" in skipped["reason"]
    assert conflict["error"] == "conflict"
    assert tasks.get(valid["_id"])["status"] == INITIAL
    assert tasks.get(invalid["_id"]) is None
    assert tasks.get(scheduled["_id"])["status"] == "running"
    assert tasks.get(waiting["_id"])["status"] == "waiting"
    assert tasks.get(stale["_id"])["status"] == "cancel"


@pytest.mark.parametrize(("held", "move"), [("waiting", "scheduled"), ("running", "done")])
def test_a_write_on_an_old_revision_never_lands(tasks: Database, held: str, move: str) -> None:
    """A worker claims or reports on the revision it saw while a client has set cancel.

    CouchDB answers 409 (the revision is checked first); PouchDB Server runs
    validate_doc_update against the current revision first, so there the same
    write is a 403 (cannot change from cancel to ...). Either way the write is
    lost and the writer must re-read: a refused status move is not final.
    """
    seen = task_in(tasks, held)
    update(tasks, seen, status="cancel")
    with pytest.raises((Conflict, Forbidden)) as caught:
        update(tasks, seen, status=move)
    assert caught.value.status in (403, 409)
    if caught.value.status == 403:
        assert f"cannot change from cancel to {move}" in caught.value.reason
    assert tasks.get(seen["_id"])["status"] == "cancel"


# -- documents written before the rules ----------------------------------------------------


@pytest.fixture
def legacy(server: Server, db_name: str) -> Iterator[tuple[Database, list[str]]]:
    """A database holding documents with statuses the table does not know, then the rules."""
    database = server.database(db_name)
    database.create()
    ids = [database.post(task(status=status))[0] for status in ("sleeping", "sleeping", MISSING)]
    push(database)
    yield database, ids
    database.delete()


def test_a_document_with_an_unknown_status_can_be_deleted_or_written_anew(
    legacy: tuple[Database, list[str]],
) -> None:
    db, (to_delete, to_repair, without_status) = legacy
    delete(db, db.get(to_delete))
    assert db.get(to_delete) is None

    doc = db.get(to_repair)
    reason = refusal(lambda: update(db, doc, status="scheduled"))
    assert reason.startswith("status:") and f'must start as "{INITIAL}"' in reason
    update(db, doc, status=INITIAL)
    assert db.get(to_repair)["status"] == INITIAL

    doc = db.get(without_status)
    reason = refusal(lambda: update(db, doc, note="no status yet"))
    assert reason.startswith("status:")
    update(db, doc, status=INITIAL)
    assert db.get(without_status)["status"] == INITIAL


def test_a_field_is_checked_when_written_not_again_on_every_move(
    server: Server, db_name: str
) -> None:
    """A task stored before the rules, with a date they refuse: a move that leaves the
    date as it was is accepted (a client's cancel, a worker's claim), a move that
    writes a date has it checked. The same
    rule makes a worker's moves cheap: CouchDB runs the function for every write, and
    a field unchanged since it was checked is not checked again."""
    database = server.database(db_name + "-checked-when-written")
    database.create()
    try:
        to_cancel, _ = database.post(task(date="next tuesday"))
        to_claim, _ = database.post(task(date="next tuesday"))
        push(database)

        doc = database.get(to_cancel)
        reason = refusal(lambda: update(database, doc, status="reschedule", date="next friday"))
        assert reason.startswith("date:") and "not an ISO 8601 date" in reason
        update(database, doc, status="cancel")
        assert database.get(to_cancel)["status"] == "cancel"

        doc = database.get(to_claim)
        database.put(claim_update(doc, "manobi@host:1:aaaa", datetime.now(UTC)))
        assert database.get(to_claim)["status"] == "scheduled"
    finally:
        database.delete()


# -- the worker filter ---------------------------------------------------------------------


@pytest.fixture(params=["design filter", "selector"])
def filtered(request: pytest.FixtureRequest, server: Server) -> Callable[[Database, str], set[str]]:
    """The ids a worker's changes feed brings: through the design document's filter,
    and through the Mango selector that stands for it where the server serves one
    (Apache CouchDB; after.feed.worker_selector): both must bring the same. The tests
    read it from a database of one copy: on a cluster a feed read right after writes
    may come from a copy that lacks the last of them (what the filter does is the
    same on every copy)."""
    selectors = request.param == "selector"
    if selectors and not server.serves_selector_feeds():
        pytest.skip("PouchDB Server serves no selector feeds: workers use the design filter")

    def ids(db: Database, worker: str) -> set[str]:
        params = feed_filter(worker, selectors)
        return {row["id"] for row in db.changes(**params)["results"]}

    return ids


def test_selector_feeds_are_used_where_the_server_serves_them(server: Server) -> None:
    assert server.serves_selector_feeds() is not is_pouchdb_server(server)


def test_the_worker_filter_delivers_only_that_workers_tasks(
    one_copy_db: Database, filtered
) -> None:
    db = one_copy_db
    mine = {create(db, worker="manobi")["_id"] for _ in range(3)}
    other = create(db, worker="other")["_id"]
    theirs = {other} | {create(db, worker=worker)["_id"] for worker in ("manobi2", "Manobi")}
    moved_away = create(db, worker="manobi")
    update(db, moved_away, worker="other")

    everything = {row["id"] for row in db.changes()["results"]}
    assert "_design/after" in everything and mine | theirs <= everything
    assert filtered(db, "manobi") == mine
    assert filtered(db, "other") == {other, moved_away["_id"]}
    assert filtered(db, "nobody") == set()


def test_the_worker_filter_delivers_the_records_of_that_workers_instances(
    one_copy_db: Database, filtered
) -> None:
    db = one_copy_db
    instances = {"manobi": "manobi@host:1:aaaa", "other": "other@host:2:bbbb"}
    for name, instance in instances.items():
        db.put(records.new_record(name, instance, datetime.now(UTC)))
    assert filtered(db, "manobi") == {records.record_id(instances["manobi"])}
    assert filtered(db, "other") == {records.record_id(instances["other"])}


@pytest.mark.parametrize("worker", ["42", "007", "true", "null"])
def test_the_worker_filter_works_for_names_that_look_like_json(
    one_copy_db: Database, worker: str, filtered
) -> None:
    db = one_copy_db
    mine = create(db, worker=worker)["_id"]
    create(db, worker="manobi")
    assert filtered(db, worker) == {mine}


# -- views ---------------------------------------------------------------------------------

# worker, date as written, status, the due instant the views must show
VIEW_TASKS = [
    ("manobi", "2026-12-01T09:30:00+02:00", "waiting", "2026-12-01T07:30:00.000Z"),
    ("manobi", "2026-12-01", "waiting", "2026-12-01T00:00:00.000Z"),
    ("manobi", "2026-12-01T10:00:00+05:00", "waiting", "2026-12-01T05:00:00.000Z"),
    ("manobi", "2026-12-01 09:30:00.123456-01:00", "scheduled", "2026-12-01T10:30:00.123Z"),
    ("other", "2026-12-01T09:30", "waiting", "2026-12-01T09:30:00.000Z"),
    ("other", "2026-11-30T23:00:00-02:00", "running", "2026-12-01T01:00:00.000Z"),
]


@pytest.fixture
def view_db(one_copy_db: Database) -> tuple[Database, dict[str, str]]:
    """The VIEW_TASKS in a fresh database; maps each due instant to its task id. One
    copy: on a cluster a view is read from one copy of each shard, which may lack the
    writes just made (docs/couchdb.md); what is checked here is what the views emit."""
    db = one_copy_db
    ids = {}
    for worker, date, status, due in VIEW_TASKS:
        ids[due] = task_in(db, status, worker=worker, date=date)["_id"]
    return db, ids


def test_by_worker_keys_are_worker_status_and_utc_due(view_db: tuple[Database, dict]) -> None:
    db, ids = view_db
    rows = db.view("after", "by_worker", reduce=False)["rows"]
    expected = sorted([worker, status, due] for worker, _, status, due in VIEW_TASKS)
    assert [row["key"] for row in rows] == expected
    assert all(row["id"] == ids[row["key"][2]] for row in rows)


def test_by_status_keys_are_status_and_utc_due(view_db: tuple[Database, dict]) -> None:
    db, ids = view_db
    rows = db.view("after", "by_status", reduce=False)["rows"]
    expected = sorted([status, due] for _, _, status, due in VIEW_TASKS)
    assert [row["key"] for row in rows] == expected
    assert all(row["id"] == ids[row["key"][1]] for row in rows)


def test_tasks_with_different_offsets_sort_by_real_time(view_db: tuple[Database, dict]) -> None:
    db, ids = view_db
    waiting = db.view(
        "after", "by_status", reduce=False, startkey=["waiting"], endkey=["waiting", {}]
    )["rows"]
    # As written, "10:00:00+05:00" sorts after "09:30:00+02:00"; in real time it is earlier.
    assert [row["id"] for row in waiting] == [
        ids["2026-12-01T00:00:00.000Z"],
        ids["2026-12-01T05:00:00.000Z"],
        ids["2026-12-01T07:30:00.000Z"],
        ids["2026-12-01T09:30:00.000Z"],
    ]
    # What a worker asks: its waiting tasks due by an instant.
    due = db.view(
        "after",
        "by_worker",
        reduce=False,
        startkey=["manobi", "waiting"],
        endkey=["manobi", "waiting", "2026-12-01T06:00:00.000Z"],
    )["rows"]
    assert [row["id"] for row in due] == [
        ids["2026-12-01T00:00:00.000Z"],
        ids["2026-12-01T05:00:00.000Z"],
    ]


def test_counts_per_status_and_per_worker(view_db: tuple[Database, dict]) -> None:
    db, _ = view_db
    assert db.view("after", "by_status")["rows"] == [{"key": None, "value": len(VIEW_TASKS)}]
    per_status = db.view("after", "by_status", group_level=1)["rows"]
    assert {row["key"][0]: row["value"] for row in per_status} == {
        "running": 1,
        "scheduled": 1,
        "waiting": 4,
    }
    per_worker = db.view("after", "by_worker", group_level=1)["rows"]
    assert {row["key"][0]: row["value"] for row in per_worker} == {"manobi": 4, "other": 2}
    per_worker_status = db.view("after", "by_worker", group_level=2)["rows"]
    assert {tuple(row["key"]): row["value"] for row in per_worker_status} == {
        ("manobi", "scheduled"): 1,
        ("manobi", "waiting"): 3,
        ("other", "running"): 1,
        ("other", "waiting"): 1,
    }


def test_views_follow_status_changes_and_deletion(view_db: tuple[Database, dict]) -> None:
    db, ids = view_db
    doc = db.get(ids["2026-12-01T01:00:00.000Z"])  # other, running
    doc = update(db, doc, status="done")
    per_status = db.view("after", "by_status", group_level=1)["rows"]
    assert {row["key"][0]: row["value"] for row in per_status} == {
        "done": 1,
        "scheduled": 1,
        "waiting": 4,
    }
    delete(db, doc)
    keys = [row["key"] for row in db.view("after", "by_worker", reduce=False)["rows"]]
    assert ["other", "done", "2026-12-01T01:00:00.000Z"] not in keys
    assert len(keys) == len(VIEW_TASKS) - 1
