"""Conflicts between replicas: resolved by the first claimer, every losing revision recorded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import new_task, replicator_user, wait_for, with_credentials
from test_worker import in_seconds, wait_status

from after import tasks
from after.config import Config, split_credentials
from after.couch import Database, Server
from after.push import push
from after.quorum import blocking
from after.security import is_pouchdb_server, security_object
from after.tasks import Local
from after.worker import TaskState, Worker


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
            {
                "rev": done["_rev"],
                "status": "done",
                "owner": runner,
                "attempt": 1,
                "date": original["date"],
            }
        ]
    finally:
        db.delete()


@pytest.mark.parametrize("workers_side", ["scheduled", "running"])
def test_a_clients_cancel_that_lost_the_conflict_to_a_worker_still_cancels(
    server: Server, db_name: str, config: Config, start_fast, workers_side: str
) -> None:
    """A cluster: a client's cancel and another instance's claim (or commit) were both
    based on the same version; the worker's write won, the client's was answered 202
    and surfaced as the losing revision. The task still ends `canceled`, with the
    worker's write recorded; a commit's run is not started again by anyone.
    (Conflict made before the design doc is deployed: see the first test.)"""
    db = server.database(db_name + "-cancel")
    db.create()
    try:
        other = "manobi@node-a:1:aaaa"  # an instance that is gone
        task_id, _ = db.post(new_task(date=in_seconds(-5)))
        original = db.get(task_id)
        attempt = 1 if workers_side == "running" else 0
        worker_rev = db.put(
            {**original, "status": workers_side, "owner": other, "attempt": attempt}
        )
        generation, parent = original["_rev"].split("-")
        cancel = {
            **original,
            "_rev": f"{int(generation) + 1}-{'0' * 32}",  # loses to the worker's (higher id)
            "_revisions": {"start": int(generation) + 1, "ids": ["0" * 32, parent]},
            "status": "cancel",
        }
        db.server.json("POST", f"{db.path}/_bulk_docs", body={"docs": [cancel], "new_edits": False})
        conflicted = db.get(task_id, conflicts=True)
        assert conflicted["_rev"] == worker_rev and conflicted["_conflicts"] == [cancel["_rev"]]
        push(db)
        start_fast(config_=config.override(db=db.name))
        final = wait_status(db, task_id, "canceled", timeout=20)
        # On a cluster the loser's deletion reaches the copies a moment apart.
        wait_for(lambda: not db.get(task_id, conflicts=True).get("_conflicts"), timeout=10)
        assert final["conflicts_resolved"] == [
            {
                "rev": worker_rev,
                "status": workers_side,
                "owner": other,
                "attempt": attempt,
                "date": original["date"],
            }
        ]
        if workers_side == "running":  # the run it stopped is on the task
            assert (final["owner"], final["attempt"]) == (other, 1)
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
    worker.started_runs[task_id] = None  # its run began here: the lost `done` was ours
    if seen_by == "the feed":
        assert not worker.feed.known(resolved)
        worker.seen(resolved, seq="9")
    else:
        worker.conflicts.recheck(task_id, delay=1.0)
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

    worker.runner.outcome_written(task_id, done, {}, {"ok": True, "id": task_id, "rev": done_rev})
    worker.writer.start()
    worker.writer.stop()  # sends what was written

    final = db.get(task_id)
    assert final["status"] == "done"
    assert [(r["owner"], r["status"]) for r in final["conflicts_resolved"]] == [
        (OTHER_REPLICA, "running")
    ]
    worker.executor.shutdown()


def test_a_conflicts_losers_are_deleted_even_if_the_task_was_forgotten_meanwhile(
    config: Config, replica_db: Database
) -> None:
    """The losers of a resolution are bound to the write that records them. The task's
    state may be forgotten (and made anew from the feed) while that write is out; the
    losers were then never deleted, and the task stayed in conflict for good on both
    replicas (the two-replica test on a loaded CI machine: 101 tasks)."""
    db = replica_db
    worker, original, ours = our_run(config, db)
    task_id = original["_id"]
    done = {**ours, "status": "done", "started_at": ours["date"], "ended_at": ours["date"]}
    db.put(done)
    other_run = {**done, "owner": OTHER_REPLICA}
    branch(db, original, {**original, "status": "running", "owner": OTHER_REPLICA}, other_run)
    push(db)
    conflicted = db.get(task_id, conflicts=True)
    assert conflicted.get("_conflicts"), "the test needs a real conflict"
    state = worker.states[task_id] = TaskState(conflicted)

    worker.conflicts.resolve(task_id, state)  # the record of the loser is written
    worker.forget(task_id)
    worker.states[task_id] = TaskState(db.get(task_id, conflicts=True))  # made anew
    worker.writer.start()
    worker.control.get(timeout=10)()  # the answer: the record landed
    worker.writer.stop()  # sends the deletion

    final = db.get(task_id, conflicts=True)
    assert not final.get("_conflicts"), final
    assert [(r["owner"], r["status"]) for r in final["conflicts_resolved"]] == [
        (OTHER_REPLICA, "done")
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

    worker.runner.outcome_written(task_id, {**ours, "status": "done", **ended}, {}, refused)
    worker.writer.start()
    worker.writer.stop()  # sends what was written

    final = db.get(task_id)
    assert final["status"] == "done" and final["owner"] == OTHER_REPLICA
    assert [(r["owner"], r["status"]) for r in final["conflicts_resolved"]] == [
        (worker.instance, "running")
    ]
    worker.executor.shutdown()


def test_an_outcome_refused_while_a_conflict_was_resolved_is_written_on_the_run_kept(
    config: Config, db: Database
) -> None:
    """On a cluster, an instance's outcome write was refused while the task was in
    conflict; the resolution then kept this instance's `running` (it got further). The
    run's outcome is written there, not the run failed as "worker lost" (a 3-node
    cluster test's failure: the job had run, its end was lost)."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(-1)))
    db.put({**db.get(task_id), "status": "running", "owner": worker.instance, "attempt": 1})
    kept = db.get(task_id)
    state = worker.states[task_id] = TaskState(kept)
    worker.started_runs[task_id] = None
    started = tasks.now()
    state.pending_outcome = tasks.outcome_fields(started, started, result="the job's result")
    worker.decide(task_id, state)
    worker.writer.start()
    worker.writer.stop()  # sends what was written
    final = db.get(task_id)
    assert final["status"] == "done" and final["result"] == "the job's result", final
    worker.executor.shutdown()


