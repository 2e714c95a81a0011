"""Many instances of one worker name: records, leases, takeovers, the horizon, outages, stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, new_task, wait_for
from test_worker import create, in_seconds, recording_jobs, wait_status

from after import embedded, records, tasks
from after.config import Config
from after.couch import Database, Forbidden, Server
from after.feed import Feed
from after.push import push
from after.tasks import Local, parse_date
from after.worker import TaskState, Worker


def worker_records(db: Database, name: str = "manobi") -> list[dict[str, Any]]:
    return [r["doc"] for r in db.all_docs(include_docs=True, **records.name_range(name))["rows"]]


def test_each_instance_keeps_a_record_with_a_lease(db: Database, start_fast) -> None:
    worker = start_fast()
    record = wait_for(lambda: (r := db.get(records.record_id(worker.instance))) and r)
    assert record["type"] == "worker"
    assert record["name"] == "manobi"
    assert record["pid"] == os.getpid()
    assert parse_date(record["lease_until"]) > datetime.now(UTC)
    first_seen = record["last_seen"]
    wait_for(lambda: db.get(records.record_id(worker.instance))["last_seen"] != first_seen)
    worker.stop()
    wait_for(lambda: db.get(records.record_id(worker.instance))["state"] == "stopped")


def test_a_worker_record_must_name_its_instance(db: Database) -> None:
    record = {
        "_id": "after-worker:someone-else",
        "type": "worker",
        "name": "manobi",
        "instance": "manobi@host:1:abc",
    }
    with pytest.raises(Forbidden) as refused:
        db.put(record)
    assert refused.value.reason.startswith("_id:")
    with pytest.raises(Forbidden) as refused:
        db.put({**record, "_id": "after-worker:manobi@host:1:abc", "instance": "other@host"})
    assert refused.value.reason.startswith("instance:")


def test_two_live_instances_run_each_task_exactly_once(
    db: Database, start_fast, tmp_path: Path
) -> None:
    jobs, runs = recording_jobs(tmp_path)
    first = start_fast(jobs=jobs)
    second = start_fast(jobs=jobs)
    ids = [
        create(db, date=in_seconds(0.5), job={"name": "record", "arguments": [n]})
        for n in range(60)
    ]
    docs = [wait_status(db, task_id, "done", timeout=30) for task_id in ids]
    assert sorted(int(line) for line in runs.read_text().split()) == list(range(60))
    assert {d["owner"] for d in docs} <= {first.instance, second.instance}


def test_a_new_instance_joins_the_claim_sharing_at_once(db: Database, start_worker) -> None:
    # Heartbeats far apart: only the changes feed can tell the first about the second soon.
    first = start_worker(heartbeat=30.0, lease=90.0)
    time.sleep(0.5)  # its first reading of the records is over
    second = start_worker(heartbeat=30.0, lease=90.0)
    joined = sorted([first.instance, second.instance])
    wait_for(lambda: first.membership.claim_order == joined, timeout=3)
    ids = [create(db, date=in_seconds(1.0)) for _ in range(40)]
    owners = Counter(wait_status(db, task_id, "done")["owner"] for task_id in ids)
    assert set(owners) == set(joined), "each claims the tasks that are its own to claim"
    second.stop()
    wait_for(lambda: first.membership.claim_order == [first.instance], timeout=10)


def test_a_live_instance_keeps_its_tasks(db: Database, start_fast) -> None:
    holder = start_fast()
    task_id = create(db, date=in_seconds(3))
    assert wait_status(db, task_id, "scheduled")["owner"] == holder.instance
    start_fast()  # a second instance of the same name, alive and well
    doc = wait_status(db, task_id, "done", timeout=15)
    assert doc["owner"] == holder.instance
    assert "takeovers" not in doc


def test_tasks_of_a_killed_instance_are_taken_over_after_its_lease(
    db: Database, start_fast, spawn
) -> None:
    victim = spawn()
    task_id = create(db, date=in_seconds(4))
    held = wait_status(db, task_id, "scheduled")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    survivor = start_fast()
    doc = wait_status(db, task_id, "done", timeout=20)
    assert doc["owner"] == survivor.instance
    assert doc["takeovers"][-1]["from"] == held["owner"]
    dead_record = db.get(records.record_id(held["owner"]))
    assert dead_record["state"] == "lost"
    assert dead_record["reaped_by"] == survivor.instance


def test_a_dead_instances_claim_its_takeover_missed_is_found_later(
    db: Database, start_fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster, a claim stored on a minority of copies (answered 202) can reach the
    copies a takeover's view is read from only after its instance was judged dead; the
    feed had brought it while the instance was alive. Its tasks are looked for again
    for a while, so the claim does not stay `scheduled` under a dead instance. (The
    copy that had not got it yet is played by hiding the task from the first look.)"""
    gone = "manobi@elsewhere:1:0dead0"
    record = records.renewed(
        records.new_record("manobi", gone, tasks.now()), tasks.now(), timedelta(seconds=2), {}
    )
    db.put(record)
    task_id = create(db, date=in_seconds(4))
    claimed = tasks.claim_update(db.get(task_id), gone, tasks.now())
    db.put(claimed)
    tasks_in = Feed.tasks_in

    def missed_until_reaped(self: Feed, status: str, until: Any) -> Iterator[dict[str, Any]]:
        # The takeover looks before it marks the record reaped: that look misses it.
        reaped = db.get(records.record_id(gone))["state"] == "lost"
        yield from (d for d in tasks_in(self, status, until) if reaped or d["_id"] != task_id)

    monkeypatch.setattr(Feed, "tasks_in", missed_until_reaped)
    survivor = start_fast()
    doc = wait_status(db, task_id, "done", timeout=20)
    assert doc["owner"] == survivor.instance
    assert doc["takeovers"][-1]["from"] == gone
    assert db.get(records.record_id(gone))["reaped_by"] == survivor.instance


