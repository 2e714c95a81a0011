"""Cron no more: repeating tasks, retries, timeouts and misfires, run by a real worker."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from conftest import wait_for
from test_worker import StartWorker, create, in_seconds, wait_status

from after.couch import Database
from after.tasks import iso, parse_date


def ms(delta: timedelta) -> float:
    return delta.total_seconds() * 1000


def test_an_interval_repeat_runs_its_series_without_drift(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    first = in_seconds(0.5)
    task_id = create(
        db,
        date=first,
        job={"name": "sleep", "arguments": [0.3]},
        repeat={"interval": "PT1S", "limit": 3},
    )
    doc = wait_status(db, task_id, "done", timeout=10)
    assert doc["runs"] == 3
    occurrences = [parse_date(run["occurrence"]) for run in doc["history"]]
    anchor = parse_date(first)
    # Anchor + k * interval, although every run took 300 ms: no drift.
    assert occurrences == [anchor + timedelta(seconds=k) for k in range(3)]
    for run in doc["history"]:
        late = parse_date(run["started_at"]) - parse_date(run["occurrence"])
        assert timedelta(0) <= late < timedelta(milliseconds=50), run
    assert doc["anchor"] == iso(anchor)


def test_a_cron_repeat_with_seconds_runs_on_each_matching_second(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(
        db, job={"name": "echo", "arguments": ["tick"]}, repeat={"cron": "* * * * * *", "limit": 3}
    )
    doc = wait_status(db, task_id, "done", timeout=10)
    assert doc["runs"] == 3
    later = [parse_date(run["occurrence"]) for run in doc["history"]][1:]
    assert all(moment.microsecond == 0 for moment in later)  # whole seconds, from cron
    assert later[1] - later[0] == timedelta(seconds=1)


def test_a_repeat_waits_between_runs(db: Database, start_worker: StartWorker) -> None:
    start_worker()
    task_id = create(db, date=in_seconds(0.2), repeat={"interval": "PT1H"})
    doc = wait_for(lambda: (d := db.get(task_id)) and d.get("runs") == 1 and d)
    assert doc["status"] in ("waiting", "scheduled")
    assert parse_date(doc["date"]) - parse_date(doc["anchor"]) == timedelta(hours=1)
    assert doc["result"] == [2, 3, "test"]


def test_a_failed_attempt_is_retried_with_backoff_then_fails_for_good(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(
        db,
        job={"name": "fail", "arguments": ["flaky"]},
        retry={"limit": 2, "delay": "PT0.2S", "backoff": 2, "jitter": False},
    )
    doc = wait_status(db, task_id, "err", timeout=10)
    assert doc["attempt"] == 3
    assert doc["error"]["message"] == "flaky"


def test_a_retry_that_succeeds_ends_done(
    db: Database, start_worker: StartWorker, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    marker = tmp_path / "failed-once"
    (jobs / "flaky.py").write_text(
        "from pathlib import Path\n"
        "def run():\n"
        f"    marker = Path({str(marker)!r})\n"
        "    if not marker.exists():\n"
        "        marker.touch()\n"
        "        raise RuntimeError('first attempt fails')\n"
        "    return 'second attempt works'\n"
    )
    start_worker(jobs=jobs)
    task_id = create(db, job={"name": "flaky"}, retry={"limit": 3, "delay": "PT0.1S"})
    doc = wait_status(db, task_id, "done", timeout=10)
    assert doc["attempt"] == 2
    assert doc["result"] == "second attempt works"
    assert "error" not in doc


def test_a_job_past_its_timeout_is_stopped(db: Database, start_worker: StartWorker) -> None:
    start_worker()
    started = time.monotonic()
    task_id = create(db, job={"name": "sleep", "arguments": [30]}, timeout="PT0.5S")
    doc = wait_status(db, task_id, "err", timeout=10)
    assert time.monotonic() - started < 10
    assert doc["error"]["type"] == "JobTimeout"
    assert doc["error"]["message"].startswith("timeout:")
    assert wait_status(db, create(db), "done")  # the worker goes on


def test_a_job_with_a_timeout_runs_in_a_child_process_and_returns_its_result(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(db, job={"name": "echo", "arguments": [1, "two"]}, timeout="PT30S")
    assert wait_status(db, task_id, "done", timeout=10)["result"] == [1, "two"]
    failing = create(db, job={"name": "fail", "arguments": ["in a child"]}, timeout="PT30S")
    error = wait_status(db, failing, "err", timeout=10)["error"]
    assert error["type"] == "RuntimeError"
    assert error["message"] == "in a child"
    assert "fail.py" in error["traceback"]


def test_canceling_a_job_with_a_timeout_stops_it(db: Database, start_worker: StartWorker) -> None:
    start_worker()
    task_id = create(db, job={"name": "sleep", "arguments": [60]}, timeout="PT120S")
    doc = wait_status(db, task_id, "running", timeout=10)
    time.sleep(0.3)  # let the child process start its job
    db.put({**doc, "status": "cancel"})
    doc = wait_status(db, task_id, "canceled", timeout=10)
    assert doc["error"]["message"].startswith("canceled while running")
    assert parse_date(doc["finished_at"]) - parse_date(doc["started_at"]) < timedelta(seconds=10)


def test_a_schedule_the_worker_cannot_understand_fails_with_the_reason(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(
        db,
        date=in_seconds(60),  # within the horizon: held, so checked now
        repeat={"cron": "0 9 * * *", "timezone": "Mars/Olympus_Mons"},
    )
    doc = wait_status(db, task_id, "err", timeout=10)
    assert doc["error"]["message"].startswith("repeat.timezone:")
    assert "Mars/Olympus_Mons" in doc["error"]["message"]


def anchored(seconds_ago: float) -> str:
    return iso(datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=seconds_ago))


def test_misfire_skip_records_missed_runs_and_moves_on(
    db: Database, start_worker: StartWorker
) -> None:
    task_id = create(
        db,
        date=anchored(630),
        repeat={"interval": "PT60S"},
        misfire={"policy": "skip", "grace": "PT1S"},
    )
    start_worker()
    doc = wait_for(lambda: (d := db.get(task_id)) and d.get("skipped") and d)
    assert doc["skipped"] == 11  # every occurrence of the last ten and a half minutes
    assert parse_date(doc["date"]) > datetime.now(UTC)
    assert "runs" not in doc


def test_misfire_once_runs_one_catch_up(db: Database, start_worker: StartWorker) -> None:
    task_id = create(
        db,
        date=anchored(630),
        repeat={"interval": "PT60S"},
        misfire={"policy": "once", "grace": "PT1S"},
    )
    start_worker()
    doc = wait_for(lambda: (d := db.get(task_id)) and d.get("runs") == 1 and d)
    assert doc["skipped"] == 10
    assert parse_date(doc["date"]) > datetime.now(UTC)  # the next one is in the future


def test_misfire_all_runs_every_missed_occurrence(db: Database, start_worker: StartWorker) -> None:
    task_id = create(db, date=anchored(5.5), repeat={"interval": "PT1S", "limit": 4}, misfire="all")
    start_worker()
    doc = wait_status(db, task_id, "done", timeout=10)
    assert doc["runs"] == 4
    assert "skipped" not in doc
    assert [run["occurrence"] for run in doc["history"]] == [
        iso(parse_date(doc["anchor"]) + timedelta(seconds=k)) for k in range(4)
    ]


def test_overlap_skip_records_occurrences_that_came_while_running(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker()
    task_id = create(
        db,
        date=in_seconds(0.3),
        job={"name": "sleep", "arguments": [2.3]},
        repeat={"interval": "PT1S", "limit": 2},
    )
    doc = wait_status(db, task_id, "done", timeout=15)
    assert doc["runs"] == 2
    assert doc["skipped"] == 2  # anchor + 1 s and + 2 s came while the first run went on
    second = doc["history"][1]
    assert parse_date(second["occurrence"]) == parse_date(doc["anchor"]) + timedelta(seconds=3)


def test_overlap_allow_runs_overlapping_occurrences_as_tasks_of_their_own(
    db: Database, start_worker: StartWorker
) -> None:
    start_worker(concurrency=4)
    task_id = create(
        db,
        date=in_seconds(0.3),
        job={"name": "sleep", "arguments": [2.3]},
        repeat={"interval": "PT1S", "limit": 4},
        overlap="allow",
    )
    doc = wait_status(db, task_id, "done", timeout=15)
    assert doc["runs"] == 4  # its own two runs and two handed off
    assert "skipped" not in doc
    children = [
        row["doc"]
        for row in db.all_docs(include_docs=True)["rows"]
        if row["doc"].get("spawned_by") == task_id
    ]
    anchor = parse_date(doc["anchor"])
    assert sorted(parse_date(c["date"]) for c in children) == [
        anchor + timedelta(seconds=1),
        anchor + timedelta(seconds=2),
    ]
    for child in children:
        assert wait_status(db, child["_id"], "done", timeout=10)["result"] == 2.3
    assert parse_date(doc["history"][-1]["occurrence"]) == anchor + timedelta(seconds=3)


def test_a_timed_out_job_never_finishes_its_side_effect(
    db: Database, start_worker: StartWorker, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    effect = tmp_path / "side-effect"
    (jobs / "slow_write.py").write_text(
        "import time\n"
        "def run():\n"
        "    time.sleep(1.5)\n"
        f"    open({str(effect)!r}, 'w').write('written')\n"
    )
    start_worker(jobs=jobs)
    task_id = create(db, job={"name": "slow_write"}, timeout="PT0.3S")
    assert wait_status(db, task_id, "err", timeout=10)["error"]["type"] == "JobTimeout"
    time.sleep(2.0)  # past the moment the job would have written
    assert not effect.exists()
