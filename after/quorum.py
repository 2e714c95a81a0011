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
  the version that got furthest, after.tasks.resolve_conflict); the hand-back is
  marked `withdrawn`, so it also gives way to a version that got as far (a
  client's reschedule the other side took up);
- while the quorum is lost (a lease renewal answered 202: only this instance writes
  its record, so no race explains it), claiming pauses and the peers are not judged
  dead: their renewals cannot reach us;
- tasks touched on our side while the quorum was lost may hold a conflict that has
  not reached our node yet: each is claimed again only once a read of its leaf
  revisions (merged from a quorum of copies, where any write answered 201 shows)
  finds none but ours.

- a commit answered 201 still stands on one branch of the task: once a minority
  side's version has spread to every copy, another instance can extend either
  branch with a 201. So on a database with more than one copy, a commit is
  confirmed before the job starts: the task's leaf revisions are read (merged from
  a quorum of copies, which always holds every write answered 201 before the
  read). With another `running`, a run's end or a cancel beside ours, the run is
  not started and the task is handed back, as for a 202: of two commits on two
  branches, the later one's read sees the earlier one's, so at most one of them
  runs.

The cost is availability on the minority side: its instances run nothing new
until the partition heals; and on a cluster one read per batch of commits. On one
node, or on PouchDB Server, nothing here ever happens: every write is answered
201, and a database has one copy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from after import tasks
from after.couch import CouchError, Database
from after.tasks import Doc, Local, TaskState

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")


class Quorum:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.lost = False  # read by every thread; set and cleared under `lock`
        self.lock = threading.Lock()
        # Tasks whose version on our side may conflict with the other side's (id -> since
        # when, monotonic): read from a quorum of copies before a claim, and audited.
        self.suspect: dict[str, float] = {}
        self.held_back_count = 0  # claims and commits not acted on, for tests and status
        # Copies of the database (a cluster's n): with more than one, commits are confirmed.
        self.copies = 1
        self.reader: LeafReader | None = None

    @property
    def confirms_commits(self) -> bool:
        return self.copies > 1

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
            self.suspect.setdefault(task_id, time.monotonic())

    # -- a claim or a commit answered 202 -------------------------------------------------
    def held_back(self, task_id: str, state: TaskState, written: Doc, row: dict[str, Any]) -> bool:
        """A write of ours was stored unconfirmed (202). If it was a claim or a commit,
        it is not acted on: the task is released here and handed back on our side
        (True). Any other write (an outcome, a hand-back) stands as written (False)."""
        worker = self.worker
        self.suspect.setdefault(task_id, time.monotonic())
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
        worker.writes.write(task_id, tasks.withdrawn_update(tasks.hand_back_update(base)))
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
            self.suspect.pop(task_id, None)
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

    # -- a commit answered 201, before its run starts ---------------------------------------
    def leaf_reader(self) -> LeafReader:
        if self.reader is None:
            self.reader = LeafReader(self.worker.db)
        return self.reader

    def confirm(self, task_id: str, state: TaskState) -> None:
        """Read the committed task's leaves; its run starts once no other leaf may run it."""
        worker = self.worker
        self.leaf_reader().read(
            task_id, lambda leaves: worker.control.put(lambda: self.confirmed(task_id, leaves))
        )

    def confirmed(self, task_id: str, leaves: list[Doc] | None) -> None:
        """Start the committed run, or hand it back: see `blocking`."""
        worker = self.worker
        state = worker.states.get(task_id)
        if state is None or state.local is not Local.COMMITTED:
            return  # moved on meanwhile (a cancel, a stop)
        doc = state.doc
        ours = doc.get("status") == "running" and doc.get("owner") == worker.instance
        if leaves is not None and not leaves:  # deleted meanwhile
            worker.unhold(task_id, state)
            return worker.forget(task_id)
        if leaves is None or not ours or doc["_rev"] not in {leaf["_rev"] for leaf in leaves}:
            # Not read (the node did not answer), or the task changed meanwhile (a
            # conflict's resolution rewrote our `running`; the feed brings the news):
            # read it again in a moment.
            at = tasks.now() + timedelta(seconds=worker.heartbeat)
            action = lambda: worker.control.put(lambda: self.confirm_again(task_id))  # noqa: E731
            worker.timer.schedule(at, action, key=task_id)
            return
        others = blocking(doc, [leaf for leaf in leaves if leaf["_rev"] != doc["_rev"]])
        if not others:
            return worker.runner.schedule_start(task_id, state)
        self.held_back_count += 1
        self.suspect.setdefault(task_id, time.monotonic())
        log.warning(
            "task %s: its commit stands beside %d other revision(s) %s; not run, handed back",
            task_id,
            len(others),
            [(leaf.get("owner"), leaf.get("status")) for leaf in others],
        )
        worker.pool.uncommit(task_id)
        worker.runner.commit_waiting()
        worker.unhold(task_id, state)
        worker.writes.write(task_id, tasks.withdrawn_update(tasks.hand_back_update(doc)))

    def confirm_again(self, task_id: str) -> None:
        state = self.worker.states.get(task_id)
        if state is not None and state.local is Local.COMMITTED:
            self.confirm(task_id, state)

    # -- the suspect tasks, audited once a lease ---------------------------------------------
    def audit(self) -> None:
        """On the control thread: read again the suspect tasks this instance holds nothing
        of. A claim of ours stored on a minority of copies whose hand-back was refused
        (the copies it went to had not got the claim) shows up on the others only once
        the copies converge, with no news on the feed: it would stay `scheduled` under a
        live instance that holds nothing of it (a cluster test's 8 tasks)."""
        worker = self.worker
        if self.lost:
            return  # read through a node cut off: nothing to go by yet
        now, keep_for = time.monotonic(), SUSPECT_LEASES * worker.lease.total_seconds()
        self.suspect = {i: since for i, since in self.suspect.items() if now - since < keep_for}
        reader = self.leaf_reader()
        for task_id in [i for i in self.suspect if i not in worker.states]:
            reader.read(
                task_id,
                lambda leaves, t=task_id: worker.control.put(lambda: self.audited(t, leaves)),
            )

    def audited(self, task_id: str, leaves: list[Doc] | None) -> None:
        """A suspect task's leaves: decided on again unless it has ended for good."""
        worker = self.worker
        if leaves is None or task_id in worker.states:
            return
        winner = max(
            leaves, key=lambda leaf: (tasks.rev_number(leaf["_rev"]), leaf["_rev"]), default=None
        )
        if winner is None or (len(leaves) == 1 and winner.get("status") in tasks.ENDED):
            self.suspect.pop(task_id, None)
            return
        others = [leaf["_rev"] for leaf in leaves if leaf is not winner]
        worker.seen({**winner, "_conflicts": others} if others else winner, fresh=True)


