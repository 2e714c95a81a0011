"""`after import-crontab`: parsing a crontab, the generated jobs, the import itself.

The parsing and the generated job module are tested directly (the module is
loaded the way a worker loads it and runs real shell commands); the import runs
as real `python -m after import-crontab` processes against the test server, and
one imported task runs for real through a worker.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import after_cli, wait_for

from after import crontab
from after.couch import Database
from after.jobs import JobLoader
from after.recurrence import next_occurrence, parse_repeat
from after.tasks import parse_date
from after.worker import Worker

REPO = Path(__file__).resolve().parent.parent

SAMPLE = """\
# m h dom mon dow command: a comment, then a blank line

SHELL=/bin/sh
MAILTO=ops@example.com
GREETING="hello from cron"
*/5 * * * * echo "$GREETING" >> /tmp/after-never-written.log
CRON_TZ=America/New_York
30 2 * * 1-5 /usr/local/bin/backup --all
@daily  date +\\%F > /tmp/after-today
@reboot /usr/local/bin/start-something
this is not a cron line
61 * * * * echo bad minute
"""


@pytest.fixture
def env(couch_url: str, db: Database, tmp_path: Path) -> dict[str, str]:
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("AFTER_", "PYTEST_", "COV_"))
    }
    environment.update(
        AFTER_COUCHDB_URL=couch_url,
        AFTER_DB=db.name,
        AFTER_HOME=str(tmp_path / "home"),
        COLUMNS="250",
        PYTHONIOENCODING="utf-8",
    )
    return environment


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "jobs"
    path.mkdir()
    return path


def tasks_of(db: Database) -> dict[str, dict]:
    rows = db.all_docs(include_docs=True)["rows"]
    return {row["id"]: row["doc"] for row in rows if not row["id"].startswith("_design/")}


def load_job(jobs_dir: Path, name: str) -> Callable[..., dict]:
    """The job's run(), loaded as a worker loads it."""
    return JobLoader(jobs_dir, watch=False).load(name)


# -- parsing -------------------------------------------------------------------------------


def test_the_sample_crontab_gives_three_entries_and_says_what_it_skips() -> None:
    parsed = crontab.parse_crontab(SAMPLE, "Europe/Paris")
    assert [(e.line, e.schedule, e.zone) for e in parsed.entries] == [
        (6, "*/5 * * * *", "Europe/Paris"),  # before CRON_TZ: the default zone
        (8, "30 2 * * 1-5", "America/New_York"),
        (9, "0 0 * * *", "America/New_York"),  # @daily written out
    ]
    first, second, third = parsed.entries
    assert first.command == 'echo "$GREETING" >> /tmp/after-never-written.log'
    assert dict(first.env) == {"SHELL": "/bin/sh", "GREETING": "hello from cron"}
    assert "MAILTO" not in dict(second.env) and "CRON_TZ" not in dict(second.env)
    assert third.command == "date +%F > /tmp/after-today"  # \% is a literal %
    assert third.stdin is None
    skipped = {item.line: item.reason for item in parsed.skipped}
    assert set(skipped) == {10, 11, 12}
    assert "@reboot" in skipped[10] and "init system" in skipped[10]
    assert "5 time fields and a command" in skipped[11]
    assert "bad minute field" in skipped[12]
    assert any("MAILTO=ops@example.com" in note for note in parsed.notes)


