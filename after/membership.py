"""Membership: the instances of one worker name, and who of them claims a task first.

Each instance keeps a worker record (after.records) and renews the lease in it on
a heartbeat, on a thread and an HTTP session of its own, so a lease is renewed
on time whatever the other threads wait for. It reads its peers' records to tell
the live from the dead (a peer is dead when its lease ran out and its record
stayed unchanged for a whole lease while we could see it), takes over what a
dead peer held, and learns of peers that start or stop from their records on the
changes feed. Of the live instances, each task has one that claims it at once
(rendezvous hashing); the others wait before claiming it (after.claiming).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

from after import records, tasks
from after.couch import Conflict, Forbidden, Server
from after.feed import NEWS_BACKLOG
from after.tasks import Doc, Local

if TYPE_CHECKING:
    from after.worker import Worker

log = logging.getLogger("after.worker")

CLOCK_CHECK_EVERY = 60.0  # seconds between comparisons with the server's clock
CLOCK_SKEW_WARNING = 2.0  # seconds of difference that earn a warning
# Seconds before claiming a task another live instance should claim (when it has
# room), and before claiming one anyway when no instance had room for it.
CLAIM_FALLBACK = 1.0
# For how many leases a dead peer's tasks are looked for again after its takeover.
RESCAN_LEASES = 10


class Membership:
    """This instance's record and lease, its peers' leases, and the claim order."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.record: Doc = records.new_record(worker.name, worker.instance, tasks.now())
        # The other instances of this name, as last read: instance -> alive.
        self.leases: dict[str, bool] = {}
        # When each peer's record was last seen to change: instance -> ((rev, last_seen), t).
        self.peer_seen: dict[str, tuple[tuple[Any, Any], float]] = {}
        self.unknown_since: dict[str, float] = {}  # owners with no record: since when
        # The lease is renewed through its own HTTP session, on its own thread.
        # With the nodes of a cluster to fail over to, a renewal that takes longer than
        # half the lease's slack goes to the next node: the lease must not run out
        # waiting for a stuck node. (One node: the usual deadline; retrying there gains
        # nothing.)
        slack = (worker.lease.total_seconds() - worker.heartbeat) / 2
        several = len(worker.config.couchdb_urls) > 1
        self.lease_server = Server.from_config(
            worker.config, timeout=max(1.0, min(30.0, slack)) if several else 30.0
        )
        self.claim_order: list[str] = [worker.instance]  # live instances of this name, sorted
        self.first_claimers: dict[str, str] = {}  # task id -> its first claimer, for claim_order
        self.awaiting_peers: set[str] = set()  # tasks whose owner we have not heard of yet
        self.peers_wanted = threading.Event()
        # When the feed last brought a task written by each other instance (monotonic):
        # an instance still working through its claims is not to be raced for them.
        self.peer_active: dict[str, float] = {}
        # Peers taken over, whose tasks are looked for again until then (monotonic).
        self.taken_over: dict[str, float] = {}
        # When the last renewal that landed was sent (monotonic), and how often our lease
        # lapsed (paused, cut off): see lease_holds.
        self.renewed_at: float | None = None
        self.lapses = 0
        self.presumed_lost_in = 0  # the lapse in which a peer marked our record lost
        # After a lapse, until when (monotonic) no run is committed or started: peers
        # that took us for dead meanwhile may still act on it until they read our
        # renewed record, and a run of ours they fail as "worker lost" must not begin.
        self.quiet_until = 0.0
        self.lapse_margin = min(worker.heartbeat, worker.lease.total_seconds() / 10)

    # -- our record and lease (the lease thread) ------------------------------------------
    def put_record(self, record: Doc) -> None:
        records_db = self.lease_server.database(self.worker.db.name)
        try:
            confirmed = records_db.put_confirmed(record)
        except Conflict:
            # Someone else wrote our record (a peer marked it lost while we could
            # not renew it): keep their revision, write ours over it.
            current = records_db.get(record["_id"])
            if current is not None:
                if current.get("reaped_by"):
                    log.warning("this instance was presumed lost by %s", current["reaped_by"])
                    self.lapses += 1
                    self.presumed_lost_in = self.lapses
                    self.quiet_until = time.monotonic() + self.worker.lease.total_seconds()
                record["_rev"] = current["_rev"]
            confirmed = records_db.put_confirmed(record)
        self.record = record
        self.worker.quorum.answered(confirmed)  # a renewal answered 202: we are cut off

    def renew_record(self) -> None:
        worker = self.worker
        sent = time.monotonic()
        if self.renewed_at is not None and not self.lease_fresh(at=sent):
            log.warning("this instance's lease lapsed: runs committed before are read back first")
            self.lapses += 1
            self.quiet_until = sent + worker.lease.total_seconds()
        self.put_record(records.renewed(self.record, tasks.now(), worker.lease, worker.counts()))
        self.renewed_at = sent

    def lease_holds(self, at: float | None = None) -> bool:
        """Whether our peers still count this instance alive: its last renewal that landed
        was sent less than a lease ago (a peer judges us dead only once our record has
        stayed unchanged for a whole lease). A run is started only while it holds: after
        a pause (SIGSTOP, a long GC, a frozen VM) or a cut-off, a peer may have taken the
        task over meanwhile (after.runner)."""
        now = time.monotonic() if at is None else at
        return now >= self.quiet_until and self.lease_fresh(at=now)

    def lease_fresh(self, at: float) -> bool:
        """Whether our last renewal that landed was sent less than a lease ago."""
        if self.renewed_at is None:
            return False
        return at < self.renewed_at + self.worker.lease.total_seconds() - self.lapse_margin

    def lease_deadline(self) -> float:
        """The wall-clock time (`time.time()`) until which our lease holds, as known now:
        a job started in a child process is not begun past it (after.jobs)."""
        if self.renewed_at is None:
            return time.time()
        left = self.renewed_at + self.worker.lease.total_seconds() - self.lapse_margin
        return time.time() + left - time.monotonic()

    def quiet_for(self) -> float:
        """Seconds left of the quiet after a lapse (0 when none)."""
        return max(self.quiet_until - time.monotonic(), 0.0)

    def renew(self) -> None:
        """Its own thread and HTTP session: a lease is renewed on time whatever the
        other threads wait for (a view being built, a slow takeover)."""
        worker = self.worker
        next_clock_check = time.monotonic()
        backoff = 0.5
        while not worker.finished.is_set():
            try:
                self.renew_record()
                if time.monotonic() >= next_clock_check:
                    self.check_clock()
                    next_clock_check = time.monotonic() + CLOCK_CHECK_EVERY
                backoff, wait = 0.5, worker.heartbeat
            except Exception as exc:
                log.warning("lease not renewed (%s); retrying in %.1fs", exc, backoff)
                wait, backoff = backoff, min(backoff * 2, worker.heartbeat)
            worker.finished.wait(wait)

    def check_clock(self) -> None:
        """Leases compare one instance's clock with another's: warn when ours is off."""
        skew = self.worker.server.clock_skew()
        if skew is not None and abs(skew) > CLOCK_SKEW_WARNING:
            log.warning(
                "this machine's clock is %.1f s %s the CouchDB server's; leases (%s s) and "
                "due times depend on clocks that agree: sync it (NTP)",
                abs(skew),
                "behind" if skew > 0 else "ahead of",
                self.worker.lease.total_seconds(),
            )

    # -- the peers (the housekeeping thread reads, the control thread applies) ------------------
    def read_leases(self) -> tuple[dict[str, bool], list[Doc]]:
        """Which other instances of this name are alive, and the records to take over.

        An instance is dead when its lease had run out when read AND its record
        has not changed for a whole lease while this instance could see it: after
        an outage that hid everyone's renewals, peers get a full lease to renew.
        """
        worker = self.worker
        now, seen_at = tasks.now(), time.monotonic()
        cut_off = worker.quorum.lost
        if cut_off:
            # The peers' renewals cannot reach our node: what their records say proves
            # nothing now, and each gets a whole lease again once the quorum is back.
            self.peer_seen.clear()
        alive: dict[str, bool] = {}
        expired: list[Doc] = []
        rows = worker.db.all_docs(include_docs=True, **records.name_range(worker.name))
        for row in rows["rows"]:
            record = row.get("doc")
            if not record or record.get("instance") == worker.instance:
                continue
            instance = record["instance"]
            stamp = (record.get("_rev"), record.get("last_seen"))
            if self.peer_seen.get(instance, (None, 0.0))[0] != stamp:
                self.peer_seen[instance] = (stamp, seen_at)
            unchanged_for = seen_at - self.peer_seen[instance][1]
            dead = (
                not cut_off
                and not records.is_live(record, now)
                and (
                    record.get("state") != "running"
                    or unchanged_for >= worker.lease.total_seconds()
                )
            )
            alive[instance] = not dead
            if dead and records.needs_takeover(record, now):
                expired.append(record)
            elif records.can_be_deleted(record, now):
                worker.db.bulk_docs(
                    [{"_id": record["_id"], "_rev": record["_rev"], "_deleted": True}]
                )
        return alive, expired

    def set_leases(self, alive: dict[str, bool]) -> None:
        """Which peers are alive, as judged when their records were read (the control
        thread may apply this late; the judgement does not age with it)."""
        self.leases = alive
        order = sorted([self.worker.instance, *(o for o, live in alive.items() if live)])
        if order != self.claim_order:
            self.claim_order = order
            self.first_claimers.clear()

    def owner_alive(self, owner: str) -> bool:
        return self.leases.get(owner, False)

    def peer_record_seen(self, record: Doc) -> None:
        """A peer's record on the feed: one that starts (or renews) joins the claim
        sharing at once, one that stopped leaves it. Judging a peer dead stays with
        the lease readings, which watch its record for a whole lease."""
        instance = record.get("instance")
        if not isinstance(instance, str) or instance == self.worker.instance:
            return
        live = record.get("state", "running") == "running" and records.is_live(record, tasks.now())
        if live and not self.leases.get(instance):
            self.set_leases({**self.leases, instance: True})
        elif not live and record.get("state") in ("stopped", "lost") and instance in self.leases:
            self.set_leases({**self.leases, instance: False})

    def leases_read(self, leases: dict[str, bool]) -> None:
        """On the control thread: new leases; decide on tasks that waited for them."""
        worker = self.worker
        self.set_leases(leases)
        waiting, self.awaiting_peers = self.awaiting_peers, set()
        for task_id in waiting:
            state = worker.states.get(task_id)
            if state is None or state.writing:
                continue
            owner = state.doc.get("owner")
            if owner not in self.leases:
                # No record: a dead instance's, deleted, or one not replicated here
                # yet. It counts as dead once it has stayed unknown for a whole lease.
                first = self.unknown_since.setdefault(owner, time.monotonic())
                if time.monotonic() - first < worker.lease.total_seconds():
                    self.awaiting_peers.add(task_id)  # again at the next reading
                    continue
                self.leases[owner] = False
            worker.decide(task_id, state)

    def await_owner(self, task_id: str, doc: Doc, local: Local) -> bool:
        """Whether the task is held by an instance we have not heard of (it may have just
        started): then the records are read again before deciding whether it is alive."""
        owner = doc.get("owner")
        if (
            doc.get("status") in ("scheduled", "running")
            and owner not in (None, self.worker.instance)
            and owner not in self.leases
            and local is Local.NONE
        ):
            self.awaiting_peers.add(task_id)
            self.peers_wanted.set()
            return True
        return False

    def take_over(self, record: Doc) -> bool:
        """An instance of our name stopped renewing its lease: mark its record lost, then
        take over what it held. Whether it is dead: False when it renewed meanwhile.

        The record first, by compare-and-set: an instance that was only paused and
        renews before that write takes nothing back from us, and one that renews after
        it learns it was presumed lost (its renewal meets our revision) and starts none
        of its committed runs (after.runner). Taking tasks first left a window where a
        paused instance, waking, renewed and started a run a peer was failing."""
        worker = self.worker
        owner = record["instance"]
        for _ in range(3):
            try:
                worker.db.put(records.reaped(record, worker.instance, tasks.now()))
                break
            except (Conflict, Forbidden):  # PouchDB Server answers a stale write with 403
                latest = worker.db.get(record["_id"])
                if latest is None or latest.get("state") == "lost":
                    return True  # reaped by another instance, which takes its tasks over
                if not records.needs_takeover(latest, tasks.now()):
                    log.info("instance %s renewed its lease after all", owner)
                    return False
                record = latest
        else:
            return True
        log.warning("instance %s stopped renewing its lease; taking over its tasks", owner)
        worker.control.put(lambda: self.leases.__setitem__(owner, False))
        self.taken_over[owner] = time.monotonic() + RESCAN_LEASES * worker.lease.total_seconds()
        self.look_for_tasks_of({owner})
        return True

    def look_for_tasks_of(self, owners: set[str]) -> None:
        """Post the tasks held by these (dead) instances to the control thread, which
        takes them over."""
        worker = self.worker
        for status in ("scheduled", "running", "cancel"):  # a cancel is its owner's to confirm
            for doc in worker.feed.tasks_in(status, {}):
                if doc.get("owner") in owners:
                    worker.control.put(lambda doc=doc: worker.seen(doc, fresh=True))

    def look_again_for_tasks_of_the_dead(self) -> None:
        """On the housekeeping thread, once a lease: the tasks of peers taken over lately,
        looked for again. A claim the cluster stored on a minority of copies (answered
        202) reaches the copies a takeover's view read from only later, by internal
        replication, after its instance was already judged dead; nothing else would
        bring it back, and it would stay `scheduled` under a dead instance."""
        now = time.monotonic()
        self.taken_over = {o: until for o, until in self.taken_over.items() if until > now}
        if self.taken_over:
            self.look_for_tasks_of(set(self.taken_over))

    # -- who claims first ------------------------------------------------------------------
    def first_claimer(self, task_id: str) -> str:
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

    def claims_first(self, task_id: str) -> bool:
        """Instances of one name share the claiming: each task has one live instance
        that claims it at once, so they do not all race for every task."""
        return self.first_claimer(task_id) == self.worker.instance

    def note_peer_write(self, doc: Doc) -> None:
        """A task another instance wrote, from the feed: that instance is at work."""
        owner = doc.get("owner")
        if owner is not None and owner != self.worker.instance:
            self.peer_active[owner] = time.monotonic()

    def first_claimer_may_be_at_work(self, task_id: str) -> bool:
        """Is the task another instance's to claim first, and may that instance be
        claiming it now: it wrote tasks within the last CLAIM_FALLBACK seconds, or
        our news (feed, control queue) is too late to tell?"""
        first = self.first_claimer(task_id)
        if first == self.worker.instance:
            return False
        if time.monotonic() - self.peer_active.get(first, -math.inf) < CLAIM_FALLBACK:
            return True
        # While we ourselves have many writes in flight, it is a burst: peers have theirs.
        feed = self.worker.feed
        return (
            feed.busy()
            or feed.news_late(by=CLAIM_FALLBACK / 2)
            or self.worker.control.qsize() > NEWS_BACKLOG
        )

    def forget(self, task_id: str) -> None:
        self.first_claimers.pop(task_id, None)
