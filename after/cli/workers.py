"""`after start`, `stop`, `log`, `list`, `clean`: the worker processes of this machine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from after import records
from after.cli.app import (
    Paths,
    connection_options,
    console,
    fail,
    friendly_errors,
    load_config,
    main,
    pid_alive,
    read_pid,
    terminate,
)
from after.client import format_duration
from after.config import Config
from after.couch import CouchError, Server
from after.tasks import parse_date


@main.command()
@click.argument("name")
@connection_options
@click.option("--jobs", metavar="DIR", help="Jobs directory [env AFTER_JOBS; default: ./jobs].")
@click.option("--concurrency", default=4, show_default=True, help="Jobs that may run at once.")
@click.option(
    "--horizon",
    default=300.0,
    show_default=True,
    help="Seconds ahead: tasks due later stay waiting in the database, not in memory.",
)
@click.option("--heartbeat", default=5.0, show_default=True, help="Seconds between lease renewals.")
@click.option(
    "--lease",
    default=30.0,
    show_default=True,
    help="Seconds without a renewal after which other instances take this one's tasks over.",
)
@click.option("--foreground", is_flag=True, help="Stay attached and log to the terminal.")
@friendly_errors
def start(
    name: str,
    couchdb_url: str | None,
    db: str | None,
    jobs: str | None,
    concurrency: int,
    horizon: float,
    heartbeat: float,
    lease: float,
    foreground: bool,
) -> None:
    """Start a worker with the given NAME (in the background unless --foreground)."""
    from after.tasks import worker_name_problem

    if problem := worker_name_problem(name):
        fail(problem)
    config = load_config(couchdb_url, db, jobs)
    if not config.jobs.is_dir():
        fail(f"jobs directory {config.jobs.resolve()} does not exist (set --jobs or AFTER_JOBS)")
    paths = Paths(config.home)
    paths.workers.mkdir(parents=True, exist_ok=True)
    pid = read_pid(paths.pid(name))
    if pid and pid != os.getpid() and pid_alive(pid):
        fail(f"worker {name} is already running here (pid {pid}); `after stop {name}` first")
    options = dict(concurrency=concurrency, horizon=horizon, heartbeat=heartbeat, lease=lease)
    if lease <= heartbeat:
        fail(f"--lease ({lease:g}s) must be longer than --heartbeat ({heartbeat:g}s)")
    if foreground:
        run_foreground(config, name, options, paths)
    else:
        start_daemon(config, name, options, paths)


def run_foreground(config: Config, name: str, options: dict[str, Any], paths: Paths) -> None:
    from after.worker import Worker

    logging.Formatter.converter = time.gmtime
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Hand the GIL over sooner (default 5 ms): the timer thread's wake-ups at due
    # times should not wait behind the feed and writer threads.
    sys.setswitchinterval(0.001)
    worker = Worker(config, name, state_file=paths.state(name), **options)
    worker.install_signal_handlers()
    paths.pid(name).write_text(str(os.getpid()))
    try:
        worker.run()
    except BaseException:
        if not worker.finished.is_set():
            raise  # it failed before it started anything: the CLI says why, in one line
        logging.getLogger("after.worker").exception("worker %s ended on an error", name)
        # Its record says its tasks are to be taken over now (records.abandoned): a job
        # still running here must not go on beside their takeover, so end at once.
        if read_pid(paths.pid(name)) == os.getpid():
            paths.pid(name).unlink(missing_ok=True)
        logging.shutdown()
        os._exit(1)
    finally:
        if read_pid(paths.pid(name)) == os.getpid():
            paths.pid(name).unlink(missing_ok=True)


def start_daemon(config: Config, name: str, options: dict[str, Any], paths: Paths) -> None:
    """Start `after start NAME --foreground` detached, logging to its log file."""
    state = paths.state(name)
    state.unlink(missing_ok=True)
    env = {
        **os.environ,
        "AFTER_COUCHDB_URL": config.couchdb_url,
        "AFTER_DB": config.db,
        "AFTER_JOBS": str(config.jobs.resolve()),
        "AFTER_HOME": str(config.home),
    }
    if config.user:
        env["AFTER_COUCHDB_USER"] = config.user
        env["AFTER_COUCHDB_PASSWORD"] = config.password or ""
    with open(paths.log(name), "ab") as log:
        flags = [part for key, value in options.items() for part in (f"--{key}", str(value))]
        process = subprocess.Popen(
            [sys.executable, "-m", "after", "start", name, "--foreground", *flags],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    paths.pid(name).write_text(str(process.pid))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if state.exists():
            click.echo(f"worker {name} started (pid {process.pid}); log: {paths.log(name)}")
            return
        if process.poll() is not None:
            paths.pid(name).unlink(missing_ok=True)
            fail(f"worker {name} did not start:\n{tail(paths.log(name), 5)}")
        time.sleep(0.05)
    fail(f"worker {name} (pid {process.pid}) did not report ready in 30 s; see {paths.log(name)}")


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@main.command()
@click.argument("name")
@click.option(
    "--timeout", default=60.0, show_default=True, help="Seconds to wait for running jobs."
)
def stop(name: str, timeout: float) -> None:
    """Stop a worker: held tasks are handed back, running jobs finish first."""
    paths = Paths(load_config().home)
    pid = read_pid(paths.pid(name))
    if pid is None or not pid_alive(pid):
        paths.pid(name).unlink(missing_ok=True)
        fail(f"worker {name} is not running here")
    if not terminate(pid, timeout):
        fail(f"worker {name} (pid {pid}) is still finishing its jobs after {timeout:.0f} s")
    paths.pid(name).unlink(missing_ok=True)
    click.echo(f"worker {name} stopped")


@main.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=0, help="Only the last N lines.")
def log(name: str, follow: bool, lines: int) -> None:
    """Show the log of a worker."""
    path = Paths(load_config().home).log(name)
    if not path.exists():
        fail(f"worker {name} has no log here ({path})")
    with open(path, errors="replace") as handle:
        content = handle.read()
        if lines:
            content = "\n".join(content.splitlines()[-lines:]) + "\n"
        click.echo(content, nl=False)
        while follow:
            line = handle.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.2)


@main.command(name="list")
@connection_options
def list_workers(couchdb_url: str | None, db: str | None) -> None:
    """List the workers running on this machine, and every instance the database knows."""
    config = load_config(couchdb_url, db)
    paths = Paths(config.home)
    local = Table(
        "worker",
        "pid",
        "state",
        "uptime",
        "held",
        "done",
        "failed",
        "database",
        title="on this machine",
    )
    for pid_file in sorted(paths.workers.glob("*.pid")) if paths.workers.is_dir() else []:
        name = pid_file.stem
        pid = read_pid(pid_file)
        alive = pid is not None and pid_alive(pid)
        try:
            state = json.loads(paths.state(name).read_text())
        except (OSError, ValueError):
            state = {}
        started = state.get("started")
        uptime = format_duration(time.time() - started) if alive and started else "-"
        local.add_row(
            name,
            str(pid or "-"),
            "running" if alive else "dead (stale pid file)",
            uptime,
            str(state.get("held", "-")),
            str(state.get("done", "-")),
            str(state.get("failed", "-")),
            f"{state.get('url', '')}{state.get('db', '')}",
        )
    if local.row_count:
        console.print(local)
    else:
        click.echo("no workers running on this machine")
    try:
        database = Server.from_config(config, timeout=5).database(config.db)
        rows = database.all_docs(include_docs=True, **records.all_range())["rows"]
    except CouchError as exc:
        click.echo(f"worker records not read: {exc}")
        return
    everywhere = Table(
        "worker",
        "instance",
        "host",
        "pid",
        "state",
        "last seen",
        "held",
        "done",
        "failed",
        title=f"instances known to {config.display_url}{config.db}",
    )
    now = datetime.now(UTC)
    for row in rows:
        record = row.get("doc") or {}
        last_seen = record.get("last_seen")
        age = format_duration((now - parse_date(last_seen)).total_seconds()) if last_seen else "-"
        everywhere.add_row(
            record.get("name", "?"),
            record.get("instance", "?"),
            record.get("host", "?"),
            str(record.get("pid", "?")),
            record_state(record, now),
            f"{age} ago",
            str(record.get("held", "-")),
            str(record.get("done", "-")),
            str(record.get("failed", "-")),
        )
    if everywhere.row_count:
        console.print(everywhere)
    else:
        click.echo(f"no worker records in {config.display_url}{config.db}")


def record_state(record: dict[str, Any], now: datetime) -> str:
    if record.get("state") == "running":
        return "live" if records.is_live(record, now) else "stale (lease ran out)"
    if record.get("state") == "lost":
        return f"lost (taken over by {record.get('reaped_by', '?')})"
    return str(record.get("state", "?"))


@main.command()
@click.argument("name")
def clean(name: str) -> None:
    """Empty the log of a worker."""
    path = Paths(load_config().home).log(name)
    if not path.exists():
        fail(f"worker {name} has no log here ({path})")
    path.write_bytes(b"")
    click.echo(f"log of worker {name} emptied")
