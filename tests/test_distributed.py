"""Many instances of one worker name: records, leases, takeover, the horizon, outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, new_task, replicator_user, wait_for, with_credentials
from test_worker import StartWorker, create, in_seconds, recording_jobs, wait_status

from after import embedded, records
from after.config import Config, split_credentials
from after.couch import Database, Forbidden, Server
from after.push import push
from after.security import is_pouchdb_server, security_object
from after.tasks import Local, parse_date
from after.worker import TaskState, Worker

FAST = {"heartbeat": 0.3, "lease": 1.5}


@pytest.fixture
def start_fast(start_worker: StartWorker) -> StartWorker:
    """In-process workers with short heartbeats and leases, so takeovers come quickly."""
    return lambda *args, **options: start_worker(*args, **{**FAST, **options})


@pytest.fixture
def spawn(config: Config, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Worker processes through the real CLI, killed at the end."""
    processes: list[subprocess.Popen] = []

    def spawn_worker(
        name: str = "manobi", jobs: Path | None = None, home: str = "a", *options: str
    ) -> subprocess.Popen:
        env = {
            **os.environ,
            "AFTER_COUCHDB_URL": config.couchdb_url,
            "AFTER_DB": config.db,
            "AFTER_HOME": str(tmp_path / home),
        }
        if config.user:
            env.update(AFTER_COUCHDB_USER=config.user, AFTER_COUCHDB_PASSWORD=config.password or "")
        jobs_dir = str(jobs or REPO / "jobs")
        command = [sys.executable, "-m", "after", "start", name, "--foreground", "--jobs", jobs_dir]
        command += ["--heartbeat", "0.3", "--lease", "1.5", *options]
        log = tmp_path / f"{home}.log"
        with open(log, "w") as output:  # a file, not a pipe: a full pipe would block the worker
            process = subprocess.Popen(command, env=env, stderr=output, cwd=REPO)
        processes.append(process)
        state = tmp_path / home / "workers" / f"{name}.json"
        wait_for(lambda: state.exists() or process.poll() is not None, timeout=20)
        assert process.poll() is None, log.read_text()
        return process

    yield spawn_worker
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


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
    wait_for(lambda: first.claim_order == joined, timeout=3)
    ids = [create(db, date=in_seconds(1.0)) for _ in range(40)]
    owners = Counter(wait_status(db, task_id, "done")["owner"] for task_id in ids)
    assert set(owners) == set(joined), "each claims the tasks that are its own to claim"
    second.stop()
    wait_for(lambda: first.claim_order == [first.instance], timeout=10)


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


def test_conflicting_claims_are_resolved_and_recorded(
    server: Server, db_name: str, config: Config, start_fast
) -> None:
    """As after a partition: two instances' claims both landed, as conflicting revisions.

    The conflict is made (by a replication-style write, new_edits=false) before the
    design document is deployed, because PouchDB Server drops such writes once a
    validate_doc_update exists; Apache CouchDB accepts them.
    """
    db = server.database(db_name + "-conflict")
    db.create()
    try:
        task_id, _ = db.post(new_task(date=in_seconds(1)))
        original = db.get(task_id)
        db.put({**original, "status": "scheduled", "owner": "manobi@node-a:1:aaaa"})
        generation, parent = original["_rev"].split("-")
        other = {
            **original,
            "_rev": f"{int(generation) + 1}-{'f' * 32}",
            "_revisions": {"start": int(generation) + 1, "ids": ["f" * 32, parent]},
            "status": "scheduled",
            "owner": "manobi@node-b:1:bbbb",
        }
        db.server.json("POST", f"{db.path}/_bulk_docs", body={"docs": [other], "new_edits": False})
        assert db.get(task_id, conflicts=True).get("_conflicts"), "the test needs a real conflict"
        push(db)
        start_fast(config_=config.override(db=db.name))
        doc = wait_status(db, task_id, "done", timeout=20)
        assert len(doc["conflicts_resolved"]) == 1
        loser = doc["conflicts_resolved"][0]
        assert loser["owner"] in {"manobi@node-a:1:aaaa", "manobi@node-b:1:bbbb"}
        assert loser["status"] == "scheduled"
        assert not db.get(task_id, conflicts=True).get("_conflicts")
    finally:
        db.delete()


