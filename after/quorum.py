"""Quorum: what an instance does when its CouchDB node is cut off from its cluster.

CouchDB answers a write `202 Accepted` (a `_bulk_docs` row says `"accepted": true`)
instead of 201 when fewer copies than its write quorum took it: a node cut off from
the others stores writes all the same, and, in a healthy cluster, two instances
claiming one task through two nodes can each win on some copies. Either way another
write of the same task may stand beside ours as a conflict. A read cannot tell
(Apache CouchDB 3.5 answers a quorum read from the one copy it has). So:

- a claim or a commit answered 202 is not a claim: the task is not run, and is
  handed back at once on our side (after.writes calls `held_back`), so that our
  side's version of it never got further than the other side's (a conflict keeps
  the version that got furthest, after.tasks.resolve_conflict);
- while the quorum is lost (a lease renewal answered 202: only this instance writes
  its record, so no race explains it), claiming pauses and the peers are not judged
  dead: their renewals cannot reach us;
- tasks touched on our side while the quorum was lost may hold a conflict that has
  not reached our node yet: each is claimed again only once a read of its leaf
  revisions (merged from a quorum of copies, where any write answered 201 shows)
  finds none but ours.

The cost is availability on the minority side: its instances run nothing new
until the partition heals. On one node, or on PouchDB Server, nothing here ever
happens: every write is answered 201.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from after import tasks
from after.couch import CouchError
from after.tasks import Doc, TaskState

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")


class Quorum:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.lost = False  # read by every thread; set and cleared under `lock`
        self.lock = threading.Lock()
        # Tasks whose version on our side may conflict with the other side's.
        self.suspect: set[str] = set()
        self.held_back_count = 0  # claims and commits not acted on, for tests and status

    # -- the signal: how CouchDB answered a write ------------------------------------------
    def answered(self, confirmed: bool) -> None:
        """A lease renewal was answered 201 (confirmed) or 202 (not): note any change.
        Called by the lease thread."""
        with self.lock:
            if self.lost != confirmed:
                return
            self.lost = not confirmed
        if self.lost:
            log.warning(
                "CouchDB stored a write without its quorum (202 Accepted): this instance's "
                "node %s is cut off from the rest of its cluster. Claiming paused, and peers "
                "are not judged lost, until writes are confirmed again",
                self.worker.server.node_url,
            )
        else:
            log.warning("writes are confirmed by the cluster's quorum again: claiming resumes")
            self.worker.membership.peers_wanted.set()  # read the peers again now

    def seen(self, task_id: str) -> None:
        """A version of a task reached us: while cut off, it is a minority-side version."""
        if self.lost:
            self.suspect.add(task_id)

    # -- a claim or a commit answered 202 -------------------------------------------------
    def held_back(self, task_id: str, state: TaskState, written: Doc, row: dict[str, Any]) -> bool:
        """A write of ours was stored unconfirmed (202). If it was a claim or a commit,
        it is not acted on: the task is released here and handed back on our side
        (True). Any other write (an outcome, a hand-back) stands as written (False)."""
        worker = self.worker
        self.suspect.add(task_id)
        if written.get("owner") != worker.instance or written.get("status") not in (
            "scheduled",
            "running",
        ):
            return False
        if task_id in worker.started_runs:
            # Its run began here (a conflict's resolution rewrote our `running`): handing
            # it back would let another instance run it again. It stands as written.
            return False
        self.held_back_count += 1
        log.warning(
            "task %s: the %s was stored without the cluster's quorum; not run, handed back",
            task_id,
            "commit" if written.get("status") == "running" else "claim",
        )
        if written.get("status") == "running":
            worker.pool.uncommit(task_id)
            worker.runner.commit_waiting()
        worker.unhold(task_id, state)
        # What the task was before our write (state.doc): its attempt count and
        # dates as they were, so our side's version has got no further.
        base = {**state.doc, "_rev": row["rev"]}
        base.pop("_conflicts", None)
        state.doc = {**written, "_rev": row["rev"]}
        worker.writes.write(task_id, tasks.hand_back_update(base))
        return True

    # -- before a claim -------------------------------------------------------------------
    def clear_to_claim(self, task_id: str, state: TaskState) -> bool:
        """Whether the task may be claimed now. A suspect one is first read as a quorum
        of copies has it: with a conflict there, that version is acted on instead."""
        if task_id not in self.suspect:
            return True
        worker = self.worker
        try:
            leaves = worker.db.leaves(task_id)
        except CouchError as exc:
            log.warning("task %s: could not read its revisions (%s); later", task_id, exc)
            worker.conflicts.recheck_later(task_id, delay=worker.heartbeat)
            return False
        if len(leaves) == 1 and leaves[0]["_rev"] == state.doc["_rev"]:
            self.suspect.discard(task_id)
            return True
        if not leaves:  # deleted meanwhile
            worker.forget(task_id)
            return False
        # A conflict, or a version we have not seen: decide on that instead.
        winner = max(leaves, key=lambda leaf: (tasks.rev_number(leaf["_rev"]), leaf["_rev"]))
        others = [leaf["_rev"] for leaf in leaves if leaf is not winner]
        log.info(
            "task %s: %d revision(s) after the partition; deciding again", task_id, len(leaves)
        )
        state.doc = {**winner, "_conflicts": others} if others else winner
        worker.act_on(task_id, state)
        return False