# Leaves beside our committed `running` that got no further than a claim of the run
# it starts: a run started from one must first commit and confirm, and its confirming
# read then sees ours.
# A client's reschedule beside our commit is not behind it: the run is not started,
# and the conflict's resolution keeps the new date (after.tasks.client_move).
BEHIND_A_COMMIT = frozenset({"waiting", "scheduled"})


def blocking(ours: Doc, others: list[Doc]) -> list[Doc]:
    """The other leaves that forbid starting our committed run: another `running` (of
    two commits on two branches, the later one's read sees the earlier one's; if both
    see each other, neither runs and the task is claimed again), a cancel, a run's end,
    or a leaf that got further than our claim (a run ended there: a retry or the next
    occurrence waits)."""
    finished, attempt = tasks.progress(ours)
    claimed = (finished, attempt - 1)  # our commit counted one attempt more
    return [
        leaf
        for leaf in others
        if leaf.get("status") not in BEHIND_A_COMMIT or tasks.progress(leaf) > claimed
    ]


SUSPECT_LEASES = 10  # for how many leases a suspect task is audited


class LeafReader:
    """Reads tasks' leaf revisions off the control thread, many in one request: what
    came while a request was out goes in the next one."""

    def __init__(self, db: Database, max_batch: int = 500) -> None:
        self.db = db
        self.max_batch = max_batch
        self.queue: queue.Queue[tuple[str, Callable[[list[Doc] | None], None]]] = queue.Queue()
        threading.Thread(target=self._loop, name="after-leaf-reader", daemon=True).start()

    def read(self, task_id: str, on_leaves: Callable[[list[Doc] | None], None]) -> None:
        """`on_leaves` gets the task's leaves, or None if they could not be read."""
        self.queue.put((task_id, on_leaves))

    def _loop(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                found: dict[str, list[Doc]] | None = self.db.leaves_of(
                    list(dict.fromkeys(task_id for task_id, _ in batch))
                )
            except Exception as exc:  # any failure: each is read again later
                log.warning("could not read %d task(s)' revisions (%s)", len(batch), exc)
                found = None
            for task_id, on_leaves in batch:
                on_leaves(None if found is None else found.get(task_id, []))