def test_a_runs_end_that_lost_the_conflict_to_its_running_is_kept(
    server: Server, db_name: str, config: Config, start_fast
) -> None:
    """Between replicas, an instance's `done` can become the losing revision beside a
    `running` of the same run (the other side recorded a resolution on it meanwhile).
    The worker resolving it keeps the run's end, not `running` under an instance that
    has finished: that would end as "worker lost" although the job ran to its end.
    (Conflict made before the design doc is deployed: see the test above.)"""
    db = server.database(db_name + "-ended")
    db.create()
    try:
        runner = "manobi@node-a:1:aaaa"
        task_id, _ = db.post(new_task(date=in_seconds(-5)))
        original = db.get(task_id)
        running = {**original, "status": "running", "owner": runner, "attempt": 1}
        running_rev = db.put(running)
        generation, parent = original["_rev"].split("-")
        done = {
            **running,
            "_rev": f"{int(generation) + 1}-{'0' * 32}",  # loses to `running` (higher id)
            "_revisions": {"start": int(generation) + 1, "ids": ["0" * 32, parent]},
            "status": "done",
            "result": "the job's own result",
            "started_at": running["date"],
            "ended_at": running["date"],
        }
        db.server.json("POST", f"{db.path}/_bulk_docs", body={"docs": [done], "new_edits": False})
        conflicted = db.get(task_id, conflicts=True)
        assert conflicted["_rev"] == running_rev and conflicted["_conflicts"] == [done["_rev"]]
        push(db)
        start_fast(config_=config.override(db=db.name))
        wait_for(lambda: not db.get(task_id, conflicts=True).get("_conflicts"), timeout=20)
        final = db.get(task_id)
        assert final["status"] == "done" and final["result"] == "the job's own result", final
        assert final["owner"] == runner
        assert final["conflicts_resolved"] == [
            {"rev": done["_rev"], "status": "done", "owner": runner, "attempt": 1}
        ]
    finally:
        db.delete()


def test_a_conflict_already_on_record_is_resolved_by_deleting_its_losers(
    couch_url: str, server: Server, db: Database, start_fast
) -> None:
    """The other replica resolved the conflict first: its winner, done, already records
    the losing revision, and both arrive by replication. Writing that record again would
    be refused (a done task cannot change): the worker only deletes the loser."""
    source = server.database(db.name + "-replica")  # no design document: any write goes
    source.create()
    try:
        start_fast()
        task_id, _ = source.post(new_task(date=in_seconds(-5)))
        original = source.get(task_id)
        loser = source.put({**original, "status": "scheduled", "owner": "manobi@node-a:1:aaaa"})
        generation, parent = original["_rev"].split("-")
        record = {"rev": loser, "status": "scheduled", "owner": "manobi@node-a:1:aaaa"}
        winner = {
            **original,
            "_rev": f"{int(generation) + 1}-{'f' * 32}",
            "_revisions": {"start": int(generation) + 1, "ids": ["f" * 32, parent]},
            "status": "done",
            "owner": "manobi@node-b:1:bbbb",
            "conflicts_resolved": [{**record, "attempt": None}],
        }
        body = {"docs": [winner], "new_edits": False}
        source.server.json("POST", f"{source.path}/_bulk_docs", body=body)
        assert source.get(task_id, conflicts=True).get("_conflicts") == [loser]
        # PouchDB Server's validation wrapper drops replicated revisions sent over HTTP, so
        # its target is the local name; Apache CouchDB 3 takes URLs only, and validates
        # what it replicates: as a user with the replicator role (the task arrives done).
        # See test_resilience.replicate_both_ways and couchdb_replicas.
        bare = split_credentials(couch_url)[0]
        with replicator_user(server) as replicator:
            if is_pouchdb_server(server):
                ends = {"source": bare + source.name, "target": db.name}
            else:
                for end in (source, db):
                    end.set_security(security_object())  # admits the replicator role
                as_replicator = with_credentials(bare, *replicator)
                ends = {"source": as_replicator + source.name, "target": as_replicator + db.name}
            replicated = server.json("POST", "_replicate", body=ends)
        assert replicated.get("ok") and not replicated.get("doc_write_failures"), replicated
        wait_for(lambda: not db.get(task_id, conflicts=True).get("_conflicts"), timeout=20)
        doc = db.get(task_id)
        assert doc["_rev"] == winner["_rev"] and doc["status"] == "done"
        assert doc["conflicts_resolved"] == winner["conflicts_resolved"]
    finally:
        source.delete()


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


