"""The ledger the soak's job writes: one JSON line per run, the job's own account."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Line:
    task: str
    attempt: int
    key: str  # the idempotency key: task id (: occurrence, for a repeat) : attempt
    pid: int  # the process that ran the job: the worker, or its child for a timeout
    ppid: int
    at: float  # time.time() when the job started
    behaviour: str
    instance: str  # the soak's slot.generation of the worker process that ran it
    text: str  # the line as written
    process_started: float = 0.0  # when the process running the job was started

    @property
    def occurrence(self) -> str | None:
        """The occurrence a repeating task's run belongs to (from its key), else None."""
        middle = self.key[len(self.task) + 1 : self.key.rindex(":")]
        return middle or None


def read(path: Path) -> tuple[list[Line], list[str]]:
    """Every line of the ledger, and those that could not be read (torn or garbled:
    O_APPEND writes of one line should never produce any)."""
    lines, bad = [], []
    if not path.exists():
        return lines, bad
    for text in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(text)
            lines.append(
                Line(
                    row["task"],
                    int(row["attempt"]),
                    row["key"],
                    int(row["pid"]),
                    int(row["ppid"]),
                    float(row["at"]),
                    row["behaviour"],
                    str(row.get("instance", "")),
                    text,
                    float(row.get("process_started") or 0.0),
                )
            )
        except (ValueError, KeyError, TypeError):
            bad.append(text)
    return lines, bad
