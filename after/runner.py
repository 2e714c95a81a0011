"""Running: a claimed task from the timer to its outcome.

A claimed task is held in the timer (after.scheduler) for its date. Shortly
before it, the run is committed (`running` written), only when a pool slot will
be free for it: `running` means the job is about to start. A moment before the
instant, the timer hands the run to a pool thread, which starts the job at the
exact instant (in the worker's thread pool, or in a child process when the task
has a timeout). The outcome (`done`, `err`, or `waiting` again for a retry or the
next occurrence, after.runs) goes out in a write that may share its request with
others; an outcome CouchDB refuses to store fails the run with the reason.
"""

from __future__ import annotations

import heapq
import logging
import time
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from after import runs, tasks
from after.capacity import ON_TIME
from after.couch import CouchError, refused_as_is
from after.jobs import JobContext, NotBegun, run_job, run_job_in_process, stop_job_process
from after.scheduler import wait_until
from after.tasks import Doc, Local, TaskState, is_newer

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")

# Seconds before its date that a run is handed to a pool thread, which then waits
# for the exact instant: the handover's own delay is not in the job's lateness.
START_EARLY = 0.002
# How long a write off the critical path (an outcome, a commit made well ahead of its
# date) may wait for others to share its request. The server's cost is per request,
# and a server with CPU to spare wakes the worker's threads on time (docs/benchmarks.md).
SHARE_WINDOW = 0.05
# Seconds between looks when a run's instant came while a write of the task was in flight.
WRITE_WAIT = 0.01
# Seconds between looks, after our lease lapsed, for the lease to hold again.
LAPSE_WAIT = 0.1
# For a task whose fields could not be parsed: it fails once, with the reason.
NO_POLICY = runs.Policy(
    repeat=None, misfire=runs.parse_misfire(None), overlap="skip", retry=None, timeout=None
)