def test_a_clock_far_from_the_servers_is_reported(
    config: Config, db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(config, "manobi")
    assert abs(worker.server.clock_skew() or 0) < 2  # this machine's clock is the server's
    worker.server.clock_skew = lambda: -7.5  # type: ignore[method-assign]
    with caplog.at_level("WARNING", logger="after.worker"):
        worker._check_clock()
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
    worker.executor.submit = lambda *args: handed_over.set()  # type: ignore[method-assign]
    worker.timer.start()

    def control() -> None:  # what Worker.run does with what the other threads post
        while (action := worker.control.get()) is not None:
            action()

    threading.Thread(target=control, daemon=True).start()
    try:
        worker._start("t")  # the instant has come; the write is not back yet
        assert not handed_over.wait(0.2) and state.local is Local.COMMITTED
        state.writing = False  # the write is back
        assert handed_over.wait(2), "the start was dropped"
        assert state.local is Local.RUNNING
    finally:
        worker.control.put(None)
        worker.timer.stop(wait=False)
        worker.executor.shutdown()


@pytest.mark.parametrize("seen_by", ["the feed", "the recheck"])
def test_a_conflict_resolved_by_the_other_replica_is_then_decided_on(
    config: Config, db: Database, seen_by: str
) -> None:
    """An instance left a conflicted task to the first claimer (on the other replica);
    that one kept a winner saying `running` under this instance and deleted the losing
    revision, this instance's own `done`. The winner comes back with the same revision,
    only without its conflict: it must be decided on (this instance is not running it:
    worker lost), not taken for the version already seen and left `running` forever (a
    two-replica test's failure)."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(-1)))
    db.put({**db.get(task_id), "status": "running", "owner": worker.instance, "attempt": 1})
    resolved = db.get(task_id)
    worker.states[task_id] = TaskState({**resolved, "_conflicts": ["5-" + "d" * 32]})
    if seen_by == "the feed":
        assert not worker._known(resolved)
        worker._seen(resolved, seq="9")
    else:
        worker._recheck(task_id, delay=1.0)
    worker.writer.start()
    worker.writer.stop()  # sends what was written
    final = db.get(task_id)
    assert final["status"] == "err" and final["error"]["type"] == "WorkerLost", final
    worker.executor.shutdown()


OTHER_REPLICA = "manobi@node-b:1:bbbb"


def branch(db: Database, parent: dict[str, Any], *versions: dict[str, Any]) -> None:
    """Write `versions` as a replica's branch on top of revision `parent` (as replication
    does: new_edits=false), beside whatever this node wrote on top of it."""
    generation, parent_id = parent["_rev"].split("-")
    ids = [
        f"{n:032x}" for n in range(len(versions), 0, -1)
    ]  # low ids: this node's branch wins ties
    docs = [
        {
            **version,
            "_rev": f"{int(generation) + n + 1}-{ids[-(n + 1)]}",
            "_revisions": {"start": int(generation) + n + 1, "ids": [*ids[-(n + 1) :], parent_id]},
        }
        for n, version in enumerate(versions)
    ]
    db.server.json("POST", f"{db.path}/_bulk_docs", body={"docs": docs, "new_edits": False})


def our_run(config: Config, db: Database) -> tuple[Worker, dict[str, Any], dict[str, Any]]:
    """A worker (not started), a task as created, and that task `running` under it."""
    worker = Worker(config.override(db=db.name), "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(-1)))
    original = db.get(task_id)
    ours = {**original, "status": "running", "owner": worker.instance, "attempt": 1}
    ours["_rev"] = db.put(ours)
    return worker, original, ours


@pytest.fixture
def replica_db(server: Server, db_name: str) -> Iterator[Database]:
    """A database without its design document yet: PouchDB Server drops replicated
    writes (new_edits=false) once a validate_doc_update exists; push() after them."""
    database = server.database(db_name + "-replica-side")
    database.create()
    yield database
    database.delete()


def test_a_conflict_that_came_while_the_outcome_was_written_is_resolved(
    config: Config, replica_db: Database
) -> None:
    """The other replica's run of the task arrives while this instance writes its
    outcome. Once that write lands the task is forgotten, and no later news may come:
    the conflicted version seen meanwhile is resolved, the other run recorded."""
    db = replica_db
    worker, original, ours = our_run(config, db)
    task_id = original["_id"]
    outcome = {"status": "done", "started_at": ours["date"], "ended_at": ours["date"]}
    done = {**ours, **outcome}
    done_rev = db.put(done)
    branch(db, original, {**original, "status": "running", "owner": OTHER_REPLICA, "attempt": 1})
    push(db)
    meanwhile = db.get(task_id, conflicts=True)
    assert meanwhile["_rev"] == done_rev and meanwhile.get("_conflicts"), meanwhile
    worker.states[task_id] = TaskState(ours, writing=True, newer=meanwhile)

    worker._outcome_written(task_id, done, {}, {"ok": True, "id": task_id, "rev": done_rev})
    worker.writer.start()
    worker.writer.stop()  # sends what was written

    final = db.get(task_id)
    assert final["status"] == "done"
    assert [(r["owner"], r["status"]) for r in final["conflicts_resolved"]] == [
        (OTHER_REPLICA, "running")
    ]
    worker.executor.shutdown()


def test_an_outcome_refused_because_the_other_replica_ended_the_task_is_recorded(
    config: Config, replica_db: Database
) -> None:
    """Our outcome is refused (PouchDB Server answers 403): the winner is the other
    replica's `done`, with our `running` beside it. Resolving records our run on the
    task; forgetting it left the conflict, and our run, unrecorded."""
    db = replica_db
    worker, original, ours = our_run(config, db)
    task_id = original["_id"]
    theirs = {**original, "status": "running", "owner": OTHER_REPLICA, "attempt": 1}
    ended = {"started_at": ours["date"], "ended_at": ours["date"]}
    branch(db, original, theirs, {**theirs, "status": "done", **ended})
    push(db)
    assert db.get(task_id, conflicts=True)["_conflicts"] == [ours["_rev"]]
    worker.states[task_id] = TaskState(ours, writing=True)
    refused = {"error": "forbidden", "reason": "status: a done task cannot change"}

    worker._outcome_written(task_id, {**ours, "status": "done", **ended}, {}, refused)
    worker.writer.start()
    worker.writer.stop()  # sends what was written

    final = db.get(task_id)
    assert final["status"] == "done" and final["owner"] == OTHER_REPLICA
    assert [(r["owner"], r["status"]) for r in final["conflicts_resolved"]] == [
        (worker.instance, "running")
    ]
    worker.executor.shutdown()


# -- an instance claims only what it can start on time ---------------------------------


def id_claimed_first_by(worker: Worker, prefix: str) -> str:
    """A task id that `worker` is the first to claim among the live instances."""
    return next(f"{prefix}-{n}" for n in range(1000) if worker._claims_first(f"{prefix}-{n}"))


def test_a_busy_instance_leaves_a_task_it_cannot_start_on_time_to_an_idle_peer(
    db: Database, start_fast
) -> None:
    busy = start_fast(concurrency=1)
    long_run = create(db, job={"name": "sleep", "arguments": [8]})
    wait_status(db, long_run, "running")
    idle = start_fast(concurrency=1)
    wait_for(lambda: len(busy.claim_order) == 2 and len(idle.claim_order) == 2)
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
    worker._set_leases(dict.fromkeys(peers, True))
    ids = [f"task-{n}" for n in range(2000)]
    before = {task_id: worker._first_claimer(task_id) for task_id in ids}
    shares = Counter(before.values())
    assert len(shares) == 4 and min(shares.values()) > 400, shares  # about 500 each
    worker._set_leases({**dict.fromkeys(peers, True), peers[0]: False})
    after = {task_id: worker._first_claimer(task_id) for task_id in ids}
    moved = {task_id for task_id in ids if before[task_id] != after[task_id]}
    assert moved == {task_id for task_id in ids if before[task_id] == peers[0]}