@pytest.mark.parametrize(
    ("macro", "expression"),
    [
        ("@hourly", "0 * * * *"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@weekly", "0 0 * * 0"),
        ("@monthly", "0 0 1 * *"),
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
    ],
)
def test_macros_become_their_expressions(macro: str, expression: str) -> None:
    (entry,) = crontab.parse_crontab(f"{macro}\t/bin/true\n", "UTC").entries
    assert (entry.schedule, entry.command) == (expression, "/bin/true")


def test_tz_sets_the_zone_when_there_is_no_cron_tz_and_reaches_the_command() -> None:
    text = "TZ=Asia/Tokyo\n0 9 * * * a\nCRON_TZ=Europe/Paris\n0 9 * * * b\n"
    first, second = crontab.parse_crontab(text, "UTC").entries
    assert (first.zone, second.zone) == ("Asia/Tokyo", "Europe/Paris")
    assert dict(second.env) == {"TZ": "Asia/Tokyo"}  # cron passes TZ on, not CRON_TZ


def test_an_unknown_zone_skips_the_entries_it_covers() -> None:
    parsed = crontab.parse_crontab("CRON_TZ=Mars/Olympus\n0 9 * * * a\n", "UTC")
    assert parsed.entries == []
    assert "unknown time zone 'Mars/Olympus'" in parsed.skipped[0].reason
    assert any("Mars/Olympus" in note for note in parsed.notes)


@pytest.mark.parametrize(
    ("command", "run", "stdin"),
    [
        ("echo plain", "echo plain", None),
        ("mail -s hi bob%Dear Bob,%see you%", "mail -s hi bob", "Dear Bob,\nsee you\n"),
        ("cat%one line", "cat", "one line\n"),
        (r"date +\%Y-\%m%in \% too", "date +%Y-%m", "in % too\n"),
        (r"printf 'a\nb'", r"printf 'a\nb'", None),  # other backslashes stay
    ],
)
def test_percent_is_read_as_cron_reads_it(command: str, run: str, stdin: str | None) -> None:
    assert crontab.split_percent(command) == (run, stdin)


def test_names_are_stable_and_follow_what_they_stand_for() -> None:
    (a,) = crontab.parse_crontab("0 9 * * * echo hi\n", "UTC").entries
    (same,) = crontab.parse_crontab("# again\n0  9 * * *   echo hi\n", "UTC").entries
    (other_env,) = crontab.parse_crontab("X=1\n0 9 * * * echo hi\n", "UTC").entries
    (other_zone,) = crontab.parse_crontab("0 9 * * * echo hi\n", "Europe/Paris").entries
    assert a.job_name == same.job_name and a.task_id("w") == same.task_id("w")
    assert a.job_name.startswith("cron_") and a.task_id("w").startswith("cron-")
    assert other_env.job_name != a.job_name
    assert other_zone.job_name == a.job_name and other_zone.task_id("w") != a.task_id("w")
    assert a.task_id("w") != a.task_id("v")
    assert crontab.job_module(a) == crontab.job_module(same)


def test_the_local_zone_comes_from_the_system_then_tz_else_utc_with_a_warning(
    tmp_path: Path,
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    assert crontab.local_zone(etc, {"TZ": ":Asia/Tokyo"}) == ("Asia/Tokyo", None)
    (etc / "timezone").write_text("Europe/Paris\n")
    assert crontab.local_zone(etc, {"TZ": "Asia/Tokyo"}) == ("Europe/Paris", None)
    (etc / "localtime").symlink_to("/usr/share/zoneinfo/America/New_York")
    assert crontab.local_zone(etc, {}) == ("America/New_York", None)
    empty = tmp_path / "empty"
    empty.mkdir()
    zone, warning = crontab.local_zone(empty, {"TZ": "Not/AZone"})
    assert zone == "UTC" and warning and "--tz" in warning


def test_a_task_starts_at_the_next_cron_time_and_holds_no_command() -> None:
    (entry,) = crontab.parse_crontab(
        "CRON_TZ=Europe/Paris\n30 2 * * * /usr/bin/secret-backup\n", "UTC"
    ).entries
    at = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    doc = crontab.task_doc(entry, "manobi", at)
    assert doc["date"] == "2026-03-29T01:00:00.000Z"  # 02:30 is skipped that night: 03:00
    assert doc["repeat"] == {"cron": "30 2 * * *", "timezone": "Europe/Paris"}
    assert doc["job"] == {"name": entry.job_name, "arguments": []}
    assert "secret-backup" not in json.dumps(doc)


# -- the generated job ---------------------------------------------------------------------


def write(jobs_dir: Path, text: str) -> crontab.Entry:
    (entry,) = crontab.parse_crontab(text, "UTC").entries
    (jobs_dir / f"{entry.job_name}.py").write_text(crontab.job_module(entry))
    return entry


def test_the_generated_job_runs_the_command_with_the_crontab_environment(
    jobs_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    entry = write(jobs_dir, f'GREETING="hello from cron"\n* * * * * echo "$GREETING" > {out}\n')
    result = load_job(jobs_dir, entry.job_name)()
    assert result == {"exit_code": 0, "stdout": "", "stderr": ""}
    assert out.read_text() == "hello from cron\n"


def test_the_generated_job_has_cron_environment_home_and_input(
    jobs_dir: Path, tmp_path: Path
) -> None:
    entry = write(jobs_dir, "* * * * * echo $PATH; pwd; cat%first%second\n")
    result = load_job(jobs_dir, entry.job_name)()
    path, cwd, *rest = result["stdout"].splitlines()
    assert path == crontab.DEFAULT_PATH
    assert cwd == os.path.realpath(os.path.expanduser("~"))
    assert rest == ["first", "second"]


def test_the_generated_job_fails_on_a_non_zero_exit_with_the_end_of_its_output(
    jobs_dir: Path,
) -> None:
    entry = write(jobs_dir, "* * * * * echo partial; echo broken >&2; exit 3\n")
    with pytest.raises(Exception, match="exit code 3") as raised:
        load_job(jobs_dir, entry.job_name)()
    assert type(raised.value).__name__ == "CommandFailed"
    assert "broken" in str(raised.value) and "partial" in str(raised.value)


def test_the_generated_job_keeps_only_the_end_of_long_output(jobs_dir: Path) -> None:
    entry = write(jobs_dir, "* * * * * seq 1 5000\n")
    result = load_job(jobs_dir, entry.job_name)()
    assert len(result["stdout"]) == crontab.OUTPUT_TAIL
    assert result["stdout"].endswith("4999\n5000\n")


# -- the import ----------------------------------------------------------------------------


def import_crontab(
    env: dict[str, str], *args: str, text: str = SAMPLE
) -> subprocess.CompletedProcess:
    result = after_cli(env, "import-crontab", "-", "--worker", "manobi", *args, input=text)
    assert result.returncode == 0, result.stderr
    return result


def test_dry_run_prints_the_plan_and_writes_nothing(
    env: dict[str, str], db: Database, jobs_dir: Path
) -> None:
    result = import_crontab(env, "--jobs", str(jobs_dir), "--tz", "Europe/Paris", "--dry-run")
    for shown in ("*/5 * * * *", "30 2 * * 1-5", "0 0 * * *", "America/New_York", "new"):
        assert shown in result.stdout
    assert "@reboot" in result.stdout and "init system" in result.stdout
    assert "dry run: nothing written (3 entries planned)" in result.stdout
    assert "note: line 4: MAILTO" in result.stdout
    assert list(jobs_dir.iterdir()) == []
    assert tasks_of(db) == {}


def test_import_creates_the_tasks_and_jobs_then_a_second_import_changes_nothing(
    env: dict[str, str], db: Database, jobs_dir: Path
) -> None:
    before = datetime.now(UTC)
    first = import_crontab(env, "--jobs", str(jobs_dir))  # no --tz: this machine's zone
    assert f"wrote 3 job files to {jobs_dir}; created 3 tasks for worker manobi" in first.stdout
    local, _ = crontab.local_zone()
    expected = crontab.parse_crontab(SAMPLE, local).entries
    tasks = tasks_of(db)
    assert set(tasks) == {entry.task_id("manobi") for entry in expected}
    for entry in expected:
        doc = tasks[entry.task_id("manobi")]
        assert doc["worker"] == "manobi" and doc["status"] == "waiting"
        assert doc["job"] == {"name": entry.job_name, "arguments": []}
        assert doc["repeat"] == {"cron": entry.schedule, "timezone": entry.zone}
        repeat = parse_repeat(doc["repeat"])
        assert parse_date(doc["date"]) in {
            next_occurrence(repeat, t, t) for t in (before, datetime.now(UTC))
        }
        job = jobs_dir / f"{entry.job_name}.py"
        assert job.read_text() == crontab.job_module(entry)
        assert stat.S_IMODE(job.stat().st_mode) == 0o600  # commands may hold secrets
    assert tasks[expected[0].task_id("manobi")]["repeat"]["timezone"] == local  # stated
    stored = json.dumps(tasks)
    for command_text in ("backup", "GREETING", "echo", "date +"):
        assert command_text not in stored  # no command ever travels in a document

    revisions = {task_id: doc["_rev"] for task_id, doc in tasks.items()}
    files = {path.name: path.stat().st_mtime_ns for path in jobs_dir.iterdir()}
    second = import_crontab(env, "--jobs", str(jobs_dir))
    assert "nothing to change: the 3 tasks and their jobs are already in place" in second.stdout
    assert "exists (waiting)" in second.stdout and "same" in second.stdout
    assert {task_id: doc["_rev"] for task_id, doc in tasks_of(db).items()} == revisions
    assert {path.name: path.stat().st_mtime_ns for path in jobs_dir.iterdir()} == files


def test_import_reads_a_file_and_refuses_a_missing_jobs_directory(
    env: dict[str, str], db: Database, tmp_path: Path
) -> None:
    source = tmp_path / "crontab.txt"
    source.write_text("@hourly /bin/true\n")
    result = after_cli(
        env, "import-crontab", str(source), "--worker", "manobi", "--jobs", str(tmp_path / "no")
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    assert tasks_of(db) == {}


def test_an_imported_task_runs_its_command_through_a_worker(
    env: dict[str, str],
    db: Database,
    jobs_dir: Path,
    tmp_path: Path,
    start_worker: Callable[..., Worker],
) -> None:
    out = tmp_path / "ran.txt"
    text = f'GREETING=hello\n0 0 1 1 * echo "$GREETING" > {out}; echo done\n'
    import_crontab(env, "--jobs", str(jobs_dir), "--tz", "UTC", text=text)
    (entry,) = crontab.parse_crontab(text, "UTC").entries
    task_id = entry.task_id("manobi")
    first_date = db.get(task_id)["date"]
    assert first_date.endswith("-01-01T00:00:00.000Z")  # its next New Year's midnight

    start_worker(jobs=jobs_dir)
    # Bring the run near: a client's reschedule to now, as anyone may do over HTTP.
    moved = after_cli(env, "reschedule", task_id, "--at", "now")
    assert moved.returncode == 0, moved.stderr
    doc = wait_for(lambda: (d := db.get(task_id)).get("history") and d["status"] == "waiting" and d)
    assert out.read_text() == "hello\n"
    assert doc["result"] == {"exit_code": 0, "stdout": "done\n", "stderr": ""}
    assert doc["history"][-1]["status"] == "done"
    # The series goes on from the cron schedule: next New Year's midnight.
    assert parse_date(doc["date"]) > datetime.now(UTC)
    assert parse_date(doc["date"]).strftime("%m-%d %H:%M") == "01-01 00:00"


def fake_crontab(tmp_path: Path, script: str) -> str:
    """A PATH whose `crontab` is this shell script (the real one is never touched)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crontab").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "crontab").chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_without_a_file_the_import_reads_crontab_l(
    env: dict[str, str], db: Database, jobs_dir: Path, tmp_path: Path
) -> None:
    path = fake_crontab(tmp_path, '[ "$1" = -l ] && printf "@hourly /bin/true\\n"')
    result = after_cli(
        {**env, "PATH": path},
        "import-crontab",
        "--worker",
        "manobi",
        "--jobs",
        str(jobs_dir),
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert "0 * * * *" in result.stdout and "/bin/true" in result.stdout
    assert "(1 entries planned)" in result.stdout


def test_a_failing_crontab_l_is_one_line(
    env: dict[str, str], db: Database, jobs_dir: Path, tmp_path: Path
) -> None:
    path = fake_crontab(tmp_path, 'echo "no crontab for manobi" >&2; exit 1')
    result = after_cli(
        {**env, "PATH": path}, "import-crontab", "--worker", "manobi", "--jobs", str(jobs_dir)
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: `crontab -l` failed: no crontab for manobi"