def test_a_job_running_on_a_killed_instance_is_not_silently_rerun(
    db: Database, start_fast, spawn
) -> None:
    victim = spawn()
    task_id = create(db, job={"name": "sleep", "arguments": [30]})
    running = wait_status(db, task_id, "running")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    start_fast()
    doc = wait_status(db, task_id, "err", timeout=20)
    assert doc["error"]["type"] == "WorkerLost"
    assert running["owner"] in doc["error"]["message"]
    assert doc["takeovers"][-1] == {
        **doc["takeovers"][-1],
        "from": running["owner"],
        "status": "running",
    }
    assert doc["attempt"] == 1


def test_tasks_beyond_the_horizon_stay_in_the_database(db: Database, start_fast) -> None:
    worker = start_fast(horizon=2.0)
    later = create(db, date=in_seconds(4))
    far = create(db, date=in_seconds(3600))
    soon = create(db, date=in_seconds(0.5))
    wait_status(db, soon, "done")
    assert db.get(later)["status"] == "waiting"
    assert far not in worker.states
    doc = wait_status(db, later, "done", timeout=10)  # claimed once the horizon reached it
    lateness = parse_date(doc["started_at"]) - parse_date(doc["date"])
    assert timedelta(0) <= lateness < timedelta(milliseconds=50)
    assert db.get(far)["status"] == "waiting"


def test_a_reschedule_beyond_the_horizon_releases_the_task(db: Database, start_fast) -> None:
    start_fast(horizon=5.0)
    task_id = create(db, date=in_seconds(2))
    doc = wait_status(db, task_id, "scheduled")
    db.put({**doc, "status": "reschedule", "date": in_seconds(3600)})
    doc = wait_status(db, task_id, "waiting")
    assert "owner" not in doc


def test_a_reschedule_beyond_the_horizon_made_while_no_worker_runs_still_runs(
    db: Database, start_fast
) -> None:
    """A deploy: the task was handed back, a client moved it further ahead than the
    horizon while no instance ran, then an instance starts. Nobody has taken the
    reschedule up: start-up reads it whatever its date, so it runs at its new date
    (issue #31: it stayed `reschedule` past its date)."""
    task_id = create(db, date=in_seconds(3600))
    new_date = in_seconds(4)
    db.put({**db.get(task_id), "status": "reschedule", "date": new_date})
    start_fast(horizon=2.0)
    doc = wait_status(db, task_id, "done", timeout=12)
    assert parse_date(doc["started_at"]) >= parse_date(new_date)