def test_a_run_whose_outcome_is_being_written_is_not_taken_for_lost(
    config: Config, db: Database
) -> None:
    """A conflict's resolution kept our `running` while our run's outcome was being
    written: deciding on that version must wait for the write's answer, not fail our
    own run as "worker lost"."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(-1)))
    db.put({**db.get(task_id), "status": "running", "owner": worker.instance, "attempt": 1})
    running = db.get(task_id)
    state = worker.states[task_id] = TaskState(running, writing=True)
    worker.started_runs[task_id] = None
    started = tasks.now()
    state.pending_outcome = tasks.outcome_fields(started, started, result="the job's result")
    worker.decide(task_id, state)
    assert not worker.writer.queue.qsize()  # nothing to write over it: no "worker lost"
    state.writing = False  # the write's answer came: the outcome is written now
    worker.decide(task_id, state)
    worker.writer.start()
    worker.writer.stop()  # sends what was written
    final = db.get(task_id)
    assert final["status"] == "done" and final["result"] == "the job's result", final
    worker.executor.shutdown()


def test_an_outcome_refused_over_another_instances_running_is_written_as_our_run(
    config: Config, db: Database
) -> None:
    """On a cluster, our run's branch was deleted by a resolution that kept another
    instance's `running` of the same attempt (its claim won by revision; it never ran
    it). Our outcome is written there as our run's: it named the other instance as
    the one that ran the task (a 3-node cluster test's finding), and not writing it
    would let that claim be handed back and the task run again."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(-1)))
    original = db.get(task_id)
    other = "manobi@node-b:1:bbbb"
    db.put({**original, "status": "running", "owner": other, "attempt": 1})
    generation = int(original["_rev"].split("-")[0]) + 1
    ours = {
        **original,
        "_rev": f"{generation}-{'a' * 32}",  # our branch, deleted on the server
        "status": "running",
        "owner": worker.instance,
        "attempt": 1,
    }
    state = worker.states[task_id] = TaskState(ours, writing=True, run_doc=ours)
    started = tasks.now()
    outcome = tasks.outcome_fields(started, started, result="our run's result")
    ended = {**ours, "status": "done", **outcome}
    state.pending_outcome = outcome
    refused = {"id": task_id, "error": "conflict", "reason": "Document update conflict."}

    worker.runner.outcome_written(task_id, ended, outcome, refused)
    worker.writer.start()
    worker.writer.stop()  # sends what was written

    final = db.get(task_id)
    assert final["status"] == "done" and final["result"] == "our run's result", final
    assert final["owner"] == worker.instance and final["history"][-1]["instance"] == worker.instance
    assert [t["from"] for t in final["takeovers"]] == [other]
    worker.executor.shutdown()


def test_a_commit_of_ours_stored_though_refused_is_handed_back_as_the_same_attempt(
    config: Config, db: Database
) -> None:
    """On a cluster a commit can be refused by a quorum of copies and stored by the
    others: the task then says `running` under this instance, which never started it.
    It is handed back with its attempt as before, not failed as "worker lost"."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(60)))
    db.put(tasks.running_update(db.get(task_id), worker.instance))
    worker.seen(db.get(task_id), fresh=True)
    worker.writer.start()
    worker.writer.stop()  # sends what was written
    final = db.get(task_id)
    assert final["status"] == "waiting" and "attempt" not in final and "owner" not in final
    worker.executor.shutdown()


def test_a_running_rewritten_without_quorum_is_not_handed_back_once_its_run_began(
    config: Config, db: Database
) -> None:
    """A write of our `running` answered 202 is a commit not acted on, handed back; but
    once the run has begun here (the write was a conflict's resolution keeping our
    `running`), handing it back let another instance run it again (a 3-node cluster
    test's duplicate, attempts 1 and 2)."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(60)))
    waiting = db.get(task_id)
    running = tasks.running_update(waiting, worker.instance)
    db.put(running)
    row = {"id": task_id, "rev": running["_rev"], "ok": True, "accepted": True}
    state = worker.states[task_id] = TaskState(waiting)
    worker.started_runs[task_id] = None
    assert not worker.quorum.held_back(task_id, state, running, row)
    del worker.started_runs[task_id]
    assert worker.quorum.held_back(task_id, state, running, row)  # a commit not run
    worker.writer.start()
    worker.writer.stop()
    assert db.get(task_id)["status"] == "waiting"
    worker.executor.shutdown()


def test_a_claim_answered_202_with_no_other_write_is_handed_back(
    config: Config, db: Database
) -> None:
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(60)))
    original = db.get(task_id)
    claim = tasks.claim_update(original, worker.instance, tasks.now())
    db.put(claim)
    row = {"id": task_id, "rev": claim["_rev"], "ok": True, "accepted": True}
    state = worker.states[task_id] = TaskState(original)

    assert worker.quorum.held_back(task_id, state, claim, row)
    worker.writer.start()
    worker.writer.stop()

    final = db.get(task_id)
    assert final["status"] == "waiting" and "owner" not in final and final["_rev"].startswith("3-")
    worker.executor.shutdown()


