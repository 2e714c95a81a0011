"""What a worker does with a task: plain functions over task documents.

The worker sees versions of task documents (from start-up reads and the
changes feed). `next_step` decides what to do with one, given what this
instance is doing with it right now; the `*_update` functions build the
document a step writes. No I/O here, so every decision is easy to test.
"""

from __future__ import annotations

import json
import re
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import TYPE_CHECKING, Any

from after.couch import rev_number, storable_text
from after.push import load_rules

if TYPE_CHECKING:
    from after.runs import Policy

Doc = dict[str, Any]

RULES = load_rules()
STATUSES: list[str] = RULES["statuses"]
FINAL: set[str] = set(RULES["final"])
TRANSITIONS: dict[str, dict[str, str]] = RULES["transitions"]
# A task that ended: final, or failed (a client may reschedule it).
ENDED: frozenset[str] = frozenset({*FINAL, "err"})
# Statuses a worker must look at on start-up; the rest need nothing from it.
ACTIVE: list[str] = [s for s in STATUSES if s not in FINAL and s != "err"]

MAX_TEXT = 16_000  # characters kept of an error message or traceback
MAX_RESULT = 64_000  # characters of JSON kept of a job's result (CouchDB refuses documents > 8 MB)


class Local(Enum):
    """What this worker instance is doing with a task."""

    NONE = "none"  # not holding it
    HELD = "held"  # claimed (scheduled) and in the timer
    COMMITTED = "committed"  # `running` written, waiting for the due instant
    RUNNING = "running"  # the job is executing


@dataclass
class TaskState:
    """What this instance knows and does about one task (the worker's, per task id)."""

    doc: Doc
    local: Local = Local.NONE
    writing: int = 0  # writes in flight (a conflict's resolution may overlap another)
    newer: Doc | None = None  # a version seen while writing
    cancel_requested: bool = False
    policy: Policy | None = None  # the scheduling fields, parsed when it is held
    invalid: str | None = None  # why the fields cannot be scheduled: the run fails with it
    ends_without_run: dict[str, Any] | None = None  # a repeat whose series ended while down
    process: subprocess.Popen | None = None  # a job run in a child process (with a timeout)
    run_at: datetime | None = None  # when the job starts: its date, or now when it must fail
    spawned: list[datetime] = field(default_factory=list)  # overlapping occurrences handed off
    resolving: bool = False  # held only to resolve a conflict of a run that had ended
    run_doc: Doc | None = None  # the committed version the running job started from
    outcome_base: Doc | None = None  # the version the run's outcome is written on
    # A run's outcome until it is stored: a write of it refused while a conflict was
    # resolved is written again on the version that continues our run.
    pending_outcome: dict[str, Any] | None = None
    lapses: int = 0  # our lease's lapses counted when the commit landed (after.runner)


class Step(Enum):
    CLAIM = "claim"  # write `scheduled`, owned by this instance
    HOLD = "hold"  # keep it in the timer at its date
    RELEASE = "release"  # rescheduled beyond the horizon: write `waiting`, owned by nobody
    CANCEL = "cancel"  # drop it and write `canceled`
    CANCEL_AFTER_RUN = "cancel-after-run"  # the job is running: write `canceled` when it ends
    LOST = "lost"  # its run was interrupted by a dead instance: write `err`
    FORGET = "forget"  # nothing to do here any more
    IGNORE = "ignore"  # nothing to do now