def test_start_up_reads_only_the_due_window(db: Database, start_fast) -> None:
    future = [
        new_task(date=(datetime.now(UTC) + timedelta(days=d)).isoformat()) for d in range(1, 301)
    ]
    db.bulk_docs(future)
    due = create(db, date="2020-01-01")
    worker = start_fast(horizon=60.0)
    wait_status(db, due, "done")
    assert len(worker.states) <= 1


def test_the_worker_rides_out_a_server_restart(tmp_path: Path, start_fast) -> None:
    """The server goes away and comes back on the same data: the worker converges."""
    port = embedded.free_port()
    url = f"http://127.0.0.1:{port}/"
    data = tmp_path / "couch"
    process = embedded.start(port, data, data / "log.txt")
    try:
        embedded.wait_healthy(url, 60, process)
        db = Server(url).database("outage")
        push(db)
        config = Config.from_env({}).override(
            couchdb_url=url, db="outage", jobs=REPO / "jobs", home=tmp_path / "home"
        )
        start_fast(config_=config)
        before = create(db)
        wait_status(db, before, "done")
        embedded.stop(process)
        process = embedded.start(port, data, data / "log.txt")
        embedded.wait_healthy(url, 60, process)
        after_restart = create(db, date=in_seconds(1))
        doc = wait_status(db, after_restart, "done", timeout=40)
        assert doc["attempt"] == 1
    finally:
        embedded.stop(process)


def test_a_second_signal_stops_at_once(db: Database, spawn) -> None:
    worker = spawn()
    task_id = create(db, job={"name": "sleep", "arguments": [60]})
    wait_status(db, task_id, "running")
    worker.send_signal(signal.SIGTERM)  # graceful: would wait for the job
    with pytest.raises(subprocess.TimeoutExpired):
        worker.wait(1.0)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 1
    assert db.get(task_id)["status"] == "running"  # left for a takeover, not lost silently


def test_a_worker_keeps_its_lease_while_a_graceful_stop_waits_for_a_job(
    db: Database, start_fast
) -> None:
    worker = start_fast()
    task_id = create(db, job={"name": "sleep", "arguments": [3]})
    wait_status(db, task_id, "running")
    worker.stop()
    time.sleep(2.5)  # longer than the lease: it must have been renewed meanwhile
    record = db.get(records.record_id(worker.instance))
    assert parse_date(record["lease_until"]) > datetime.now(UTC)
    assert wait_status(db, task_id, "done")["owner"] == worker.instance
    wait_for(lambda: db.get(records.record_id(worker.instance))["state"] == "stopped")


def test_a_graceful_stop_between_a_commit_and_its_start_uses_up_no_attempt(
    db: Database, start_fast
) -> None:
    """Stopped after the commit (`running`, attempt 1) but before the job began: the task
    is handed back with the attempt its commit counted taken back, so its only run is
    attempt 1, with attempt 1's idempotency key, and a retry is not lost (issue #31)."""
    worker = start_fast(lead=2.0)
    task_id = create(db, date=in_seconds(3))
    assert wait_status(db, task_id, "running")["attempt"] == 1
    worker.stop()
    assert worker.finished.wait(15)
    handed_back = wait_status(db, task_id, "waiting")
    assert "attempt" not in handed_back and "owner" not in handed_back
    start_fast()
    assert wait_status(db, task_id, "done")["attempt"] == 1


def test_an_exit_on_an_error_leaves_what_it_held_to_be_taken_over_at_once(
    db: Database, start_fast
) -> None:
    """Only a graceful stop that handed everything back marks the record stopped: peers
    take over only from a record still `running` whose lease ran out, so an exit on an
    error that said `stopped` left its tasks `scheduled` for ever (issue #31)."""
    first = start_fast()
    task_id = create(db, date=in_seconds(5))
    assert wait_status(db, task_id, "scheduled")["owner"] == first.instance
    second = start_fast()

    def fail() -> None:
        raise SystemExit("an error nobody caught")  # not an Exception: it ends the loop

    first.control.put(fail)
    assert first.finished.wait(15)
    wait_for(lambda: records.needs_takeover(db.get(records.record_id(first.instance)), tasks.now()))
    doc = wait_status(db, task_id, "done", timeout=20)
    assert doc["owner"] == second.instance and doc["attempt"] == 1