# -- on a cluster, a commit is confirmed before its run starts ---------------------------


def test_the_leaves_of_many_tasks_are_read_in_one_request(replica_db: Database) -> None:
    db = replica_db
    plain, _ = db.post(new_task())
    task_id, _ = db.post(new_task())
    original = db.get(task_id)
    db.put({**original, "status": "scheduled", "owner": "manobi@node-a:1:aaaa"})
    branch(db, original, {**original, "status": "scheduled", "owner": OTHER_REPLICA})
    gone, _ = db.post(new_task())
    db.put({**db.get(gone), "_deleted": True})

    found = db.leaves_of([plain, task_id, gone, "no-such-task"])

    assert [leaf["_rev"] for leaf in found[plain]] == [db.get(plain)["_rev"]]
    assert sorted(leaf["owner"] for leaf in found[task_id]) == sorted(
        ["manobi@node-a:1:aaaa", OTHER_REPLICA]
    )
    assert found[gone] == [] and found["no-such-task"] == []


def committed_here(worker: Worker, db: Database) -> tuple[str, TaskState]:
    """A task due in a minute, claimed and committed by `worker` (not started)."""
    task_id, _ = db.post(new_task(date=in_seconds(60)))
    claimed = tasks.claim_update(db.get(task_id), worker.instance, tasks.now())
    claimed["_rev"] = db.put(claimed)
    running = tasks.running_update(claimed, worker.instance)
    running["_rev"] = db.put(running)
    state = worker.states[task_id] = TaskState(running, local=Local.COMMITTED)
    worker.pool.hold(task_id, tasks.parse_date(running["date"]).timestamp())
    worker.pool.commit(task_id)
    return task_id, state