class Runner:
    """Holding, committing, starting and ending the runs of one instance."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # Held tasks due (or overdue) whose run waits for a free slot: (date, order, id).
        self.slot_wait: list[tuple[float, int, str]] = []
        self._slot_order = 0

    # -- held in the timer ---------------------------------------------------------------
    def hold(self, task_id: str, state: TaskState) -> None:
        """The decision's HOLD step: ours, claimed; keep it in the timer for its date
        (a late repeat is first moved on by its misfire policy)."""
        worker = self.worker
        doc = state.doc
        if worker.stopping.is_set():
            return worker.writes.write(task_id, tasks.hand_back_update(doc))
        due = tasks.parse_date(doc["date"])
        state.ends_without_run = None  # what an earlier hold found no longer holds
        try:
            state.policy, state.invalid = runs.policy_of(doc), None
        except ValueError as exc:  # the shape was fine (CouchDB checked it), the meaning not
            state.policy, state.invalid = None, str(exc)
            due = tasks.now()  # fail it now rather than at its date
        if state.policy is not None and due < tasks.now():
            plan = runs.overdue_plan(doc, state.policy, tasks.now())
            if plan is not None and plan.next_date is not None:
                log.info("task %s: late; its misfire policy moves it on", task_id)
                return worker.writes.write(task_id, runs.moved_update(doc, plan))
            if plan is not None:  # nothing of the series is left to run
                state.ends_without_run = runs.skipped_fields(doc, plan)
        state.local, state.run_at = Local.HELD, due
        worker.pool.hold(task_id, due.timestamp())
        worker.timer.schedule(
            due - self.commit_lead(),
            lambda: worker.control.put(lambda: self.commit(task_id)),
            key=task_id,
        )

    def commit_lead(self) -> timedelta:
        """How long before its date a run is committed (`running` written): longer
        when many tasks are held, so a burst's writes are done before it is due."""
        return self.worker.lead + timedelta(seconds=min(5.0, len(self.worker.timer) / 4000))

    # -- committed -----------------------------------------------------------------------
    def commit(self, task_id: str) -> None:
        """Shortly before the due time: write `running` so the start is not delayed by it.

        Only when a pool slot will be free for it: `running` means the job is about
        to start, and a crash never turns a run that had not begun into "worker
        lost". Otherwise it waits, still `scheduled`, for a run to end.
        """
        worker = self.worker
        state = worker.states.get(task_id)
        if (
            state is None
            or state.local is not Local.HELD
            or state.writing
            or worker.stopping.is_set()
            or task_id in worker.pool.committing
        ):
            return
        if worker.membership.quiet_for() > 0:  # after a lapse: see Membership.quiet_until
            at = tasks.now() + timedelta(seconds=worker.membership.quiet_for())
            commit_then = lambda: worker.control.put(lambda: self.commit(task_id))  # noqa: E731
            worker.timer.schedule(at, commit_then, key=task_id)
            return
        run_at = state.run_at or tasks.parse_date(state.doc["date"])
        until_run = max((run_at - tasks.now()).total_seconds(), 0.0)
        if not worker.pool.can_commit(until_run + ON_TIME, time.monotonic()):
            self._slot_order += 1
            heapq.heappush(self.slot_wait, (run_at.timestamp(), self._slot_order, task_id))
            return
        worker.pool.commit(task_id)
        # Made ahead of the date, it may wait up to half the time left to share a request.
        within = min(SHARE_WINDOW, until_run / 2)
        worker.writes.write(task_id, tasks.running_update(state.doc, worker.instance), within)

    def commit_waiting(self) -> None:
        """Commit the runs that waited for a slot, oldest date first, while there is room."""
        pool = self.worker.pool
        while self.slot_wait and pool.can_commit(ON_TIME, time.monotonic()):
            _, _, task_id = heapq.heappop(self.slot_wait)
            self.commit(task_id)

    def committed(self, task_id: str, state: TaskState) -> None:
        """Our commit landed: on a cluster, confirm it (after.quorum); then start."""
        state.local = Local.COMMITTED
        state.lapses = self.worker.membership.lapses
        if self.worker.quorum.confirms_commits:
            return self.worker.quorum.confirm(task_id, state)
        self.schedule_start(task_id, state)

    def schedule_start(self, task_id: str, state: TaskState) -> None:
        """Hand the run to a pool thread a moment before its instant."""
        due = state.run_at or tasks.parse_date(state.doc["date"])
        start = due - timedelta(seconds=START_EARLY)
        self.worker.timer.schedule(start, lambda: self.start_now(task_id), key=task_id)

    # -- started -----------------------------------------------------------------------
    def start_now(self, task_id: str) -> None:
        """On the timer thread, at the due time: start the job straight away.

        This is the one state change made outside the control thread, so that a
        start never waits behind the control queue; `start_lock` orders it with
        the control thread's moves out of COMMITTED (a cancel, a stop).
        """
        worker = self.worker
        with worker.start_lock:
            state = worker.states.get(task_id)
            ready = state is not None and self.may_start(state)
            if ready:
                state.local, state.spawned = Local.RUNNING, []
                worker.run_started(task_id, state)
                worker.pool.started(task_id, time.monotonic())
        if not ready:
            worker.control.put(lambda: self.start(task_id))  # let the control thread decide
            return
        self.submit(task_id, state)
        if state.policy is not None and state.policy.overlap == "allow":
            occurrence = runs.occurrence_of(state.doc)
            worker.control.put(lambda: self.plan_overlap(task_id, state, occurrence))

    def submit(self, task_id: str, state: TaskState) -> None:
        """Hand the run to a pool thread; what its thread raises is never dropped."""
        future = self.worker.executor.submit(self.execute, task_id, state)
        future.add_done_callback(lambda done: self.job_thread_ended(task_id, done))

    def job_thread_ended(self, task_id: str, done: Future[None]) -> None:
        if done.cancelled() or done.exception() is None:
            return
        error = done.exception()
        log.error("task %s: its run's thread failed (%r); the run fails with it", task_id, error)
        now = tasks.now()
        self.worker.pool.ended(task_id, time.monotonic(), began=time.monotonic())
        outcome = tasks.outcome_fields(now, now, error=error)
        self.worker.control.put(lambda: self.finished(task_id, outcome))

    def may_start(self, state: TaskState) -> bool:
        """Whether a run may start now, without a word from the control thread: the
        version held is still our commit (a newer one may have come in a moment ago:
        a peer's takeover, a retry's `waiting`), no write of it is out, and our lease
        has held since the commit (after a pause or a cut-off a peer may have taken
        it over, and what the feed says may be behind)."""
        worker, doc = self.worker, state.doc
        return (
            state.local is Local.COMMITTED
            and not state.writing
            and not worker.stopping.is_set()
            and doc.get("status") == "running"
            and doc.get("owner") == worker.instance
            and state.lapses == worker.membership.lapses
            and worker.membership.lease_holds()
        )

    def start(self, task_id: str) -> None:
        """At the due time, on the control thread: what `start_now` left to it."""
        worker = self.worker
        state = worker.states.get(task_id)
        if state is not None and state.local is Local.COMMITTED and state.writing:
            # A write of the task is in flight (a conflict's resolution): look again in
            # a moment rather than drop the start, which would leave it `running` forever.
            at = tasks.now() + timedelta(seconds=WRITE_WAIT)
            worker.timer.schedule(at, lambda: self.start_now(task_id), key=task_id)
            return
        if state is None or state.local is not Local.COMMITTED:
            return
        if worker.stopping.is_set():
            state.local = Local.NONE
            worker.pool.release(task_id)
            return worker.writes.write(task_id, tasks.hand_back_update(state.doc))
        doc = state.doc
        if doc.get("status") != "running" or doc.get("owner") != worker.instance:
            # A newer version came between the timer and us: decide on it instead.
            worker.unhold(task_id, state)
            return worker.decide(task_id, state)
        if state.lapses != worker.membership.lapses or not worker.membership.lease_holds():
            return self.start_after_lapse(task_id, state)
        state.local, state.spawned = Local.RUNNING, []
        worker.run_started(task_id, state)
        worker.pool.started(task_id, time.monotonic())
        self.submit(task_id, state)
        if state.policy is not None:
            self.plan_overlap(task_id, state, runs.occurrence_of(state.doc))

    def start_after_lapse(self, task_id: str, state: TaskState) -> None:
        """Our lease lapsed since the commit (we were paused, or cut off): a peer may
        have judged us dead and taken the task over, and the feed may not have told us
        yet. Once the lease holds again, the task is read back, and its run starts only
        if it is still our commit."""
        worker, membership = self.worker, self.worker.membership
        if membership.presumed_lost_in > state.lapses:
            # A peer marked us lost since the commit: it takes our tasks over, and its
            # writes may still be on their way. Hand it back (compare-and-set: a takeover
            # that landed wins); its run never began, so no attempt is used up.
            log.warning("task %s: presumed lost while committed; handed back", task_id)
            worker.unhold(task_id, state)
            return worker.writes.write(task_id, tasks.hand_back_update(state.doc))
        if not membership.lease_holds():
            at = tasks.now() + timedelta(seconds=max(LAPSE_WAIT, membership.quiet_for()))
            worker.timer.schedule(at, lambda: worker.control.put(lambda: self.start(task_id)))
            return
        try:
            latest = worker.db.get(task_id, conflicts=True)
        except CouchError as exc:
            log.warning("task %s: could not read it back after a lapse (%s)", task_id, exc)
            at = tasks.now() + timedelta(seconds=LAPSE_WAIT)
            worker.timer.schedule(at, lambda: worker.control.put(lambda: self.start(task_id)))
            return
        if latest is not None and latest["_rev"] == state.doc["_rev"]:
            state.lapses = worker.membership.lapses  # still ours: it starts now
            return self.start(task_id)
        log.warning("task %s: changed while our lease had lapsed; not started", task_id)
        worker.unhold(task_id, state)
        if latest is None:
            return worker.forget(task_id)
        state.doc = latest
        worker.act_on(task_id, state)

    def plan_overlap(self, task_id: str, state: TaskState, after: datetime) -> None:
        """overlap "allow": when the next occurrence comes while the job still runs,
        it runs as a task of its own rather than being skipped."""
        assert state.policy is not None
        occurrence = runs.next_overlapping(state.doc, state.policy, after, len(state.spawned))
        if occurrence is not None:
            control = self.worker.control
            action = lambda: control.put(lambda: self.spawn(task_id, occurrence))  # noqa: E731
            self.worker.timer.schedule(occurrence, action, key=("overlap", task_id))

    def spawn(self, task_id: str, occurrence: datetime) -> None:
        state = self.worker.states.get(task_id)
        if state is None or state.local is not Local.RUNNING:
            return
        child = runs.spawned_task(state.doc, occurrence)
        log.info(
            "task %s still runs at its next occurrence: running that one as a new task", task_id
        )
        self.worker.writer.write(child, lambda row: self.spawned(task_id, row))
        state.spawned.append(occurrence)
        self.plan_overlap(task_id, state, occurrence)

    def spawned(self, task_id: str, row: dict[str, Any]) -> None:
        if row.get("error"):
            log.error("task %s: its overlapping occurrence was refused: %s", task_id, row)

    def cancel_running(self, task_id: str, state: TaskState) -> None:
        """The decision's CANCEL_AFTER_RUN step: a cancel came while the job runs."""
        state.cancel_requested = True
        if state.process is not None:  # a job in a child process can really be stopped
            log.info("task %s: cancel asked while its job runs; stopping the job", task_id)
            stop_job_process(state.process)
        else:
            log.info(
                "task %s: cancel asked while its job runs in the worker; "
                "it will be marked canceled when it ends",
                task_id,
            )

    def execute(self, task_id: str, state: TaskState) -> None:
        """On an executor thread: run the job and post its outcome."""
        worker = self.worker
        doc, policy = state.doc, state.policy
        job = doc["job"]
        if state.run_at is not None:
            wait_until(state.run_at.timestamp())  # the timer handed it over a moment early
        membership = worker.membership
        if state.lapses != membership.lapses or not membership.lease_holds():
            # Our lease lapsed while the run waited for a pool thread (a pause, a cut-off):
            # a peer may have taken it over. It has not begun: read it back first.
            worker.control.put(lambda: self.not_begun(task_id, state))
            return
        began, started = time.monotonic(), tasks.now()
        try:  # everything from here ends in an outcome: a task never stays `running`
            context = JobContext(
                task_id=task_id,
                attempt=int(doc.get("attempt", 1)),
                worker=worker.name,
                idempotency_key=runs.idempotency_key(doc),
                couchdb_url=worker.server_url,
                database=worker.config.db,
            )
            if state.invalid is not None:
                raise ValueError(state.invalid)
            if state.ends_without_run is not None:
                outcome = {**tasks.outcome_fields(started, started), **state.ends_without_run}
                outcome["result"] = "the repeat ended while no worker could run it"
            elif policy is not None and policy.timeout is not None:
                result = run_job_in_process(
                    worker.config.jobs.resolve(),
                    job["name"],
                    list(job.get("arguments", [])),
                    context,
                    policy.timeout.total_seconds(),
                    started=lambda process: setattr(state, "process", process),
                    not_after=membership.lease_deadline(),
                )
                outcome = tasks.outcome_fields(started, tasks.now(), result=result)
            else:
                fn = worker.jobs.load(job["name"])
                result = run_job(fn, list(job.get("arguments", [])), context)
                outcome = tasks.outcome_fields(started, tasks.now(), result=result)
        except NotBegun:  # paused as its process started: see Membership.lease_deadline
            worker.control.put(lambda: self.not_begun(task_id, state))
            return
        except BaseException as exc:  # a job's failure is the task's, never the worker's
            outcome = tasks.outcome_fields(started, tasks.now(), error=exc)
            if not isinstance(exc, Exception):
                log.warning("task %s: job %s raised %s", task_id, job["name"], type(exc).__name__)
        worker.pool.ended(task_id, time.monotonic(), began=began)
        worker.control.put(lambda: self.finished(task_id, outcome))

    def not_begun(self, task_id: str, state: TaskState) -> None:
        """On the control thread: a run handed to a pool thread that did not begin (our
        lease lapsed meanwhile) is committed again, and started only as after a lapse."""
        worker = self.worker
        worker.pool.not_begun(task_id)
        if worker.states.get(task_id) is not state or state.local is not Local.RUNNING:
            return worker.pool.release(task_id)  # let go of meanwhile
        state.local, state.run_doc = Local.COMMITTED, None
        worker.started_runs.pop(task_id, None)
        self.start(task_id)

    # -- ended ---------------------------------------------------------------------------
    def finished(self, task_id: str, outcome: dict[str, Any]) -> None:
        self.commit_waiting()  # a slot is free
        worker = self.worker
        state = worker.states.get(task_id)
        if state is None:
            return
        state.local = Local.NONE
        state.process = None
        worker.timer.cancel(("overlap", task_id))
        if state.cancel_requested and outcome.get("error"):
            outcome["error"]["message"] = "canceled while running: " + outcome["error"]["message"]
        state.cancel_requested = False  # it was this run's; the next one starts afresh
        if state.writing:  # cannot happen in practice; keep the outcome for the next version
            state.newer = state.newer or state.doc
        state.outcome_base = tasks.outcome_base(state.doc, state.run_doc, worker.instance)
        self.write_outcome(task_id, state, outcome)

    def outcome_still_to_write(self, task_id: str, state: TaskState) -> bool:
        """A run of ours ended and its outcome is not stored yet (its write was refused
        while a conflict was being resolved): when the task again says we run it, the
        outcome is written there, rather than the run failed as "worker lost"."""
        doc, outcome = state.doc, state.pending_outcome
        if outcome is None or state.local is not Local.NONE:
            return False
        status = doc.get("status")
        if status != "cancel" and (status != "running" or doc.get("owner") != self.worker.instance):
            return False
        if state.writing:
            # A write is out (the outcome's, or a conflict's resolution): its answer
            # decides again. Deciding now would take our own run for lost (a 3-node
            # cluster test's task ended `err` "worker lost" though its job had run).
            return True
        self.write_outcome(task_id, state, outcome)
        return True

    def lost(self, task_id: str, state: TaskState) -> None:
        """The decision's LOST step: its run was interrupted by a dead instance."""
        doc = state.doc
        log.warning(
            "task %s was running under %s, whose lease ran out: its run failed (worker lost)",
            task_id,
            doc.get("owner"),
        )
        try:
            policy = runs.policy_of(doc)
        except ValueError:
            policy = NO_POLICY
        now = tasks.now()
        lost = runs.after_run_update(
            tasks.taken_over(doc, now), policy, tasks.lost_outcome(doc, now), now
        )
        self.worker.writes.write(task_id, lost)  # err, or waiting for its retry or next occurrence

    def write_outcome(self, task_id: str, state: TaskState, outcome: dict[str, Any]) -> None:
        """Write the run's outcome on `state.outcome_base` (see tasks.outcome_base), or
        on the task as it is now."""
        worker = self.worker
        state.pending_outcome = outcome
        policy = state.policy or NO_POLICY
        base = state.outcome_base or state.doc
        doc = runs.after_run_update(base, policy, outcome, tasks.now(), spawned=state.spawned)
        worker.writes.send(
            task_id, doc, lambda row: self.outcome_written(task_id, doc, outcome, row), SHARE_WINDOW
        )

    def outcome_written(
        self, task_id: str, doc: Doc, outcome: dict[str, Any], row: dict[str, Any]
    ) -> None:
        worker = self.worker
        if (answer := worker.writes.answer(task_id, row)) is None:
            return
        state, newer = answer
        refused_before = (outcome.get("error") or {}).get("type") == tasks.REFUSED_OUTCOME
        if refused_as_is(row) and not refused_before and not (newer and is_newer(newer, doc)):
            # The outcome cannot be stored (too large, not valid JSON): the run fails
            # with what CouchDB refused, so the task does not stay `running` for good.
            log.error(
                "task %s: CouchDB refused its outcome (%s: %s); the run fails with that",
                task_id,
                row.get("error"),
                row.get("reason"),
            )
            return self.write_outcome(task_id, state, tasks.refused_outcome(outcome, row))
        if refused_as_is(row) and not (newer and is_newer(newer, doc)):
            state.pending_outcome = state.run_doc = None
            worker.writes.leave(task_id, state, row)  # even the failure: too large
            return worker.maybe_finish_stop()
        state.outcome_base = None
        if not row.get("error"):
            state.pending_outcome = state.run_doc = None
            state.doc = {**doc, "_rev": row["rev"]}
            worker.writes.after_write(task_id, state)  # final: forgotten; a retry: claimed
            if newer and newer.get("_conflicts") and tasks.is_news(newer, state.doc):
                # A replica's write landed beside ours meanwhile: the conflict is still
                # to be resolved, though the run has ended (no later news may come).
                worker.seen(newer, fresh=True)
        elif (latest := worker.writes.changed_since(task_id, doc, newer, row)) is not None:
            state.doc = latest
            if latest.get("status") in ("running", "cancel"):
                # Changed while the job ran (a cancel, another branch's `running`): record
                # the outcome on the newest version, as our run's (tasks.outcome_base_over).
                base = tasks.outcome_base_over(latest, state.run_doc, worker.instance, tasks.now())
                if base is not latest:
                    log.warning(
                        "task %s: %s's running of it became current while our run ended; %s",
                        task_id,
                        latest.get("owner"),
                        "our run's outcome is written over it"
                        if base is not None
                        else "it runs a later attempt (ours was judged lost): ours is dropped",
                    )
                if base is not None:
                    state.outcome_base = base
                    return self.write_outcome(task_id, state, outcome)
                state.pending_outcome = state.run_doc = None
                worker.forget(task_id)
                return worker.maybe_finish_stop()
            if latest.get("_conflicts"):
                # Ended by a replica's write, beside ours (a duplicate run): resolving the
                # conflict records ours on the task; forgetting it would leave both.
                state.resolving = True
                return worker.act_on(task_id, state)
            worker.forget(task_id)
        else:
            worker.forget(task_id)
        worker.maybe_finish_stop()
