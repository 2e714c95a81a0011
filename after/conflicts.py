"""Conflicts between replicas, and reading a task again.

On one CouchDB node a 409 makes a write exclusive. Between replicated servers,
or in a partitioned cluster, two writes based on the same revision can both be
accepted and surface as conflicting revisions. The instance that claims the task
first resolves it (two resolving at once, on two replicas, would make a new
conflict): it keeps CouchDB's winner (after.tasks.resolve_conflict decides the
content), records the losers on it, and deletes them once that record has
landed, so no duplicate run goes unrecorded. A task is also read again here when
a read or a write of it failed and the feed may bring nothing new.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from after import tasks
from after.couch import CouchError
from after.tasks import Doc, TaskState

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")

# How long a conflict is left to the instance that claims its task first, while that
# instance is at work, before another resolves it: rechecks after 1, 2, 4 and 8 s.
PATIENCE = 8.0


class Conflicts:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def resolve(self, task_id: str, state: TaskState) -> None:
        """Two writes both landed (replicated nodes, a partitioned cluster): keep
        CouchDB's winner, record the losers on it, delete them, decide again.

        The losers are deleted only once the winner recording them has landed: when
        that write is refused (the winner moved on meanwhile, e.g. the other replica
        finished the run), the conflict is still there and is resolved again on the
        newer version, so no duplicate run goes unrecorded."""
        worker = self.worker
        winner = state.doc
        try:
            found = worker.db.revisions(task_id, winner["_conflicts"])
        except CouchError as exc:
            log.warning("task %s: could not read its conflicting revisions (%s)", task_id, exc)
            return self.recheck_later(task_id)
        log.warning(
            "task %s has %d conflicting revision(s) %s; keeping %s",
            task_id,
            len(found),
            [(d.get("owner"), d.get("status")) for d in found],
            winner["_rev"],
        )
        updated, *losers = tasks.resolve_conflict(winner, found)
        state.doc = {**winner, "_conflicts": []}
        if updated == {k: v for k, v in winner.items() if k != "_conflicts"}:
            # Every loser is on record already (the other replica resolved it first):
            # an unchanged record would be refused (a done task cannot change).
            self.delete(losers)
            return worker.decide(task_id, state)
        if updated.get("status") != winner.get("status"):
            log.info("task %s: a losing revision got further with it than the winner", task_id)
            state.resolving = True  # that run's end, not ours: forgotten once written
        if updated["_rev"] != winner["_rev"]:
            # A losing revision is kept (it got further): the others, the winner among
            # them, are deleted first. PouchDB Server checks a write on a losing
            # revision against the winner (an `err` may not become `done`), and what is
            # deleted here is a claim or a "worker lost" judgement, not a run.
            self.delete(losers)
            losers = []
        worker.writes.write(task_id, updated, losers=losers)

    def delete(self, losers: Sequence[Doc]) -> None:
        """Delete a resolved conflict's losing revisions. A refusal is only logged: the
        conflict is then still there, and the feed brings it to be resolved again."""
        for loser in losers:
            self.worker.writer.write(loser, lambda row, rev=loser["_rev"]: self.deleted(row, rev))

    @staticmethod
    def deleted(row: dict[str, Any], rev: str) -> None:
        if row.get("error") == "conflict":
            # No longer a leaf: deleted already (both sides resolved the conflict), or
            # written on since, which the feed brings as a conflict to resolve again.
            log.debug("task %s: its losing revision %s is gone already", row.get("id"), rev)
        elif row.get("error"):
            log.warning(
                "task %s: deleting its losing revision %s refused: %s: %s",
                row.get("id"),
                rev,
                row.get("error"),
                row.get("reason"),
            )

    def recheck_later(self, task_id: str, delay: float = 1.0) -> None:
        worker = self.worker
        at = tasks.now() + timedelta(seconds=delay)
        action = lambda: worker.control.put(lambda: self.recheck(task_id, delay))  # noqa: E731
        worker.timer.schedule(at, action, key=("recheck", task_id))

    def recheck(self, task_id: str, delay: float) -> None:
        """Read a task again (after a failed read, a conflict), and act on what it is now."""
        worker = self.worker
        state = worker.states.get(task_id)
        if state is None or state.writing:
            return
        try:
            latest = worker.db.get(task_id, conflicts=True)
        except CouchError:
            return self.recheck_later(task_id, min(delay * 2, 30.0))
        if latest is None:
            return worker.forget(task_id)
        if latest.get("_conflicts"):
            state.doc = latest
            membership = worker.membership
            if (
                delay < PATIENCE
                and not membership.claims_first(task_id)
                and membership.first_claimer_may_be_at_work(task_id)
            ):
                # Its resolution may be on its way (writes are slow under load): two
                # at once, on two replicas, would only make a conflict of their own.
                return self.recheck_later(task_id, delay * 2)
            return self.resolve(task_id, state)
        if latest["_rev"] == state.doc["_rev"] and not state.doc.get("_conflicts"):
            return  # the feed brought it meanwhile, and it was decided on
        state.doc = latest
        worker.decide(task_id, state)