def test_a_commit_is_run_beside_claims_only() -> None:
    """Which other leaves forbid starting a committed run: anything beyond a claim."""
    ours = {"_rev": "4-a", "status": "running", "owner": "me", "attempt": 1}
    claim = {"_rev": "3-b", "status": "scheduled", "owner": "other"}
    handed_back = {"_rev": "4-c", "status": "waiting"}
    assert blocking(ours, [claim, handed_back]) == []
    commit = {**claim, "_rev": "4-d", "status": "running", "attempt": 1}
    ended = {**commit, "_rev": "5-d", "status": "done", "finished_at": "2026-12-06T22:00:00Z"}
    cancel = {**claim, "_rev": "4-e", "status": "cancel"}
    assert blocking(ours, [commit, ended, cancel, claim]) == [commit, ended, cancel]
    # A run ended on the other branch, and its retry waits: not a claim of our run.
    retry = {"_rev": "5-f", "status": "waiting", "attempt": 1, "finished_at": "2026-12-06T22:00Z"}
    assert blocking(ours, [retry]) == [retry]


def test_a_commit_that_is_the_only_leaf_starts_its_run(config: Config, db: Database) -> None:
    worker = Worker(config, "manobi")
    worker.quorum.copies = 3  # as on a cluster
    task_id, state = committed_here(worker, db)
    worker.quorum.confirmed(task_id, db.leaves_of([task_id])[task_id])

    assert task_id in worker.timer  # its start is in the timer, at its date
    assert state.local is Local.COMMITTED and worker.quorum.held_back_count == 0
    worker.executor.shutdown()


def test_a_commit_rewritten_while_it_was_confirmed_is_read_again_then_run(
    config: Config, db: Database
) -> None:
    """Another instance's conflict resolution rewrote our `running` while its leaves
    were read: the read named a revision that is no longer ours to go by. Dropping it
    left the task `running` for good under a live instance (a cluster test's 13 stuck
    tasks); it is read again, and the run starts from the rewritten version."""
    worker = Worker(config, "manobi")
    worker.quorum.copies = 3
    task_id, state = committed_here(worker, db)
    read_before = db.leaves_of([task_id])[task_id]
    rewritten = {**state.doc, "conflicts_resolved": []}
    rewritten["_rev"] = db.put(rewritten)
    state.doc = rewritten  # the feed brought it

    worker.quorum.confirmed(task_id, read_before)
    assert task_id in worker.timer  # to be read again
    worker.timer.cancel(task_id)
    worker.quorum.confirmed(task_id, db.leaves_of([task_id])[task_id])

    assert task_id in worker.timer and state.local is Local.COMMITTED
    assert worker.quorum.held_back_count == 0
    worker.executor.shutdown()


