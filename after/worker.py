"""The worker: one instance of a worker name, wired from its parts.

A task's life, in the order it happens, and where each step lives:

1. after.feed: the start-up read and the changes feed bring a version of a task;
2. `Worker.seen` / `decide`: a pure decision on it (after.tasks.next_step);
3. after.claiming: the claim (`scheduled`, or `running` at once when due now);
4. after.runner: held in the timer, committed (`running`), run, its outcome;
5. after.runs: what the outcome makes of it (done, err, a retry, the next occurrence);
6. after.writes: every write and what its answer means (after.quorum: one a cluster
   node stored without its quorum);
7. after.conflicts: conflicting revisions between replicas resolved;
8. after.membership: the instance's record and lease, its peers, takeovers.

Threads, none of which blocks another:

- control: the only thread that changes the worker's state. Everything else
  posts a function to its queue, so no locks are needed and the order of
  events for one task is the order they happened in.
- feed: follows the filtered changes feed (`include_docs`) and posts each doc.
- writer: sends writes through `_bulk_docs`; writes that arrive while a batch
  is in flight go out together in the next one.
- timer (after.scheduler): commits `running` shortly before each due time and
  starts the job at the due time.
- executor: runs the jobs.
- lease and housekeeping: the instance's lease, the peers' leases and the horizon.
- leaf reader (after.quorum, on a cluster only): reads the leaves of committed
  tasks, many in one request, before their jobs start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from after import records, runs, tasks
from after.capacity import Pool
from after.claiming import Claiming
from after.config import Config, with_credentials
from after.conflicts import Conflicts
from after.couch import BulkWriter, CouchError, NotFound, Server
from after.feed import DDOC, Feed
from after.jobs import JobLoader, stop_job_process
from after.membership import CLAIM_FALLBACK, Membership
from after.quorum import Quorum
from after.runner import Runner
from after.scheduler import Scheduler
from after.tasks import Doc, Local, Step, TaskState
from after.writes import Writes

log = logging.getLogger("after.worker")

FORGOTTEN = 10_000  # ids (and last revisions) of tasks let go, to ignore stale versions
SIGNAL_LOOK = 0.25  # seconds between the control loop's looks at a signal's stop flag
WRITER_DRAIN = 30.0  # seconds a shutdown gives the writer to send what is queued

__all__ = ["TaskState", "Worker"]


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
        self.control: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self.states: dict[str, TaskState] = {}
        self.stats = Stats()
        self.stopping = threading.Event()
        # Set by a signal handler, which must take no lock (it may run while this thread
        # holds the control queue's): the control loop turns it into stop().
        self.stop_signaled = False
        # True once a graceful stop has handed back all it held and every run ended: only
        # then is the record marked stopped. Any other exit leaves the tasks it held to
        # be taken over (records.abandoned).
        self.stopped_cleanly = False
        self.finished = threading.Event()  # set once the worker has shut down
        # Orders the timer thread's start of a run with the control thread's moves out
        # of COMMITTED (a cancel, a stop): after.runner.Runner.start_now.
        self.start_lock = threading.Lock()
        self.keeper: threading.Thread | None = None
        self.ready = threading.Event()
        self.last_seq: Any = None
        self._state_written = 0.0
        self._held = 0
        self.forgotten: OrderedDict[str, int] = OrderedDict()
        # Tasks whose run this instance started (the latest FORGOTTEN of them).
        self.started_runs: OrderedDict[str, None] = OrderedDict()
        # The parts, in the order a task meets them.
        self.feed = Feed(self)
        self.membership = Membership(self)
        self.claiming = Claiming(self)
        self.runner = Runner(self)
        self.writes = Writes(self)
        self.conflicts = Conflicts(self)
        self.quorum = Quorum(self)

    @property
    def server_url(self) -> str:
        """The URL of the node in use, with our credentials, for jobs that use the
        worker's own CouchDB (JobContext.couchdb_url)."""
        return with_credentials(self.server.url, self.config.user, self.config.password)

    # -- life cycle --------------------------------------------------------------
    def run(self) -> None:
        """Run until stop() (or SIGTERM/SIGINT when installed by the CLI)."""
        since = self._check_database()
        self.membership.renew_record()  # our record exists before our first claim
        self.membership.set_leases(self.membership.read_leases()[0])
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
        self.keeper = threading.Thread(
            target=self.membership.renew, name="after-lease", daemon=True
        )
        self.keeper.start()
        threading.Thread(target=self._housekeep, name="after-housekeeping", daemon=True).start()
        try:
            while True:
                if self.stop_signaled and not self.stopping.is_set():
                    self.stop()
                try:
                    action = self.control.get(timeout=SIGNAL_LOOK)
                except queue.Empty:
                    action = self.runner.commit_waiting  # run times measured may make room
                if action is None:
                    break
                try:
                    action()
                    self._write_state_file()  # what the last burst of events changed
                except Exception:  # one bad event must not stop the worker
                    log.exception("internal error while handling an event; continuing")
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the worker to stop: held tasks are handed back, running jobs finish."""
        if not self.stopping.is_set():
            self.stopping.set()
            self.control.put(self._begin_stop)

    def install_signal_handlers(self) -> None:
        """The first SIGTERM/SIGINT stops gracefully; a second one stops at once
        (held tasks are then taken over by other instances when the lease runs out)."""

        def on_signal(signum: int, frame: object) -> None:
            # Only a flag and a raw write: the handler runs between two bytecodes of the
            # main thread, which may hold a lock of the control queue or of logging.
            if self.stop_signaled or self.stopping.is_set():
                os.write(2, b"second signal: stopping at once, without waiting for jobs\n")
                os._exit(1)
            self.stop_signaled = True

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
        self.claiming.read_claim_commits(design)
        self.quorum.copies = int((info.get("cluster") or {}).get("n", 1))
        return info["update_seq"]

    def _start_up(self, since: Any) -> None:
        """On its own thread: read the current state, then follow the changes feed
        from `since`, the sequence taken before that read (so nothing is missed).

        Each page read goes to the control thread at once, so the first due tasks
        are claimed and run while later pages are still being read.
        """
        backoff = 0.5
        while True:
            try:
                self.feed.read_current_state()
                break
            except Exception as exc:  # e.g. an outage: read it all again (seen() is idempotent)
                log.warning("start-up read failed (%s); reading again in %.1fs", exc, backoff)
                if self.stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
        feed = threading.Thread(
            target=self.feed.follow, args=(since,), name="after-feed", daemon=True
        )
        feed.start()
        self.ready.set()
        self.control.put(lambda: self._write_state_file(force=True))

    def _housekeep(self) -> None:
        """Watch the peers' leases, take over the dead ones' tasks, sweep the horizon."""
        membership = self.membership
        next_peers = next_sweep = time.monotonic()
        next_rescan = next_peers + self.lease.total_seconds()
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                now = time.monotonic()
                if now >= next_peers or membership.peers_wanted.is_set():
                    membership.peers_wanted.clear()
                    next_peers = now + self.heartbeat
                    alive, expired = membership.read_leases()
                    for record in expired:  # marked lost first: see Membership.take_over
                        alive[record["instance"]] = not membership.take_over(record)
                    self.control.put(lambda alive=alive: membership.leases_read(alive))
                if now >= next_sweep:
                    self.claiming.sweep_horizon()
                    next_sweep = now + self.sweep_every
                if now >= next_rescan:
                    membership.look_again_for_tasks_of_the_dead()
                    self.control.put(self.quorum.audit)
                    next_rescan = now + self.lease.total_seconds()
                backoff = 0.5
                wait = min(next_peers, next_sweep, next_rescan) - time.monotonic()
            except Exception as exc:  # a bad record or an outage: log, wait, go on
                log.warning("housekeeping failed (%s); retrying in %.1fs", exc, backoff)
                membership.peer_seen.clear()  # what we saw before the gap proves nothing now
                wait, backoff = backoff, min(backoff * 2, 30.0)
            if wait > 0:
                membership.peers_wanted.wait(wait)

    def _begin_stop(self) -> None:
        log.info("stopping: handing back held tasks, letting running jobs finish")
        self.hand_back_held()
        self.maybe_finish_stop()

    def hand_back_held(self) -> None:
        """Hand back every task held and not started (a stop, a lapsed lease), each
        on the revision we hold: a peer that took it over meanwhile wins."""
        for task_id, state in list(self.states.items()):
            if state.local in (Local.HELD, Local.COMMITTED) and not state.writing:
                self.unhold(task_id, state)
                if state.local is Local.NONE:  # not started meanwhile
                    self.writes.write(task_id, tasks.hand_back_update(state.doc))

    def maybe_finish_stop(self) -> None:
        if not self.stopping.is_set():
            return  # the usual case: no scan over every task on every write
        if not any(s.writing or s.local is Local.RUNNING for s in self.states.values()):
            self.stopped_cleanly = True
            self.control.put(None)

    def _shutdown(self) -> None:
        """End the threads, each within a bound, and say in the record how it ended."""
        clean = self.stopped_cleanly and not any(
            s.local is not Local.NONE for s in self.states.values()
        )
        if not clean:
            log.error(
                "worker %s is exiting on an error: what it held is left for its peers to take over",
                self.name,
            )
            for state in list(self.states.values()):
                if state.process is not None:  # a job in a child process would outlive us
                    stop_job_process(state.process)
        self.stopping.set()  # the feed, housekeeping and lease threads end too
        self.timer.stop(wait=False)
        # A graceful stop has let every run end already; an exit on an error does not
        # wait for jobs (their tasks are taken over).
        self.executor.shutdown(wait=clean, cancel_futures=True)
        self.writer.stop(timeout=WRITER_DRAIN)
        self.jobs.close()
        self.finished.set()
        self.membership.peers_wanted.set()  # wake the housekeeping thread from its wait
        if self.keeper is not None:
            self.keeper.join(timeout=self.heartbeat + 30)  # no renewal after "stopped"
        ended = records.stopped if clean else records.abandoned
        try:
            self.membership.put_record(ended(self.membership.record, tasks.now(), self.counts()))
        except CouchError as exc:
            log.warning("could not write how this instance ended in its record (%s)", exc)
        with contextlib.suppress(OSError):
            self._write_state_file(force=True, running=False)
        log.info(
            "worker %s stopped: %d done, %d failed, %d canceled",
            self.name,
            self.stats.done,
            self.stats.failed,
            self.stats.canceled,
        )

    def counts(self) -> dict[str, Any]:
        """What the instance record tells of this instance's work."""
        # Read from another thread while the control thread may change the dict.
        with contextlib.suppress(RuntimeError):
            self._held = sum(1 for s in list(self.states.values()) if s.local is not Local.NONE)
        return {
            "held": self._held,
            "done": self.stats.done,
            "failed": self.stats.failed,
            "canceled": self.stats.canceled,
            "last_seq": self.last_seq,
            "node": self.server.node_url,
        }

    # -- a version of a task: decide what to do (the control thread) -----------------------
    def seen(self, doc: Doc, seq: Any = None, fresh: bool = False) -> None:
        """A version of a task, from the feed or (fresh=True) just read from a view."""
        if seq is not None:
            self.last_seq = seq
            self.membership.note_peer_write(doc)
        task_id = doc["_id"]
        self.quorum.seen(task_id)
        state = self.states.get(task_id)
        conflicted = bool(doc.get("_conflicts"))
        if state is None:
            ended = doc.get("status") in tasks.FINAL or doc.get("status") == "err"
            if ended and not conflicted:
                return
            if self.writes.unstorable.get(task_id) == doc["_rev"]:
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
        self.act_on(task_id, state)

    def act_on(self, task_id: str, state: TaskState) -> None:
        """Decide on the task's current version; a conflicted one is resolved first."""
        if state.doc.get("_conflicts"):
            mine = state.doc.get("status") == "running" and state.doc.get("owner") == self.instance
            if mine or self.membership.claims_first(task_id):
                # Our own run's conflict is ours to resolve: we know if it began.
                return self.conflicts.resolve(task_id, state)
            # The instance that claims it first resolves it (two resolving at once,
            # on two replicas, would make a new conflict); we do if it has not.
            return self.conflicts.recheck_later(task_id, delay=CLAIM_FALLBACK)
        self.decide(task_id, state)

    def decide(self, task_id: str, state: TaskState) -> None:
        """The step after.tasks.next_step gives this version, carried out by its part."""
        doc = state.doc
        if doc.get("worker") != self.name and state.local is Local.NONE:
            return self.forget(task_id)  # reassigned to another worker name meanwhile
        if self.membership.await_owner(task_id, doc, state.local):
            return
        if self.runner.outcome_still_to_write(task_id, state):
            return
        step = tasks.next_step(
            doc,
            self.instance,
            state.local,
            owner_alive=self.membership.owner_alive,
            within_horizon=tasks.parse_date(doc["date"]) <= tasks.now() + self.horizon,
            started_here=task_id in self.started_runs,
        )
        if step is Step.CLAIM:
            self.claiming.consider(task_id, state)
        elif step is Step.HOLD:
            self.runner.hold(task_id, state)
        elif step is Step.RELEASE:
            self.unhold(task_id, state)
            self.writes.write(task_id, tasks.hand_back_update(doc))
        elif step is Step.CANCEL:
            self.unhold(task_id, state)
            if state.local is Local.RUNNING:  # the timer started it a moment ago
                return self.decide(task_id, state)  # -> cancel after the run
            if doc.get("owner") not in (None, self.instance) and runs.commit_unended(doc):
                # A dead instance's run, canceled: it may have begun, so it is recorded
                # as that run's end ("worker lost"), not dropped.
                return self.runner.lost(task_id, state)
            self.writes.write(task_id, tasks.canceled_update(doc, tasks.now()))
        elif step is Step.CANCEL_AFTER_RUN:
            self.runner.cancel_running(task_id, state)
        elif step is Step.LOST:
            self.runner.lost(task_id, state)
        elif step is Step.FORGET:
            self.forget(task_id)

    def unhold(self, task_id: str, state: TaskState) -> None:
        with self.start_lock:  # not while the timer thread is starting it
            if state.local in (Local.HELD, Local.COMMITTED):
                self.timer.cancel(task_id)
                state.local = Local.NONE
                self.pool.release(task_id)

    def run_started(self, task_id: str, state: TaskState) -> None:
        """A run of the task starts here (the timer or the control thread)."""
        state.run_doc = state.doc
        self.started_runs[task_id] = None
        while len(self.started_runs) > FORGOTTEN:
            self.started_runs.popitem(last=False)

    def forget(self, task_id: str) -> None:
        state = self.states.pop(task_id, None)
        self.membership.forget(task_id)
        self.conflicts.deferred.pop(task_id, None)
        if state is not None:
            self.timer.cancel(task_id)
            self.claiming.forget(task_id)
            self.pool.release(task_id)
            # Versions the feed read before we forgot it may still be queued: ignore them.
            self.forgotten[task_id] = tasks.rev_number(state.doc["_rev"])
            if len(self.forgotten) > FORGOTTEN:
                self.forgotten.popitem(last=False)

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
        try:
            tmp.write_text(json.dumps(state))
            tmp.replace(self.state_file)
        except OSError as exc:  # a full disk must not stop the worker: it is only for `list`
            log.warning("could not write the state file %s (%s)", self.state_file, exc)
