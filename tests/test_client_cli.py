"""`after schedule`, `cancel`, `reschedule`, `show` and `history`, run the way a user runs them.

Real `python -m after ...` processes against the real test server; a real
worker (the start_worker fixture) where runs are needed. The race between a
client's reschedule and a worker's write is driven in-process, with the worker's
write made for real between the client's read and its write.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from conftest import after_cli, new_task, wait_for

from after import client
from after.couch import Database
from after.recurrence import next_occurrence, parse_repeat
from after.tasks import parse_date
from after.worker import Worker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(couch_url: str, db: Database, tmp_path: Path) -> dict[str, str]:
    """A user's environment, set up for the test server and database."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("AFTER_", "PYTEST_", "COV_"))
    }
    environment.update(
        AFTER_COUCHDB_URL=couch_url,
        AFTER_DB=db.name,
        AFTER_JOBS=str(REPO / "jobs"),
        AFTER_HOME=str(tmp_path / "home"),
        COLUMNS="200",  # rich never wraps a cell
        PYTHONIOENCODING="utf-8",
    )
    return environment


def schedule(env: dict[str, str], *args: str) -> str:
    """`after schedule ...`: it succeeds and prints the new task's id alone."""
    result = after_cli(env, "schedule", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].strip() == lines[0] and " " not in lines[0], result.stdout
    return lines[0]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """A failed command: non-zero exit, one line on stderr, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


def task_count(db: Database) -> int:
    return sum(not row["id"].startswith("_design/") for row in db.all_docs()["rows"])


def near(value: str, moment: datetime, slack: float = 10.0) -> bool:
    return abs((parse_date(value) - moment).total_seconds()) <= slack


# -- schedule ------------------------------------------------------------------------------


def test_schedule_at_writes_the_task_and_prints_only_its_id(
    env: dict[str, str], db: Database
) -> None:
    task_id = schedule(env, "manobi", "echo", "1", "two", "--at", "2030-01-02T03:04:05+02:00")
    doc = db.get(task_id)
    assert doc is not None
    assert doc["worker"] == "manobi"
    assert doc["status"] == "waiting"
    assert doc["date"] == "2030-01-02T01:04:05.000Z"
    assert doc["job"] == {"name": "echo", "arguments": [1, "two"]}
    for field in ("repeat", "retry", "timeout", "misfire"):
        assert field not in doc


def test_schedule_at_without_offset_is_utc_or_the_given_zone(
    env: dict[str, str], db: Database
) -> None:
    utc = schedule(env, "manobi", "echo", "--at", "2030-07-01T09:30")
    paris = schedule(env, "manobi", "echo", "--at", "2030-07-01T09:30", "--tz", "Europe/Paris")
    day = schedule(env, "manobi", "echo", "--at", "2030-07-01")
    assert db.get(utc)["date"] == "2030-07-01T09:30:00.000Z"
    assert db.get(paris)["date"] == "2030-07-01T07:30:00.000Z"  # summer time: UTC+2
    assert db.get(day)["date"] == "2030-07-01T00:00:00.000Z"


def test_schedule_in_with_retry_and_timeout(env: dict[str, str], db: Database) -> None:
    before = datetime.now(UTC)
    task_id = schedule(env, "manobi", "echo", "--in", "PT1H", "--retry", "3", "--timeout", "5m")
    doc = db.get(task_id)
    assert near(doc["date"], before + timedelta(hours=1))
    assert doc["retry"] == {"limit": 3}
    assert doc["timeout"] == "PT5M"
    assert "repeat" not in doc


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800), ("1h30m", 5400), ("PT45S", 45)],
)
def test_schedule_in_takes_simple_and_iso_durations(
    env: dict[str, str], db: Database, given: str, seconds: int
) -> None:
    before = datetime.now(UTC)
    doc = db.get(schedule(env, "manobi", "echo", "--in", given))
    assert near(doc["date"], before + timedelta(seconds=seconds))


def test_schedule_cron_starts_at_the_next_cron_time_in_its_zone(
    env: dict[str, str], db: Database
) -> None:
    before = datetime.now(UTC)
    task_id = schedule(
        env,
        "manobi",
        "echo",
        "--cron",
        "30 2 * * *",
        "--tz",
        "Europe/Paris",
        "--limit",
        "10",
        "--until",
        "2031-01-01",
        "--misfire",
        "once",
    )
    after = datetime.now(UTC)
    doc = db.get(task_id)
    assert doc["repeat"] == {
        "cron": "30 2 * * *",
        "timezone": "Europe/Paris",
        "limit": 10,
        "until": "2030-12-31T23:00:00.000Z",  # --until without offset: in --tz
    }
    assert doc["misfire"] == "once"
    repeat = parse_repeat(doc["repeat"])
    expected = {next_occurrence(repeat, t, t) for t in (before, after)}
    assert parse_date(doc["date"]) in expected


def test_schedule_cron_with_at_starts_at_that_date(env: dict[str, str], db: Database) -> None:
    doc = db.get(schedule(env, "manobi", "echo", "--cron", "0 * * * *", "--at", "2030-01-01"))
    assert doc["date"] == "2030-01-01T00:00:00.000Z"
    assert doc["repeat"] == {"cron": "0 * * * *"}


def test_schedule_every_starts_now_with_an_iso_interval(env: dict[str, str], db: Database) -> None:
    before = datetime.now(UTC)
    doc = db.get(schedule(env, "manobi", "echo", "--every", "90m", "--limit", "2"))
    assert doc["repeat"] == {"interval": "PT90M", "limit": 2}
    assert near(doc["date"], before)


def test_arguments_are_json_where_they_parse_else_strings(
    env: dict[str, str], db: Database
) -> None:
    given = ["3", "2.5", "true", "null", "[1, 2]", '{"a": 1}', '"7"', "hello world", "NaN"]
    task_id = schedule(env, "manobi", "echo", *given, "--in", "1h", "--", "-5", "--flag")
    assert db.get(task_id)["job"]["arguments"] == [
        3,
        2.5,
        True,
        None,
        [1, 2],
        {"a": 1},
        "7",
        "hello world",
        "NaN",  # Python reads NaN, JSON does not: it stays text
        -5,
        "--flag",
    ]


def test_a_job_name_the_server_refuses_is_one_line_with_its_reason(
    env: dict[str, str], db: Database
) -> None:
    line = one_line_error(after_cli(env, "schedule", "manobi", "not-a-job", "--in", "1m"))
    assert "403 forbidden" in line
    assert "job.name: must be a job module name" in line
    assert task_count(db) == 0


def test_an_argument_that_is_not_unicode_is_one_line_naming_it_and_nothing_is_sent(
    env: dict[str, str], db: Database
) -> None:
    """A byte that is not UTF-8 on the command line reaches Python as a lone surrogate
    (surrogateescape), which CouchDB refuses: the field is named, nothing is written."""
    bad = os.fsdecode(b"bad \x80")  # what Python makes of such a byte in argv
    result = after_cli(env, "schedule", "manobi", "echo", "ok", bad, "--in", "1m")
    line = one_line_error(result)
    assert "400 invalid_json: job.arguments[1]: the lone surrogate \\udc80" in line
    assert task_count(db) == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--cron", "61 * * * *"], "repeat.cron: bad minute field"),
        (["--in", "5 parsecs"], "--in: '5 parsecs' is not a duration"),
        (["--every", "1h", "--cron", "* * * * *"], "not both"),
        (["--in", "1m", "--limit", "3"], "--limit applies to repeating tasks"),
        (["--at", "2030-02-30"], "not a real calendar date"),
        (["--cron", "0 9 * * *", "--tz", "Mars/Olympus"], "unknown time zone"),
        ([], "say when"),
    ],
)
def test_bad_timing_options_are_one_line(
    env: dict[str, str], db: Database, args: list[str], says: str
) -> None:
    assert says in one_line_error(after_cli(env, "schedule", "manobi", "echo", *args))
    assert task_count(db) == 0


# -- cancel and reschedule -----------------------------------------------------------------


def test_cancel_a_waiting_task_then_again(env: dict[str, str], db: Database) -> None:
    task_id = schedule(env, "manobi", "echo", "--at", "2030-01-01")
    result = after_cli(env, "cancel", task_id)
    assert result.returncode == 0, result.stderr
    assert "cancel requested (it was waiting)" in result.stdout
    assert db.get(task_id)["status"] == "cancel"
    again = after_cli(env, "cancel", task_id)
    assert again.returncode == 0 and "already cancel" in again.stdout


def test_cancel_of_a_done_task_and_of_an_unknown_one_are_one_line(
    env: dict[str, str], db: Database
) -> None:
    task_id = db.post(new_task())[0]
    doc = db.get(task_id)
    db.put({**doc, "status": "scheduled", "owner": "manobi@h:1:a"})
    db.put({**db.get(task_id), "status": "running", "attempt": 1})
    db.put({**db.get(task_id), "status": "done", "result": 1})
    assert "is done" in one_line_error(after_cli(env, "cancel", task_id))
    assert "no task 'nope'" in one_line_error(after_cli(env, "cancel", "nope"))


def test_reschedule_moves_the_date(env: dict[str, str], db: Database) -> None:
    task_id = schedule(env, "manobi", "echo", "--at", "2030-01-01")
    result = after_cli(env, "reschedule", task_id, "--at", "2031-06-01T12:00:00Z")
    assert result.returncode == 0, result.stderr
    assert "rescheduled to 2031-06-01T12:00:00.000Z (it was waiting)" in result.stdout
    doc = db.get(task_id)
    assert (doc["status"], doc["date"]) == ("reschedule", "2031-06-01T12:00:00.000Z")
    before = datetime.now(UTC)
    assert after_cli(env, "reschedule", task_id, "--in", "2h").returncode == 0
    assert near(db.get(task_id)["date"], before + timedelta(hours=2))


def test_a_rescheduled_task_runs_at_its_new_date(
    env: dict[str, str], db: Database, start_worker: Callable[..., Worker]
) -> None:
    start_worker()
    task_id = schedule(env, "manobi", "echo", "moved", "--in", "2m")  # within the horizon
    wait_for(lambda: db.get(task_id)["status"] == "scheduled")  # claimed and held
    assert after_cli(env, "reschedule", task_id, "--in", "1s").returncode == 0
    done = wait_for(lambda: (d := db.get(task_id))["status"] == "done" and d)
    assert done["result"] == ["moved"]


def claim(db: Database, doc: dict[str, Any], owner: str = "manobi@elsewhere:42:w1") -> None:
    """What a worker writes when it claims a task: a new revision, under its own name.
    The race tests below play it step by step on a database of one copy: on a cluster
    the client's read right after this write may meet a copy that lags it (the client
    then meets a 409, or its write is stored beside the claim, answered 202: the
    conflict a worker resolves, tests/test_resilience.py)."""
    db.put({**doc, "status": "scheduled", "owner": owner, "claimed_at": "2030-01-01T00:00:00Z"})


def test_a_reschedule_that_races_a_claim_rereads_and_keeps_the_worker_fields(
    one_copy_db: Database,
) -> None:
    db = one_copy_db  # the client's logic, step by step (see `claim`)
    task_id = db.post(new_task(date="2030-01-01"))[0]
    stale = db.get(task_id)  # the client reads ...
    claim(db, dict(stale))  # ... the worker writes a new revision ...
    date = datetime(2031, 1, 1, tzinfo=UTC)
    move = client.reschedule_task(db, task_id, date, doc=stale)  # ... the client writes
    assert (move.found, move.status) == ("scheduled", "reschedule")
    doc = db.get(task_id)
    assert doc["_rev"].startswith("3-")
    assert doc["status"] == "reschedule"
    assert doc["date"] == "2031-01-01T00:00:00.000Z"
    assert doc["owner"] == "manobi@elsewhere:42:w1"  # the worker's write is kept
    assert doc["claimed_at"] == "2030-01-01T00:00:00Z"


def test_a_reschedule_that_races_a_run_start_decides_again_and_writes_nothing(
    one_copy_db: Database,
) -> None:
    db = one_copy_db  # the client's logic, step by step (see `claim`)
    task_id = db.post(new_task(date="2030-01-01"))[0]
    stale = db.get(task_id)
    claim(db, dict(stale))
    db.put({**db.get(task_id), "status": "running", "attempt": 1})
    running = db.get(task_id)
    with pytest.raises(client.ClientError, match="is running"):
        client.reschedule_task(db, task_id, datetime(2031, 1, 1, tzinfo=UTC), doc=stale)
    assert db.get(task_id) == running  # not clobbered, not even touched


def test_a_cancel_that_races_a_claim_cancels_the_claimed_task(one_copy_db: Database) -> None:
    db = one_copy_db  # the client's logic, step by step (see `claim`)
    task_id = db.post(new_task(date="2030-01-01"))[0]
    stale = db.get(task_id)
    claim(db, dict(stale))
    move = client.cancel_task(db, task_id, doc=stale)
    assert (move.found, move.status) == ("scheduled", "cancel")
    doc = db.get(task_id)
    assert (doc["status"], doc["owner"]) == ("cancel", "manobi@elsewhere:42:w1")


def test_a_cancel_waits_a_little_for_a_pending_reschedule_then_says_why(db: Database) -> None:
    task_id = db.post(new_task(date="2030-01-01"))[0]
    db.put({**db.get(task_id), "status": "reschedule"})
    with pytest.raises(client.ClientError, match="no worker has taken it up"):
        client.cancel_task(db, task_id, settle=0.3)


# -- show ----------------------------------------------------------------------------------


def test_show_lists_the_task_and_its_next_occurrences(env: dict[str, str], db: Database) -> None:
    task_id = schedule(
        env, "manobi", "echo", "x", "--cron", "0 9 * * 1-5", "--tz", "America/New_York"
    )
    result = after_cli(env, "show", task_id)
    assert result.returncode == 0, result.stderr
    assert f"task {task_id}" in result.stdout
    for shown in ("status", "waiting", "worker", "manobi", 'echo ["x"]', "America/New_York"):
        assert shown in result.stdout
    assert "next runs" in result.stdout

    data = json.loads(after_cli(env, "show", task_id, "--json").stdout)
    assert data["task"]["_id"] == task_id
    assert len(data["next"]) == 5
    zone = ZoneInfo("America/New_York")
    local = [parse_date(value).astimezone(zone) for value in data["next"]]
    assert data["next"][0] == db.get(task_id)["date"]
    assert all((t.hour, t.minute, t.weekday() < 5) == (9, 0, True) for t in local)
    assert local == sorted(local) and len(set(local)) == 5
    for moment in local:  # each shown in the table, as local time in the zone
        assert moment.isoformat(timespec="seconds") in result.stdout


def test_show_of_a_limited_repeat_stops_at_its_limit(env: dict[str, str], db: Database) -> None:
    task_id = schedule(env, "manobi", "echo", "--every", "1d", "--at", "2030-01-01", "--limit", "2")
    data = json.loads(after_cli(env, "show", task_id, "--json").stdout)
    assert data["next"] == ["2030-01-01T00:00:00.000Z", "2030-01-02T00:00:00.000Z"]


def test_show_of_a_one_off_task_and_of_an_unknown_one(env: dict[str, str], db: Database) -> None:
    task_id = schedule(env, "manobi", "echo", "--at", "2030-01-01")
    data = json.loads(after_cli(env, "show", task_id, "--json").stdout)
    assert data["next"] == ["2030-01-01T00:00:00.000Z"]
    assert "next run" in after_cli(env, "show", task_id).stdout
    assert "no task 'nope'" in one_line_error(after_cli(env, "show", "nope"))


# -- history -------------------------------------------------------------------------------


def test_history_of_a_repeat_and_of_a_worker_and_a_job(
    env: dict[str, str], db: Database, start_worker: Callable[..., Worker]
) -> None:
    worker = start_worker()
    task_id = schedule(env, "manobi", "echo", "tick", "--every", "PT1S", "--limit", "3")
    wait_for(lambda: db.get(task_id)["status"] == "done", timeout=30)

    runs = json.loads(after_cli(env, "history", task_id, "--json").stdout)
    assert [run["status"] for run in runs] == ["done", "done", "done"]
    occurrences = [parse_date(run["occurrence"]) for run in runs]
    assert occurrences == sorted(occurrences, reverse=True)  # newest first
    assert [(a - b).total_seconds() for a, b in itertools.pairwise(occurrences)] == [1.0, 1.0]
    assert all(run["instance"] == worker.instance for run in runs)
    assert all(run["attempt"] == 1 and run["error"] is None for run in runs)
    assert all(run["started_at"] and run["finished_at"] for run in runs)
    assert all(isinstance(run["duration_ms"], int | float) for run in runs)
    table = after_cli(env, "history", task_id)
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("done") == 3 and worker.instance in table.stdout

    failed = schedule(env, "manobi", "fail", "disk full", "--at", "now")
    wait_for(lambda: db.get(failed)["status"] == "err")

    by_worker = json.loads(after_cli(env, "history", "--worker", "manobi", "--json").stdout)
    assert [run["task"] for run in by_worker] == [failed, task_id, task_id, task_id]
    assert by_worker[0]["status"] == "err" and by_worker[0]["job"] == "fail"
    assert by_worker[0]["error"] == "disk full"
    ends = [run["finished_at"] for run in by_worker]
    assert ends == sorted(ends, reverse=True)

    by_job = json.loads(after_cli(env, "history", "--job", "echo", "--limit", "2", "--json").stdout)
    assert [run["task"] for run in by_job] == [task_id, task_id]
    assert [run["finished_at"] for run in by_job] == ends[1:3]
    assert all(run["worker"] == "manobi" for run in by_job)

    shown = after_cli(env, "history", "--job", "fail")
    assert shown.returncode == 0, shown.stderr
    assert "disk full" in shown.stdout and failed in shown.stdout


def test_history_of_a_task_that_never_ran_and_bad_usage(env: dict[str, str], db: Database) -> None:
    task_id = schedule(env, "manobi", "echo", "--at", "2030-01-01")
    assert "no runs recorded" in after_cli(env, "history", task_id).stdout
    assert json.loads(after_cli(env, "history", task_id, "--json").stdout) == []
    assert after_cli(env, "history", "--worker", "nobody", "--json").stdout.strip() == "[]"
    both = after_cli(env, "history", task_id, "--worker", "manobi")
    assert both.returncode == 2 and "one of them" in both.stderr
