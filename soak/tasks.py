"""The task mix: every kind of task After runs, drawn from the seed.

Each kind says what its job does and which final statuses it may end with when no
client steers it. A run interrupted by the nemesis (its instance killed, or paused
past its lease) ends `err` "worker lost" or goes on to its retry or next occurrence:
that is allowed for every kind, and the checker accepts it. Anything else (a `fail`
task ending `done`, a far-future task that ran) is a wrong outcome.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from after.tasks import iso

Doc = dict[str, Any]
PREFIX = "soak-"  # every soak task's id starts so; worker records and design docs do not
FAR = timedelta(days=2)  # far beyond any worker's --horizon


@dataclass(frozen=True)
class Kind:
    name: str
    weight: int
    ends: frozenset[str]  # final statuses it may reach untouched (besides "worker lost")
    repeating: bool = False
    longest: float = 0.5  # seconds its longest run may take (for the checker's bound)
    tail: float = 0.0  # seconds its series or retries may go on after its first date


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("once", 25, frozenset({"done"})),
        Kind("now", 5, frozenset({"done"})),
        Kind("slow", 10, frozenset({"done"}), longest=3.0),
        Kind("fail", 6, frozenset({"err"}), tail=2.0),
        Kind("flaky", 8, frozenset({"done"}), tail=3.0),
        Kind("timeout", 5, frozenset({"err"}), longest=5.5, tail=12.0),
        Kind("timed_ok", 5, frozenset({"done"}), longest=1.0),
        Kind("nan", 2, frozenset({"err"})),
        Kind("surrogate", 2, frozenset({"err"})),
        Kind("huge", 1, frozenset({"done"}), longest=2.0),
        Kind("cron", 8, frozenset({"done"}), repeating=True, tail=8.0),
        Kind("interval", 8, frozenset({"done"}), repeating=True, tail=10.0),
        Kind("cron_fail", 3, frozenset({"err"}), repeating=True, tail=8.0),
        Kind("far", 5, frozenset()),  # never runs: it stays waiting for its date
    )
}


def kind_of(task_id: str) -> str:
    """The kind named at the end of a soak task's id."""
    return task_id.rsplit("-", 1)[-1]


def draw_kind(rng: random.Random, repeating: bool = True) -> str:
    kinds = [k for k in KINDS.values() if repeating or not k.repeating]
    return rng.choices([k.name for k in kinds], weights=[k.weight for k in kinds])[0]


def new_task(rng: random.Random, task_id: str, kind: str, worker: str, date: datetime) -> Doc:
    """The document of one task of `kind`, due at `date` (a far task: two days later)."""
    doc: Doc = {"_id": f"{task_id}-{kind}", "worker": worker, "status": "waiting"}
    arguments: list[Any]
    if kind in ("once", "now"):
        arguments = ["ok", round(rng.uniform(0, 0.3), 3)]
    elif kind == "slow":
        arguments = ["ok", round(rng.uniform(1.5, 3.0), 3)]
    elif kind == "fail":
        arguments = ["fail", 0.05]
        doc["retry"] = {"limit": 1, "delay": "PT1S", "backoff": 1}
    elif kind == "flaky":
        arguments = ["flaky", rng.choice([2, 3])]
        doc["retry"] = {"limit": 3, "delay": "PT0.5S", "backoff": 1}
    elif kind == "timeout":
        # Long enough for the child process to start (about a second on a busy 2-core
        # machine) and the job to write its ledger line before it is stopped.
        arguments = ["sleep", 12]
        doc["timeout"] = "PT5S"
        doc["retry"] = {"limit": 1, "delay": "PT0.5S", "backoff": 1}
    elif kind == "timed_ok":
        arguments = ["ok", 0.1]
        doc["timeout"] = "PT10S"
    elif kind in ("nan", "surrogate", "huge"):
        arguments = [kind]
    elif kind == "cron":
        arguments = ["ok", 0.1]
        doc["repeat"] = {"cron": "*/2 * * * * *", "limit": rng.choice([3, 4])}
    elif kind == "interval":
        arguments = ["ok", 0.1]
        if rng.random() < 0.5:
            doc["repeat"] = {"interval": "PT3S", "limit": 3}
        else:  # ends by date instead: no occurrence after `until`
            doc["repeat"] = {"interval": "PT2S", "until": iso(date + timedelta(seconds=7))}
    elif kind == "cron_fail":
        arguments = ["fail", 0.05]
        doc["repeat"] = {"cron": "*/3 * * * * *", "limit": 2}
    elif kind == "far":
        arguments = ["ok", 0]
        date = date + FAR
    else:
        raise ValueError(f"unknown task kind {kind!r}")
    doc["date"] = iso(date)
    doc["job"] = {"name": "ledger", "arguments": arguments}
    return doc


def initial_tasks(
    seed: int, count: int, names: list[str], start: datetime, spread: float
) -> list[Doc]:
    """The tasks written before the workers start: due from now (`now` tasks) to
    `spread` seconds later; repeating ones early enough for their series to end."""
    rng = random.Random(f"tasks-{seed}")
    docs = []
    for n in range(count):
        kind = draw_kind(rng)
        info = KINDS[kind]
        if kind == "now":
            offset = 0.0
        else:
            latest = max(1.0, spread - info.tail)
            offset = rng.uniform(1.0, latest)
        date = start + timedelta(seconds=offset)
        docs.append(new_task(rng, f"{PREFIX}{seed}-{n:05d}", kind, rng.choice(names), date))
    return docs


def now() -> datetime:
    return datetime.now(UTC)
