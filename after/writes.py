"""Writes: a task's next version sent, and what its answer means.

Every write carries the revision it was decided on and goes out through the
batching writer (after.couch.BulkWriter); while it is in flight, versions the
feed brings are kept, and decided on when the answer is back. A 409 (or, on
PouchDB Server, a 403 for a stale revision) means someone else changed the
task: decide again on the newer version, never fetch-latest-and-overwrite. A
write refused for what the document holds is not retried: the task is left as
it is, and that version of it is not taken up again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from after.couch import CouchError, is_own_write, refused_as_is, unconfirmed
from after.tasks import Doc, Local, TaskState, is_newer, is_news

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")


class Writes:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # Tasks whose version CouchDB refused to store as it is (id -> that revision):
        # not written again until someone changes them.
        self.unstorable: dict[str, str] = {}

    def write(
        self, task_id: str, doc: Doc, within: float = 0.0, losers: Sequence[Doc] = ()
    ) -> None:
        """Write a version of a task; `losers` are a conflict's losing revisions that
        `doc` records, deleted once it has landed (bound to this write, not to the
        task's state, which may be forgotten and made anew while the write is out)."""
        self.send(task_id, doc, lambda row: self.written(task_id, doc, row, losers), within)

    def send(
        self,
        task_id: str,
        doc: Doc,
        answered: Callable[[dict[str, Any]], None],
        within: float = 0.0,
    ) -> None:
        """Write a version of a task; `answered(row)` runs on the control thread."""
        worker = self.worker
        worker.states[task_id].writing += 1
        worker.feed.expect_echo(task_id)
        worker.writer.write(doc, lambda row: worker.control.put(lambda: answered(row)), within)

    def answer(self, task_id: str, row: dict[str, Any]) -> tuple[TaskState, Doc | None] | None:
        """The first steps on the answer to one of our writes: the task's state and any
        newer version the feed brought meanwhile (None if the task is forgotten)."""
        worker = self.worker
        state = worker.states.get(task_id)
        if state is None:
            return None
        state.writing = max(state.writing - 1, 0)
        newer, state.newer = state.newer, None
        if row.get("error"):
            worker.feed.forget_echo(task_id)  # refused: the feed may have nothing new to bring
        return state, newer

    def written(
        self, task_id: str, doc: Doc, row: dict[str, Any], losers: Sequence[Doc] = ()
    ) -> None:
        worker = self.worker
        if (answer := self.answer(task_id, row)) is None:
            if not row.get("error") and not unconfirmed(row):
                worker.conflicts.delete(losers)  # recorded on the winner now
            return
        state, newer = answer
        if row.get("error") and doc.get("status") == "running":
            worker.pool.uncommit(task_id)  # the commit did not land: its slot is free again
            worker.runner.commit_waiting()
            if state.doc["status"] == "waiting":  # a claim that commits: nothing is held
                worker.unhold(task_id, state)
                claiming = worker.claiming
                if row.get("error") == "forbidden" and not claiming.claim_commits_still_allowed():
                    if newer and is_news(newer, state.doc):
                        state.doc = newer
                    return worker.act_on(task_id, state)  # claimed again, in two writes
        if not row.get("error"):
            if unconfirmed(row) and worker.quorum.held_back(task_id, state, doc, row):
                return worker.maybe_finish_stop()
            worker.conflicts.delete(losers)  # recorded on the winner now
            state.doc = {**doc, "_rev": row["rev"]}
            self.after_write(task_id, state)
            if newer and is_news(newer, state.doc):
                if task_id in worker.states:
                    state.doc = newer
                    worker.act_on(task_id, state)
                elif newer.get("_conflicts"):  # ended and forgotten, but in conflict
                    worker.seen(newer, fresh=True)
        elif refused_as_is(row) and not (newer and is_newer(newer, doc)):
            self.leave(task_id, state, row)
        elif row.get("error") == "conflict" and not (newer and is_newer(newer, doc)):
            # Someone else wrote first (another instance's claim, a client's cancel):
            # the feed brings that version in a moment; read it ourselves only if not.
            worker.conflicts.recheck_later(task_id, delay=5.0)
        elif (latest := self.changed_since(task_id, doc, newer, row)) is not None:
            if is_own_write(latest, doc) and worker.quorum.held_back(
                task_id, state, doc, {"rev": latest["_rev"]}
            ):
                # Refused, yet stored: on a cluster, the copies that refused it (a quorum)
                # hold another version; ours stands on a minority of copies, like a write
                # answered 202, and is handed back rather than taken for a lost run.
                return worker.maybe_finish_stop()
            state.doc = latest
            worker.act_on(task_id, state)
        else:
            worker.forget(task_id)
        worker.maybe_finish_stop()

    def after_write(self, task_id: str, state: TaskState) -> None:
        """A write of ours landed: what comes next for the task."""
        worker = self.worker
        status = state.doc["status"]
        if status == "running" and state.local is Local.HELD:  # our commit landed
            worker.runner.committed(task_id, state)
        elif status in ("done", "err", "canceled") and state.resolving:
            worker.forget(task_id)  # a conflict resolved on a task that had ended already
        elif status in ("done", "err", "canceled"):
            if status == "done":
                worker.stats.done += 1
            elif status == "err":
                worker.stats.failed += 1
            else:
                worker.stats.canceled += 1
            log.info("task %s %s", task_id, status)
            worker.forget(task_id)
        else:  # a claim (-> HOLD), a hand-back, a conflict resolution: act on what it is now
            worker.decide(task_id, state)

    def leave(self, task_id: str, state: TaskState, row: dict[str, Any]) -> None:
        """CouchDB cannot store what this instance would write of the task (its content,
        not a rule): the same write would be refused again, so the task is left as it
        is, and this version of it is not taken up again."""
        log.error(
            "task %s: CouchDB refuses to store it (%s: %s); left as it is, with status %s",
            task_id,
            row.get("error"),
            row.get("reason"),
            state.doc.get("status"),
        )
        self.unstorable[task_id] = state.doc["_rev"]
        self.worker.forget(task_id)

    def changed_since(
        self, task_id: str, written: Doc, newer: Doc | None, row: dict[str, Any]
    ) -> Doc | None:
        """After a refused write: the task's newer version if someone changed it since
        the revision the write was based on, else None (the refusal is logged).

        CouchDB answers such a stale write with 409; PouchDB Server runs
        validate_doc_update first and may answer 403, so both are checked the same way.
        """
        worker = self.worker
        try:
            latest = (
                newer
                if newer and is_newer(newer, written)
                else worker.db.get(task_id, conflicts=True)
            )
        except CouchError as exc:
            log.warning("task %s: could not re-read it (%s); retrying", task_id, exc)
            worker.conflicts.recheck_later(task_id)
            return None
        if latest is not None and latest["_rev"] != written["_rev"]:
            log.info(
                "task %s changed under us (%s: %s); deciding again",
                task_id,
                row.get("error"),
                row.get("reason"),
            )
            return latest
        if latest is not None:  # a real refusal: report it, never loop on it
            log.error(
                "task %s: write refused: %s: %s", task_id, row.get("error"), row.get("reason")
            )
        return None
