"""Worker records: one document per worker instance, renewed on a heartbeat.

A record says which instance is alive and until when (its lease). A task's
`owner` names an instance; the task is that instance's for as long as the
record's lease holds. One write per heartbeat renews the leases of everything
the instance holds, whatever their number. When a lease runs out, another
instance of the same worker name takes the tasks over by compare-and-set on
each task's `_rev`, and marks the record `reaped`.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta
from typing import Any

from after import __version__
from after.tasks import RULES, Doc, iso, parse_date

PREFIX: str = RULES["record_prefix"]
# Records older than this after they were reaped or stopped are deleted by a peer.
KEEP_FOR = timedelta(days=1)


def record_id(instance: str) -> str:
    return PREFIX + instance


def name_range(name: str) -> dict[str, str]:
    """`_all_docs` bounds for the records of one worker name (`name@…`)."""
    return {"startkey": f"{PREFIX}{name}@", "endkey": f"{PREFIX}{name}@\ufff0"}


def all_range() -> dict[str, str]:
    return {"startkey": PREFIX, "endkey": PREFIX + "\ufff0"}


def new_record(name: str, instance: str, now: datetime) -> Doc:
    return {
        "_id": record_id(instance),
        "type": "worker",
        "name": name,
        "instance": instance,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "version": __version__,
        "started_at": iso(now),
    }


def renewed(record: Doc, now: datetime, lease: timedelta, counts: dict[str, Any]) -> Doc:
    """The record with a fresh lease and the instance's current counts."""
    return {
        **record,
        **counts,
        "last_seen": iso(now),
        "lease_until": iso(now + lease),
        "state": "running",
    }


def stopped(record: Doc, now: datetime, counts: dict[str, Any]) -> Doc:
    """A graceful stop: the lease ends now (nothing is left held to take over)."""
    return {**record, **counts, "last_seen": iso(now), "lease_until": iso(now), "state": "stopped"}


def abandoned(record: Doc, now: datetime, counts: dict[str, Any]) -> Doc:
    """An exit on an error, which may have left tasks held: still `running`, with a
    lease that ends now, so a peer takes its tasks over (needs_takeover) once the record
    has stayed unchanged for a lease, as for any instance that went silent."""
    return {**record, **counts, "last_seen": iso(now), "lease_until": iso(now), "state": "running"}


def reaped(record: Doc, by: str, now: datetime) -> Doc:
    return {**record, "state": "lost", "reaped_by": by, "reaped_at": iso(now)}


def _date(record: Doc, field: str) -> datetime | None:
    """A date field of a record, or None if it is missing or unreadable."""
    value = record.get(field)
    try:
        return parse_date(value) if isinstance(value, str) else None
    except (ValueError, OverflowError):
        return None


def lease_until(record: Doc) -> datetime | None:
    return _date(record, "lease_until")


def is_live(record: Doc, now: datetime) -> bool:
    until = lease_until(record)
    return until is not None and until > now


def needs_takeover(record: Doc, now: datetime) -> bool:
    """Expired while running: its tasks must be checked and taken over."""
    return record.get("state") == "running" and not is_live(record, now)


def can_be_deleted(record: Doc, now: datetime) -> bool:
    ended = record.get("reaped_at") or (
        record.get("state") == "stopped" and record.get("last_seen")
    )
    return isinstance(ended, str) and parse_date(ended) + KEEP_FOR < now
