"""What follows a run: retries, the next occurrence of a repeat, missed occurrences.

Plain functions over task documents, like after/tasks.py. The fields:

- `repeat`, `misfire`, `overlap`, `retry`, `timeout`: the client's (checked for
  shape by validate_doc_update, for meaning by `policy_of` here).
- `anchor`: the first date of a repeating task's series (kept when `date` moves on).
- `occurrence`: the date the current attempts belong to (retries move `date`).
- `runs`: occurrences that ended (done or failed for good); `attempt`: attempts
  of the current occurrence; `skipped`, `last_skipped`: occurrences missed and
  given up by the misfire policy; `history`: the last runs, newest last.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from after.recurrence import (
    Misfire,
    Plan,
    Repeat,
    next_occurrence,
    parse_misfire,
    parse_overlap,
    parse_repeat,
    plan_after_run,
    plan_overdue,
)
from after.retry import Retry, next_attempt, parse_retry, parse_timeout
from after.tasks import Doc, _update, iso, outcome_update, parse_date

HISTORY = 20  # runs kept in a task's history
NO_OVERLAP = Misfire(policy="skip", grace=timedelta(0))


@dataclass(frozen=True)
class Policy:
    """A task's scheduling fields, parsed."""

    repeat: Repeat | None
    misfire: Misfire
    overlap: str
    retry: Retry | None
    timeout: timedelta | None


def policy_of(doc: Doc) -> Policy:
    """Parse the scheduling fields; a ValueError whose message names the field."""
    return Policy(
        repeat=parse_repeat(doc["repeat"]) if doc.get("repeat") is not None else None,
        misfire=parse_misfire(doc.get("misfire")),
        overlap=str(parse_overlap(doc.get("overlap"))),
        retry=parse_retry(doc["retry"]) if doc.get("retry") is not None else None,
        timeout=parse_timeout(doc["timeout"]) if doc.get("timeout") is not None else None,
    )


def anchor_of(doc: Doc) -> datetime:
    return parse_date(doc.get("anchor") or doc["date"])


def occurrence_of(doc: Doc) -> datetime:
    return parse_date(doc.get("occurrence") or doc["date"])


def idempotency_key(doc: Doc) -> str:
    """The same for every delivery of one attempt, different for each attempt."""
    if doc.get("repeat"):
        return f"{doc['_id']}:{iso(occurrence_of(doc))}:{doc.get('attempt', 1)}"
    return f"{doc['_id']}:{doc.get('attempt', 1)}"


def commit_unended(doc: Doc) -> bool:
    """Whether the task holds a commit of a run that has no end recorded: its attempt
    (counted by the commit) is not in its history for this occurrence. A cancel of a
    dead instance's run is then written as that run's end (it may have begun)."""
    attempt = doc.get("attempt")
    if not isinstance(attempt, int) or attempt < 1:
        return False
    occurrence = iso(occurrence_of(doc))
    return not any(
        entry.get("attempt") == attempt and entry.get("occurrence") == occurrence
        for entry in doc.get("history", [])
        if isinstance(entry, dict)
    )


def overdue_plan(doc: Doc, policy: Policy, now: datetime) -> Plan | None:
    """For a repeating task found late (after downtime): what its misfire policy
    makes of it, or None when it simply runs now as it is."""
    if policy.repeat is None or doc.get("occurrence"):  # a retry is never a misfire
        return None
    due = parse_date(doc["date"])
    plan = plan_overdue(policy.repeat, policy.misfire, anchor_of(doc), due, now, doc.get("runs", 0))
    if plan.next_date == due and plan.skipped == 0:
        return None
    return plan


def moved_update(doc: Doc, plan: Plan) -> Doc:
    """Back to `waiting` at the occurrence the plan picked, with what it skipped."""
    return _next(doc, plan, finished_status="done")


def skipped_fields(doc: Doc, plan: Plan) -> dict[str, Any]:
    if not plan.skipped:
        return {}
    fields: dict[str, Any] = {"skipped": int(doc.get("skipped", 0)) + plan.skipped}
    if plan.last_skipped is not None:
        fields["last_skipped"] = iso(plan.last_skipped)
    return fields


