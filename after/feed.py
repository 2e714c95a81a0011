"""The feed: what a worker instance learns of its tasks, and how late it learns it.

At start-up the instance reads the current state of its active tasks through the
`by_worker` view, page by page (a small first page, so the first due tasks run
while later pages are read), then follows the filtered changes feed from the
sequence taken before that read, so nothing that changed in between is missed.
Each version goes to the control thread, which alone decides (after.worker).
Echoes of our own writes and versions older than what we know are dropped here,
on the feed thread, so that a burst's echoes stay out of the control queue.

The feed also tells how late this instance's news is: a write of ours that has
not come back on the feed yet (`news_late`), which the claim sharing between
instances of one name takes into account (after.membership).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from after import tasks
from after.couch import Unreachable
from after.tasks import Doc

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")

DDOC = "after"
# Rows of the first page read at start-up: small, so the first due tasks run soon.
FIRST_PAGE = 100
# Our writes not yet back on the feed beyond which this instance counts as busy with
# a burst (its news is late).
NEWS_BACKLOG = 100
ECHO_GIVEN_UP = 30.0  # seconds after which a write's echo is no longer expected


def worker_selector(name: str) -> dict[str, Any]:
    """What designdocs/after/filters/worker.js lets through, as a Mango selector: the
    worker's tasks and the records of its instances. On Apache CouchDB it is matched in
    Erlang, where the JavaScript filter costs a call to a JavaScript process per change
    and per follower."""
    return {
        "$or": [
            {"type": "worker", "name": name},
            {"type": "task", "worker": name},
            {"type": {"$exists": False}, "worker": name},
        ]
    }


def feed_filter(name: str, selectors: bool) -> dict[str, Any]:
    """The changes-feed parameters that bring one worker's documents."""
    if selectors:
        return {"selector": worker_selector(name)}
    return {"filter": f"{DDOC}/worker", "worker": name}


class Feed:
    """The start-up read and the changes feed of one worker instance."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        # Tasks we wrote whose version the feed has not brought back yet: id -> when the
        # write was sent (monotonic). The oldest tells how late our news is.
        self.echoes: OrderedDict[str, float] = OrderedDict()
        self.echo_lock = threading.Lock()
        # How the changes feed is filtered: the design document's filter until the
        # start-up read has asked the server whether it serves selector feeds.
        self.filter = feed_filter(worker.name, selectors=False)

    # -- start-up ------------------------------------------------------------------------
    def read_current_state(self) -> None:
        """The active tasks of this worker, paged, oldest first within each status.

        Waiting tasks are read only up to the horizon: later ones stay in the database
        until the horizon reaches them. Rescheduled ones are read whatever their date:
        a reschedule made while no instance ran is taken up now (one beyond the horizon
        is handed back as `waiting`, for the horizon sweep to find), never left as it is.
        """
        worker = self.worker
        selectors = worker.server.serves_selector_feeds()
        self.filter = feed_filter(worker.name, selectors)
        log.info("changes feed filtered by %s", "a selector" if selectors else "after/worker")
        count = 0
        horizon_end = tasks.iso(tasks.now() + worker.horizon)
        for status in tasks.ACTIVE:
            end = horizon_end if status == "waiting" else {}
            page: list[Doc] = []
            for doc in self.tasks_in(status, end):
                page.append(doc)
                if len(page) >= FIRST_PAGE:
                    worker.control.put(lambda page=page: self.seen_all(page))
                    count, page = count + len(page), []
            if page:
                worker.control.put(lambda page=page: self.seen_all(page))
                count += len(page)
        log.info("start-up: %d active task(s) read", count)

    def seen_all(self, docs: list[Doc]) -> None:
        """On the control thread: a page of tasks just read."""
        for doc in docs:
            try:
                self.worker.seen(doc, fresh=True)
            except Exception:  # one unreadable task must not keep the worker from starting
                log.exception("task %s could not be read; skipped", doc.get("_id"))

    def tasks_in(self, status: str, until: str | dict[str, Any]) -> Iterator[Doc]:
        """This worker's tasks in `status` due up to `until` ({} for any date), paged."""
        worker = self.worker
        rows = worker.db.iter_view(
            DDOC,
            "by_worker",
            page_size=worker.page_size,
            first_page=FIRST_PAGE,
            include_docs=True,
            conflicts=True,
            startkey=[worker.name, status],
            endkey=[worker.name, status, until],
        )
        for row in rows:
            if row.get("doc"):  # null when the document went away after the view was read
                yield row["doc"]

    # -- following -----------------------------------------------------------------------
    def follow(self, since: Any) -> None:
        """On its own thread: the changes feed from `since`, until the worker stops."""
        worker = self.worker
        backoff = 0.5
        while not worker.stopping.is_set():
            try:
                changes = worker.db.follow(
                    since, stop=worker.stopping, include_docs=True, conflicts=True, **self.filter
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
                        worker.control.put(lambda doc=doc: worker.membership.peer_record_seen(doc))
                    elif not self.known(doc):
                        worker.control.put(lambda doc=doc, seq=since: worker.seen(doc, seq))
                    backoff = 0.5
            except Exception as exc:  # an outage, or anything else: the feed must go on
                if worker.stopping.is_set():
                    return
                level = logging.WARNING if isinstance(exc, Unreachable) else logging.ERROR
                log.log(level, "changes feed interrupted (%s); resuming in %.1fs", exc, backoff)
                worker.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)

    def known(self, doc: Doc) -> bool:
        """On the feed thread: an echo of our own write, or a version already seen?
        Only a shortcut (the control thread checks again); it keeps the echoes of
        a burst's writes out of the control queue."""
        if doc.get("_conflicts"):
            return False  # always the control thread's to resolve
        worker = self.worker
        state = worker.states.get(doc["_id"])
        if state is not None and state.doc["_rev"] == doc["_rev"]:
            # Unless the version we hold was conflicted: the same revision without its
            # conflict (the other side deleted the losers) is to be decided on now.
            return not state.doc.get("_conflicts")
        known = tasks.rev_number(state.doc["_rev"]) if state is not None else 0
        # Strictly older only: a sibling of the same generation (a conflict's other
        # side, after a replication) is news.
        return tasks.rev_number(doc["_rev"]) < max(known, worker.forgotten.get(doc["_id"], 0))

    # -- echoes: how late our news is ----------------------------------------------------------
    def expect_echo(self, task_id: str) -> None:
        """A write of the task is sent: the feed should bring it back soon."""
        with self.echo_lock:
            self.echoes.pop(task_id, None)
            self.echoes[task_id] = time.monotonic()

    def forget_echo(self, task_id: str) -> None:
        with self.echo_lock:
            self.echoes.pop(task_id, None)

    def news_late(self, by: float) -> bool:
        """Is our news more than `by` seconds late: a write of ours sent that long ago
        has not come back on the feed yet (the server or the feed lags)?"""
        now = time.monotonic()
        with self.echo_lock:
            while self.echoes:  # an echo that never comes (the task left this worker)
                task_id, acknowledged = next(iter(self.echoes.items()))
                if now - acknowledged < ECHO_GIVEN_UP:
                    return now - acknowledged > by
                del self.echoes[task_id]
        return False

    def busy(self) -> bool:
        """Many of our writes are not back yet: a burst (peers have theirs too)."""
        return len(self.echoes) > NEWS_BACKLOG
