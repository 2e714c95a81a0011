"""Conflicts between replicas, and reading a task again.

On one CouchDB node a 409 makes a write exclusive. Between replicated servers,
or in a partitioned cluster, two writes based on the same revision can both be
accepted and surface as conflicting revisions. The instance that claims the task
first resolves it (two resolving at once, on two replicas, would make a new
conflict): it keeps the revision after.tasks.resolve_conflict chooses from the
leaves alone, records the others on it, and deletes them once that record has
landed (first, when it keeps a losing revision), so no duplicate run goes
unrecorded. A task is also read again here when
a read or a write of it failed and the feed may bring nothing new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from after import tasks
from after.couch import CouchError
from after.tasks import Doc, Local, TaskState

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")

# How long a conflict is left to the instance that claims its task first, while that
# instance is at work, before another resolves it: rechecks after 1, 2, 4 and 8 s.
PATIENCE = 8.0
OWNER_PATIENCE = 15.0


class Conflicts:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # Tasks whose conflict is left to the instance whose run it holds: since when.
        self.deferred: dict[str, float] = {}

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
        if self.left_to_a_runs_owner(task_id, [winner, *found]):
            return self.recheck_later(task_id, 2.0)
        self.deferred.pop(task_id, None)
        log.warning(
            "task %s has %d conflicting revision(s) %s; keeping %s",
            task_id,
            len(found),
            [(d.get("owner"), d.get("status")) for d in found],
            winner["_rev"],
        )
        judged_winner, *judged_found = self.as_judged(task_id, state, [winner, *found])
        updated, *losers = tasks.resolve_conflict(judged_winner, judged_found)
        state.doc = {**winner, "_conflicts": []}
        if updated == {k: v for k, v in winner.items() if k != "_conflicts"}:
            # Every loser is on record already (the other replica resolved it first):
            # an unchanged record would be refused (a done task cannot change).
            self.delete(losers)
            return worker.decide(task_id, state)
        if updated.get("status") != winner.get("status") and updated.get("status") in tasks.ENDED:
            log.info("task %s: a losing revision got further with it than the winner", task_id)
            state.resolving = True  # that run's end, not ours: forgotten once written
        if updated["_rev"] != winner["_rev"]:
            # A losing revision is kept (it got further, or is a client's move): the
            # others, the winner among them, are deleted first. PouchDB Server checks a
            # write on a losing revision against the winner (an `err` may not become
            # `done`), and what is deleted here is a claim, a commit whose run the kept
            # cancel carries, or a "worker lost" judgement, not a run's end.
            self.delete(losers)
            losers = []
        worker.writes.write(task_id, updated, losers=losers)

    def left_to_a_runs_owner(self, task_id: str, leaves: list[Doc]) -> bool:
        """A client's reschedule beside another live instance's commit: whether that
        run began only its instance knows, so it resolves the conflict (for at most
        OWNER_PATIENCE seconds; then any instance does, and the run counts as begun)."""
        worker = self.worker
        if not beside_a_reschedule(leaves):
            return False
        owners = {leaf.get("owner") for leaf in leaves if leaf.get("status") == "running"}
        if not any(
            owner not in (None, worker.instance) and worker.membership.owner_alive(owner)
            for owner in owners
        ):
            return False
        since = self.deferred.setdefault(task_id, time.monotonic())
        return time.monotonic() - since < OWNER_PATIENCE

    def as_judged(self, task_id: str, state: TaskState, leaves: list[Doc]) -> list[Doc]:
        """The leaves as the resolution is to weigh them: beside a client's reschedule,
        a commit of ours whose run never began here counts as handed back (its attempt
        given back), so the reschedule stands (after.tasks.client_move)."""
        worker = self.worker
        if not beside_a_reschedule(leaves):
            return leaves
        if task_id in worker.started_runs or state.local is Local.RUNNING:
            return leaves
        return [
            tasks.hand_back_update(leaf)
            if leaf.get("status") == "running" and leaf.get("owner") == worker.instance
            else leaf
            for leaf in leaves
        ]

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


def beside_a_reschedule(leaves: list[Doc]) -> bool:
    """A client's reschedule is among a conflict's leaves: whether a commit beside it
    began its run decides what stands (after.tasks.client_move)."""
    return any(leaf.get("status") == "reschedule" for leaf in leaves)