def next_step(
    doc: Doc,
    me: str,
    local: Local,
    owner_alive: Callable[[str], bool] = lambda owner: False,
    within_horizon: bool = True,
    started_here: bool = True,
) -> Step:
    """Decide what instance `me` does with this version of a task.

    `owner_alive(owner)` tells whether another instance still holds its lease;
    `within_horizon` whether the task is due soon enough to be held in memory;
    `started_here` whether this instance ever started a run of it. A `running` of ours
    that we hold no run of and never started is a commit we took as refused that was
    stored all the same (on a cluster, by a minority of copies): its run never began,
    so it is handed back, not failed as "worker lost".
    """
    status = doc.get("status")
    owner = doc.get("owner")
    if status == "waiting":
        if local is Local.RUNNING:
            return Step.IGNORE
        return Step.CLAIM if within_horizon else Step.FORGET
    if status == "reschedule":
        if local is Local.RUNNING:
            return Step.IGNORE
        return Step.CLAIM if within_horizon else Step.RELEASE
    if status == "scheduled":
        if owner == me:
            return Step.HOLD if local in (Local.NONE, Local.HELD) else Step.IGNORE
        if local is not Local.NONE:
            return Step.FORGET  # another instance took it over from us
        if owner and owner_alive(owner):
            return Step.FORGET
        return Step.CLAIM  # its owner's lease ran out: take it over
    if status == "running":
        if owner == me:
            if local in (Local.COMMITTED, Local.RUNNING):
                return Step.IGNORE
            return Step.LOST if started_here else Step.RELEASE
        if local is not Local.NONE:
            return Step.FORGET
        return Step.FORGET if owner and owner_alive(owner) else Step.LOST
    if status == "cancel":
        if local is Local.RUNNING:
            return Step.CANCEL_AFTER_RUN
        if local is Local.NONE and owner not in (None, me) and owner_alive(owner):
            return Step.FORGET  # its live owner confirms it: only it knows if the run began
        return Step.CANCEL
    return Step.FORGET  # done, err, canceled


def outcome_base(current: Doc, run_doc: Doc | None, me: str) -> Doc:
    """The version a run's outcome is written on: the task as it is now while it still
    continues our run (our `running`, or a client's `cancel` of it), else the version
    the run started from. A conflict can make another branch's version current while
    the job runs (another instance's claim handed back, which CouchDB chose as the
    winner): ending the run there would be refused (`waiting` -> `done`) and lose the
    outcome; ending it on our own branch keeps it, and the conflict's resolution then
    keeps the branch that got furthest, ours."""
    status = current.get("status")
    ours = status == "cancel" or (status == "running" and current.get("owner") == me)
    return current if ours or run_doc is None else run_doc


def outcome_base_over(latest: Doc, run_doc: Doc | None, me: str, at: datetime) -> Doc | None:
    """Where a run's outcome is written again after its write was refused, the task now
    being `latest` (`running` or `cancel`): latest itself while it continues our run.
    When it is another instance's `running` of the same attempt (on a cluster, its
    claim won on another branch while our branch was deleted), our run is put on
    latest's revision: the outcome names the instance and attempt that ran, ends the
    task (the other's claim, never started, would otherwise hand it back to run again),
    and the other's claim is recorded as taken over. None when it runs a later attempt:
    our run was judged lost (its lease ran out) and recorded so; the next attempt's
    outcome is the task's."""
    ours = latest.get("status") == "cancel" or latest.get("owner") == me
    if ours or run_doc is None:
        return latest
    if int(latest.get("attempt", 1)) > int(run_doc.get("attempt", 1)):
        return None
    records = (
        {"conflicts_resolved": latest["conflicts_resolved"]}
        if "conflicts_resolved" in latest
        else {}
    )
    return {**run_doc, **records, "_rev": latest["_rev"], "takeovers": _takeovers(latest, at)}


def worker_name_problem(name: str) -> str | None:
    """Why a worker name cannot be used, or None; the same rules as validate_doc_update."""
    if not re.fullmatch(RULES["patterns"]["worker"], name):
        return f"worker name {name!r}: use 1 to 64 letters, digits, '_', '-' or '.' (not first)"
    try:
        value = json.loads(name)
    except ValueError:
        return None
    if isinstance(value, bool):
        shown = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        shown = str(int(value))
    else:
        shown = str(value)
    if shown != name:
        return (
            f"worker name {name!r} is read as {shown} in a query string (?worker=...); "
            "write it that way or choose a name that is not a number"
        )
    return None


# -- dates ----------------------------------------------------------------------


