"""Claiming: who claims first, only what can start on time, claim and commit in one write."""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import timedelta

import pytest
from conftest import new_task, wait_for
from test_worker import StartWorker, create, in_seconds, wait_status

from after.config import Config
from after.couch import Database
from after.push import deployed_rules, lib_module, load_rules
from after.tasks import parse_date
from after.worker import Worker

# -- claiming and committing in one write ----------------------------------------------


def statuses_of_every_revision(db: Database, task_id: str) -> list[str]:
    """The status of each revision of the task, oldest first."""
    history = db.get(task_id, revs=True)["_revisions"]
    revs = [f"{history['start'] - i}-{rev}" for i, rev in enumerate(history["ids"])]
    return [doc["status"] for doc in db.revisions(task_id, list(reversed(revs)))]


def test_a_task_due_now_is_claimed_and_committed_in_one_write(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(db, date=in_seconds(0))
    doc = wait_status(db, task_id, "done")
    assert statuses_of_every_revision(db, task_id) == ["waiting", "running", "done"]
    assert doc["owner"].startswith("manobi@") and doc["claimed_at"] and doc["attempt"] == 1


def test_a_task_due_later_is_claimed_first_and_committed_shortly_before_its_date(
    db: Database, start_worker: StartWorker
) -> None:
    """Held as `scheduled` meanwhile: a cancel or a peer can still take it from there."""
    start_worker()
    task_id = create(db, date=in_seconds(1.5))
    wait_status(db, task_id, "done")
    assert statuses_of_every_revision(db, task_id) == ["waiting", "scheduled", "running", "done"]


def push_rules_without_claim_commits(db: Database) -> None:
    """Deploy the design doc as an older After pushed it: a claim cannot commit a run."""
    design = db.get("_design/after")
    rules = deployed_rules(design)
    del rules["transitions"]["waiting"]["running"]
    design["lib"]["rules"] = lib_module(rules)
    db.put(design)
    assert "running" not in deployed_rules(db.get("_design/after"))["transitions"]["waiting"]


def test_under_an_older_design_doc_a_claim_and_its_commit_are_two_writes(
    db: Database, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    push_rules_without_claim_commits(db)
    with caplog.at_level("WARNING", logger="after.worker"):
        start_worker()
    assert "is older than this worker" in caplog.text and "after push" in caplog.text
    task_id = create(db, date=in_seconds(0))
    wait_status(db, task_id, "done")
    assert statuses_of_every_revision(db, task_id) == ["waiting", "scheduled", "running", "done"]


def test_a_claim_that_commits_refused_by_an_older_design_doc_is_made_in_two_writes(
    db: Database, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """The older design doc was pushed while the worker ran: the task is not lost."""
    start_worker()
    push_rules_without_claim_commits(db)
    with caplog.at_level("WARNING", logger="after.worker"):
        task_id = create(db, date=in_seconds(0))
        wait_status(db, task_id, "done")
    assert statuses_of_every_revision(db, task_id) == ["waiting", "scheduled", "running", "done"]
    assert "is older than this worker" in caplog.text


@pytest.mark.parametrize(
    "design",
    [{}, {"lib": {}}, {"lib": {"rules": "module.exports = {;"}}, {"lib": {"rules": 42}}],
)
def test_a_design_doc_without_readable_rules_has_no_known_rules(design: dict) -> None:
    assert deployed_rules(design) == {}


def test_the_deployed_rules_are_read_back_as_pushed(db: Database) -> None:
    assert deployed_rules(db.get("_design/after")) == load_rules()


# -- an instance claims only what it can start on time ---------------------------------


def id_claimed_first_by(worker: Worker, prefix: str) -> str:
    """A task id that `worker` is the first to claim among the live instances."""
    return next(
        f"{prefix}-{n}" for n in range(1000) if worker.membership.claims_first(f"{prefix}-{n}")
    )


def test_a_busy_instance_leaves_a_task_it_cannot_start_on_time_to_an_idle_peer(
    db: Database, start_fast
) -> None:
    busy = start_fast(concurrency=1)
    long_run = create(db, job={"name": "sleep", "arguments": [8]})
    wait_status(db, long_run, "running")
    idle = start_fast(concurrency=1)
    wait_for(
        lambda: len(busy.membership.claim_order) == 2 and len(idle.membership.claim_order) == 2
    )
    # The long run has run a while, so it is expected to run as long again: past
    # the next task's date.
    time.sleep(2.5)
    task_id = id_claimed_first_by(busy, "next")
    date = in_seconds(2.0)
    db.put({**new_task(date=date), "_id": task_id})
    doc = wait_status(db, task_id, "done", timeout=15)
    assert doc["owner"] == idle.instance
    assert parse_date(doc["started_at"]) - parse_date(date) < timedelta(milliseconds=500)
    assert db.get(long_run)["status"] == "running", "it ran beside the long run, not after it"


def test_a_run_waits_for_a_free_slot_as_scheduled_and_survives_a_crash(
    db: Database, start_fast, spawn
) -> None:
    victim = spawn("manobi", None, "a", "--concurrency", "1")
    long_run = create(db, job={"name": "sleep", "arguments": [30]})
    wait_status(db, long_run, "running")
    time.sleep(1.0)
    queued = create(db, date=in_seconds(0.5))
    held = wait_status(db, queued, "scheduled", timeout=10)
    time.sleep(1.5)  # past its date: it waits for the one slot, and says so
    assert db.get(queued)["status"] == "scheduled"
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    survivor = start_fast()
    doc = wait_status(db, queued, "done", timeout=20)
    assert doc["owner"] == survivor.instance
    assert doc["attempt"] == 1, "it ran once: the crash did not count as an attempt"
    assert doc["takeovers"][-1]["from"] == held["owner"]
    assert doc["takeovers"][-1]["status"] == "scheduled"
    lost = wait_status(db, long_run, "err", timeout=20)
    assert lost["error"]["type"] == "WorkerLost"


def test_one_instance_still_runs_what_it_has_no_room_for_late_rather_than_never(
    db: Database, start_fast
) -> None:
    start_fast(concurrency=1)
    first = create(db, job={"name": "sleep", "arguments": [2]})
    wait_status(db, first, "running")
    time.sleep(0.5)
    then = create(db)
    doc = wait_status(db, then, "done", timeout=15)
    assert parse_date(doc["started_at"]) >= parse_date(db.get(first)["finished_at"])


def test_when_an_instance_leaves_only_its_share_of_the_claims_moves(config: Config) -> None:
    worker = Worker(config, "manobi")
    peers = [f"manobi@host:{n}:0000" for n in range(3)]
    worker.membership.set_leases(dict.fromkeys(peers, True))
    ids = [f"task-{n}" for n in range(2000)]
    before = {task_id: worker.membership.first_claimer(task_id) for task_id in ids}
    shares = Counter(before.values())
    assert len(shares) == 4 and min(shares.values()) > 400, shares  # about 500 each
    worker.membership.set_leases({**dict.fromkeys(peers, True), peers[0]: False})
    after = {task_id: worker.membership.first_claimer(task_id) for task_id in ids}
    moved = {task_id for task_id in ids if before[task_id] != after[task_id]}
    assert moved == {task_id for task_id in ids if before[task_id] == peers[0]}


# -- a held task steered while its new claim is put off -----------------------------------


def test_a_held_task_rescheduled_while_its_new_claim_waits_is_not_committed_on_the_old_date(
    db: Database, start_worker, caplog: pytest.LogCaptureFixture
) -> None:
    """A client reschedules a task this instance holds, and the instance puts off its new
    claim (no room now). What it held was the old version: its timer must not commit the
    `reschedule` version at the old date (refused, `reschedule` -> `running`, and the task
    then forgotten, `reschedule` for ever: issue #31's fuzz failure)."""
    worker = start_worker()
    task_id = create(db, date=in_seconds(1.5))
    held = wait_status(db, task_id, "scheduled")
    room = worker.claiming.has_room_for
    refusals = iter([False])  # the first look after the reschedule finds no room
    worker.claiming.has_room_for = lambda doc: next(refusals, True) and room(doc)
    new_date = in_seconds(2.5)
    with caplog.at_level("ERROR", logger="after"):
        db.put({**held, "status": "reschedule", "date": new_date})
        doc = wait_status(db, task_id, "done", timeout=15)
    assert parse_date(doc["started_at"]) >= parse_date(new_date)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