def test_a_run_whose_thread_fails_before_the_job_ends_the_task_with_the_error(
    db: Database, start_fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What fails in the run's thread before the job (here its idempotency key) is the
    run's error: the task does not stay `running` with its slot taken, and a graceful
    stop does not wait for it for ever (issue #31)."""
    from after import runs

    def no_key(doc: dict[str, Any]) -> str:
        raise RuntimeError("no idempotency key today")

    monkeypatch.setattr(runs, "idempotency_key", no_key)
    worker = start_fast()
    task_id = create(db)
    doc = wait_status(db, task_id, "err")
    assert "no idempotency key today" in doc["error"]["message"]
    worker.stop()
    assert worker.finished.wait(15)


def test_a_task_counts_as_written_until_every_write_of_it_is_answered(config: Config) -> None:
    """Two writes of one task can be out at once (a conflict resolved on our own running
    task): the first answer must not make the task look settled while the second is out
    (issue #31: `writing` was a boolean)."""
    worker = Worker(config, "manobi")
    sent: list[Any] = []
    worker.writer.write = lambda doc, on_result, within=0.0: sent.append(doc)  # type: ignore[method-assign]
    doc = new_task(_id="t", _rev="2-x", status="running", owner=worker.instance)
    worker.states["t"] = TaskState(doc, local=Local.RUNNING)
    worker.writes.send("t", {**doc, "status": "done"}, lambda row: None)
    worker.writes.send("t", {**doc, "_deleted": True}, lambda row: None)
    worker.writes.answer("t", {"id": "t", "rev": "3-y", "ok": True})
    assert worker.states["t"].writing
    worker.writes.answer("t", {"id": "t", "rev": "3-z", "ok": True})
    assert not worker.states["t"].writing


SIGNAL_WHILE_QUEUE_LOCKED = """
import os, signal, sys
from after.config import Config
from after.worker import Worker
worker = Worker(Config.from_env({}).override(couchdb_url=sys.argv[1], db="x"), "manobi")
worker.install_signal_handlers()
with worker.control.mutex:  # as the control thread does inside get() or put()
    os.kill(os.getpid(), signal.SIGTERM)
print("stop asked" if worker.stop_signaled else "no stop", flush=True)
"""


def test_a_signal_while_the_control_queue_is_locked_does_not_deadlock(couch_url: str) -> None:
    """The handler only sets a flag: it runs between two bytecodes of the main thread,
    which may hold the control queue's lock (not reentrant) at that moment."""
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_WHILE_QUEUE_LOCKED, couch_url],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert done.stdout.strip() == "stop asked", done.stderr


def test_an_instance_whose_lease_lapsed_does_not_start_a_run_taken_over_meanwhile(
    db: Database, start_fast, tmp_path: Path
) -> None:
    """The instance committed a run, then was paused (SIGSTOP, a long GC, a frozen VM:
    here its lease and control threads are held) past its lease. A peer took the task
    over as "worker lost". Resumed, its timer comes to the date before its feed brings
    the takeover: it must not start the job (issue #31: it did, a run recorded
    nowhere)."""
    jobs, runs = recording_jobs(tmp_path)
    first = start_fast(lead=4.0, jobs=jobs)
    task_id = create(db, date=in_seconds(6), job={"name": "record", "arguments": ["ran"]})
    assert wait_status(db, task_id, "running")["owner"] == first.instance
    resume = threading.Event()
    first.membership.renew_record = lambda: resume.wait(30)  # type: ignore[method-assign]
    first.control.put(lambda: resume.wait(30))
    try:
        start_fast(jobs=jobs)  # a peer, which takes the task over
        lost = wait_status(db, task_id, "err", timeout=15)
        assert lost["error"]["type"] == "WorkerLost" and lost["takeovers"][-1]["from"] == (
            first.instance
        )
        time.sleep(max(0.0, (parse_date(lost["date"]) - tasks.now()).total_seconds()) + 1.0)
        assert not runs.exists(), "the lapsed instance ran a task taken over from it"
    finally:
        resume.set()
    time.sleep(1.0)  # resumed: it learns of the takeover and leaves the task alone
    assert not runs.exists() and db.get(task_id)["status"] == "err"


def test_a_run_that_waited_for_a_pool_thread_past_a_lapse_does_not_begin(
    config: Config, tmp_path: Path
) -> None:
    """The run was handed to the pool, whose threads were busy; the instance was paused
    before one took it, past its lease (the soak, seed 2: such runs began 5 s after a
    peer had judged them lost). It does not begin: it is committed again, for the
    read-back that follows a lapse."""
    jobs, runs = recording_jobs(tmp_path)
    worker = Worker(config.override(jobs=jobs), "manobi")
    doc = new_task(
        _id="t", _rev="3-x", status="running", owner=worker.instance, attempt=1,
        job={"name": "record", "arguments": ["ran"]},
    )  # fmt: skip
    state = worker.states["t"] = TaskState(doc, local=Local.RUNNING)
    worker.membership.renewed_at = time.monotonic() - 60  # the pause: no renewal since
    worker.runner.execute("t", state)
    assert not runs.exists(), "the job began though our lease had lapsed"
    worker.control.get_nowait()()  # the control thread takes it back
    assert state.local is Local.COMMITTED and "t" not in worker.started_runs


def test_a_lapse_is_counted_once_and_quiets_the_instance_for_a_lease(config: Config) -> None:
    """After a lapse nothing is committed or started for a lease (peers may still take
    us for dead); the renewals made meanwhile are no new lapses (the soak, seed 6: each
    one counted as a lapse, the quiet never ended, and 69 tasks stayed `scheduled`)."""
    worker = Worker(config, "manobi", heartbeat=0.3, lease=1.5)
    membership = worker.membership
    membership.put_record = lambda record: None  # type: ignore[method-assign]
    membership.renewed_at = time.monotonic() - 60  # a long pause
    membership.renew_record()
    assert membership.lapses == 1 and not membership.lease_holds()
    membership.renew_record()
    assert membership.lapses == 1, "a renewal during the quiet counted as a lapse"
    for _ in range(6):  # a lease of renewals, a heartbeat apart
        time.sleep(0.3)
        membership.renew_record()
    assert membership.lapses == 1 and membership.lease_holds()


def test_a_clock_far_from_the_servers_is_reported(
    config: Config, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(config, "manobi")
    assert abs(worker.server.clock_skew() or 0) < 2  # this machine's clock is the server's
    worker.server.clock_skew = lambda: -7.5  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="after.worker"):
        worker.membership.check_clock()
    assert "clock is 7.5 s ahead of the CouchDB server's" in caplog.text


def test_a_start_that_meets_a_write_in_flight_waits_for_it(config: Config) -> None:
    """At a run's instant a write of the task may still be in flight (a conflict's
    resolution on the committed run, between replicas): the start waits for it,
    rather than being dropped and leaving the task `running` with nobody running it."""
    worker = Worker(config, "manobi")
    doc = new_task(_id="t", _rev="3-x", status="running", owner=worker.instance)
    state = TaskState(doc, local=Local.COMMITTED, writing=True)
    worker.states["t"] = state
    handed_over = threading.Event()

    def submit(*args: Any) -> Future[None]:
        handed_over.set()
        return Future()  # the run, never ended here

    worker.executor.submit = submit  # type: ignore[method-assign]
    worker.membership.renewed_at = time.monotonic()  # its lease holds
    worker.timer.start()

    def control() -> None:  # what Worker.run does with what the other threads post
        while (action := worker.control.get()) is not None:
            action()

    threading.Thread(target=control, daemon=True).start()
    try:
        worker.runner.start("t")  # the instant has come; the write is not back yet
        assert not handed_over.wait(0.2) and state.local is Local.COMMITTED
        state.writing = False  # the write is back
        assert handed_over.wait(2), "the start was dropped"
        assert state.local is Local.RUNNING
    finally:
        worker.control.put(None)
        worker.timer.stop(wait=False)
        worker.executor.shutdown()


def test_a_view_row_without_its_document_is_skipped(config: Config) -> None:
    """A row of `by_worker` whose document is null (it went away between the index and
    the read: seen once on SpiderMonkey under the soak) is skipped, not an internal
    error of the horizon sweep."""
    worker = Worker(config, "manobi")
    rows = [{"id": "gone", "doc": None}, {"id": "t", "doc": new_task(_id="t")}]
    worker.db.iter_view = lambda *args, **kwargs: iter(rows)  # type: ignore[method-assign]
    assert [doc["_id"] for doc in worker.feed.tasks_in("waiting", {})] == ["t"]