def parse_date(value: str) -> datetime:
    """An aware UTC datetime from an ISO 8601 string; a date alone is midnight UTC,
    no offset means UTC (the task contract)."""
    parsed = datetime.fromisoformat(value.replace("z", "Z"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def iso(moment: datetime) -> str:
    """UTC with milliseconds: 2026-12-01T09:30:00.123Z (sorts as text, as the views do)."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now() -> datetime:
    return datetime.now(UTC)


# -- the documents each step writes --------------------------------------------


def _update(doc: Doc, **fields: Any) -> Doc:
    """A copy of doc with fields set; a field set to None is removed. The document's
    other fields stay as they are, a null too: dropping one the worker did not mean to
    change (an admin's `"force": null`) got the write refused."""
    updated = {**doc, **fields}
    for name, value in fields.items():
        if value is None:
            del updated[name]
    return updated


def claim_update(doc: Doc, me: str, at: datetime) -> Doc:
    """`scheduled`, owned by `me`; taking over another instance's claim is recorded."""
    fields: dict[str, Any] = {"status": "scheduled", "owner": me, "claimed_at": iso(at)}
    fields["withdrawn"] = None
    if doc.get("status") == "scheduled" and doc.get("owner") not in (None, me):
        fields["takeovers"] = _takeovers(doc, at)
    return _update(doc, **fields)


def _takeovers(doc: Doc, at: datetime) -> list[dict[str, Any]]:
    entry = {"from": doc.get("owner"), "status": doc.get("status"), "at": iso(at)}
    return [*doc.get("takeovers", []), entry][-10:]


def running_update(doc: Doc, me: str) -> Doc:
    attempt = int(doc.get("attempt", 0)) + 1
    return _update(doc, status="running", owner=me, attempt=attempt, withdrawn=None)


def hand_back_update(doc: Doc) -> Doc:
    """Back to `waiting` for any instance to take (graceful stop, or rescheduled
    beyond the horizon). A run is handed back only before it began: from `running` (a
    commit), the attempt the commit counted is taken back too, so the run that follows
    is the same attempt (and the same idempotency key), not a retry."""
    fields: dict[str, Any] = {"owner": None, "claimed_at": None, "withdrawn": None}
    if doc.get("status") == "running":
        attempt = int(doc.get("attempt", 1)) - 1
        fields["attempt"] = attempt if attempt > 0 else None
    return _update(doc, status="waiting", **fields)


def withdrawn_update(hand_back: Doc) -> Doc:
    """A hand-back of a claim or commit the cluster did not confirm (after.quorum),
    marked as such: beside a revision that got as far, it gives way
    (`resolve_conflict`), whichever of the two CouchDB picks as winner. It only takes
    back our unconfirmed write, so it must not undo what the other side did meanwhile
    (a client's reschedule taken up there)."""
    return _update(hand_back, withdrawn=True)


def canceled_update(doc: Doc, at: datetime) -> Doc:
    return _update(doc, status="canceled", canceled_at=iso(at), withdrawn=None)


LOST = "WorkerLost"  # the error type of a run failed because its instance was judged dead


def lost_outcome(doc: Doc, at: datetime) -> dict[str, Any]:
    """The outcome of a run whose instance died: it failed with "worker lost"."""
    return {
        "error": {
            "type": LOST,
            "message": f"worker lost: instance {doc.get('owner')} stopped while the job was "
            "running; the job may have run in part (set status to reschedule to run it again)",
        },
        "result": None,
        "finished_at": iso(at),
    }


def taken_over(doc: Doc, at: datetime) -> Doc:
    """The task with the takeover from its current owner recorded."""
    return {**doc, "takeovers": _takeovers(doc, at)}


def outcome_fields(
    started: datetime, finished: datetime, result: Any = None, error: BaseException | None = None
) -> dict[str, Any]:
    """The fields a finished run writes, done or failed."""
    fields: dict[str, Any] = {
        "started_at": iso(started),
        "finished_at": iso(finished),
        "duration_ms": round((finished - started).total_seconds() * 1000, 3),
    }
    if error is None:
        fields["result"] = cap_result(result)
        fields["error"] = None
    else:
        fields["error"] = error_info(error)
        fields["result"] = None  # none from an earlier attempt either
    return fields


def outcome_update(doc: Doc, outcome: dict[str, Any]) -> Doc:
    """`done` or `err` after a run; `canceled` if a cancel came while it ran."""
    if doc.get("status") == "cancel":
        status = "canceled"
    else:
        status = "err" if outcome.get("error") else "done"
    return _update(doc, status=status, **outcome)


REFUSED_OUTCOME = "OutcomeRefused"  # the error type of a run whose outcome CouchDB refused


def refused_outcome(outcome: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A run's outcome that CouchDB refused to store, as the failure it becomes: the
    run's times are kept, the result is not, and the error says what was refused."""
    message = (
        f"the run's outcome could not be stored: CouchDB refused it "
        f"({row.get('error')}: {row.get('reason')})"
    )
    return {
        **outcome,
        "result": None,
        "error": {"type": REFUSED_OUTCOME, "message": _cap(message)},
    }


def cap_result(result: Any) -> Any:
    """The result as it may be stored: a large one is replaced by a marked preview."""
    text = json.dumps(result)
    if len(text) <= MAX_RESULT:
        return result
    return {
        "truncated": True,
        "size": len(text),
        "preview": text[:1000] + f"... [cut: {len(text) - 1000} more characters]",
    }


def error_info(error: BaseException) -> dict[str, str]:
    remote = getattr(error, "error", None)  # a job that failed in a child process
    if isinstance(remote, dict):
        return {key: _cap(str(remote.get(key, ""))) for key in ("type", "message", "traceback")}
    text = "".join(traceback.format_exception(error))
    return {
        "type": type(error).__name__,
        "message": _cap(str(error)),
        "traceback": _cap(text),
    }


def _cap(text: str) -> str:
    text = storable_text(text)  # decoded process output may hold lone surrogates
    if len(text) <= MAX_TEXT:
        return text
    return text[:MAX_TEXT] + f"... [cut: {len(text) - MAX_TEXT} more characters]"


def resolve_conflict(winner: Doc, losers: list[Doc]) -> list[Doc]:
    """Resolve a conflict: one revision is kept, each other leaf is deleted, and what
    the others were doing is recorded on the kept one, so a duplicate claim or run is
    visible. Which one is kept depends on the leaves only, never on which of them
    CouchDB picked as `winner`: two instances may resolve one conflict at once, each
    seeing some of its leaves (deletions and the other's resolution not arrived yet),
    and one that keeps a losing revision deletes the others before writing
    (after.conflicts); two that kept different ones would delete the task.
    (tests/test_tasks.py checks it over every mix of leaves.) In order:

    - a final leaf (`done`, `canceled`) over any other: of several, the furthest
      (`progress`), a cancel of a run over that run's `done`;
    - else the leaf that got furthest: it ran, ended or committed a run the others
      never did (their side only claimed or handed the task back: a claim a
      partition's minority side could not confirm, after.quorum), and keeping
      another would run the task again; a "worker lost" judgement gives way to that
      run's own end (its instance, cut off from the majority, finished it); among
      equals, CouchDB's winner. When the winner says a run is under way and the kept
      leaf is that run's end, the winner's revision takes the end's content;
    - a hand-back marked `withdrawn` gives way to a leaf that got as far (`not_withdrawn`);
    - a client's move stands over the workers' side (`client_move`): a cancel unless
      the task ended, a reschedule if no run was committed beside it. On a cluster a
      client's write can be answered `202` and lose the conflict to a claim made at
      the same moment; dropping it would undo a request the client was told was
      accepted.

    Conflicts arise only between replicated nodes or in a cluster (a partition, or
    two claims through two nodes at once), where two writes based on the same
    revision can both be accepted. The record holds no time, so two resolutions of
    one conflict write the same content.
    """
    runs = runs_in([winner, *losers])
    standing = [doc for doc in (winner, *losers) if not superseded(doc, runs)]
    best = furthest(winner, standing)
    ended = run_ended_in(winner, [doc for doc in standing if doc is not winner])
    if best not in (None, ended):
        ended = None  # a final leaf, or one further still, is what stands (`furthest`)
    keep = (None if ended is not None else best) or winner
    if ended is None:
        keep = not_withdrawn(keep, [doc for doc in standing if doc is not keep])
    base = keep if ended is None else {**ended, "_rev": winner["_rev"]}
    others = [doc for doc in (winner, *losers) if doc is not keep]
    if ended is None and (move := client_move(keep, others)) is not None:
        keep, base = move, moved(move, keep)
    gone = [doc for doc in (winner, *losers) if doc is not keep]
    seen = [
        {
            "rev": doc["_rev"],
            "status": doc.get("status"),
            "owner": doc.get("owner"),
            "attempt": doc.get("attempt"),
            "date": doc.get("date"),  # a client's reschedule, or a worker's version of it
            **({"lost": True} if is_judged_lost(doc) else {}),  # see `superseded`
        }
        for doc in gone
        if not same_content(doc, keep)
    ]
    # A loser may itself record an earlier resolution (the other replica's): keep those too.
    earlier = [
        entry
        for doc in (winner, *losers)
        for entry in doc.get("conflicts_resolved", [])
        if isinstance(entry, dict)
    ]
    recorded: dict[Any, dict[str, Any]] = {}
    for entry in [*earlier, *seen]:
        recorded.setdefault(entry.get("rev"), entry)
    kept = {k: v for k, v in base.items() if k != "_conflicts"}
    updated = _update(kept, conflicts_resolved=list(recorded.values())[-20:])
    deletions = [
        {"_id": doc["_id"], "_rev": doc["_rev"], "_deleted": True, "resolves_conflict": True}
        for doc in gone
    ]
    return [updated, *deletions]


# Statuses only a client writes (rules.json): a revision with one is a client's move.
CLIENT_MOVES = ("cancel", "reschedule")
WORKER_FIELDS: list[str] = RULES["worker_fields"]


def latest(docs: list[Doc]) -> Doc | None:
    """The latest of several revisions: the same choice on every node."""
    return max(docs, key=lambda d: (rev_number(d["_rev"]), d["_rev"]), default=None)


def client_move(kept: Doc, others: list[Doc]) -> Doc | None:
    """The client's cancel or reschedule among a conflict's other revisions that must
    stand over `kept` (the workers' side), or None; of several, a cancel, then the
    latest revision (the same choice on every node).

    A cancel stands unless the task has ended (`done`, `canceled`, `err`): it stops a
    run committed meanwhile too (see `moved`). So does a cancel already carried out
    (`canceled`, written by a worker on the client's side: a claim or commit on the
    other side must not bring the task back). A reschedule stands only if no run was
    committed beside it: a run that may have begun cannot be moved to another date,
    and the reschedule is recorded as a losing revision instead."""
    status = kept.get("status")
    if status in ENDED:
        return None
    # Whatever `kept` is (CouchDB's pick or not), the same one stands: a cancel carried
    # out over a cancel, a cancel over a reschedule, either over the workers' side.
    cancels = [doc for doc in others if doc.get("status") == "canceled"]
    if not cancels and status != "cancel":
        cancels = [doc for doc in others if doc.get("status") == "cancel"]
    reschedules = [
        doc
        for doc in others
        if doc.get("status") == "reschedule"
        and status not in CLIENT_MOVES
        and progress(doc) >= progress(kept)
    ]
    return latest(cancels or reschedules)


def moved(move: Doc, kept: Doc) -> Doc:
    """The client's move as it is kept: its own revision, with what the workers did on
    the other side (owner, attempt, run history: every worker field) when a run was
    committed there, so the instance running it sees a cancel of its own run."""
    if progress(kept) <= progress(move) or move.get("status") in FINAL:
        return move  # a final version cannot take other worker fields
    client_side = {k: v for k, v in move.items() if k not in WORKER_FIELDS}
    workers_side = {k: v for k, v in kept.items() if k in WORKER_FIELDS}
    return {**client_side, **workers_side}


def same_content(doc: Doc, other: Doc) -> bool:
    """The same version of the task under two revisions, apart from the record of
    resolved conflicts: two resolutions of one conflict made at once on two replicas
    (PouchDB Server draws revision ids at random; CouchDB derives them from the
    content). Such a loser is no other run, and recording it would make each side's
    next resolution differ from the other's again, with no end."""
    ignored = ("_rev", "_conflicts", "conflicts_resolved")
    return {k: v for k, v in doc.items() if k not in ignored} == {
        k: v for k, v in other.items() if k not in ignored
    }


def run_ended_in(winner: Doc, losers: list[Doc]) -> Doc | None:
    """The losing revision that ended the run the winner says is under way, or None;
    of several, the latest revision (the same choice on every node)."""
    if winner.get("status") != "running":
        return None
    ends = [
        loser
        for loser in losers
        if loser.get("status") in ("done", "err")
        and loser.get("owner") == winner.get("owner")
        and loser.get("attempt") == winner.get("attempt")
    ]
    return latest(ends)


def superseded(doc: Doc, runs: list[dict[str, Any]]) -> bool:
    """Whether `doc` is a run's end that another leaf overrides (`runs`: what the
    conflict's leaves say of the task's runs, `runs_in`), so it cannot be kept:
    - a "worker lost" judgement beside that run's own end (same instance, same
      attempt), written by its instance: cut off from the cluster's majority, whose
      peers judged it dead, it finished the run all the same;
    - any end of a run beside a client's cancel of that run (`cancel` carrying the
      run's owner and attempt, or that cancel carried out): the cancel landed while
      the job ran and the end on other copies. On one node the instance would have
      recorded the run as `canceled` when its job ended."""
    if doc.get("status") not in ("done", "err") or not doc.get("attempt"):
        return False
    judged_lost = is_judged_lost(doc)
    for run in runs:
        if run.get("owner") != doc.get("owner") or run.get("attempt") != doc.get("attempt"):
            continue
        if run.get("status") in ("cancel", "canceled"):
            return True
        if judged_lost and run.get("status") in ("done", "err") and run.get("lost") is not True:
            return True
    return False


def runs_in(leaves: list[Doc]) -> list[dict[str, Any]]:
    """What the leaves say of the task's runs: each leaf, and each revision an earlier
    resolution deleted and recorded on one of them (`conflicts_resolved`). A revision
    that superseded another still does once it is deleted: a resolver that sees the
    kept revision beside some of the deleted ones must choose as the first one did."""
    found = [{**leaf, "lost": is_judged_lost(leaf)} for leaf in leaves]
    for leaf in leaves:
        entries = leaf.get("conflicts_resolved")
        found += [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
    return found


def is_judged_lost(doc: Doc) -> bool:
    """A run failed as "worker lost" by the peers of the instance running it."""
    return doc.get("status") == "err" and (doc.get("error") or {}).get("type") == LOST


def progress(doc: Doc) -> tuple[str, int]:
    """How far a revision got with its task: the end of its last run, then its attempt
    count. Two sides of one conflict share their history up to where they split, so the
    side with a later run end or more attempts ran or committed a run the other did not."""
    finished = doc.get("finished_at")
    attempt = doc.get("attempt")
    return (
        finished if isinstance(finished, str) else "",
        attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
    )


def furthest(winner: Doc, standing: list[Doc]) -> Doc | None:
    """Of the leaves that may be kept (none `superseded`), the one that got furthest
    with the task, or None when that is the winner: of the final ones (`done`,
    `canceled`) if any, else of all, the furthest (`progress`), then the latest
    revision. The choice depends on the leaves only, not on which one CouchDB picked:
    two resolvers that see some of the same leaves keep the same one (among ties in
    progress the latest revision is CouchDB's own winner)."""
    pool = [doc for doc in standing if doc.get("status") in FINAL] or standing
    best = max(pool, key=furthest_first)
    return None if best is winner else best


def furthest_first(doc: Doc) -> tuple[tuple[str, int], int, str]:
    """Sort key: how far a revision got (`progress`), then the latest revision (the
    same order on every node)."""
    return progress(doc), rev_number(doc["_rev"]), doc["_rev"]


def not_withdrawn(keep: Doc, others: list[Doc]) -> Doc:
    """`keep`, unless it is a withdrawn hand-back (`withdrawn_update`) and another
    revision not withdrawn got as far: then that one (of several, the furthest, then
    the latest revision; the same choice on every node). A withdrawn hand-back took
    back a claim that never counted; the other revision is what the cluster did."""
    if keep.get("status") != "waiting" or keep.get("withdrawn") is not True:
        return keep
    ahead = [
        doc
        for doc in others
        if doc.get("withdrawn") is not True and progress(doc) >= progress(keep)
    ]
    return max(ahead, key=furthest_first, default=keep)


def is_newer(doc: Doc, than: Doc) -> bool:
    return rev_number(doc["_rev"]) > rev_number(than["_rev"])


def is_news(doc: Doc, than: Doc) -> bool:
    """A later version, or another one of the same generation, conflicted or not (a
    replica's write that won over ours, ours with a replica's beside it, or a sibling
    whose conflict with ours was resolved by deleting ours): to be acted on."""
    if rev_number(doc["_rev"]) == rev_number(than["_rev"]):
        return doc["_rev"] != than["_rev"] or bool(doc.get("_conflicts"))
    return is_newer(doc, than)