def test_a_commit_beside_another_branch_is_not_run_and_is_handed_back(
    config: Config, db: Database
) -> None:
    """Two instances extended two branches of one task with a 201 each (a partition's
    branches had spread to every copy): of the two, the one whose read after its
    commit sees the other's does not run it; it hands it back as the same attempt."""
    worker = Worker(config, "manobi")
    worker.quorum.copies = 3
    task_id, state = committed_here(worker, db)
    ours = state.doc
    theirs = {**ours, "_rev": "3-" + "f" * 32, "owner": OTHER_REPLICA}

    worker.quorum.confirmed(task_id, [ours, theirs])
    worker.writer.start()
    worker.writer.stop()  # sends what was written

    assert task_id not in worker.timer and task_id not in worker.started_runs
    assert state.local is Local.NONE and task_id not in worker.pool.committing
    assert worker.quorum.held_back_count == 1
    final = db.get(task_id)
    assert final["status"] == "waiting" and "attempt" not in final and "owner" not in final
    worker.executor.shutdown()


def test_on_a_cluster_every_run_waits_for_its_commit_to_be_confirmed(
    db: Database, start_fast, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more than one copy of the database, each commit's leaves are read before
    the run starts (one request for many): every task runs once, at its date."""
    reads: list[int] = []
    leaves_of = Database.leaves_of

    def counted(self: Database, doc_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
        reads.append(len(doc_ids))
        return leaves_of(self, doc_ids)

    monkeypatch.setattr(Database, "leaves_of", counted)
    monkeypatch.setattr(Worker, "_check_database", copies_as_on_a_cluster(Worker._check_database))
    ids = [db.post(new_task(date=in_seconds(2)))[0] for _ in range(30)]
    start_fast()
    for task_id in ids:
        assert wait_status(db, task_id, "done", "err", timeout=30)["status"] == "done"
    assert sum(reads) == len(ids) and len(reads) < len(ids)  # batched


def copies_as_on_a_cluster(check: Any) -> Any:
    def checked(worker: Worker) -> Any:
        since = check(worker)
        worker.quorum.copies = 3
        return since

    return checked


def test_a_suspect_claim_of_ours_that_nothing_brings_back_is_found_by_the_audit(
    config: Config, db: Database
) -> None:
    """On a cluster, our claim answered 202 was handed back, the hand-back refused (the
    copies it reached had not got the claim), and the claim reached every copy later,
    with no news on the feed: the task said `scheduled` under this live instance, which
    held nothing of it (a cluster test's 8 stuck tasks). The audit of suspect tasks
    finds it, and the instance holds it again; a task that has ended is no longer
    suspect."""
    worker = Worker(config, "manobi")
    task_id, _ = db.post(new_task(date=in_seconds(60)))
    db.put(tasks.claim_update(db.get(task_id), worker.instance, tasks.now()))
    ended, _ = db.post(new_task())
    running = tasks.running_update(db.get(ended), worker.instance)
    running["_rev"] = db.put(running)
    db.put(tasks.outcome_update(running, tasks.outcome_fields(tasks.now(), tasks.now())))
    worker.quorum.suspect = {task_id: time.monotonic(), ended: time.monotonic()}

    worker.quorum.audit()
    for _ in range(2):  # the leaf reader's answers, as the control thread runs them
        worker.control.get(timeout=10)()

    assert worker.states[task_id].local is Local.HELD and task_id in worker.timer
    assert list(worker.quorum.suspect) == [task_id]
    worker.executor.shutdown()
