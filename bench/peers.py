"""The peers, on the same machine in the same run: APScheduler 3 and Huey.

- APScheduler 3: a BackgroundScheduler with an SQLite SQLAlchemy job store and its default
  thread pool (10), `misfire_grace_time` raised so that no run is dropped; it runs in its own
  process (`python -m bench.peers aps ...`), which also adds the jobs (APScheduler has no
  out-of-process API). Again with its MemoryJobStore: the in-process limit, nothing
  persisted, which shows how far a persistent, distributed scheduler is from one.
- Huey: SqliteHuey, a `huey_consumer` process with 4 worker threads (After's default
  concurrency), other settings at their defaults (scheduler interval 1 s, polling
  0.1 s backing off to 10 s); the bench enqueues the tasks with an `eta`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.env import ROOT, Bench
from bench.stats import rate, summary_ms

PYTHON = sys.executable


def _summarise(
    records: list[tuple[int, float, float, float]],
    n: int,
    all_done_at: float | None,
    created: dict[int, float] | None = None,
    claimed: dict[int, float] | None = None,
) -> dict[str, Any]:
    lateness = [started - due for _, due, started, _ in records]
    result: dict[str, Any] = {
        "tasks": n,
        "ran": len(records),
        "lateness_ms": summary_ms(lateness),
        "_lateness_s": lateness,
    }
    if records:
        first_due = min(due for _, due, _, _ in records)
        last_finished = max(f for *_, f in records)
        result["due_spread_ms"] = round((max(d for _, d, _, _ in records) - first_due) * 1000, 1)
        result["last_finished_after_first_due_s"] = round(last_finished - first_due, 3)
        result["throughput_jobs_per_s"] = rate(len(records), last_finished - first_due)
        if all_done_at is not None:
            result["all_done_in_db_s"] = round(all_done_at - first_due, 3)
            result["throughput_db_per_s"] = rate(len(records), all_done_at - first_due)
    if created and claimed:
        pickup = [claimed[i] - created[i] for i in created if i in claimed]
        result["pickup_ms"] = summary_ms(pickup)
        result["claimed_before_due"] = sum(
            1 for i, due, _, _ in records if i in claimed and claimed[i] <= due
        )
    return result


# -- APScheduler ----------------------------------------------------------------------------


def aps_process(args: list[str]) -> None:
    """In the child process: python -m bench.peers aps SCENARIO N SECONDS STORE OUT, where
    STORE is `memory` or the SQLite file of the job store."""
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    from bench import peer_jobs

    scenario, n, seconds, store, out = args[0], int(args[1]), float(args[2]), args[3], args[4]
    jobstore = (
        MemoryJobStore() if store == "memory" else SQLAlchemyJobStore(url=f"sqlite:///{store}")
    )
    scheduler = BackgroundScheduler(
        jobstores={"default": jobstore},
        executors={"default": ThreadPoolExecutor(10)},
        job_defaults={"misfire_grace_time": 3600, "coalesce": False},
        timezone=UTC,
    )
    scheduler.start()
    created: dict[int, float] = {}

    def add(i: int, due: float) -> None:
        scheduler.add_job(
            peer_jobs.aps_noop,
            trigger="date",
            run_date=datetime.fromtimestamp(due, UTC),
            args=[i, due],
            id=f"t{i}",
        )

    # calibrate the add rate, so the burst is due once every job is in the store
    far = time.time() + 86_400
    began = time.perf_counter()
    for i in range(100):
        add(-1 - i, far)
    per_add = (time.perf_counter() - began) / 100
    scheduler.remove_all_jobs()
    if scenario == "burst":
        margin = 1.0 + 1.5 * n * per_add
        first_due = time.time() + margin
        began_wall = time.time()
        for i in range(n):
            add(i, first_due + 0.1 * i / n)
        loaded_s = time.time() - began_wall
        expect_end = first_due + 60 + n / 50
    else:
        began_wall = time.time()
        trickle(n, seconds, began_wall, created, add)
        loaded_s = time.time() - began_wall
        margin = None
        expect_end = time.time() + 60
    all_done_at = None
    while time.time() < expect_end:
        with peer_jobs.APS_LOCK:
            count = len(peer_jobs.APS_RECORDS)
        if count >= n:
            all_done_at = time.time()
            break
        time.sleep(0.005)
    scheduler.shutdown(wait=False)
    with peer_jobs.APS_LOCK:
        records = list(peer_jobs.APS_RECORDS)
    result = _summarise(records, n, all_done_at)
    result.update(per_add_ms=round(per_add * 1000, 3), loaded_s=round(loaded_s, 3))
    if margin is not None:
        result["margin_s"] = round(margin, 2)
    result["all_done"] = all_done_at is not None
    Path(out).write_text(json.dumps(result))


def aps(
    bench: Bench, scenario: str, n: int, seconds: float = 0.0, memory: bool = False
) -> dict[str, Any]:
    """APScheduler with the SQLite job store, or with the MemoryJobStore (`memory`)."""
    label = f"aps-{'memory' if memory else 'sqlite'}-{scenario}"
    store = "memory" if memory else str(bench.tmp / f"{label}.sqlite")
    out = bench.tmp / f"{label}.json"
    limit = 120 + n / 50 + seconds
    subprocess.run(
        [PYTHON, "-m", "bench.peers", "aps", scenario, str(n), str(seconds), store, str(out)],
        cwd=ROOT,
        check=True,
        timeout=limit,
    )
    result = json.loads(out.read_text())
    jobstore = "MemoryJobStore" if memory else "SQLAlchemyJobStore(sqlite)"
    result["settings"] = f"BackgroundScheduler, {jobstore}, 10 threads, misfire_grace_time=3600"
    return result


# -- Huey -------------------------------------------------------------------------------------


class HueyConsumer:
    def __init__(self, bench: Bench, label: str) -> None:
        self.db = bench.tmp / f"huey-{label}.sqlite"
        self.log = bench.tmp / f"huey-{label}.log"
        self.env = {**os.environ, "BENCH_HUEY_DB": str(self.db)}
        os.environ["BENCH_HUEY_DB"] = str(self.db)
        # the bench's own handle on the same SQLite file
        import importlib

        from bench import peer_jobs

        self.app = importlib.reload(peer_jobs)
        self.argv = [
            PYTHON, "-m", "huey.bin.huey_consumer", "bench.peer_jobs.huey",
            "-w", "4", "-k", "thread", "-l", str(self.log),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.log.exists() and "started with" in self.log.read_text(errors="replace"):
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"huey_consumer exited with {self.process.returncode}")
            time.sleep(0.02)

    def claimed(self) -> dict[int, float]:
        path = Path(str(self.db) + ".scheduled")
        seen: dict[int, float] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                i, at = line.split()
                seen.setdefault(int(i), float(at))
        return seen

    def records(self) -> list[tuple[int, float, float, float]]:
        huey = self.app.huey
        records = []
        for raw in huey.all_results().values():
            value = huey.serializer.deserialize(raw)
            if isinstance(value, list | tuple) and len(value) == 4:
                records.append(tuple(value))
        return records

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        os.environ.pop("BENCH_HUEY_DB", None)


def trickle(
    n: int,
    seconds: float,
    began_wall: float,
    created: dict[int, float],
    add: Callable[[int, float], None],
) -> None:
    """N tasks over `seconds`, a few every 20 ms, each due 1 s after it is added
    (as the After trickle): `created` gets each one's creation time."""
    tick, per_tick = 0.02, max(1, round(n / seconds * 0.02))
    k = i = 0
    while i < n and time.time() - began_wall < seconds + 10:
        pause = began_wall + k * tick - time.time()
        if pause > 0:
            time.sleep(pause)
        at = time.time()
        for j in range(min(per_tick, n - i)):
            created[i] = at
            add(i, at + 1.0 + j * tick / per_tick)
            i += 1
        k += 1


