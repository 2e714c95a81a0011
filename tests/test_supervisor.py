"""`after couchdb` supervises the embedded server: it comes back from death and wedges.

These tests run the real command (`python -m after couchdb`) and the real
PouchDB Server, and do to the server what can happen to it: a SIGKILL in the
middle of a stream of writes, a wedge (simulated with SIGSTOP: the process
holds its port and answers nothing), an install that no longer passes the
guard's check. The health check runs every 0.2 s here
(AFTER_COUCHDB_CHECK_INTERVAL) and gives up on a request after 0.5 s
(AFTER_COUCHDB_CHECK_TIMEOUT), so a wedge is found within a few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REPO, after_cli, wait_for
from test_embedded_durability import (
    ADMIN,
    DB,
    assert_every_acknowledged_write_is_there,
    write_until_killed,
)
from test_security_cli import clean_env, output

from after import embedded
from after.cli import process_running
from after.supervisor import Backoff, read_state

FAST_CHECKS = {"AFTER_COUCHDB_CHECK_INTERVAL": "0.2", "AFTER_COUCHDB_CHECK_TIMEOUT": "0.5"}
DEADLINE = 30.0  # seconds: generous, for a slow machine; it usually takes one or two


@dataclass
class Supervised:
    """`after couchdb` in the foreground: the supervisor and, under it, the server."""

    process: subprocess.Popen
    home: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def data_dir(self) -> Path:
        return self.home / "couchdb"

    def state(self) -> dict[str, Any]:
        return read_state(self.home / "couchdb.json")

    def server_pid(self) -> int:
        return self.state()["server_pid"]

    def log(self) -> str:
        return (self.data_dir / "server.log").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.home / "stderr.txt").read_text(errors="replace")

    def wait_for_another_server(self, old_pid: int) -> int:
        """The pid of the server that replaced old_pid, once it answers."""
        wait_for(lambda: self.state().get("server_pid") not in (None, old_pid), DEADLINE)
        return self.server_pid()

    def exit_status(self) -> int:
        try:
            return self.process.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor did not exit:\n{self.log()[-3000:]}")


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Callable[..., Supervised]]:
    """Start `after couchdb` (foreground) on a free port; whatever is left is stopped at the end.

    supervise(admin=None, **environment): `admin` is seeded into the config first.
    """
    started: list[Supervised] = []

    def start(admin: tuple[str, str] | None = None, **environment: str) -> Supervised:
        home = tmp_path / f"home-{len(started)}"
        home.mkdir()
        if admin is not None:
            embedded.seed_admin(home / "couchdb", admin)
        port = embedded.free_port()
        env = clean_env(AFTER_HOME=str(home), **FAST_CHECKS, **environment)
        with open(home / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-m", "after", "couchdb", "--port", str(port)],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        supervised = Supervised(process, home, port)
        started.append(supervised)
        wait_for(lambda: supervised.state() or process.poll() is not None, DEADLINE)
        assert process.poll() is None, f"it did not start:\n{supervised.stderr()}"
        return supervised

    yield start
    for supervised in started:
        server_pid = supervised.state().get("server_pid")
        if supervised.process.poll() is None:
            supervised.process.terminate()
            supervised.process.wait(DEADLINE)
        if server_pid and process_running(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def gone(pid: int) -> bool:
    return not process_running(pid)


def port_is_free(port: int) -> bool:
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    except requests.ConnectionError:
        return True
    return False


# -- the server dies --------------------------------------------------------------------------


def test_a_killed_server_comes_back_at_once_on_its_port_with_every_acknowledged_write(
    supervise: Callable[..., Supervised],
) -> None:
    supervised = supervise(admin=ADMIN)
    admin = requests.Session()
    admin.auth = ADMIN
    assert admin.put(supervised.url + DB, timeout=10).status_code == 201
    supervisor_pid, killed = supervised.process.pid, supervised.server_pid()

    writer = write_until_killed(supervised.url, lambda: os.kill(killed, signal.SIGKILL))

    restarted = supervised.wait_for_another_server(killed)
    assert supervised.state()["port"] == supervised.port
    assert supervised.state()["supervisor_pid"] == supervisor_pid
    assert_every_acknowledged_write_is_there(supervised.url, dict(writer.acked))
    assert admin.put(f"{supervised.url}{DB}/after-restart", json={"ok": 1}, timeout=10).ok

    line = (
        f"after couchdb: the server (pid {killed}) exited (code -9: killed by SIGKILL); "
        "restarting it now (restart 1)"
    )
    assert line in supervised.log() and line in supervised.stderr()
    assert f"the server (pid {restarted}) answers again at {supervised.url}" in supervised.log()


def test_a_wedged_server_is_killed_and_restarted_and_serves_database_requests_again(
    supervise: Callable[..., Supervised],
) -> None:
    supervised = supervise()
    assert requests.put(supervised.url + "kept", timeout=10).status_code == 201
    assert requests.put(supervised.url + "kept/doc", json={"n": 1}, timeout=10).status_code == 201
    wedged = supervised.server_pid()

    os.kill(wedged, signal.SIGSTOP)  # it keeps its port, and answers nothing

    restarted = supervised.wait_for_another_server(wedged)
    assert wait_for(lambda: gone(wedged), DEADLINE)
    assert requests.get(supervised.url + "kept/doc", timeout=10).json()["n"] == 1
    assert requests.put(supervised.url + "kept/new", json={}, timeout=10).status_code == 201
    assert requests.put(supervised.url + "another", timeout=10).status_code == 201
    assert process_running(restarted)
    log = supervised.log()
    assert f"the server (pid {wedged}) is wedged: 3 health checks in a row failed" in log
    assert "killing it (SIGKILL); restarting it" in log


def test_the_health_check_sees_the_wedge_that_get_root_does_not(tmp_path: Path) -> None:
    """PouchDB Server without our guard: a refused `DELETE /db` wedges its database layer."""
    port = embedded.free_port()
    argv = embedded.command(port, tmp_path, admin=ADMIN)
    del argv[argv.index("--require") : argv.index("--require") + 2]  # no guard
    with open(tmp_path / "server.log", "ab") as log:
        unguarded = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        embedded.wait_healthy(url, timeout=DEADLINE, process=unguarded)
        assert requests.put(url + "db", auth=ADMIN, timeout=10).status_code == 201
        assert embedded.health_problem(url, timeout=1) is None

        for _ in range(2):
            assert requests.delete(url + "db", timeout=10).status_code == 401

        assert requests.get(url, timeout=10).status_code == 200  # GET / still answers
        wrong_login = requests.get(url + "_users", auth=("nobody", "x"), timeout=10)
        assert wrong_login.status_code == 401  # so does a login: neither opens a database
        assert embedded.health_problem(url, timeout=1) == "GET /_users got no answer within 1 s"
    finally:
        embedded.stop(unguarded)


# -- what is not restarted --------------------------------------------------------------------


def installed_copy(tmp_path: Path) -> Path:
    """A node_modules whose pouchdb-server is a copy (to break later); the rest are links."""
    real = embedded.find_pouchdb_server().resolve().parent.parent.parent
    modules = tmp_path / "node_modules"
    modules.mkdir()
    for package in real.iterdir():
        if package.name != "pouchdb-server":
            (modules / package.name).symlink_to(package)
    shutil.copytree(real / "pouchdb-server", modules / "pouchdb-server")
    return modules / "pouchdb-server"


def test_a_server_that_refuses_to_start_is_not_restarted(
    supervise: Callable[..., Supervised], tmp_path: Path
) -> None:
    package = installed_copy(tmp_path)
    script = str(package / "bin" / "pouchdb-server")
    supervised = supervise(AFTER_POUCHDB_SERVER=script)
    killed = supervised.server_pid()
    metadata = json.loads((package / "package.json").read_text())
    (package / "package.json").write_text(json.dumps({**metadata, "version": "4.1.0"}))

    os.kill(killed, signal.SIGKILL)

    assert supervised.exit_status() == embedded.EXIT_REFUSED
    log = supervised.log()
    assert log.count("refusing to start: pouchdb-server 4.1.0 is installed") == 1
    refused = "exited (code 78: it refused to start: PouchDB Server is not the pinned"
    assert refused in supervised.stderr()
    assert "not restarting it: install the pinned one (`npm ci`)" in supervised.stderr()
    assert port_is_free(supervised.port)
    assert not (supervised.home / "couchdb.pid").exists()
    assert not (supervised.home / "couchdb.json").exists()


def test_a_daemon_that_cannot_start_says_why_and_where_its_log_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = installed_copy(tmp_path)
    metadata = json.loads((package / "package.json").read_text())
    (package / "package.json").write_text(json.dumps({**metadata, "version": "4.1.0"}))
    home = tmp_path / "home"
    env = clean_env(AFTER_HOME=str(home), AFTER_POUCHDB_SERVER=str(package / "bin/pouchdb-server"))

    started = after_cli(env, "couchdb", "--daemon", "--port", str(embedded.free_port()))

    assert started.returncode == 1
    assert "the embedded server did not start (code 78: it refused to start" in started.stderr
    assert f"see {home / 'couchdb' / 'server.log'}" in started.stderr
    assert "not restarting it" in (home / "couchdb" / "server.log").read_text()
    assert not (home / "couchdb.pid").exists()


# -- stopping ---------------------------------------------------------------------------------


def test_sigterm_stops_the_server_then_the_supervisor(
    supervise: Callable[..., Supervised],
) -> None:
    supervised = supervise()
    server_pid = supervised.server_pid()

    supervised.process.send_signal(signal.SIGTERM)

    assert supervised.exit_status() == 0
    assert gone(server_pid)
    assert port_is_free(supervised.port)
    assert not (supervised.home / "couchdb.pid").exists()
    assert not (supervised.home / "couchdb.json").exists()
    log = supervised.log()
    assert f"after couchdb: SIGTERM: stopping the server (pid {server_pid})" in log
    assert "after-embedded-guard: stopping on SIGTERM" in log
    assert "after couchdb: the server stopped (code 0)" in log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_supervisor_takes_its_server_with_it(
    supervise: Callable[..., Supervised],
) -> None:
    supervised = supervise()
    server_pid = supervised.server_pid()

    supervised.process.kill()

    assert supervised.exit_status() == -signal.SIGKILL
    assert wait_for(lambda: gone(server_pid), DEADLINE)
    assert wait_for(lambda: port_is_free(supervised.port), DEADLINE)
    env = clean_env(AFTER_HOME=str(supervised.home))
    again = after_cli(env, "couchdb", "--daemon", "--port", str(supervised.port))
    try:
        assert again.returncode == 0, output(again)  # the port and the data are free again
    finally:
        after_cli(env, "couchdb", "stop")


def test_a_daemon_and_its_server_are_gone_after_couchdb_stop(tmp_path: Path) -> None:
    env = clean_env(AFTER_HOME=str(tmp_path))
    port = embedded.free_port()
    started = after_cli(env, "couchdb", "--daemon", "--port", str(port))
    assert started.returncode == 0, output(started)
    state = read_state(tmp_path / "couchdb.json")
    supervisor_pid, server_pid = state["supervisor_pid"], state["server_pid"]
    try:
        assert int((tmp_path / "couchdb.pid").read_text()) == supervisor_pid
        assert os.getsid(supervisor_pid) == supervisor_pid, "the daemon has a session of its own"
        assert process_running(server_pid)
        name = f"db-{uuid.uuid4().hex[:8]}"
        assert requests.put(f"http://127.0.0.1:{port}/{name}", timeout=10).status_code == 201
    finally:
        stopped = after_cli(env, "couchdb", "stop")
    assert stopped.returncode == 0, output(stopped)
    assert f"supervisor pid {supervisor_pid}, server pid {server_pid}" in stopped.stdout
    assert gone(supervisor_pid) and gone(server_pid)
    assert port_is_free(port)
    assert not (tmp_path / "couchdb.pid").exists()
    assert not (tmp_path / "couchdb.json").exists()


# -- a server that keeps dying ----------------------------------------------------------------


def test_a_server_that_keeps_dying_is_restarted_ever_more_slowly_up_to_5_s() -> None:
    backoff = Backoff(longest=5.0, stable_after=60.0)
    delays = [backoff.next_delay(healthy_for=1.0) for _ in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_a_server_that_ran_healthy_for_a_minute_is_restarted_at_once() -> None:
    backoff = Backoff(longest=5.0, stable_after=60.0)
    for _ in range(4):
        backoff.next_delay(healthy_for=0.0)
    assert backoff.next_delay(healthy_for=61.0) == 0.0
    assert backoff.next_delay(healthy_for=1.0) == 0.5
