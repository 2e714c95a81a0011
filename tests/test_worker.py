"""The worker against a real server: claiming, running, steering, recovering."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from conftest import REPO, new_task, wait_for

from after.config import Config
from after.couch import Database
from after.tasks import iso, parse_date
from after.worker import Worker

StartWorker = Callable[..., Worker]  # the start_worker fixture of conftest.py


def in_seconds(seconds: float) -> str:
    return iso(datetime.now(UTC) + timedelta(seconds=seconds))


def status_of(db: Database, task_id: str) -> str | None:
    doc = db.get(task_id)
    return doc["status"] if doc else None


def wait_status(db: Database, task_id: str, *statuses: str, timeout: float = 15) -> dict[str, Any]:
    return wait_for(lambda: (d := db.get(task_id)) and d["status"] in statuses and d, timeout)


def create(db: Database, **fields: Any) -> str:
    task_id, _ = db.post(new_task(**fields))
    return task_id


def test_a_due_task_runs_at_its_date_and_records_its_outcome(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    date = in_seconds(1.0)
    task_id = create(db, date=date)
    doc = wait_status(db, task_id, "done")
    started = parse_date(doc["started_at"])
    assert started >= parse_date(date)
    assert started - parse_date(date) < timedelta(milliseconds=50)
    assert doc["result"] == [2, 3, "test"]
    assert parse_date(doc["finished_at"]) >= started
    assert doc["duration_ms"] >= 0
    assert doc["attempt"] == 1
    assert doc["owner"].startswith("manobi@")


def test_a_task_with_a_past_date_runs_at_once(db: Database, start_worker: StartWorker) -> None:
    start_worker()
    task_id = create(db, date="2011-10-12")
    assert wait_status(db, task_id, "done", timeout=5)["result"] == [2, 3, "test"]


def test_a_task_with_a_null_force_field_runs(db: Database, start_worker: StartWorker) -> None:
    """A server admin may write `"force": null`; the worker's writes must keep it."""
    start_worker()
    task_id = create(db, force=None)
    assert wait_status(db, task_id, "done")["force"] is None


def test_only_the_named_worker_takes_a_task(db: Database, start_worker: StartWorker) -> None:
    start_worker("manobi")
    other = create(db, worker="someone-else")
    mine = create(db)
    wait_status(db, mine, "done")
    assert status_of(db, other) == "waiting"


def recording_jobs(tmp_path: Path) -> tuple[Path, Path]:
    """A jobs directory with `record(value)`, which appends value to a file, in run order."""
    jobs, runs = tmp_path / "jobs", tmp_path / "runs.txt"
    jobs.mkdir()
    (jobs / "record.py").write_text(
        "def run(value):\n"
        f"    with open({str(runs)!r}, 'a') as f:\n"
        "        f.write(f'{value}\\n')\n"
    )
    return jobs, runs


def test_overdue_tasks_run_first_oldest_first(
    db: Database, start_worker: StartWorker, tmp_path: Path
) -> None:
    jobs, runs = recording_jobs(tmp_path)
    dates = ["2020-01-05", "2020-01-01T12:00:00+02:00", "2020-01-03", "2020-01-02", "2020-01-04"]
    ids = [create(db, date=date, job={"name": "record", "arguments": [date]}) for date in dates]
    start_worker(concurrency=1, jobs=jobs)
    for task_id in ids:
        wait_status(db, task_id, "done")
    assert runs.read_text().split() == sorted(dates, key=parse_date)


def test_canceling_a_scheduled_task_stops_it(db: Database, start_worker: StartWorker) -> None:
    start_worker()
    task_id = create(db, date=in_seconds(30))
    doc = wait_status(db, task_id, "scheduled")
    db.put({**doc, "status": "cancel"})
    doc = wait_status(db, task_id, "canceled")
    assert "started_at" not in doc
    assert "canceled_at" in doc