def next_overlapping(doc: Doc, policy: Policy, after: datetime, handed_off: int) -> datetime | None:
    """With `overlap: "allow"`: the occurrence after `after` that comes due while
    this run is still going, to be run by a task of its own (within the limit,
    counting this run and the `handed_off` ones)."""
    repeat = policy.repeat
    if repeat is None or policy.overlap != "allow":
        return None
    if repeat.limit is not None and int(doc.get("runs", 0)) + 1 + handed_off >= repeat.limit:
        return None
    return next_occurrence(repeat, anchor_of(doc), after)


def spawned_task(doc: Doc, occurrence: datetime) -> Doc:
    """A one-off task for an occurrence that overlaps the running one."""
    fields = ("worker", "job", "retry", "timeout")
    return {
        **{key: doc[key] for key in fields if key in doc},
        "date": iso(occurrence),
        "status": "waiting",
        "spawned_by": doc["_id"],
    }


def after_run_update(
    doc: Doc,
    policy: Policy,
    outcome: dict[str, Any],
    now: datetime,
    rng: Any = None,
    spawned: list[datetime] | None = None,
) -> Doc:
    """The document a run's end writes: `done` or `err`, or `waiting` again for a
    retry or for the next occurrence; `canceled` if a cancel came while it ran.

    `spawned`: occurrences that came due during the run and were handed to tasks
    of their own (overlap "allow"); the series goes on after the last of them.
    """
    spawned = spawned or []
    failed = bool(outcome.get("error"))
    attempt = int(doc.get("attempt", 1))
    # Every run leaves a record, kept in the task as a capped list: one write per
    # run either way, and no extra document to fetch when a task is shown.
    entry = {
        "occurrence": iso(occurrence_of(doc)),
        "attempt": attempt,
        "instance": doc.get("owner"),
        "status": "canceled" if doc.get("status") == "cancel" else "err" if failed else "done",
        **{k: outcome.get(k) for k in ("started_at", "finished_at", "duration_ms")},
    }
    if failed:
        entry["error"] = str(outcome["error"].get("message", ""))[:200]
    doc = {**doc, "history": [*doc.get("history", []), entry][-HISTORY:]}
    if doc.get("status") == "cancel":
        return outcome_update(doc, outcome)
    if failed and policy.retry is not None:
        retry_at = next_attempt(policy.retry, attempt, now, rng)
        if retry_at is not None:
            return _update(
                doc,
                **outcome,
                status="waiting",
                owner=None,
                claimed_at=None,
                date=iso(retry_at),
                occurrence=iso(occurrence_of(doc)),
            )
    if policy.repeat is None:
        return outcome_update(doc, outcome)
    runs = int(doc.get("runs", 0)) + 1 + len(spawned)
    ran = _update(doc, **outcome, runs=runs, anchor=iso(anchor_of(doc)))
    last = max([occurrence_of(doc), *spawned])
    started = parse_date(outcome["started_at"]) if outcome.get("started_at") else now
    # Occurrences missed before this run started follow the misfire policy (a
    # catch-up goes on); those that came due while it ran follow overlap: with
    # "skip" (the default) they are skipped and recorded, with "allow" they were
    # handed to tasks of their own.
    plan = plan_after_run(policy.repeat, policy.misfire, anchor_of(doc), last, started, runs)
    if policy.overlap == "skip" and plan.next_date is not None and started <= plan.next_date < now:
        during = plan_overdue(policy.repeat, NO_OVERLAP, anchor_of(doc), plan.next_date, now, runs)
        plan = Plan(
            during.next_date,
            plan.skipped + during.skipped,
            during.last_skipped or plan.last_skipped,
        )
    return _next(ran, plan, finished_status="err" if failed else "done")


def _next(doc: Doc, plan: Plan, finished_status: str) -> Doc:
    """Waiting for the plan's next date, or finished when the series has ended."""
    skipped = skipped_fields(doc, plan)
    if plan.next_date is None:
        return _update(doc, **skipped, status=finished_status, occurrence=None)
    return _update(
        doc,
        **skipped,
        status="waiting",
        owner=None,
        claimed_at=None,
        attempt=None,
        occurrence=None,
        anchor=iso(anchor_of(doc)),
        date=iso(plan.next_date),
    )
