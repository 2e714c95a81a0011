"""Clients: threads that create, cancel and reschedule tasks while the soak runs.

Each steers as a careful client does (and as after/client.py does): read the task,
decide from its status, write it back with the revision it read (compare-and-set); a
409 means someone wrote since, so read again and decide again, never overwrite. A 403
on PouchDB Server can mean the same (it validates a stale write against the current
revision first): read again, and only a 403 on the revision we decided on is a real
refusal. Every move is recorded with what it found, what it wrote and the server's
answer: 201, or 202 on a cluster when the write did not reach a quorum of copies.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from after.couch import Conflict, CouchError, Database, Forbidden, Server
from after.runs import idempotency_key
from after.tasks import iso, parse_date
from soak import tasks

TRIES = 20  # reads and writes of one move before giving up on a task that keeps changing
CANCELABLE = {"waiting", "scheduled", "running"}
RESCHEDULABLE = {"waiting", "scheduled", "err"}


@dataclass
class Move:
    client: int
    action: str  # create, cancel, reschedule
    task_id: str
    outcome: str = ""  # landed, too_late, refused, unanswered, gave_up
    http: int | None = None  # 201 or 202 for a write that landed
    read_at: float = 0.0  # time.time() when the version decided on was read
    answered_at: float = 0.0  # time.time() when the write was answered
    from_status: str | None = None
    from_rev: str | None = None
    from_attempt: int | None = None
    from_key: str | None = None  # the idempotency key of the attempt it found
    rev: str | None = None  # the revision the move wrote
    date: str | None = None  # a reschedule's new date; a creation's date
    retries: int = 0  # 409s (or stale 403s) read again
    reason: str = ""

    @property
    def landed(self) -> bool:
        return self.outcome == "landed"

    def line(self) -> str:
        return (
            f"{self.action} by client {self.client}: {self.outcome}"
            + (f" ({self.http})" if self.http else "")
            + (f" from {self.from_status} {self.from_rev}" if self.from_status else "")
            + (f" to {self.rev}" if self.rev else "")
            + (f" date {self.date}" if self.date else "")
            + f" read {stamp(self.read_at)} answered {stamp(self.answered_at)}"
            + (f" after {self.retries} re-reads" if self.retries else "")
            + (f": {self.reason}" if self.reason else "")
        )


def stamp(at: float) -> str:
    return iso(datetime.fromtimestamp(at, UTC)) if at else "-"


class Known:
    """The soak's tasks the clients may pick from: their planned dates, shared."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.lock = threading.Lock()
        self.dates: dict[str, float] = {d["_id"]: parse_date(d["date"]).timestamp() for d in docs}

    def add(self, task_id: str, date: str) -> None:
        with self.lock:
            self.dates[task_id] = parse_date(date).timestamp()

    def pick(self, rng: random.Random, steerable_only: bool) -> str | None:
        """Mostly a task due soon (it can still be steered), sometimes any."""
        with self.lock:
            ids = list(self.dates)
            soon = [i for i in ids if self.dates[i] > time.time() - 1.0]
        if steerable_only:
            ids = [i for i in ids if not tasks.KINDS[tasks.kind_of(i)].repeating]
            soon = [i for i in soon if not tasks.KINDS[tasks.kind_of(i)].repeating]
        pool = soon if soon and rng.random() < 0.8 else ids
        return rng.choice(pool) if pool else None


class Client(threading.Thread):
    def __init__(
        self,
        number: int,
        seed: int,
        server: Server,
        database: str,
        known: Known,
        names: list[str],
        stop: threading.Event,
        rate: float,
    ) -> None:
        super().__init__(name=f"soak-client-{number}", daemon=True)
        self.number = number
        self.rng = random.Random(f"client-{seed}-{number}")
        self.seed = seed
        self.db: Database = server.database(database)
        self.known = known
        self.names = names
        self.stop = stop
        self.rate = rate  # moves a second
        self.moves: list[Move] = []
        self.created = 0
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.wait(self.rng.uniform(0.5, 1.5) / self.rate):
                action = self.rng.choices(["create", "cancel", "reschedule"], [3, 4, 4])[0]
                if action == "create":
                    self.moves.append(self.create())
                    continue
                task_id = self.known.pick(self.rng, steerable_only=action == "reschedule")
                if task_id is not None:
                    self.moves.append(self.steer(task_id, action))
        except BaseException as exc:  # reported by the checker, never silently lost
            self.failure = exc

    def create(self) -> Move:
        kind = tasks.draw_kind(self.rng)
        date = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(0.2, 6.0))
        base = f"{tasks.PREFIX}{self.seed}-c{self.number}x{self.created:04d}"
        self.created += 1
        doc = tasks.new_task(self.rng, base, kind, self.rng.choice(self.names), date)
        move = Move(self.number, "create", doc["_id"], date=doc["date"], read_at=time.time())
        try:
            confirmed = self.db.put_confirmed(doc)
        except CouchError as exc:
            move.answered_at = time.time()
            move.outcome = "unanswered" if exc.status == 0 or exc.status >= 500 else "refused"
            move.reason = str(exc)
            if move.outcome == "unanswered":
                self.known.add(doc["_id"], doc["date"])  # it may have been stored
            return move
        move.answered_at = time.time()
        move.outcome, move.http, move.rev = "landed", 201 if confirmed else 202, doc["_rev"]
        self.known.add(doc["_id"], doc["date"])
        return move

    def steer(self, task_id: str, action: str) -> Move:
        move = Move(self.number, action, task_id)
        allowed = CANCELABLE if action == "cancel" else RESCHEDULABLE
        doc: dict[str, Any] | None = None
        for _ in range(TRIES):
            try:
                doc = self.db.get(task_id)
            except CouchError as exc:
                move.outcome, move.reason = "unanswered", f"read: {exc}"
                return move
            move.read_at = time.time()
            if doc is None or doc.get("status") not in allowed:
                move.outcome = "too_late"
                move.reason = f"found {doc.get('status') if doc else 'no task'}"
                return move
            update = {**doc, "status": action}
            if action == "reschedule":
                later = datetime.now(UTC) + timedelta(seconds=self.rng.uniform(1.0, 6.0))
                update["date"] = iso(later)
            try:
                confirmed = self.db.put_confirmed(update)
            except Conflict:
                move.retries += 1
                continue
            except Forbidden as exc:
                try:
                    latest = self.db.get(task_id)
                except CouchError:
                    latest = None
                if latest is not None and latest["_rev"] != doc["_rev"]:
                    move.retries += 1  # PouchDB Server's 403 for a stale revision
                    continue
                move.answered_at = time.time()
                move.outcome, move.reason = "refused", str(exc)
                self.note_found(move, doc)
                return move
            except CouchError as exc:
                move.answered_at = time.time()
                move.outcome, move.reason = "unanswered", str(exc)
                self.note_found(move, doc)
                move.date = update.get("date") if action == "reschedule" else None
                return move
            move.answered_at = time.time()
            move.outcome, move.http, move.rev = "landed", 201 if confirmed else 202, update["_rev"]
            self.note_found(move, doc)
            move.date = update["date"] if action == "reschedule" else None
            return move
        move.outcome = "gave_up"
        return move

    @staticmethod
    def note_found(move: Move, doc: dict[str, Any]) -> None:
        move.from_status, move.from_rev = doc.get("status"), doc.get("_rev")
        attempt = doc.get("attempt")
        move.from_attempt = attempt if isinstance(attempt, int) else None
        move.from_key = idempotency_key(doc)