def test_rescheduling_a_scheduled_task_moves_its_run(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(db, date=in_seconds(60))
    doc = wait_status(db, task_id, "scheduled")
    new_date = in_seconds(1.0)
    db.put({**doc, "status": "reschedule", "date": new_date})
    doc = wait_status(db, task_id, "done")
    assert parse_date(doc["started_at"]) >= parse_date(new_date)
    assert parse_date(doc["started_at"]) - parse_date(new_date) < timedelta(milliseconds=50)


def test_a_failed_task_can_be_retried_with_reschedule(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(db, job={"name": "fail", "arguments": ["once"]})
    doc = wait_status(db, task_id, "err")
    db.put({**doc, "status": "reschedule", "date": in_seconds(0)})
    doc = wait_for(
        lambda: (d := db.get(task_id)) and d.get("attempt") == 2 and d["status"] == "err" and d
    )
    assert doc["error"]["message"] == "once"


def test_an_unknown_job_fails_the_task_not_the_worker(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    bad = create(db, job={"name": "no_such_job", "arguments": []})
    doc = wait_status(db, bad, "err")
    assert doc["error"]["type"] == "UnknownJob"
    assert "no_such_job" in doc["error"]["message"]
    assert str(REPO / "jobs") in doc["error"]["message"]
    assert wait_status(db, create(db), "done")


def test_a_job_that_raises_fails_the_task_with_its_traceback(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(db, job={"name": "fail", "arguments": ["boom"]})
    doc = wait_status(db, task_id, "err")
    assert doc["error"]["type"] == "RuntimeError"
    assert doc["error"]["message"] == "boom"
    assert "Traceback" in doc["error"]["traceback"]
    assert "fail.py" in doc["error"]["traceback"]
    assert wait_status(db, create(db), "done")


def test_an_edited_job_runs_its_new_code_without_restart(
    db: Database, start_worker: StartWorker, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "version.py").write_text("def run():\n    return 1\n")
    start_worker(jobs=jobs)
    first = create(db, job={"name": "version"})
    assert wait_status(db, first, "done")["result"] == 1
    (jobs / "version.py").write_text("def run():\n    return 'two'\n")
    second = create(db, job={"name": "version"})
    assert wait_status(db, second, "done")["result"] == "two"


def test_a_cancel_while_running_is_recorded_when_the_job_ends(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(db, job={"name": "sleep", "arguments": [1.0]})
    doc = wait_status(db, task_id, "running")
    db.put({**doc, "status": "cancel"})
    doc = wait_status(db, task_id, "canceled")
    assert doc["result"] == 1.0  # the job could not be stopped; its result is kept


def test_each_task_runs_exactly_once(
    db: Database, start_worker: StartWorker, tmp_path: Path
) -> None:
    jobs, runs = recording_jobs(tmp_path)
    ids = [create(db, job={"name": "record", "arguments": [n]}) for n in range(20)]
    start_worker(jobs=jobs)
    ids += [create(db, job={"name": "record", "arguments": [n]}) for n in range(20, 40)]
    for task_id in ids:
        wait_status(db, task_id, "done")
    assert sorted(int(line) for line in runs.read_text().split()) == list(range(40))


def test_start_up_reads_every_task_page_by_page(db: Database, start_worker: StartWorker) -> None:
    ids = [create(db, date=f"2020-01-{day:02d}") for day in range(1, 8)]
    start_worker(page_size=2)
    for task_id in ids:
        wait_status(db, task_id, "done")


def test_a_task_held_by_a_dead_process_is_taken_over(
    db: Database, start_worker: StartWorker
) -> None:
    task_id = create(db, date=in_seconds(1))
    doc = db.get(task_id)
    db.put({**doc, "status": "scheduled", "owner": "manobi@elsewhere:1:dead"})
    start_worker(heartbeat=0.3, lease=1.0)  # an owner with no record is dead after a lease
    doc = wait_status(db, task_id, "done")
    assert doc["owner"] != "manobi@elsewhere:1:dead"


def test_a_task_left_running_by_a_dead_process_is_marked_lost(
    db: Database, start_worker: StartWorker
) -> None:
    task_id = create(db)
    doc = db.get(task_id)
    doc = {**doc, "status": "scheduled", "owner": "manobi@elsewhere:1:dead"}
    db.put(doc)
    db.put({**doc, "status": "running", "attempt": 1})
    start_worker(heartbeat=0.3, lease=1.0)
    doc = wait_status(db, task_id, "err")
    assert doc["error"]["type"] == "WorkerLost"
    assert "worker lost" in doc["error"]["message"]


def test_stop_hands_held_tasks_back(
    db: Database, start_worker: StartWorker, config: Config
) -> None:
    worker = start_worker()
    task_id = create(db, date=in_seconds(60))
    wait_status(db, task_id, "scheduled")
    worker.stop()
    doc = wait_status(db, task_id, "waiting")
    assert "owner" not in doc
