"""`after metrics`: the state of a tasks database in the Prometheus text format.

Read from the same views and worker records as `after status` (a handful of
small requests, whatever the number of tasks), so that anything that scrapes
text (Prometheus through node_exporter's textfile collector, or any agent that
reads the exposition format) can watch After without another port:

- `after_tasks{worker,status}`: tasks by worker and status (gauge);
- `after_tasks_late{worker}` and `after_task_oldest_lateness_seconds{worker}`:
  tasks past their date that nobody runs yet, and how late the oldest is;
- `after_runs_total{worker,instance,outcome}`: runs each instance ended, done or
  failed, since it started (a counter that restarts with the instance, as
  Prometheus counters do);
- `after_run_duration_seconds{worker}` and `after_run_start_delay_seconds{worker}`:
  summaries (p50, p90, p99, sum, count) of the runs that ended in the last
  `window` seconds; the start delay is from the date of a first attempt to its
  start (retries are late by design, so they are left out);
- `after_instances{worker,state}` and `after_instance_heartbeat_age_seconds
  {worker,instance}`: instances by state (live, stale, stopped, lost) and the age
  of each live one's last heartbeat.

Formatting is prometheus_client's, so names, escaping and types follow the format.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import generate_latest

from after import records, status
from after.couch import Database
from after.status import moment_of, seconds_of
from after.tasks import STATUSES, iso, now

DDOC = "after"
WINDOW = 300.0  # seconds of finished runs the summaries cover
QUANTILES = (0.5, 0.9, 0.99)


def collect(db: Database, at: datetime | None = None, window: float = WINDOW) -> list[Metric]:
    """Every metric of `db` at `at` (default: now)."""
    at = at or now()
    counts = worker_counts(db)
    return [
        *task_metrics(db, at, counts),
        *run_metrics(db, at, window, list(counts)),
        *instance_metrics(db, at),
    ]


def worker_counts(db: Database) -> dict[str, dict[str, int]]:
    """Tasks by worker, then status: one grouped reduce of `by_worker`."""
    counts: dict[str, dict[str, int]] = {}
    for row in db.view(DDOC, "by_worker", group_level=2)["rows"]:
        worker, task_status = row["key"]
        counts.setdefault(str(worker), {})[str(task_status)] = row["value"]
    return counts


def render(metrics: Iterable[Metric]) -> str:
    """The Prometheus text exposition of `metrics`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(metrics)))
    return generate_latest(registry).decode("utf-8")


def write_textfile(path: Path, text: str) -> None:
    """Replace `path` at once (a temporary file renamed over it), as the textfile
    collector wants: it must never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- the metrics --------------------------------------------------------------------------


def task_metrics(db: Database, at: datetime, counts: dict[str, dict[str, int]]) -> Iterator[Metric]:
    tasks = GaugeMetricFamily(
        "after_tasks", "Tasks by worker and status.", labels=["worker", "status"]
    )
    for worker, by_status in counts.items():
        # Every status of the table, 0 included, so that a series never just vanishes.
        for task_status in [*STATUSES, *sorted(set(by_status) - set(STATUSES))]:
            tasks.add_metric([worker, task_status], by_status.get(task_status, 0))
    yield tasks
    workers = list(counts)

    late = GaugeMetricFamily(
        "after_tasks_late",
        "Tasks past their date that no instance has started yet.",
        labels=["worker"],
    )
    oldest = GaugeMetricFamily(
        "after_task_oldest_lateness_seconds",
        "How long the oldest late task of a worker is past its date (0 when none is late).",
        labels=["worker"],
    )
    moment = iso(at)
    for worker in workers:
        count, first_due = 0, None
        for task_status in status.LATE_STATUSES:
            bounds = {"startkey": [worker, task_status], "endkey": [worker, task_status, moment]}
            rows = db.view(DDOC, "by_worker", reduce=True, **bounds)["rows"]
            count += rows[0]["value"] if rows else 0
            first = db.view(DDOC, "by_worker", reduce=False, limit=1, **bounds)["rows"]
            if first:
                due = moment_of(first[0]["key"][2])
                if due is not None and (first_due is None or due < first_due):
                    first_due = due
        late.add_metric([str(worker)], count)
        oldest.add_metric([str(worker)], seconds_of(at - first_due) if first_due else 0.0)
    yield late
    yield oldest


def run_metrics(db: Database, at: datetime, window: float, workers: list[str]) -> Iterator[Metric]:
    since = iso(at - timedelta(seconds=window))
    durations: dict[str, list[float]] = {}
    delays: dict[str, list[float]] = {}
    for worker in workers:
        rows = db.view(
            DDOC, "runs", startkey=["worker", worker, since], endkey=["worker", worker, {}]
        )["rows"]
        for row in rows:
            run = row["value"]
            if isinstance(run.get("duration_ms"), int | float):
                durations.setdefault(worker, []).append(run["duration_ms"] / 1000)
            started, due = moment_of(run.get("started_at")), moment_of(run.get("occurrence"))
            if started and due and run.get("attempt") in (None, 1):
                delays.setdefault(worker, []).append(max(seconds_of(started - due), 0.0))
    yield _summary(
        "after_run_duration_seconds",
        f"Run durations of the runs that ended in the last {window:g} s.",
        durations,
    )
    yield _summary(
        "after_run_start_delay_seconds",
        f"Date to start of first attempts that ended in the last {window:g} s.",
        delays,
    )


def instance_metrics(db: Database, at: datetime) -> Iterator[Metric]:
    rows = db.all_docs(include_docs=True, **records.all_range())["rows"]
    found = [row["doc"] for row in rows if row.get("doc") and row["doc"].get("type") == "worker"]
    states = GaugeMetricFamily(
        "after_instances", "Worker instances by state.", labels=["worker", "state"]
    )
    counts: dict[tuple[str, str], int] = {}
    age = GaugeMetricFamily(
        "after_instance_heartbeat_age_seconds",
        "Seconds since each live instance last renewed its lease.",
        labels=["worker", "instance"],
    )
    runs = CounterMetricFamily(
        "after_runs",
        "Runs an instance ended since it started, by outcome.",
        labels=["worker", "instance", "outcome"],
    )
    for record in found:
        name, instance = str(record.get("name")), str(record.get("instance"))
        state = status.instance_state(record, at)
        counts[(name, state)] = counts.get((name, state), 0) + 1
        seen = moment_of(record.get("last_seen"))
        if state == "live" and seen is not None:
            age.add_metric([name, instance], seconds_of(at - seen))
        for outcome, field in (("done", "done"), ("failed", "failed")):
            if isinstance(record.get(field), int):
                runs.add_metric([name, instance, outcome], record[field])
    for (name, state), count in sorted(counts.items()):
        states.add_metric([name, state], count)
    yield states
    yield age
    yield runs


# -- helpers ------------------------------------------------------------------------------


class _Fixed:
    """A collector that yields metrics gathered beforehand."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def _summary(name: str, documentation: str, samples: dict[str, list[float]]) -> Metric:
    family = SummaryMetricFamily(name, documentation, labels=["worker"])
    for worker, values in sorted(samples.items()):
        family.add_metric([worker], count_value=len(values), sum_value=round(sum(values), 6))
        for q in QUANTILES:
            family.add_sample(
                name, {"worker": worker, "quantile": str(q)}, quantile(values, q), None
            )
    return family


def quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(sorted(values), n=100, method="inclusive")
    return round(cuts[round(q * 100) - 1], 6)
