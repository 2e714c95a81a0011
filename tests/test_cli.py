"""The `after` command line, run the way a user runs it.

Every test starts real `python -m after ...` processes against the real test
server (see conftest.py): no mocks, no in-process calls. Each test gets its own
AFTER_HOME (pid files, logs and state files of its workers) and its own database.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import after_cli, delete_replications, new_task, wait_for

import after
from after.couch import Database, NotFound, Server

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
COMMANDS = ["start", "stop", "log", "list", "clean", "push", "status", "setup", "couchdb"]
# A job that returns its arguments.
ECHO = {"name": "echo", "arguments": [2, 3, "test"]}
ECHO_RESULT = [2, 3, "test"]


# -- helpers ---------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """UTC with milliseconds and a Z, as a client would write a task's date."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def is_our_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"after" in cmdline and b"start" in cmdline


def list_rows(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The first table of `after list` (the workers on this machine) as {worker: {column: value}}.

    The table is read as a user sees it: a header line (┃) and one line (│) per worker.
    """
    result = after_cli(env, "list")
    assert result.returncode == 0, result.stderr
    tables: list[tuple[list[str], dict[str, dict[str, str]]]] = []
    for line in result.stdout.splitlines():
        if "┃" in line:
            tables.append(([cell.strip() for cell in line.split("┃")[1:-1]], {}))
        elif "│" in line and tables:
            header, rows = tables[-1]
            cells = [cell.strip() for cell in line.split("│")[1:-1]]
            if cells and cells[0]:
                rows[cells[0]] = dict(zip(header, cells, strict=True))
    if "no workers running" in result.stdout or not tables:
        return {}  # no local table; a table after the message is about other instances
    return tables[0][1]


def post_task(couch_url: str, db: Database, **fields: Any) -> str:
    """Create a task with a plain HTTP POST, as the README says; return its _id."""
    response = requests.post(f"{couch_url}{db.name}", json=new_task(**fields), timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def get_task(couch_url: str, db: Database, task_id: str) -> dict[str, Any]:
    response = requests.get(f"{couch_url}{db.name}/{task_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def status_is(couch_url: str, db: Database, task_id: str, status: str) -> dict[str, Any] | None:
    doc = get_task(couch_url, db, task_id)
    return doc if doc["status"] == status else None


def assert_one_clear_line(result: subprocess.CompletedProcess) -> str:
    """A failed command: non-zero exit, one line on stderr, no traceback; the line."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0]


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "after-home"


@pytest.fixture
def env(couch_url: str, db: Database, home: Path) -> dict[str, str]:
    """The environment of a user who set After up for the test server and database."""
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("AFTER_", "PYTEST_", "COV_"))
    }
    environment.update(
        AFTER_COUCHDB_URL=couch_url,
        AFTER_DB=db.name,
        AFTER_JOBS=str(JOBS),
        AFTER_HOME=str(home),
        COLUMNS="200",  # wide enough that rich never wraps a table cell
        PYTHONIOENCODING="utf-8",
    )
    return environment


