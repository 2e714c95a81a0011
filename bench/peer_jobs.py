"""The no-op jobs the peers run, and the Huey application (imported by its consumer).

Each no-op records when it started and ended, the same instants After writes into a
task as `started_at` / `finished_at`; the job itself does nothing.
"""

from __future__ import annotations

import os
import threading
import time

# -- APScheduler: runs in the scheduler's own process, records kept in memory ---------------
APS_RECORDS: list[tuple[int, float, float, float]] = []
APS_LOCK = threading.Lock()


def aps_noop(i: int, due: float) -> None:
    started = time.time()
    finished = time.time()
    with APS_LOCK:
        APS_RECORDS.append((i, due, started, finished))


# -- Huey: SqliteHuey in the file named by BENCH_HUEY_DB ------------------------------------
huey = None
_signal_lock = threading.Lock()
_signal_file = None

if os.environ.get("BENCH_HUEY_DB"):
    from huey import SqliteHuey, signals

    huey = SqliteHuey("bench", filename=os.environ["BENCH_HUEY_DB"])

    @huey.task()
    def huey_noop(i: int, due: float) -> tuple[int, float, float, float]:
        started = time.time()
        return (i, due, started, time.time())

    @huey.signal(signals.SIGNAL_SCHEDULED)
    def _scheduled(signal, task, *args, **kwargs) -> None:
        """The consumer took the task off the queue and holds it for its eta ("claimed")."""
        global _signal_file
        at = time.time()
        with _signal_lock:
            if _signal_file is None:
                _signal_file = open(  # noqa: SIM115 (kept open for the process's life)
                    os.environ["BENCH_HUEY_DB"] + ".scheduled", "a", buffering=1
                )
            _signal_file.write(f"{task.args[0]} {at}\n")
