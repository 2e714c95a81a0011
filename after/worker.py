"""The worker: follows its changes feed, holds its tasks in the timer, runs jobs.

Threads, none of which blocks another:

- control: the only thread that changes the worker's state. Everything else
  posts a function to its queue, so no locks are needed and the order of
  events for one task is the order they happened in.
- feed: follows the filtered changes feed (`include_docs`) and posts each doc.
- writer: sends writes through `_bulk_docs`; writes that arrive while a batch
  is in flight go out together in the next one. Each write carries the `_rev`
  it was decided on; a 409 means someone else changed the task, so the worker
  decides again on the newer version (never fetch-latest-and-overwrite).
- timer (after.scheduler): commits `running` shortly before each due time and
  starts the job at the due time.
- executor: runs the jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from after import records, runs, tasks
from after.capacity import ON_TIME, Pool
from after.config import Config
from after.couch import (
    BulkWriter,
    Conflict,
    CouchError,
    Forbidden,
    NotFound,
    Server,
    Unreachable,
    refused_as_is,
)
from after.jobs import JobContext, JobLoader, run_job, run_job_in_process, stop_job_process
from after.push import deployed_rules
from after.scheduler import Scheduler, wait_until
from after.tasks import Doc, Local, Step

log = logging.getLogger("after.worker")

DDOC = "after"
CLOCK_CHECK_EVERY = 60.0  # seconds between comparisons with the server's clock
CLOCK_SKEW_WARNING = 2.0  # seconds of difference that earn a warning
# Seconds before claiming a task another live instance should claim (when it has
# room), and before claiming one anyway when no instance had room for it.
CLAIM_FALLBACK = 1.0
DEFERRED_SWEEP = 0.25  # seconds between looks at the deferred claims
# Seconds before its date that a run is handed to a pool thread, which then waits
# for the exact instant: the handover's own delay is not in the job's lateness.
START_EARLY = 0.002
# How long a write off the critical path (an outcome, a commit made well ahead of its
# date) may wait for others to share its request. The server's cost is per request,
# and a server with CPU to spare wakes the worker's threads on time (docs/benchmarks.md).
SHARE_WINDOW = 0.05
# Seconds between looks when a run's instant came while a write of the task was in flight.
WRITE_WAIT = 0.01
# Events queued for the control thread, or our writes not yet back on the feed,
# beyond which this instance counts as busy with a burst (its news is late).
NEWS_BACKLOG = 100
ECHO_GIVEN_UP = 30.0  # seconds after which a write's echo is no longer expected
# Rows of the first page read at start-up: small, so the first due tasks run soon.
FIRST_PAGE = 100
FORGOTTEN = 10_000  # ids (and last revisions) of tasks let go, to ignore stale versions
# For a task whose fields could not be parsed: it fails once, with the reason.
NO_POLICY = runs.Policy(
    repeat=None, misfire=runs.parse_misfire(None), overlap="skip", retry=None, timeout=None
)


@dataclass
class TaskState:
    """What this instance knows and does about one task."""

    doc: Doc
    local: Local = Local.NONE
    writing: bool = False  # a write is in flight: decide again when it returns
    newer: Doc | None = None  # a version seen while writing
    cancel_requested: bool = False
    policy: runs.Policy | None = None  # the scheduling fields, parsed when it is held
    invalid: str | None = None  # why the fields cannot be scheduled: the run fails with it
    ends_without_run: dict[str, Any] | None = None  # a repeat whose series ended while down
    process: subprocess.Popen | None = None  # a job run in a child process (with a timeout)
    run_at: datetime | None = None  # when the job starts: its date, or now when it must fail
    spawned: list[datetime] = field(default_factory=list)  # overlapping occurrences handed off
    resolving: bool = False  # held only to resolve a conflict of a run that had ended
    # A conflict's losing revisions, deleted once the winner recording them has landed.
    losers: list[Doc] = field(default_factory=list)


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    done: int = 0
    failed: int = 0
    canceled: int = 0


class Worker:
    def __init__(
        self,
        config: Config,
        name: str,
        *,
        concurrency: int = 4,
        lead: float = 0.2,
        heartbeat: float = 5.0,
        lease: float = 30.0,
        horizon: float = 300.0,
        page_size: int = 1000,
        state_file: Path | None = None,
    ) -> None:
        if lease <= heartbeat:
            raise ValueError(f"lease ({lease}s) must be longer than the heartbeat ({heartbeat}s)")
        self.config = config
        self.name = name
        self.instance = f"{name}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lead = timedelta(seconds=lead)
        # Whether the deployed design doc lets a claim commit the run too (waiting ->
        # running); one pushed by an older After does not (see _check_database).
        self.claim_commits = True
        self.heartbeat = heartbeat
        self.lease = timedelta(seconds=lease)
        self.horizon = timedelta(seconds=horizon)
        # How often the horizon window is swept for waiting tasks it has reached.
        self.sweep_every = min(max(horizon / 4, 0.5), 60.0)
        self.page_size = page_size
        self.state_file = state_file
        self.server = Server.from_config(config)
        self.db = self.server.database(config.db)
        self.jobs = JobLoader(config.jobs)
        self.writer = BulkWriter(self.db)
        self.timer = Scheduler()
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="after-job")
        self.pool = Pool(concurrency)  # what the executor can run on time
        # Held tasks due (or overdue) whose run waits for a free slot: (date, order, id).
        self.slot_wait: list[tuple[float, int, str]] = []
        self._slot_order = 0
        self.control: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.states: dict[str, TaskState] = {}
        self.stats = Stats()
        self.stopping = threading.Event()
        self.finished = threading.Event()  # set once the worker has shut down
        self.start_lock = threading.Lock()
        self.keeper: threading.Thread | None = None
        self.ready = threading.Event()
        self.last_seq: Any = None
        self._state_written = 0.0
        self.record: Doc = records.new_record(name, self.instance, tasks.now())
        # The other instances of this name, as last read: instance -> alive.
        self.leases: dict[str, bool] = {}
        # When each peer's record was last seen to change: instance -> ((rev, last_seen), t).
        self.peer_seen: dict[str, tuple[tuple[Any, Any], float]] = {}
        self._held = 0
        self.unknown_since: dict[str, float] = {}  # owners with no record: since when
        # The lease is renewed through its own HTTP session, on its own thread.
        self.lease_server = Server.from_config(config)
        self.claim_order: list[str] = [self.instance]  # live instances of this name, sorted
        self.first_claimers: dict[str, str] = {}  # task id -> its first claimer, for claim_order
        # Claims put off (another instance claims first, or no room): id -> (when, anyway).
        self.deferred: dict[str, tuple[float, bool]] = {}
        self.deferred_sweep = False  # a sweep of them is scheduled
        self.awaiting_peers: set[str] = set()  # tasks whose owner we have not heard of yet
        self.peers_wanted = threading.Event()
        self.forgotten: OrderedDict[str, int] = OrderedDict()
        # Tasks whose version CouchDB refused to store as it is (id -> that revision):
        # not written again until someone changes them.
        self.unstorable: dict[str, str] = {}
        self.start_up_error: Exception | None = None
        # When the feed last brought a task written by each other instance (monotonic):
        # an instance still working through its claims is not to be raced for them.
        self.peer_active: dict[str, float] = {}
        # Tasks we wrote whose version the feed has not brought back yet: id -> when the
        # write was sent (monotonic). The oldest tells how late our news is.
        self.echoes: OrderedDict[str, float] = OrderedDict()
        self.echo_lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------
    def run(self) -> None:
        """Run until stop() (or SIGTERM/SIGINT when installed by the CLI)."""
        since = self._check_database()
        self._renew_record()  # our record exists before our first claim
        self._set_leases(self._read_leases()[0])
        self.writer.start()
        self.timer.start()
        log.info(
            "worker %s started as %s on %s, database %s, jobs in %s",
            self.name,
            self.instance,
            self.server.display_url,
            self.db.name,
            self.config.jobs.resolve(),
        )
        start_up = threading.Thread(
            target=self._start_up, args=(since,), name="after-start-up", daemon=True
        )
        start_up.start()
        self.keeper = threading.Thread(target=self._renew, name="after-lease", daemon=True)
        self.keeper.start()
        threading.Thread(target=self._housekeep, name="after-housekeeping", daemon=True).start()
        try:
            while True:
                try:
                    action = self.control.get(timeout=1.0)
                except queue.Empty:
                    self._commit_waiting()  # run times measured meanwhile may make room
                    self._write_state_file()  # what the last burst of events changed
                    continue
                if action is None:
                    break
                try:
                    action()
                except Exception:  # one bad event must not stop the worker
                    log.exception("internal error while handling an event; continuing")
                self._write_state_file()
        finally:
            self._shutdown()
        if self.start_up_error is not None:
            raise self.start_up_error

    def stop(self) -> None:
        """Ask the worker to stop: held tasks are handed back, running jobs finish."""
        if not self.stopping.is_set():
            self.stopping.set()
            self.control.put(self._begin_stop)

    def install_signal_handlers(self) -> None:
        """The first SIGTERM/SIGINT stops gracefully; a second one stops at once
        (held tasks are then taken over by other instances when the lease runs out)."""

        def on_signal(signum: int, frame: object) -> None:
            if self.stopping.is_set():
                log.warning("second signal: stopping at once, without waiting for jobs")
                os._exit(1)
            self.stop()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)

    def _check_database(self) -> Any:
        """Fail fast with a clear error; return the sequence to follow changes from."""
        try:
            info = self.db.info()
        except NotFound:
            info = None
        design = None if info is None else self.db.get(f"_design/{DDOC}")
        if info is None or design is None:
            missing = "does not exist" if info is None else f"has no _design/{DDOC}"
            raise CouchError(
                404, "not_found", f"{missing}: run `after push`", f"database {self.db.name}"
            )
        self._read_claim_commits(design)
        return info["update_seq"]

    def _read_claim_commits(self, design: Doc) -> bool:
        """Whether the deployed design doc lets a claim commit the run in the same write
        (`waiting` -> `running`); one pushed by an older After does not."""
        transitions = deployed_rules(design).get("transitions", {})
        self.claim_commits = "running" in transitions.get("waiting", {})
        if not self.claim_commits:
            log.warning(
                "the design document of %s is older than this worker (a claim cannot commit "
                "a run in the same write, so a task due now takes one more write): "
                "run `after push`",
                self.db.name,
            )
        return self.claim_commits

    def _start_up(self, since: Any) -> None:
        """On its own thread: read the current state, then follow the changes feed
        from `since`, the sequence taken before that read (so nothing is missed).

        Each page read goes to the control thread at once, so the first due tasks
        are claimed and run while later pages are still being read.
        """
        try:
            self._read_current_state()
        except Exception as exc:  # e.g. the server went away: the worker cannot start
            self.start_up_error = exc
            self.control.put(None)
            return
        feed = threading.Thread(target=self._follow, args=(since,), name="after-feed", daemon=True)
        feed.start()
        self.ready.set()
        self.control.put(lambda: self._write_state_file(force=True))

    def _read_current_state(self) -> None:
        """The active tasks of this worker, paged, oldest first within each status.

        Waiting and rescheduled tasks are read only up to the horizon: later ones
        stay in the database until the horizon reaches them.
        """
        count = 0
        horizon_end = tasks.iso(tasks.now() + self.horizon)
        for status in tasks.ACTIVE:
            end = horizon_end if status in ("waiting", "reschedule") else {}
            page: list[Doc] = []
            for doc in self._tasks_in(status, end):
                page.append(doc)
                if len(page) >= FIRST_PAGE:
                    self.control.put(lambda page=page: self._seen_all(page))
                    count, page = count + len(page), []
            if page:
                self.control.put(lambda page=page: self._seen_all(page))
                count += len(page)
        log.info("start-up: %d active task(s) read", count)

    def _seen_all(self, docs: list[Doc]) -> None:
        for doc in docs:
            try:
                self._seen(doc, fresh=True)
            except Exception:  # one unreadable task must not keep the worker from starting
                log.exception("task %s could not be read; skipped", doc.get("_id"))

    def _tasks_in(self, status: str, until: str | dict[str, Any]) -> Iterator[Doc]:
        rows = self.db.iter_view(
            DDOC,
            "by_worker",
            page_size=self.page_size,
            first_page=FIRST_PAGE,
            include_docs=True,
            conflicts=True,
            startkey=[self.name, status],
            endkey=[self.name, status, until],
        )
        for row in rows:
            yield row["doc"]

    def _begin_stop(self) -> None:
        log.info("stopping: handing back held tasks, letting running jobs finish")
        for task_id, state in list(self.states.items()):
            if state.local in (Local.HELD, Local.COMMITTED) and not state.writing:
                self._unhold(task_id, state)
                if state.local is Local.NONE:  # not started meanwhile
                    self._write(task_id, tasks.hand_back_update(state.doc))
        self._maybe_finish_stop()

    def _maybe_finish_stop(self) -> None:
        if not self.stopping.is_set():
            return  # the usual case: no scan over every task on every write
        if not any(s.writing or s.local is Local.RUNNING for s in self.states.values()):
            self.control.put(None)

    def _shutdown(self) -> None:
        self.timer.stop(wait=False)
        self.executor.shutdown(wait=True)
        self.writer.stop()
        self.jobs.close()
        self.finished.set()
        self.peers_wanted.set()  # wake the housekeeping thread from its wait
        if self.keeper is not None:
            self.keeper.join(timeout=self.heartbeat + 30)  # no renewal after "stopped"
        try:
            self._put_record(records.stopped(self.record, tasks.now(), self._counts()))
        except CouchError as exc:
            log.warning("could not mark this instance's record stopped (%s)", exc)
        self._write_state_file(force=True, running=False)
        log.info(
            "worker %s stopped: %d done, %d failed, %d canceled",
            self.name,
            self.stats.done,
            self.stats.failed,
            self.stats.canceled,
        )

    # -- records, leases, the horizon (the housekeeping thread) -----------------------
    def _set_leases(self, alive: dict[str, bool]) -> None:
        """Which peers are alive, as judged when their records were read (the control
        thread may apply this late; the judgement does not age with it)."""
        self.leases = alive
        order = sorted([self.instance, *(o for o, live in alive.items() if live)])
        if order != self.claim_order:
            self.claim_order = order
            self.first_claimers.clear()

    def _owner_alive(self, owner: str) -> bool:
        return self.leases.get(owner, False)

    def _counts(self) -> dict[str, Any]:
        # Read from another thread while the control thread may change the dict.
        with contextlib.suppress(RuntimeError):
            self._held = sum(1 for s in list(self.states.values()) if s.local is not Local.NONE)
        return {
            "held": self._held,
            "done": self.stats.done,
            "failed": self.stats.failed,
            "canceled": self.stats.canceled,
            "last_seq": self.last_seq,
        }

    def _put_record(self, record: Doc) -> None:
        records_db = self.lease_server.database(self.db.name)
        try:
            records_db.put(record)
        except Conflict:
            # Someone else wrote our record (a peer marked it lost while we could
            # not renew it): keep their revision, write ours over it.
            current = records_db.get(record["_id"])
            if current is not None:
                if current.get("reaped_by"):
                    log.warning("this instance was presumed lost by %s", current["reaped_by"])
                record["_rev"] = current["_rev"]
            records_db.put(record)
        self.record = record

    def _renew_record(self) -> None:
        self._put_record(records.renewed(self.record, tasks.now(), self.lease, self._counts()))

    def _renew(self) -> None:
        """Its own thread and HTTP session: a lease is renewed on time whatever the
        other threads wait for (a view being built, a slow takeover)."""
        next_clock_check = time.monotonic()
        backoff = 0.5
        while not self.finished.is_set():
            try:
                self._renew_record()
                if time.monotonic() >= next_clock_check:
                    self._check_clock()
                    next_clock_check = time.monotonic() + CLOCK_CHECK_EVERY
                backoff, wait = 0.5, self.heartbeat
            except Exception as exc:
                log.warning("lease not renewed (%s); retrying in %.1fs", exc, backoff)
                wait, backoff = backoff, min(backoff * 2, self.heartbeat)
            self.finished.wait(wait)

    def _read_leases(self) -> tuple[dict[str, bool], list[Doc]]:
        """Which other instances of this name are alive, and the records to take over.

        An instance is dead when its lease had run out when read AND its record
        has not changed for a whole lease while this instance could see it: after
        an outage that hid everyone's renewals, peers get a full lease to renew.
        """
        now, seen_at = tasks.now(), time.monotonic()
        alive: dict[str, bool] = {}
        expired: list[Doc] = []
        rows = self.db.all_docs(include_docs=True, **records.name_range(self.name))
        for row in rows["rows"]:
            record = row.get("doc")
            if not record or record.get("instance") == self.instance:
                continue
            instance = record["instance"]
            stamp = (record.get("_rev"), record.get("last_seen"))
            if self.peer_seen.get(instance, (None, 0.0))[0] != stamp:
                self.peer_seen[instance] = (stamp, seen_at)
            unchanged_for = seen_at - self.peer_seen[instance][1]
            dead = not records.is_live(record, now) and (
                record.get("state") != "running" or unchanged_for >= self.lease.total_seconds()
            )
            alive[instance] = not dead
            if dead and records.needs_takeover(record, now):
                expired.append(record)
            elif records.can_be_deleted(record, now):
                self.db.bulk_docs(
                    [{"_id": record["_id"], "_rev": record["_rev"], "_deleted": True}]
                )
        return alive, expired

    def _housekeep(self) -> None:
        """Watch the peers' leases, take over the dead ones' tasks, sweep the horizon."""
        next_peers = next_sweep = time.monotonic()
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                now = time.monotonic()
                if now >= next_peers or self.peers_wanted.is_set():
                    self.peers_wanted.clear()
                    next_peers = now + self.heartbeat
                    alive, expired = self._read_leases()
                    self.control.put(lambda alive=alive: self._leases_read(alive))
                    for record in expired:
                        self._take_over(record)
                if now >= next_sweep:
                    self._sweep_horizon()
                    next_sweep = now + self.sweep_every
                backoff = 0.5
                wait = min(next_peers, next_sweep) - time.monotonic()
            except Exception as exc:  # a bad record or an outage: log, wait, go on
                log.warning("housekeeping failed (%s); retrying in %.1fs", exc, backoff)
                self.peer_seen.clear()  # what we saw before the gap proves nothing now
                wait, backoff = backoff, min(backoff * 2, 30.0)
            if wait > 0:
                self.peers_wanted.wait(wait)

    def _check_clock(self) -> None:
        """Leases compare one instance's clock with another's: warn when ours is off."""
        skew = self.server.clock_skew()
        if skew is not None and abs(skew) > CLOCK_SKEW_WARNING:
            log.warning(
                "this machine's clock is %.1f s %s the CouchDB server's; leases (%s s) and "
                "due times depend on clocks that agree: sync it (NTP)",
                abs(skew),
                "behind" if skew > 0 else "ahead of",
                self.lease.total_seconds(),
            )

    def _peer_record_seen(self, record: Doc) -> None:
        """A peer's record on the feed: one that starts (or renews) joins the claim
        sharing at once, one that stopped leaves it. Judging a peer dead stays with
        the lease readings, which watch its record for a whole lease."""
        instance = record.get("instance")
        if not isinstance(instance, str) or instance == self.instance:
            return
        live = record.get("state", "running") == "running" and records.is_live(record, tasks.now())
        if live and not self.leases.get(instance):
            self._set_leases({**self.leases, instance: True})
        elif not live and record.get("state") in ("stopped", "lost") and instance in self.leases:
            self._set_leases({**self.leases, instance: False})

    def _leases_read(self, leases: dict[str, bool]) -> None:
        """On the control thread: new leases; decide on tasks that waited for them."""
        self._set_leases(leases)
        waiting, self.awaiting_peers = self.awaiting_peers, set()
        for task_id in waiting:
            state = self.states.get(task_id)
            if state is None or state.writing:
                continue
            owner = state.doc.get("owner")
            if owner not in self.leases:
                # No record: a dead instance's, deleted, or one not replicated here
                # yet. It counts as dead once it has stayed unknown for a whole lease.
                first = self.unknown_since.setdefault(owner, time.monotonic())
                if time.monotonic() - first < self.lease.total_seconds():
                    self.awaiting_peers.add(task_id)  # again at the next reading
                    continue
                self.leases[owner] = False
            self._decide(task_id, state)

    def _take_over(self, record: Doc) -> None:
        """An instance of our name stopped renewing its lease: take over what it held."""
        owner = record["instance"]
        log.warning("instance %s stopped renewing its lease; taking over its tasks", owner)
        self.control.put(lambda: self.leases.__setitem__(owner, False))
        for status in ("scheduled", "running"):
            for doc in self._tasks_in(status, {}):
                if doc.get("owner") == owner:
                    self.control.put(lambda doc=doc: self._seen(doc, fresh=True))
        for _ in range(3):
            try:
                self.db.put(records.reaped(record, self.instance, tasks.now()))
                return
            except (Conflict, Forbidden):  # PouchDB Server answers a stale write with 403
                latest = self.db.get(record["_id"])
                if latest is None or not records.needs_takeover(latest, tasks.now()):
                    return  # reaped by another instance, or it came back: both are fine
                record = latest

    def _sweep_horizon(self) -> None:
        """Claim the waiting tasks the horizon has reached since the last sweep."""
        until = tasks.iso(tasks.now() + self.horizon)
        for doc in self._tasks_in("waiting", until):
            self.control.put(lambda doc=doc: self._seen(doc, fresh=True))

    # -- the feed ----------------------------------------------------------------
    def _follow(self, since: Any) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                changes = self.db.follow(
                    since,
                    stop=self.stopping,
                    include_docs=True,
                    conflicts=True,
                    filter=f"{DDOC}/worker",
                    worker=self.name,
                )
                for change in changes:
                    since = change["seq"]
                    doc = change.get("doc")
                    if self.echoes:
                        with self.echo_lock:
                            self.echoes.pop(change.get("id"), None)
                    if not doc or change.get("deleted"):
                        continue
                    if doc.get("type") == "worker":
                        self.control.put(lambda doc=doc: self._peer_record_seen(doc))
                    elif not self._known(doc):
                        self.control.put(lambda doc=doc, seq=since: self._seen(doc, seq))
                    backoff = 0.5
            except Exception as exc:  # an outage, or anything else: the feed must go on
                if self.stopping.is_set():
                    return
                level = logging.WARNING if isinstance(exc, Unreachable) else logging.ERROR
                log.log(level, "changes feed interrupted (%s); resuming in %.1fs", exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    # -- decisions ---------------------------------------------------------------
    def _known(self, doc: Doc) -> bool:
        """On the feed thread: an echo of our own write, or a version already seen?
        Only a shortcut (the control thread checks again); it keeps the echoes of
        a burst's writes out of the control queue."""
        if doc.get("_conflicts"):
            return False  # always the control thread's to resolve
        state = self.states.get(doc["_id"])
        if state is not None and state.doc["_rev"] == doc["_rev"]:
            # Unless the version we hold was conflicted: the same revision without its
            # conflict (the other side deleted the losers) is to be decided on now.
            return not state.doc.get("_conflicts")
        known = tasks.rev_number(state.doc["_rev"]) if state is not None else 0
        # Strictly older only: a sibling of the same generation (a conflict's other
        # side, after a replication) is news.
        return tasks.rev_number(doc["_rev"]) < max(known, self.forgotten.get(doc["_id"], 0))

    def _seen(self, doc: Doc, seq: Any = None, fresh: bool = False) -> None:
        """A version of a task, from the feed or (fresh=True) just read from a view."""
        if seq is not None:
            self.last_seq = seq
            self._note_peer_write(doc)
        task_id = doc["_id"]
        state = self.states.get(task_id)
        conflicted = bool(doc.get("_conflicts"))
        if state is None:
            ended = doc.get("status") in tasks.FINAL or doc.get("status") == "err"
            if ended and not conflicted:
                return
            if self.unstorable.get(task_id) == doc["_rev"]:
                return  # CouchDB refused to store this version once: it would again
            if (
                not fresh
                and not conflicted
                and tasks.rev_number(doc["_rev"]) < self.forgotten.get(task_id, 0)
            ):
                return
            state = self.states[task_id] = TaskState(doc, resolving=ended)
        elif doc["_rev"] == state.doc["_rev"] and not conflicted:
            if not state.doc.get("_conflicts"):
                return  # an echo of our own write
            # else its conflict is gone (the losers deleted on the other side): decide
        elif tasks.rev_number(doc["_rev"]) < tasks.rev_number(state.doc["_rev"]):
            return  # an older version
        if state.writing:
            state.newer = doc
            return
        state.doc = doc
        self._act_on(task_id, state)

    def _act_on(self, task_id: str, state: TaskState) -> None:
        """Decide on the task's current version; a conflicted one is resolved first."""
        if state.doc.get("_conflicts"):
            if self._claims_first(task_id):
                return self._resolve_conflict(task_id, state)
            # The instance that claims it first resolves it (two resolving at once,
            # on two replicas, would make a new conflict); we do if it has not.
            return self._recheck_later(task_id, delay=CLAIM_FALLBACK)
        self._decide(task_id, state)

    def _resolve_conflict(self, task_id: str, state: TaskState) -> None:
        """Two writes both landed (replicated nodes, a partitioned cluster): keep
        CouchDB's winner, record the losers on it, delete them, decide again.

        The losers are deleted only once the winner recording them has landed: when
        that write is refused (the winner moved on meanwhile, e.g. the other replica
        finished the run), the conflict is still there and is resolved again on the
        newer version, so no duplicate run goes unrecorded."""
        winner = state.doc
        try:
            found = self.db.revisions(task_id, winner["_conflicts"])
        except CouchError as exc:
            log.warning("task %s: could not read its conflicting revisions (%s)", task_id, exc)
            return self._recheck_later(task_id)
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
            for loser in losers:
                self.writer.write(loser, lambda row: None)
            return self._decide(task_id, state)
        if updated.get("status") != winner.get("status"):
            log.info("task %s: a losing revision ended the run the winner has under way", task_id)
            state.resolving = True  # that run's end, not ours: forgotten once written
        state.losers = losers
        self._write(task_id, updated)

    def _decide(self, task_id: str, state: TaskState) -> None:
        doc = state.doc
        if doc.get("worker") != self.name and state.local is Local.NONE:
            return self._forget(task_id)  # reassigned to another worker name meanwhile
        owner = doc.get("owner")
        if (
            doc.get("status") in ("scheduled", "running")
            and owner not in (None, self.instance)
            and owner not in self.leases
            and state.local is Local.NONE
        ):
            # Held by an instance we have not heard of (it may have just started):
            # read the records again before deciding whether it is alive.
            self.awaiting_peers.add(task_id)
            self.peers_wanted.set()
            return
        step = tasks.next_step(
            doc,
            self.instance,
            state.local,
            owner_alive=self._owner_alive,
            within_horizon=tasks.parse_date(doc["date"]) <= tasks.now() + self.horizon,
        )
        if step is Step.CLAIM:
            if self.stopping.is_set():
                return self._forget(task_id)
            if doc.get("status") in ("waiting", "reschedule"):
                if not self._claims_first(task_id):
                    # Another live instance claims this one first; take it only if it
                    # does not and we have room, or, after a while, if nobody did.
                    return self._claim_later(task_id, CLAIM_FALLBACK, anyway=False)
                if not self._has_room_for(doc):
                    # We could not start it on time: leave it to a peer with room for
                    # a moment, and claim it anyway (late beats never) if none takes it.
                    return self._claim_later(task_id, 2 * CLAIM_FALLBACK, anyway=True)
            elif not self._claims_first(task_id):
                # A dead instance's claim: the live instance it now falls to takes it
                # over, the others only if that one has not after a moment.
                return self._claim_later(task_id, CLAIM_FALLBACK, anyway=True)
            self._unhold(task_id, state)
            if doc.get("status") == "scheduled":
                log.warning("task %s: taking it over from %s, whose lease ran out", task_id, owner)
            self._claim(task_id, state)
        elif step is Step.HOLD:
            if self.stopping.is_set():
                return self._write(task_id, tasks.hand_back_update(doc))
            due = tasks.parse_date(doc["date"])
            try:
                state.policy, state.invalid = runs.policy_of(doc), None
            except ValueError as exc:  # the shape was fine (CouchDB checked it), the meaning not
                state.policy, state.invalid = None, str(exc)
                due = tasks.now()  # fail it now rather than at its date
            if state.policy is not None and due < tasks.now():
                plan = runs.overdue_plan(doc, state.policy, tasks.now())
                if plan is not None and plan.next_date is not None:
                    log.info("task %s: late; its misfire policy moves it on", task_id)
                    return self._write(task_id, runs.moved_update(doc, plan))
                if plan is not None:  # nothing of the series is left to run
                    state.ends_without_run = runs.skipped_fields(doc, plan)
            state.local, state.run_at = Local.HELD, due
            self.pool.hold(task_id, due.timestamp())
            self.timer.schedule(
                due - self._commit_lead(),
                lambda: self.control.put(lambda: self._commit(task_id)),
                key=task_id,
            )
        elif step is Step.RELEASE:
            self._unhold(task_id, state)
            self._write(task_id, tasks.hand_back_update(doc))
        elif step is Step.CANCEL:
            self._unhold(task_id, state)
            if state.local is Local.RUNNING:  # the timer started it a moment ago
                return self._decide(task_id, state)  # -> cancel after the run
            self._write(task_id, tasks.canceled_update(doc, tasks.now()))
        elif step is Step.CANCEL_AFTER_RUN:
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
        elif step is Step.LOST:
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
            self._write(task_id, lost)  # err, or waiting for its retry or next occurrence
        elif step is Step.FORGET:
            self._forget(task_id)

    def _claim(self, task_id: str, state: TaskState) -> None:
        """Claim the task (write `scheduled`). One whose commit would be due at once is
        claimed and committed in one write (`waiting` -> `running`): a burst's late
        claims and a task due now cost one write and one round trip, not two."""
        doc, now = state.doc, tasks.now()
        claim = tasks.claim_update(doc, self.instance, now)
        due = tasks.parse_date(doc["date"])
        commits, policy = self._claim_commits(task_id, doc, due, now)
        if not commits:
            return self._write(task_id, claim)
        state.policy, state.invalid = policy, None
        state.local, state.run_at = Local.HELD, due
        self.pool.hold(task_id, due.timestamp())
        self.pool.commit(task_id)
        self._write(task_id, tasks.running_update(claim, self.instance))

    def _claim_commits(
        self, task_id: str, doc: Doc, due: datetime, now: datetime
    ) -> tuple[bool, runs.Policy | None]:
        """Whether the task's claim commits its run too, and the run's policy. Only a
        `waiting` task due within the commit lead, with a pool slot free for it, whose
        run needs no misfire decision (an overdue repeat is held first, then decided)."""
        if (
            not self.claim_commits
            or doc.get("status") != "waiting"
            or due - self._commit_lead() > now
            or task_id in self.pool.committing
            or self.stopping.is_set()
        ):
            return False, None
        try:
            policy = runs.policy_of(doc)
        except ValueError:
            return False, None  # held, then failed with the reason
        if due < now and runs.overdue_plan(doc, policy, now) is not None:
            return False, None
        until_run = max((due - now).total_seconds(), 0.0)
        return self.pool.can_commit(until_run + ON_TIME, time.monotonic()), policy

    def _recheck_later(self, task_id: str, delay: float = 1.0) -> None:
        at = tasks.now() + timedelta(seconds=delay)
        action = lambda: self.control.put(lambda: self._recheck(task_id, delay))  # noqa: E731
        self.timer.schedule(at, action, key=("recheck", task_id))

    def _recheck(self, task_id: str, delay: float) -> None:
        """Read a task again (after a failed read, a conflict), and act on what it is now."""
        state = self.states.get(task_id)
        if state is None or state.writing:
            return
        try:
            latest = self.db.get(task_id, conflicts=True)
        except CouchError:
            return self._recheck_later(task_id, min(delay * 2, 30.0))
        if latest is None:
            return self._forget(task_id)
        if latest.get("_conflicts"):
            state.doc = latest
            return self._resolve_conflict(task_id, state)
        if latest["_rev"] == state.doc["_rev"] and not state.doc.get("_conflicts"):
            return  # the feed brought it meanwhile, and it was decided on
        state.doc = latest
        self._decide(task_id, state)

    def _commit_lead(self) -> timedelta:
        """How long before its date a run is committed (`running` written): longer
        when many tasks are held, so a burst's writes are done before it is due."""
        return self.lead + timedelta(seconds=min(5.0, len(self.timer) / 4000))

    def _first_claimer(self, task_id: str) -> str:
        """The live instance that claims this task at once. Rendezvous hashing: each
        instance scores the task, the highest score wins, so when an instance joins
        or leaves only its own share moves (the peers agree on the rest meanwhile)."""
        order = self.claim_order
        if len(order) < 2:
            return order[0]
        first = self.first_claimers.get(task_id)
        if first is None:  # asked again at every fallback while a peer works through a burst
            # A real hash: a CRC is linear, and its scores would split the tasks unevenly.
            first = self.first_claimers[task_id] = max(
                order,
                key=lambda instance: hashlib.blake2b(
                    f"{instance}\0{task_id}".encode(), digest_size=8
                ).digest(),
            )
        return first

    def _claims_first(self, task_id: str) -> bool:
        """Instances of one name share the claiming: each task has one live instance
        that claims it at once, so they do not all race for every task."""
        return self._first_claimer(task_id) == self.instance

    def _note_peer_write(self, doc: Doc) -> None:
        """A task another instance wrote, from the feed: that instance is at work."""
        owner = doc.get("owner")
        if owner is not None and owner != self.instance:
            self.peer_active[owner] = time.monotonic()

    def _expect_echo(self, task_id: str) -> None:
        """A write of the task is sent: the feed should bring it back soon."""
        with self.echo_lock:
            self.echoes.pop(task_id, None)
            self.echoes[task_id] = time.monotonic()

    def _forget_echo(self, task_id: str) -> None:
        with self.echo_lock:
            self.echoes.pop(task_id, None)

    def _news_late(self) -> bool:
        """Is our news more than half a fallback late: a write of ours sent that long
        ago has not come back on the feed yet (the server or the feed lags)?"""
        now = time.monotonic()
        with self.echo_lock:
            while self.echoes:  # an echo that never comes (the task left this worker)
                task_id, acknowledged = next(iter(self.echoes.items()))
                if now - acknowledged < ECHO_GIVEN_UP:
                    return now - acknowledged > CLAIM_FALLBACK / 2
                del self.echoes[task_id]
        return False

    def _first_claimer_may_be_at_work(self, task_id: str) -> bool:
        """Is the task another instance's to claim first, and may that instance be
        claiming it now: it wrote tasks within the last CLAIM_FALLBACK seconds, or
        our news (feed, control queue) is too late to tell?"""
        first = self._first_claimer(task_id)
        if first == self.instance:
            return False
        if time.monotonic() - self.peer_active.get(first, -math.inf) < CLAIM_FALLBACK:
            return True
        # While we ourselves have many writes in flight, it is a burst: peers have theirs.
        in_flight = len(self.echoes) > NEWS_BACKLOG
        return in_flight or self._news_late() or self.control.qsize() > NEWS_BACKLOG

    def _has_room_for(self, doc: Doc) -> bool:
        """Could this instance start the task on time, besides what it holds?"""
        due = tasks.parse_date(doc["date"]).timestamp()
        return self.pool.can_claim(due, tasks.now().timestamp(), time.monotonic())

    def _claim_later(self, task_id: str, delay: float, anyway: bool) -> None:
        """Claim the task after `delay` seconds if it is still free then. One sweep looks
        at all such tasks: a burst defers thousands (each another instance's to claim
        first), and a timer each cost most of an instance's CPU."""
        self.deferred[task_id] = (time.monotonic() + delay, anyway)
        self._sweep_later()

    def _sweep_later(self) -> None:
        if self.deferred and not self.deferred_sweep:
            self.deferred_sweep = True
            at = tasks.now() + timedelta(seconds=DEFERRED_SWEEP)
            self.timer.schedule(at, lambda: self.control.put(self._sweep_deferred))

    def _sweep_deferred(self) -> None:
        """On the control thread: the deferred claims whose time has come."""
        self.deferred_sweep = False
        now = time.monotonic()
        due = [(task_id, anyway) for task_id, (at, anyway) in self.deferred.items() if at <= now]
        for task_id, anyway in due:
            del self.deferred[task_id]
            self._claim_if_still_free(task_id, anyway)  # which may defer it again
        self._sweep_later()

    def _claim_if_still_free(self, task_id: str, anyway: bool) -> None:
        state = self.states.get(task_id)
        if state is None or state.writing or state.local is not Local.NONE:
            return
        status, owner = state.doc.get("status"), state.doc.get("owner")
        taking_over = status == "scheduled" and owner is not None and not self._owner_alive(owner)
        if (status not in ("waiting", "reschedule") and not taking_over) or self.stopping.is_set():
            return
        if self._first_claimer_may_be_at_work(task_id):
            # Its instance is alive and still claiming (a burst), or our news is too
            # late to tell: it gets to this one soon, and racing it makes conflicts.
            return self._claim_later(task_id, CLAIM_FALLBACK, anyway)
        if anyway or self._has_room_for(state.doc):
            if taking_over:
                log.warning("task %s: taking it over from %s, whose lease ran out", task_id, owner)
            self._claim(task_id, state)
        else:  # no room here either: the instance it belongs to claims it meanwhile, or we do
            self._claim_later(task_id, 2 * CLAIM_FALLBACK, anyway=True)

    def _unhold(self, task_id: str, state: TaskState) -> None:
        with self.start_lock:  # not while the timer thread is starting it
            if state.local in (Local.HELD, Local.COMMITTED):
                self.timer.cancel(task_id)
                state.local = Local.NONE
                self.pool.release(task_id)

    def _forget(self, task_id: str) -> None:
        state = self.states.pop(task_id, None)
        self.first_claimers.pop(task_id, None)
        if state is not None:
            self.timer.cancel(task_id)
            self.deferred.pop(task_id, None)  # a peer claimed it: no fallback to try
            self.pool.release(task_id)
            # Versions the feed read before we forgot it may still be queued: ignore them.
            self.forgotten[task_id] = tasks.rev_number(state.doc["_rev"])
            if len(self.forgotten) > FORGOTTEN:
                self.forgotten.popitem(last=False)

    # -- writes --------------------------------------------------------------------
    def _write(self, task_id: str, doc: Doc, within: float = 0.0) -> None:
        state = self.states[task_id]
        state.writing = True
        self._expect_echo(task_id)
        self.writer.write(
            doc, lambda row: self.control.put(lambda: self._written(task_id, doc, row)), within
        )

    def _written(self, task_id: str, doc: Doc, row: dict[str, Any]) -> None:
        state = self.states.get(task_id)
        if state is None:
            return
        state.writing = False
        newer, state.newer = state.newer, None
        losers, state.losers = state.losers, []
        if row.get("error"):
            self._forget_echo(task_id)  # refused: the feed may have nothing new to bring
        if row.get("error") and doc.get("status") == "running":
            self.pool.uncommit(task_id)  # the commit did not land: its slot is free again
            self._commit_waiting()
            if state.doc["status"] == "waiting":  # a claim that commits: nothing is held
                self._unhold(task_id, state)
                if row.get("error") == "forbidden" and not self._claim_commits_still_allowed():
                    if newer and _is_news(newer, state.doc):
                        state.doc = newer
                    return self._act_on(task_id, state)  # claimed again, in two writes
        if not row.get("error"):
            for loser in losers:  # recorded on the winner now: delete them
                self.writer.write(loser, lambda row: None)
            state.doc = {**doc, "_rev": row["rev"]}
            self._after_write(task_id, state)
            if newer and _is_news(newer, state.doc):
                if task_id in self.states:
                    state.doc = newer
                    self._act_on(task_id, state)
                elif newer.get("_conflicts"):  # ended and forgotten, but in conflict
                    self._seen(newer, fresh=True)
        elif refused_as_is(row) and not (newer and _is_newer(newer, doc)):
            self._unstorable(task_id, state, row)
        elif row.get("error") == "conflict" and not (newer and _is_newer(newer, doc)):
            # Someone else wrote first (another instance's claim, a client's cancel):
            # the feed brings that version in a moment; read it ourselves only if not.
            self._recheck_later(task_id, delay=5.0)
        elif (latest := self._changed_since(task_id, doc, newer, row)) is not None:
            state.doc = latest
            self._act_on(task_id, state)
        else:
            self._forget(task_id)
        self._maybe_finish_stop()

    def _unstorable(self, task_id: str, state: TaskState, row: dict[str, Any]) -> None:
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
        self._forget(task_id)

    def _claim_commits_still_allowed(self) -> bool:
        """After a claim that commits was refused: read the design doc again, in case an
        older one was pushed while we ran."""
        try:
            design = self.db.get(f"_design/{DDOC}")
        except CouchError as exc:
            log.warning("could not read the design document (%s)", exc)
            return True
        return design is None or self._read_claim_commits(design)

    def _changed_since(
        self, task_id: str, written: Doc, newer: Doc | None, row: dict[str, Any]
    ) -> Doc | None:
        """After a refused write: the task's newer version if someone changed it since
        the revision the write was based on, else None (the refusal is logged).

        CouchDB answers such a stale write with 409; PouchDB Server runs
        validate_doc_update first and may answer 403, so both are checked the same way.
        """
        try:
            latest = (
                newer
                if newer and _is_newer(newer, written)
                else self.db.get(task_id, conflicts=True)
            )
        except CouchError as exc:
            log.warning("task %s: could not re-read it (%s); retrying", task_id, exc)
            self._recheck_later(task_id)
            return None
        if latest is not None and latest["_rev"] != written["_rev"]:
            log.info("task %s changed under us (%s); deciding again", task_id, row.get("error"))
            return latest
        if latest is not None:  # a real refusal: report it, never loop on it
            log.error(
                "task %s: write refused: %s: %s", task_id, row.get("error"), row.get("reason")
            )
        return None

    def _after_write(self, task_id: str, state: TaskState) -> None:
        status = state.doc["status"]
        if status == "running" and state.local is Local.HELD:  # our commit landed
            state.local = Local.COMMITTED
            due = state.run_at or tasks.parse_date(state.doc["date"])
            # Handed to a pool thread a moment early; that thread starts the job at `due`.
            start = due - timedelta(seconds=START_EARLY)
            self.timer.schedule(start, lambda: self._start_now(task_id), key=task_id)
        elif status in ("done", "err", "canceled") and state.resolving:
            self._forget(task_id)  # a conflict resolved on a task that had ended already
        elif status in ("done", "err", "canceled"):
            if status == "done":
                self.stats.done += 1
            elif status == "err":
                self.stats.failed += 1
            else:
                self.stats.canceled += 1
            log.info("task %s %s", task_id, status)
            self._forget(task_id)
        else:  # a claim (-> HOLD), a hand-back, a conflict resolution: act on what it is now
            self._decide(task_id, state)

    # -- running -------------------------------------------------------------------
    def _commit(self, task_id: str) -> None:
        """Shortly before the due time: write `running` so the start is not delayed by it.

        Only when a pool slot will be free for it: `running` means the job is about
        to start, and a crash never turns a run that had not begun into "worker
        lost". Otherwise it waits, still `scheduled`, for a run to end.
        """
        state = self.states.get(task_id)
        if (
            state is None
            or state.local is not Local.HELD
            or state.writing
            or self.stopping.is_set()
            or task_id in self.pool.committing
        ):
            return
        run_at = state.run_at or tasks.parse_date(state.doc["date"])
        until_run = max((run_at - tasks.now()).total_seconds(), 0.0)
        if not self.pool.can_commit(until_run + ON_TIME, time.monotonic()):
            self._slot_order += 1
            heapq.heappush(self.slot_wait, (run_at.timestamp(), self._slot_order, task_id))
            return
        self.pool.commit(task_id)
        # Made ahead of the date, it may wait up to half the time left to share a request.
        within = min(SHARE_WINDOW, until_run / 2)
        self._write(task_id, tasks.running_update(state.doc, self.instance), within)

    def _commit_waiting(self) -> None:
        """Commit the runs that waited for a slot, oldest date first, while there is room."""
        while self.slot_wait and self.pool.can_commit(ON_TIME, time.monotonic()):
            _, _, task_id = heapq.heappop(self.slot_wait)
            self._commit(task_id)

    def _start_now(self, task_id: str) -> None:
        """On the timer thread, at the due time: start the job straight away.

        This is the one state change made outside the control thread, so that a
        start never waits behind the control queue; `start_lock` orders it with
        the control thread's moves out of COMMITTED (a cancel, a stop).
        """
        with self.start_lock:
            state = self.states.get(task_id)
            ready = (
                state is not None
                and state.local is Local.COMMITTED
                and not state.writing
                and not self.stopping.is_set()
            )
            if ready:
                state.local, state.spawned = Local.RUNNING, []
                self.pool.started(task_id, time.monotonic())
        if not ready:
            self.control.put(lambda: self._start(task_id))  # let the control thread decide
            return
        self.executor.submit(self._execute, task_id, state)
        if state.policy is not None and state.policy.overlap == "allow":
            occurrence = runs.occurrence_of(state.doc)
            self.control.put(lambda: self._plan_overlap(task_id, state, occurrence))

    def _start(self, task_id: str) -> None:
        """At the due time, on the control thread: what `_start_now` left to it."""
        state = self.states.get(task_id)
        if state is not None and state.local is Local.COMMITTED and state.writing:
            # A write of the task is in flight (a conflict's resolution): look again in
            # a moment rather than drop the start, which would leave it `running` forever.
            at = tasks.now() + timedelta(seconds=WRITE_WAIT)
            self.timer.schedule(at, lambda: self._start_now(task_id), key=task_id)
            return
        if state is None or state.local is not Local.COMMITTED:
            return
        if self.stopping.is_set():
            state.local = Local.NONE
            self.pool.release(task_id)
            return self._write(task_id, tasks.hand_back_update(state.doc))
        state.local, state.spawned = Local.RUNNING, []
        self.pool.started(task_id, time.monotonic())
        self.executor.submit(self._execute, task_id, state)
        if state.policy is not None:
            self._plan_overlap(task_id, state, runs.occurrence_of(state.doc))

    def _plan_overlap(self, task_id: str, state: TaskState, after: datetime) -> None:
        """overlap "allow": when the next occurrence comes while the job still runs,
        it runs as a task of its own rather than being skipped."""
        assert state.policy is not None
        occurrence = runs.next_overlapping(state.doc, state.policy, after, len(state.spawned))
        if occurrence is not None:
            action = lambda: self.control.put(lambda: self._spawn(task_id, occurrence))  # noqa: E731
            self.timer.schedule(occurrence, action, key=("overlap", task_id))

    def _spawn(self, task_id: str, occurrence: datetime) -> None:
        state = self.states.get(task_id)
        if state is None or state.local is not Local.RUNNING:
            return
        child = runs.spawned_task(state.doc, occurrence)
        log.info(
            "task %s still runs at its next occurrence: running that one as a new task", task_id
        )
        self.writer.write(child, lambda row: self._spawned(task_id, row))
        state.spawned.append(occurrence)
        self._plan_overlap(task_id, state, occurrence)

    def _spawned(self, task_id: str, row: dict[str, Any]) -> None:
        if row.get("error"):
            log.error("task %s: its overlapping occurrence was refused: %s", task_id, row)

    def _execute(self, task_id: str, state: TaskState) -> None:
        """On an executor thread: run the job and post its outcome."""
        doc, policy = state.doc, state.policy
        job = doc["job"]
        context = JobContext(
            task_id=task_id,
            attempt=int(doc.get("attempt", 1)),
            worker=self.name,
            idempotency_key=runs.idempotency_key(doc),
        )
        if state.run_at is not None:
            wait_until(state.run_at.timestamp())  # the timer handed it over a moment early
        began, started = time.monotonic(), tasks.now()
        try:
            if state.invalid is not None:
                raise ValueError(state.invalid)
            if state.ends_without_run is not None:
                outcome = {**tasks.outcome_fields(started, started), **state.ends_without_run}
                outcome["result"] = "the repeat ended while no worker could run it"
            elif policy is not None and policy.timeout is not None:
                result = run_job_in_process(
                    self.config.jobs.resolve(),
                    job["name"],
                    list(job.get("arguments", [])),
                    context,
                    policy.timeout.total_seconds(),
                    started=lambda process: setattr(state, "process", process),
                )
                outcome = tasks.outcome_fields(started, tasks.now(), result=result)
            else:
                fn = self.jobs.load(job["name"])
                result = run_job(fn, list(job.get("arguments", [])), context)
                outcome = tasks.outcome_fields(started, tasks.now(), result=result)
        except BaseException as exc:  # a job's failure is the task's, never the worker's
            outcome = tasks.outcome_fields(started, tasks.now(), error=exc)
            if not isinstance(exc, Exception):
                log.warning("task %s: job %s raised %s", task_id, job["name"], type(exc).__name__)
        self.pool.ended(task_id, time.monotonic(), began=began)
        self.control.put(lambda: self._finished(task_id, outcome))

    def _finished(self, task_id: str, outcome: dict[str, Any]) -> None:
        self._commit_waiting()  # a slot is free
        state = self.states.get(task_id)
        if state is None:
            return
        state.local = Local.NONE
        state.process = None
        self.timer.cancel(("overlap", task_id))
        if state.cancel_requested and outcome.get("error"):
            outcome["error"]["message"] = "canceled while running: " + outcome["error"]["message"]
        if state.writing:  # cannot happen in practice; keep the outcome for the next version
            state.newer = state.newer or state.doc
        self._write_outcome(task_id, state, outcome)

    def _write_outcome(self, task_id: str, state: TaskState, outcome: dict[str, Any]) -> None:
        policy = state.policy or NO_POLICY
        doc = runs.after_run_update(state.doc, policy, outcome, tasks.now(), spawned=state.spawned)
        state.writing = True
        self._expect_echo(task_id)

        def on_result(row: dict[str, Any]) -> None:
            self.control.put(lambda: self._outcome_written(task_id, doc, outcome, row))

        self.writer.write(doc, on_result, SHARE_WINDOW)

    def _outcome_written(
        self, task_id: str, doc: Doc, outcome: dict[str, Any], row: dict[str, Any]
    ) -> None:
        state = self.states.get(task_id)
        if state is None:
            return
        state.writing = False
        newer, state.newer = state.newer, None
        if row.get("error"):
            self._forget_echo(task_id)
        refused_before = (outcome.get("error") or {}).get("type") == tasks.REFUSED_OUTCOME
        if refused_as_is(row) and not refused_before and not (newer and _is_newer(newer, doc)):
            # The outcome cannot be stored (too large, not valid JSON): the run fails
            # with what CouchDB refused, so the task does not stay `running` for good.
            log.error(
                "task %s: CouchDB refused its outcome (%s: %s); the run fails with that",
                task_id,
                row.get("error"),
                row.get("reason"),
            )
            return self._write_outcome(task_id, state, tasks.refused_outcome(outcome, row))
        if refused_as_is(row) and not (newer and _is_newer(newer, doc)):
            self._unstorable(task_id, state, row)  # even the failure: too large
            return self._maybe_finish_stop()
        if not row.get("error"):
            state.doc = {**doc, "_rev": row["rev"]}
            self._after_write(task_id, state)  # final: forgotten; a retry or repeat: claimed
            if newer and newer.get("_conflicts") and _is_news(newer, state.doc):
                # A replica's write landed beside ours meanwhile: the conflict is still
                # to be resolved, though the run has ended (no later news may come).
                self._seen(newer, fresh=True)
        elif (latest := self._changed_since(task_id, doc, newer, row)) is not None:
            state.doc = latest
            if latest.get("status") in ("running", "cancel"):
                # Changed while the job ran (a cancel): record the outcome on the newest version.
                return self._write_outcome(task_id, state, outcome)
            if latest.get("_conflicts"):
                # Ended by a replica's write, beside ours (a duplicate run): resolving the
                # conflict records ours on the task; forgetting it would leave both.
                state.resolving = True
                return self._act_on(task_id, state)
            self._forget(task_id)
        else:
            self._forget(task_id)
        self._maybe_finish_stop()

    # -- local state file (for `after list`) ----------------------------------------
    def _write_state_file(self, force: bool = False, running: bool = True) -> None:
        """The local state file; while running, it also tells the CLI that start-up is over."""
        if self.state_file is None or (running and not self.ready.is_set()):
            return
        if not force and time.monotonic() - self._state_written < 1.0:
            return
        self._state_written = time.monotonic()
        state = {
            "name": self.name,
            "instance": self.instance,
            "pid": os.getpid(),
            "started": self.stats.started,
            "running": running,
            "url": self.server.display_url,
            "db": self.db.name,
            "held": sum(1 for s in self.states.values() if s.local is not Local.NONE),
            "done": self.stats.done,
            "failed": self.stats.failed,
            "canceled": self.stats.canceled,
            "updated": time.time(),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)


def _is_newer(doc: Doc, than: Doc) -> bool:
    return tasks.rev_number(doc["_rev"]) > tasks.rev_number(than["_rev"])


def _is_news(doc: Doc, than: Doc) -> bool:
    """A later version, or a conflicted one of the same generation (a replica's write
    that won over ours, or ours with a replica's beside it): to be acted on."""
    if doc.get("_conflicts"):
        return tasks.rev_number(doc["_rev"]) >= tasks.rev_number(than["_rev"])
    return _is_newer(doc, than)