def huey_run(bench: Bench, scenario: str, n: int, seconds: float = 0.0) -> dict[str, Any]:
    consumer = HueyConsumer(bench, scenario)
    try:
        app = consumer.app
        noop = app.huey_noop

        def enqueue(i: int, due: float) -> None:
            noop.schedule(args=(i, due), eta=datetime.fromtimestamp(due, UTC))

        far = time.time() + 86_400
        began = time.perf_counter()
        for i in range(100):
            enqueue(-1 - i, far)
        per_enqueue = (time.perf_counter() - began) / 100
        created: dict[int, float] = {}
        began_wall = time.time()
        if scenario == "burst":
            # enqueue, and leave the consumer time to move every task into its schedule
            margin = 1.0 + 3.0 * n * per_enqueue
            first_due = time.time() + margin
            for i in range(n):
                created[i] = time.time()
                enqueue(i, first_due + 0.1 * i / n)
            expect_end = first_due + 60 + n / 50
        else:
            margin = None
            trickle(n, seconds, began_wall, created, enqueue)
            expect_end = time.time() + 60
        loaded_s = time.time() - began_wall
        all_done_at = None
        storage = app.huey.storage
        while time.time() < expect_end:
            if storage.result_store_size() >= n:
                all_done_at = time.time()
                break
            time.sleep(0.02)
        records = [r for r in consumer.records() if r[0] >= 0]
        result = _summarise(records, n, all_done_at, created, consumer.claimed())
        result.update(
            per_enqueue_ms=round(per_enqueue * 1000, 3),
            loaded_s=round(loaded_s, 3),
            all_done=all_done_at is not None,
            settings="SqliteHuey, huey_consumer -w 4 -k thread, defaults otherwise "
            "(scheduler interval 1 s, polling 0.1 s backing off to 10 s)",
        )
        if margin is not None:
            result["margin_s"] = round(margin, 2)
        return result
    finally:
        consumer.stop()


if __name__ == "__main__":
    if sys.argv[1] == "aps":
        aps_process(sys.argv[2:])
    else:
        raise SystemExit(f"unknown peer {sys.argv[1]!r}")