class Foreground:
    """`after start NAME --foreground` processes, always killed at teardown."""

    def __init__(self, env: dict[str, str], home: Path, out_dir: Path) -> None:
        self.env, self.home, self.out_dir = env, home, out_dir
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start a worker and return once it reports ready (its own state file exists)."""
        out = self.out_dir / f"{name}.out"
        with open(out, "wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "after", "start", name, "--foreground", *args],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self.processes.append(process)
        state = self.home / "workers" / f"{name}.json"

        def ready() -> bool:
            try:
                return json.loads(state.read_text())["pid"] == process.pid
            except (OSError, ValueError):
                return False

        wait_for(lambda: ready() or process.poll() is not None, timeout=30)
        assert process.poll() is None, out.read_text()
        return process

    def output(self, name: str) -> str:
        return (self.out_dir / f"{name}.out").read_text()

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


@pytest.fixture
def foreground(env: dict[str, str], home: Path, tmp_path: Path) -> Iterator[Foreground]:
    workers = Foreground(env, home, tmp_path)
    try:
        yield workers
    finally:
        workers.kill_all()


@pytest.fixture
def daemons(home: Path) -> Iterator[Path]:
    """Yield AFTER_HOME; at teardown kill any worker daemon a test left running there."""
    yield home
    for pid_file in (home / "workers").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid_alive(pid) and is_our_worker(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fresh_db(server: Server) -> Iterator[Database]:
    """A database name nobody has created yet; deleted afterwards if a test created it."""
    database = server.database(f"after-test-fresh-{uuid.uuid4().hex[:12]}")
    yield database
    if database.exists():
        database.delete()


# -- 1. the original README, step by step ----------------------------------------------


@pytest.fixture
def replication_target(server: Server, db: Database) -> Iterator[str]:
    """The name of a database a replication creates; it and the `_replicator` documents
    of the test are deleted afterwards."""
    target = f"{db.name}-copy"
    yield target
    delete_replications(server, lambda doc: db.name in str(doc.get("source")))
    with contextlib.suppress(NotFound):
        server.database(target).delete()


def test_readme_walkthrough_task_runs_at_its_date(
    foreground: Foreground, couch_url: str, db: Database, server: Server, replication_target: str
) -> None:
    """`after start manobi`, POST the README's task, GET it later: it is done.

    The job starts at the task's date, not before it and at most 50 ms after it;
    the worker writes the outcome (times, duration, result) into the document. The
    README's job, start_replication, really replicates: the tasks database into a copy.
    """
    worker = foreground.start("manobi")
    assert "start-up:" in foreground.output("manobi")

    date = iso(datetime.now(UTC) + timedelta(seconds=1.5))
    job = {"name": "start_replication", "arguments": [db.name, replication_target, "test"]}
    task_id = post_task(couch_url, db, worker="manobi", date=date, job=job)

    doc = wait_for(lambda: status_is(couch_url, db, task_id, "done"), timeout=10)
    for field in ("started_at", "finished_at", "duration_ms", "result"):
        assert field in doc, f"{field} missing from {doc}"
    result = doc["result"]
    assert result["replication"] == "test" and result["started"] is True
    assert (result["source"], result["target"]) == (db.name, replication_target)
    assert server.database("_replicator").get(result["id"])["label"] == "test"
    copy = server.database(replication_target)
    # The design document arrives (the tasks, in their later statuses, only where the
    # replication runs as a user with the replicator role: see docs/couchdb.md).
    wait_for(lambda: copy.exists() and copy.get("_design/after") is not None, timeout=30)
    late = parse(doc["started_at"]) - parse(date)
    assert timedelta(0) <= late <= timedelta(milliseconds=50), f"started {late} after its date"
    assert parse(doc["finished_at"]) >= parse(doc["started_at"])
    assert doc["duration_ms"] >= 0

    # A date already past (the README's own "2011-10-12") runs at once.
    overdue = post_task(couch_url, db, worker="manobi", date="2011-10-12", job=ECHO)
    doc = wait_for(lambda: status_is(couch_url, db, overdue, "done"), timeout=3)
    assert doc["result"] == ECHO_RESULT

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, foreground.output("manobi")
    assert "stopped: 2 done" in foreground.output("manobi")


# -- 2. a worker in the background, managed with start/list/log/clean/stop -------------


def test_daemon_life_cycle(
    env: dict[str, str], daemons: Path, couch_url: str, db: Database
) -> None:
    home = daemons
    pid_file, log_file = home / "workers" / "w1.pid", home / "workers" / "w1.log"

    # start: returns once the worker is ready, printing its pid and log file.
    started = after_cli(env, "start", "w1")
    assert started.returncode == 0, started.stderr
    match = re.search(r"\(pid (\d+)\)", started.stdout)
    assert match, started.stdout
    pid = int(match.group(1))
    assert pid_file.read_text().strip() == str(pid)
    assert str(log_file) in started.stdout
    assert pid_alive(pid)

    rows = list_rows(env)
    assert rows["w1"]["pid"] == str(pid)
    assert rows["w1"]["state"] == "running"
    assert rows["w1"]["done"] == "0"
    assert rows["w1"]["database"].endswith(db.name)

    # A second start of the same name is refused and leaves the first one alone.
    again = after_cli(env, "start", "w1")
    line = assert_one_clear_line(again)
    assert "already running" in line and str(pid) in line
    assert pid_alive(pid)
    assert pid_file.read_text().strip() == str(pid)

    shown = after_cli(env, "log", "w1")
    assert shown.returncode == 0
    assert "start-up:" in shown.stdout
    last = after_cli(env, "log", "w1", "-n", "1")
    assert last.returncode == 0 and len(last.stdout.strip().splitlines()) == 1

    # `after log -f` keeps printing what the worker writes.
    followed = home / "followed.txt"
    with open(followed, "wb") as handle:
        follower = subprocess.Popen(
            [sys.executable, "-m", "after", "log", "w1", "-f"], env=env, stdout=handle, cwd=REPO
        )
    try:
        wait_for(lambda: "start-up:" in followed.read_text(), timeout=10)
        task_id = post_task(couch_url, db, worker="w1", date="2011-10-12", job=ECHO)
        wait_for(lambda: status_is(couch_url, db, task_id, "done"), timeout=10)
        wait_for(lambda: f"task {task_id} done" in followed.read_text(), timeout=5)
    finally:
        follower.kill()
        follower.wait(timeout=10)
    assert f"task {task_id} done" in after_cli(env, "log", "w1").stdout

    cleaned = after_cli(env, "clean", "w1")
    assert cleaned.returncode == 0, cleaned.stderr
    assert log_file.stat().st_size == 0
    assert after_cli(env, "log", "w1").stdout == ""

    stopped = after_cli(env, "stop", "w1")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not pid_alive(pid)
    assert not pid_file.exists()
    assert "w1" not in list_rows(env)
    final = json.loads((home / "workers" / "w1.json").read_text())
    assert final["running"] is False and final["done"] == 1

    line = assert_one_clear_line(after_cli(env, "stop", "w1"))
    assert "not running" in line


def test_a_killed_worker_leaves_a_stale_pid_file_and_its_tasks_are_taken_over(
    foreground: Foreground, env: dict[str, str], home: Path, couch_url: str, db: Database
) -> None:
    quick_leases = ("--heartbeat", "0.5", "--lease", "2")  # a dead instance is known in 2 s
    first = foreground.start("w2", *quick_leases)
    date = iso(datetime.now(UTC) + timedelta(seconds=60))
    task_id = post_task(couch_url, db, worker="w2", date=date, job=ECHO)
    owner = wait_for(lambda: status_is(couch_url, db, task_id, "scheduled"), timeout=10)["owner"]

    first.kill()  # no chance to hand anything back
    first.wait(timeout=10)
    assert list_rows(env)["w2"]["state"] == "dead (stale pid file)"

    # A stale pid file never blocks a new start of that name; once the killed
    # instance's lease has run out, the new one takes its task over.
    foreground.start("w2", *quick_leases)
    assert list_rows(env)["w2"]["state"] == "running"
    taken = wait_for(
        lambda: (doc := get_task(couch_url, db, task_id))["owner"] != owner and doc, timeout=10
    )
    assert taken["status"] == "scheduled" and taken["owner"].startswith("w2@")


def test_stop_of_a_dead_worker_fails_clearly_and_removes_its_stale_pid_file(
    foreground: Foreground, env: dict[str, str], home: Path
) -> None:
    worker = foreground.start("w3")
    worker.kill()
    worker.wait(timeout=10)
    line = assert_one_clear_line(after_cli(env, "stop", "w3"))
    assert "w3 is not running" in line
    assert not (home / "workers" / "w3.pid").exists()
    assert "w3" not in list_rows(env)


def test_list_shows_the_done_count_within_about_a_second(
    foreground: Foreground, env: dict[str, str], couch_url: str, db: Database
) -> None:
    # A long heartbeat: nothing but the task itself happens in the worker meanwhile.
    foreground.start("w1", "--heartbeat", "30", "--lease", "60")
    assert list_rows(env)["w1"]["done"] == "0"
    task_id = post_task(couch_url, db, worker="w1", date="2011-10-12", job=ECHO)
    wait_for(lambda: status_is(couch_url, db, task_id, "done"), timeout=10)
    wait_for(lambda: list_rows(env)["w1"]["done"] == "1", timeout=3)


# -- 3. errors: one clear line, a non-zero exit, never a traceback ----------------------

UNREACHABLE = "http://user:secret@127.0.0.1:1/"


@pytest.mark.parametrize(
    "command",
    [["status"], ["push"], ["start", "manobi", "--foreground"]],
    ids=["status", "push", "start"],
)
def test_unreachable_server_is_one_line_naming_the_url_without_the_password(
    env: dict[str, str], command: list[str]
) -> None:
    line = assert_one_clear_line(after_cli(env, *command, "--couchdb", UNREACHABLE))
    assert "user:***@127.0.0.1:1/" in line
    assert "secret" not in line
    assert "unreachable" in line


def test_unreachable_server_from_the_environment_is_redacted_too(env: dict[str, str]) -> None:
    env = {
        **env,
        "AFTER_COUCHDB_URL": "http://127.0.0.1:1/",
        "AFTER_COUCHDB_USER": "user",
        "AFTER_COUCHDB_PASSWORD": "secret",
    }
    line = assert_one_clear_line(after_cli(env, "status"))
    assert "user:***@127.0.0.1:1/" in line and "secret" not in line


def test_a_daemon_that_cannot_start_says_why_and_leaves_no_pid_file(
    env: dict[str, str], daemons: Path
) -> None:
    result = after_cli(env, "start", "w4", "--couchdb", UNREACHABLE)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    assert "w4 did not start" in result.stderr
    assert "user:***@127.0.0.1:1/" in result.stderr and "secret" not in result.stderr
    assert not (daemons / "workers" / "w4.pid").exists()
    assert "secret" not in (daemons / "workers" / "w4.log").read_text()


def test_start_on_a_database_without_design_docs_says_run_push(
    env: dict[str, str], fresh_db: Database
) -> None:
    fresh_db.create()
    line = assert_one_clear_line(
        after_cli(env, "start", "manobi", "--foreground", "--db", fresh_db.name)
    )
    assert "after push" in line
    assert fresh_db.name in line


@pytest.mark.parametrize("created", [True, False], ids=["no-design-doc", "no-database"])
def test_status_on_a_database_that_was_never_pushed_says_run_push(
    env: dict[str, str], fresh_db: Database, created: bool
) -> None:
    if created:
        fresh_db.create()
    line = assert_one_clear_line(after_cli(env, "status", "--db", fresh_db.name))
    assert "after push" in line


def test_start_on_a_database_that_does_not_exist_says_run_push(
    env: dict[str, str], fresh_db: Database
) -> None:
    line = assert_one_clear_line(
        after_cli(env, "start", "manobi", "--foreground", "--db", fresh_db.name)
    )
    assert fresh_db.name in line
    assert "after push" in line
    assert not fresh_db.exists()  # starting a worker never creates a database


@pytest.mark.parametrize("name", ["bad name", "-w", ".hidden", "x" * 65, "a/b"])
def test_start_refuses_a_bad_worker_name(env: dict[str, str], home: Path, name: str) -> None:
    line = assert_one_clear_line(after_cli(env, "start", "--", name))
    assert "worker name" in line
    assert not (home / "workers" / f"{name}.pid").exists()


def test_start_refuses_a_worker_name_no_task_can_have(
    env: dict[str, str], daemons: Path, couch_url: str, db: Database
) -> None:
    refused = requests.post(f"{couch_url}{db.name}", json=new_task(worker="1.0"), timeout=10)
    assert refused.status_code == 403  # the database will never hold a task for "1.0"
    line = assert_one_clear_line(after_cli(env, "start", "1.0"))
    assert "worker name" in line


def test_start_refuses_a_missing_jobs_directory(env: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "no-such-jobs"
    for args in (["--jobs", str(missing)], []):
        run_env = env if args else {**env, "AFTER_JOBS": str(missing)}
        line = assert_one_clear_line(after_cli(run_env, "start", "manobi", *args))
        assert str(missing) in line
        assert "does not exist" in line


def test_log_and_clean_of_an_unknown_worker_fail_clearly(env: dict[str, str]) -> None:
    for command in ("log", "clean"):
        line = assert_one_clear_line(after_cli(env, command, "nobody"))
        assert "nobody" in line and "no log" in line


# -- 4. push -----------------------------------------------------------------------------


def test_push_creates_then_deploys_once_and_is_idempotent(
    env: dict[str, str], fresh_db: Database
) -> None:
    env = {**env, "AFTER_DB": fresh_db.name}
    first = after_cli(env, "push")
    assert first.returncode == 0, first.stderr
    assert "created database" in first.stdout
    assert "deployed _design/after" in first.stdout
    rev = fresh_db.get("_design/after")["_rev"]

    second = after_cli(env, "push")
    assert second.returncode == 0, second.stderr
    assert "_design/after unchanged" in second.stdout
    assert "deployed" not in second.stdout and "created" not in second.stdout
    assert fresh_db.get("_design/after")["_rev"] == rev


# -- 5. status -----------------------------------------------------------------------------


def test_status_counts_tasks_by_worker_and_status(
    env: dict[str, str], couch_url: str, db: Database
) -> None:
    for worker in ("alpha", "alpha", "alpha", "beta"):
        post_task(couch_url, db, worker=worker, date="2030-01-01")
    canceled = db.get(post_task(couch_url, db, worker="beta", date="2030-01-01"))
    canceled["status"] = "cancel"
    db.put(canceled)

    result = after_cli(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["database"] == db.name
    assert data["workers"] == {"alpha": {"waiting": 3}, "beta": {"waiting": 1, "cancel": 1}}
    assert data["counts"]["total"] == 5

    table = after_cli(env, "status")
    assert table.returncode == 0, table.stderr
    assert "alpha" in table.stdout and "beta" in table.stdout
    assert db.name in table.stdout


def test_status_of_an_empty_database(env: dict[str, str], db: Database) -> None:
    result = after_cli(env, "status", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["database"] == db.name
    assert data["workers"] == {}
    assert data["counts"]["total"] == 0


# -- 6. help and version ---------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_command(env: dict[str, str], flag: str) -> None:
    result = after_cli(env, flag)
    assert result.returncode == 0
    listed = result.stdout.split("Commands:", 1)[1]
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", listed, re.MULTILINE), f"{command} not in\n{listed}"
    assert "--version" in result.stdout and "--home" in result.stdout


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_is_the_package_version(env: dict[str, str], flag: str) -> None:
    result = after_cli(env, flag)
    assert result.returncode == 0
    assert result.stdout.strip() == f"after, version {after.__version__}"


def test_the_after_script_is_installed(env: dict[str, str]) -> None:
    script = Path(sys.executable).parent / "after"
    if not script.exists():
        pytest.skip("the `after` console script is not installed in this environment")
    result = subprocess.run(
        [str(script), "-V"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    assert after.__version__ in result.stdout


# -- 7. a graceful stop hands held tasks back ---------------------------------------------------


def test_sigterm_hands_held_tasks_back_to_waiting(
    foreground: Foreground, couch_url: str, db: Database
) -> None:
    worker = foreground.start("manobi")
    date = iso(datetime.now(UTC) + timedelta(seconds=60))
    task_id = post_task(couch_url, db, worker="manobi", date=date, job=ECHO)
    held = wait_for(lambda: status_is(couch_url, db, task_id, "scheduled"), timeout=10)
    assert held["owner"].startswith("manobi@")

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, foreground.output("manobi")

    doc = get_task(couch_url, db, task_id)
    assert doc["status"] == "waiting"
    assert "owner" not in doc
    assert doc["date"] == date  # handed back unchanged, for the next worker to take
    assert "started_at" not in doc


def test_a_restarted_worker_takes_the_handed_back_task(
    foreground: Foreground, couch_url: str, db: Database
) -> None:
    """After a graceful stop the next worker of that name claims the task again."""
    first = foreground.start("manobi")
    date = iso(datetime.now(UTC) + timedelta(seconds=60))
    task_id = post_task(couch_url, db, worker="manobi", date=date, job=ECHO)
    owner = wait_for(lambda: status_is(couch_url, db, task_id, "scheduled"), timeout=10)["owner"]
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert get_task(couch_url, db, task_id)["status"] == "waiting"

    foreground.start("manobi")
    again = wait_for(lambda: status_is(couch_url, db, task_id, "scheduled"), timeout=10)
    assert again["owner"].startswith("manobi@") and again["owner"] != owner
