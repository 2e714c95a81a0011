"""Claiming: when this instance takes a task, and the write that takes it.

A task is claimed (`scheduled`, owned by this instance) with the revision it was
read at, so of two claimers exactly one wins on a node. An instance claims at
once only the tasks it is the first claimer of (after.membership) and only what
it can start on time (after.capacity); the rest it claims later if they are still
free then: one sweep looks at all such deferred claims. A task whose run would be
due at once, with a pool slot free, is claimed and committed in one write
(`waiting` -> `running`), where the deployed design document allows it.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from after import runs, tasks
from after.capacity import ON_TIME
from after.couch import CouchError
from after.feed import DDOC
from after.membership import CLAIM_FALLBACK
from after.push import deployed_rules
from after.tasks import Doc, Local, TaskState

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")

DEFERRED_SWEEP = 0.25  # seconds between looks at the deferred claims


class Claiming:
    """The claims of one instance: at once, deferred, or with the run committed too."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # Whether the deployed design doc lets a claim commit the run too (waiting ->
        # running); one pushed by an older After does not (see read_claim_commits).
        self.claim_commits = True
        # Claims put off (another instance claims first, or no room): id -> (when, anyway).
        self.deferred: dict[str, tuple[float, bool]] = {}
        self.deferred_sweep = False  # a sweep of them is scheduled

    # -- what the deployed design document allows ----------------------------------------------
    def read_claim_commits(self, design: Doc) -> bool:
        """Whether the deployed design doc lets a claim commit the run in the same write
        (`waiting` -> `running`); one pushed by an older After does not."""
        transitions = deployed_rules(design).get("transitions", {})
        self.claim_commits = "running" in transitions.get("waiting", {})
        if not self.claim_commits:
            log.warning(
                "the design document of %s is older than this worker (a claim cannot commit "
                "a run in the same write, so a task due now takes one more write): "
                "run `after push`",
                self.worker.db.name,
            )
        return self.claim_commits

    def claim_commits_still_allowed(self) -> bool:
        """After a claim that commits was refused: read the design doc again, in case an
        older one was pushed while we ran."""
        try:
            design = self.worker.db.get(f"_design/{DDOC}")
        except CouchError as exc:
            log.warning("could not read the design document (%s)", exc)
            return True
        return design is None or self.read_claim_commits(design)

    # -- the decision's CLAIM step -------------------------------------------------------
    def consider(self, task_id: str, state: TaskState) -> None:
        """The task may be claimed by this instance: claim it now, later, or not."""
        worker, membership = self.worker, self.worker.membership
        doc = state.doc
        if worker.stopping.is_set():
            return worker.forget(task_id)
        # What we held was an older version (a client rescheduled it): its timer must not
        # commit this one, whether we claim it now or later.
        worker.unhold(task_id, state)
        if worker.quorum.lost:  # our node is cut off: what we claim, the other side may too
            return self.claim_later(task_id, CLAIM_FALLBACK, anyway=False)
        if doc.get("status") in ("waiting", "reschedule"):
            if not membership.claims_first(task_id):
                # Another live instance claims this one first; take it only if it
                # does not and we have room, or, after a while, if nobody did.
                return self.claim_later(task_id, CLAIM_FALLBACK, anyway=False)
            if not self.has_room_for(doc):
                # We could not start it on time: leave it to a peer with room for
                # a moment, and claim it anyway (late beats never) if none takes it.
                return self.claim_later(task_id, 2 * CLAIM_FALLBACK, anyway=True)
        elif not membership.claims_first(task_id):
            # A dead instance's claim: the live instance it now falls to takes it
            # over, the others only if that one has not after a moment.
            return self.claim_later(task_id, CLAIM_FALLBACK, anyway=True)
        if doc.get("status") == "scheduled":
            log.warning(
                "task %s: taking it over from %s, whose lease ran out", task_id, doc.get("owner")
            )
        self.claim(task_id, state)

    def claim(self, task_id: str, state: TaskState) -> None:
        """Claim the task (write `scheduled`). One whose commit would be due at once is
        claimed and committed in one write (`waiting` -> `running`): a burst's late
        claims and a task due now cost one write and one round trip, not two."""
        worker = self.worker
        if not worker.quorum.clear_to_claim(task_id, state):
            return
        doc, now = state.doc, tasks.now()
        claim = tasks.claim_update(doc, worker.instance, now)
        due = tasks.parse_date(doc["date"])
        commits, policy = self.claim_commits_run(task_id, doc, due, now)
        if not commits:
            return worker.writes.write(task_id, claim)
        state.policy, state.invalid = policy, None
        state.local, state.run_at = Local.HELD, due
        worker.pool.hold(task_id, due.timestamp())
        worker.pool.commit(task_id)
        worker.writes.write(task_id, tasks.running_update(claim, worker.instance))

    def claim_commits_run(
        self, task_id: str, doc: Doc, due: datetime, now: datetime
    ) -> tuple[bool, runs.Policy | None]:
        """Whether the task's claim commits its run too, and the run's policy. Only a
        `waiting` task due within the commit lead, with a pool slot free for it, whose
        run needs no misfire decision (an overdue repeat is held first, then decided)."""
        worker = self.worker
        if (
            not self.claim_commits
            or doc.get("status") != "waiting"
            or due - worker.runner.commit_lead() > now
            or task_id in worker.pool.committing
            or worker.stopping.is_set()
            or worker.membership.quiet_for() > 0
        ):
            return False, None
        try:
            policy = runs.policy_of(doc)
        except ValueError:
            return False, None  # held, then failed with the reason
        if due < now and runs.overdue_plan(doc, policy, now) is not None:
            return False, None
        until_run = max((due - now).total_seconds(), 0.0)
        return worker.pool.can_commit(until_run + ON_TIME, time.monotonic()), policy

    def has_room_for(self, doc: Doc) -> bool:
        """Could this instance start the task on time, besides what it holds?"""
        due = tasks.parse_date(doc["date"]).timestamp()
        return self.worker.pool.can_claim(due, tasks.now().timestamp(), time.monotonic())

    # -- deferred claims ---------------------------------------------------------------
    def claim_later(self, task_id: str, delay: float, anyway: bool) -> None:
        """Claim the task after `delay` seconds if it is still free then. One sweep looks
        at all such tasks: a burst defers thousands (each another instance's to claim
        first), and a timer each cost most of an instance's CPU."""
        self.deferred[task_id] = (time.monotonic() + delay, anyway)
        self.sweep_later()

    def sweep_later(self) -> None:
        if self.deferred and not self.deferred_sweep:
            self.deferred_sweep = True
            at = tasks.now() + timedelta(seconds=DEFERRED_SWEEP)
            control = self.worker.control
            self.worker.timer.schedule(at, lambda: control.put(self.sweep_deferred))

    def sweep_deferred(self) -> None:
        """On the control thread: the deferred claims whose time has come."""
        self.deferred_sweep = False
        now = time.monotonic()
        due = [(task_id, anyway) for task_id, (at, anyway) in self.deferred.items() if at <= now]
        for task_id, anyway in due:
            del self.deferred[task_id]
            self.claim_if_still_free(task_id, anyway)  # which may defer it again
        self.sweep_later()

    def claim_if_still_free(self, task_id: str, anyway: bool) -> None:
        worker = self.worker
        state = worker.states.get(task_id)
        if state is None or state.writing or state.local is not Local.NONE:
            return
        status, owner = state.doc.get("status"), state.doc.get("owner")
        taking_over = (
            status == "scheduled" and owner is not None and not worker.membership.owner_alive(owner)
        )
        if (
            status not in ("waiting", "reschedule") and not taking_over
        ) or worker.stopping.is_set():
            return
        if worker.quorum.lost or worker.membership.first_claimer_may_be_at_work(task_id):
            # Its instance is alive and still claiming (a burst), or our news is too
            # late to tell: it gets to this one soon, and racing it makes conflicts.
            # (Or our node is cut off from its cluster: nothing is claimed meanwhile.)
            return self.claim_later(task_id, CLAIM_FALLBACK, anyway)
        if anyway or self.has_room_for(state.doc):
            if taking_over:
                log.warning("task %s: taking it over from %s, whose lease ran out", task_id, owner)
            self.claim(task_id, state)
        else:  # no room here either: the instance it belongs to claims it meanwhile, or we do
            self.claim_later(task_id, 2 * CLAIM_FALLBACK, anyway=True)

    def forget(self, task_id: str) -> None:
        self.deferred.pop(task_id, None)  # a peer claimed it: no fallback to try

    # -- the horizon (the housekeeping thread) -------------------------------------------------
    def sweep_horizon(self) -> None:
        """Claim the waiting tasks the horizon has reached since the last sweep, and take
        up any reschedule not taken up yet (its write back was lost in an outage)."""
        worker = self.worker
        until = tasks.iso(tasks.now() + worker.horizon)
        for status in ("waiting", "reschedule"):
            for doc in worker.feed.tasks_in(status, until):
                worker.control.put(lambda doc=doc: worker.seen(doc, fresh=True))
