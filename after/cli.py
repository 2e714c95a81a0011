"""The `after` command line. Thin: each command reads the config, calls one module."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from after import __version__, embedded, records, supervisor
from after.client import format_duration
from after.config import Config, ConfigError
from after.couch import CouchError, Database, Forbidden, NotFound, Server
from after.tasks import parse_date

console = Console()


class Paths:
    """Where a worker's pid, log and state files live under AFTER_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.workers = home / "workers"

    def pid(self, name: str) -> Path:
        return self.workers / f"{name}.pid"

    def log(self, name: str) -> Path:
        return self.workers / f"{name}.log"

    def state(self, name: str) -> Path:
        return self.workers / f"{name}.json"

    @property
    def couchdb_dir(self) -> Path:
        return self.home / "couchdb"

    @property
    def couchdb_pid(self) -> Path:
        return self.home / "couchdb.pid"


def fail(message: str) -> None:
    raise click.ClickException(message)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One clear line and a non-zero exit for server errors; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CouchError as exc:
            fail(str(exc))
        except (embedded.EmbeddedServerError, OSError) as exc:
            fail(str(exc))

    return wrapper


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--couchdb and --db, overriding AFTER_COUCHDB_URL and AFTER_DB."""
    fn = click.option(
        "--db", metavar="NAME", help="Tasks database [env AFTER_DB; default: tasks]."
    )(fn)
    fn = click.option(
        "--couchdb",
        "couchdb_url",
        metavar="URL",
        help="CouchDB server URL, credentials allowed [env AFTER_COUCHDB_URL; "
        "default: http://127.0.0.1:5984/].",
    )(fn)
    return fn


def load_config(
    couchdb_url: str | None = None, db: str | None = None, jobs: str | None = None
) -> Config:
    """The config file (AFTER_CONFIG or ~/.after/config.toml), the environment, then flags."""
    home = click.get_current_context().find_root().params.get("home")
    try:
        config = Config.from_env()
    except ConfigError as exc:
        fail(str(exc))
    return config.override(couchdb_url=couchdb_url, db=db, jobs=jobs, home=home)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_running(pid: int) -> bool:
    """pid_alive, but a zombie (exited, not reaped yet by its parent) does not count."""
    if not pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: the signal test is all there is
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def terminate(pid: int, timeout: float) -> bool:
    """SIGTERM a process and wait for it to exit; False if it still runs after timeout."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_running(pid)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="after")
@click.option(
    "--home",
    metavar="DIR",
    help="Where pid files, logs and the embedded server's data live [env AFTER_HOME; "
    "default: ~/.after].",
)
def main(home: str | None) -> None:
    """After: cron no more. Schedule your tasks over HTTP.

    A task is a CouchDB document (worker, date, job, status); workers follow
    the changes feed, run the job at the task's date and write the outcome back.
    """


# -- workers ---------------------------------------------------------------------------


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


# -- tasks ---------------------------------------------------------------------------------


def database_of(config: Config) -> Database:
    return Server.from_config(config).database(config.db)


def client_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A refused request is one line: ours (ClientError), or the server's 403 reason."""
    from after.client import ClientError
    from after.crontab import CrontabError

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ClientError, CrontabError) as exc:
            fail(str(exc))
        except Forbidden as exc:
            fail(f"refused by the server ({exc.status} {exc.error}): {exc.reason}")

    return wrapper


@main.command()
@click.argument("worker")
@click.argument("job")
@click.argument("arguments", nargs=-1)
@click.option("--at", metavar="DATE", help="First run: ISO 8601 date (no offset: UTC, or --tz).")
@click.option("--in", "in_", metavar="DURATION", help="First run after this long: PT30S, 5m, 2d.")
@click.option(
    "--cron", metavar="EXPR", help="Repeat on a cron schedule (5 fields, or 6 with seconds)."
)
@click.option("--every", metavar="DURATION", help="Repeat at this interval: PT1H, 30s, 1d.")
@click.option("--tz", metavar="ZONE", help="IANA zone of the schedule and of dates without offset.")
@click.option(
    "--limit", type=click.IntRange(min=1), metavar="N", help="Number of runs of a repeat."
)
@click.option("--until", metavar="DATE", help="No run of the repeat after this date.")
@click.option("--retry", type=click.IntRange(0, 1000), metavar="N", help="Retries of a failed run.")
@click.option("--timeout", metavar="DURATION", help="Stop a run that lasts longer than this.")
@click.option(
    "--misfire",
    type=click.Choice(["skip", "once", "all"]),
    help="Occurrences missed while no worker ran: skip (default), once, all.",
)
@connection_options
@friendly_errors
@client_errors
def schedule(
    worker: str,
    job: str,
    arguments: tuple[str, ...],
    at: str | None,
    in_: str | None,
    cron: str | None,
    every: str | None,
    tz: str | None,
    limit: int | None,
    until: str | None,
    retry: int | None,
    timeout: str | None,
    misfire: str | None,
    couchdb_url: str | None,
    db: str | None,
) -> None:
    """Create a task: run JOB with ARGUMENTS on WORKER; print its id.

    ARGUMENTS are JSON where they parse (3, true, null, '{"a": 1}'), else strings;
    put -- before one that starts with a dash. Durations are ISO 8601 (PT30S, P1D)
    or short forms (30s, 5m, 1h, 2d, 1w, 1h30m). Without --at or --in, a --cron
    task starts at the cron's next time and an --every task now.
    """
    from after import client

    doc = client.build_task(
        worker,
        job,
        arguments,
        at=at,
        in_=in_,
        cron=cron,
        every=every,
        tz=tz,
        limit=limit,
        until=until,
        retry=retry,
        timeout=timeout,
        misfire=misfire,
    )
    config = load_config(couchdb_url, db)
    click.echo(client.create_task(database_of(config), doc))


@main.command()
@click.argument("task_id", metavar="ID")
@connection_options
@friendly_errors
@client_errors
def cancel(task_id: str, couchdb_url: str | None, db: str | None) -> None:
    """Cancel a task: its worker drops it (or stops it, if it runs with a timeout)."""
    from after import client

    config = load_config(couchdb_url, db)
    move = client.cancel_task(database_of(config), task_id)
    if not move.changed:
        click.echo(f"task {task_id} is already {move.found}")
    else:
        click.echo(
            f"task {task_id}: cancel requested (it was {move.found}); "
            "its worker confirms with canceled"
        )


@main.command()
@click.argument("task_id", metavar="ID")
@click.option("--at", metavar="DATE", help="The new date: ISO 8601 (no offset: UTC, or --tz).")
@click.option("--in", "in_", metavar="DURATION", help="The new date, this long from now.")
@click.option("--tz", metavar="ZONE", help="IANA zone of an --at without offset.")
@connection_options
@friendly_errors
@client_errors
def reschedule(
    task_id: str,
    at: str | None,
    in_: str | None,
    tz: str | None,
    couchdb_url: str | None,
    db: str | None,
) -> None:
    """Move a task to a new date (also retries a failed one)."""
    from after import client
    from after.tasks import iso

    if (at is None) == (in_ is None):
        raise click.UsageError("give the new date with --at DATE or --in DURATION")
    if at is not None:
        date = client.parse_when(at, tz)
    else:
        date = client.add_duration(datetime.now(UTC), client.parse_duration(in_ or "", "--in"))
    config = load_config(couchdb_url, db)
    move = client.reschedule_task(database_of(config), task_id, date)
    click.echo(f"task {task_id} rescheduled to {iso(date)} (it was {move.found})")


@main.command()
@click.argument("task_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the task and its next runs as JSON.")
@click.option("--next", "count", default=5, show_default=True, help="How many next runs to list.")
@connection_options
@friendly_errors
@client_errors
def show(task_id: str, as_json: bool, count: int, couchdb_url: str | None, db: str | None) -> None:
    """Show a task's fields and its next runs."""
    from after import client

    config = load_config(couchdb_url, db)
    data = client.show_data(client.read_task(database_of(config), task_id), count)
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        console.print(client.render_task(data))


@main.command()
@click.argument("task_id", metavar="[ID]", required=False)
@click.option("--worker", metavar="NAME", help="The last runs of this worker's tasks.")
@click.option("--job", metavar="NAME", help="The last runs of this job.")
@click.option("--limit", default=20, show_default=True, help="How many runs (--worker, --job).")
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON.")
@connection_options
@friendly_errors
@client_errors
def history(
    task_id: str | None,
    worker: str | None,
    job: str | None,
    limit: int,
    as_json: bool,
    couchdb_url: str | None,
    db: str | None,
) -> None:
    """The runs of a task (newest first), or the last runs of a --worker or a --job."""
    from after import client

    if sum(value is not None for value in (task_id, worker, job)) != 1:
        raise click.UsageError("give a task ID, --worker NAME or --job NAME (one of them)")
    config = load_config(couchdb_url, db)
    database = database_of(config)
    if task_id is not None:
        runs = client.task_runs(client.read_task(database, task_id))
        title, extra = f"runs of task {task_id}", ()
    else:
        try:
            runs = client.recent_runs(database, worker=worker, job=job, limit=limit)
        except NotFound:
            fail(f"database {config.db} has no runs view at {config.display_url}: run `after push`")
        title = f"last runs of worker {worker}" if worker else f"last runs of job {job}"
        extra = ("job" if worker else "worker", "task")
    if as_json:
        click.echo(json.dumps(runs, indent=2, ensure_ascii=False))
    elif not runs:
        click.echo(f"no runs recorded ({title})")
    else:
        console.print(client.render_runs(runs, title, extra))


@main.command(name="import-crontab")
@click.argument("file", type=click.File("r"), required=False)
@click.option("--worker", required=True, metavar="NAME", help="The worker that runs the tasks.")
@click.option("--dry-run", is_flag=True, help="Print the plan, write nothing.")
@click.option(
    "--jobs", metavar="DIR", help="Where job modules go [env AFTER_JOBS; default: ./jobs]."
)
@click.option(
    "--tz", metavar="ZONE", help="Zone of entries without CRON_TZ [default: this machine's]."
)
@connection_options
@friendly_errors
@client_errors
def import_crontab(
    file: Any,
    worker: str,
    dry_run: bool,
    jobs: str | None,
    tz: str | None,
    couchdb_url: str | None,
    db: str | None,
) -> None:
    """Turn each entry of a crontab into a repeating task and a job module.

    FILE is a crontab (- for standard input; default: `crontab -l`). Each
    command becomes jobs/cron_<hash>.py, run as cron runs it; the task names
    that job, never the command. Importing the same entries again changes nothing.
    """
    from rich.progress import Progress

    from after import client, crontab
    from after.tasks import worker_name_problem

    if problem := worker_name_problem(worker):
        fail(problem)
    if tz is not None:
        client.zone(tz)
        zone, warning = tz, None
    else:
        zone, warning = crontab.local_zone()
    if warning:
        click.secho(f"warning: {warning}", fg="yellow", err=True)
    text = file.read() if file is not None else crontab.read_user_crontab()
    parsed = crontab.parse_crontab(text, zone)
    config = load_config(couchdb_url, db, jobs)
    jobs_dir = config.jobs.resolve()
    if not jobs_dir.is_dir() and not dry_run:
        fail(f"jobs directory {jobs_dir} does not exist (set --jobs or AFTER_JOBS)")
    database = database_of(config)
    plan = crontab.plan_import(database, parsed, worker, jobs_dir)

    console.print(crontab.render_plan(plan))
    for note in parsed.notes:
        click.echo(f"note: {note}")
    if dry_run:
        click.echo(f"dry run: nothing written ({len(plan.steps)} entries planned)")
        return
    if not plan.changes:
        click.echo(
            f"nothing to change: the {len(plan.steps)} tasks and their jobs are already in place"
        )
        return
    progress_console = Console(stderr=True)
    with Progress(
        console=progress_console, transient=True, disable=not progress_console.is_terminal
    ) as progress:
        bar = progress.add_task("importing", total=len(plan.steps))
        applied = crontab.apply_plan(database, plan, lambda n: progress.advance(bar, n))
    click.echo(
        f"wrote {applied.jobs_written} job files to {jobs_dir}; created {applied.tasks_created} "
        f"tasks for worker {worker} (run it with --jobs {jobs_dir})"
    )
    for step, reason in applied.refused:
        click.echo(f"line {step.entry.line}: task {step.task['_id']} refused: {reason}", err=True)
    if applied.refused:
        sys.exit(1)


# -- the database ----------------------------------------------------------------------


@main.command()
@connection_options
@click.option("--watch", is_flag=True, help="Re-deploy whenever a design file changes.")
@friendly_errors
def push(couchdb_url: str | None, db: str | None, watch: bool) -> None:
    """Create the database if missing and deploy the design documents."""
    from after import push as pusher

    config = load_config(couchdb_url, db)
    database = Server.from_config(config).database(config.db)

    def report(result: pusher.PushResult) -> None:
        where = f"{config.display_url}{config.db}"
        if result.created_db:
            click.echo(f"created database {where}")
        for doc_id in result.changed:
            click.echo(f"deployed {doc_id} to {where}")
        for doc_id in result.unchanged:
            click.echo(f"{doc_id} unchanged in {where}")

    report(pusher.push(database))
    if watch:
        click.echo("watching designdocs/ for changes (Ctrl-C to stop)")
        with contextlib.suppress(KeyboardInterrupt):
            pusher.watch(database, report)


@main.command()
@connection_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON for scripts.")
@click.option("--watch", is_flag=True, help="Redraw the summary in place until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="How often --watch redraws.",
)
@friendly_errors
def status(
    couchdb_url: str | None, db: str | None, as_json: bool, watch: bool, interval: float
) -> None:
    """Tasks by status and worker, late and failed tasks, worker instances."""
    from rich.text import Text

    from after import status as view

    if as_json and watch:
        raise click.UsageError("--json and --watch do not go together")
    config = load_config(couchdb_url, db)
    database = Server.from_config(config).database(config.db)
    title = f"{config.display_url}{config.db}"
    try:
        data = view.summary(database)
    except NotFound:
        fail(f"database {config.db} has no _design/after at {config.display_url}: run `after push`")
    if as_json:
        click.echo(view.to_json(data))
    elif watch:
        warn_if_admin_party(config)
        with contextlib.suppress(KeyboardInterrupt):
            view.watch(
                lambda: view.summary(database),
                interval,
                title=title,
                console=console,
                on_error=lambda exc: Text(f"not read ({exc}); trying again", style="red"),
            )
        return
    else:
        console.print(view.render(data, title))
    warn_if_admin_party(config)


def warn_if_admin_party(config: Config) -> bool:
    """One loud line on stderr when the server makes every anonymous request an admin."""
    from after.security import admin_party, admin_party_warning

    try:
        party = admin_party(config.couchdb_url, timeout=5)
    except CouchError:
        return False
    if party:
        click.secho(admin_party_warning(config.display_url), fg="red", bold=True, err=True)
    return party


@main.command()
@connection_options
@click.option(
    "--user",
    "user_name",
    default=None,
    help="The user to create or update [default: after, unless only --dashboard is given].",
)
@click.option(
    "--role",
    type=click.Choice(["worker", "client", "replicator"]),
    default="worker",
    show_default=True,
    help="worker: runs tasks; client: creates and steers tasks; replicator: the user a "
    "replication between servers runs as (its writes are checked for shape only).",
)
@click.option(
    "--dashboard",
    is_flag=True,
    help="Let the dashboard's script run on Apache CouchDB 3.2+, which serves attachments "
    "with `Content-Security-Policy: sandbox`: sets [csp] attachments_header_value on every "
    "node to the narrowest policy the page needs.",
)
@friendly_errors
def setup(
    couchdb_url: str | None, db: str | None, user_name: str | None, role: str, dashboard: bool
) -> None:
    """Create the database, a user and the database's security (needs admin credentials).

    The password comes from AFTER_USER_PASSWORD or a prompt, never from the command line.
    With --dashboard alone, only the dashboard's setting is made.
    """
    from after import push as pusher
    from after.security import ROLES, security_object, user_context

    config = load_config(couchdb_url, db)
    server = Server.from_config(config)
    me = user_context(server)
    if "_admin" not in (me.get("roles") or []):
        who = f"user {me['name']}" if me.get("name") else "an anonymous user"
        fail(
            f"after setup needs a server admin, but {config.display_url} takes you for {who}; "
            "give admin credentials (in the URL, AFTER_COUCHDB_USER / AFTER_COUCHDB_PASSWORD "
            "or the config file)"
        )
    if dashboard and user_name is None:
        result = pusher.push(server.database(config.db))
        if result.created_db:
            click.echo(f"created database {config.db}")
        return setup_dashboard(config, server)
    user_name = user_name or "after"
    password = os.environ.get("AFTER_USER_PASSWORD") or click.prompt(
        f"password for {user_name}", hide_input=True, confirmation_prompt=True
    )
    if not password:
        fail(f"the password for {user_name} is empty")
    database = server.database(config.db)
    result = pusher.push(database)
    if result.created_db:
        click.echo(f"created database {config.db}")
    server.put_user(user_name, password, [ROLES[role]])
    click.echo(f"user {user_name} has role {ROLES[role]}")
    database.set_security(security_object())
    click.echo(f"{config.db} admits the roles {', '.join(ROLES.values())} (and server admins)")
    if not warn_if_admin_party(config):
        try:
            Server(config.couchdb_url, timeout=10).database(config.db).info()
        except Forbidden as exc:
            click.echo(f"anonymous requests to {config.db} are refused ({exc.status})")
        else:
            fail(f"{config.db} still answers anonymous requests: check the server's security")
    if dashboard:
        setup_dashboard(config, server)


def setup_dashboard(config: Config, server: Server) -> None:
    """`after setup --dashboard`: the page's script may run, and what that opens."""
    from after.security import DASHBOARD_POLICY, allow_dashboard, is_pouchdb_server

    page = f"{config.display_url}{config.db}/_design/after/index.html"
    if is_pouchdb_server(server):
        click.echo(
            "PouchDB Server serves attachments without a Content-Security-Policy: "
            f"the dashboard needs no setting ({page})"
        )
        return
    before = allow_dashboard(server)
    for node, policy in before.items():
        was = "CouchDB's default, sandbox" if policy is None else policy
        click.echo(f"{node}: [csp] attachments_header_value = {DASHBOARD_POLICY} (was: {was})")
    click.echo(
        "This is server-wide: the HTML attachments of every database on this server may now "
        "run scripts served by this server (never inline ones, nor from elsewhere). Do it "
        "only where everyone who can write documents with attachments is trusted."
    )
    click.echo(f"the dashboard: {page}")


# -- the embedded server -----------------------------------------------------------------


def couchdb_state_path(paths: Paths) -> Path:
    """The supervisor's state (JSON, see after.supervisor), next to its pid file."""
    return paths.home / "couchdb.json"


def running_supervisor(paths: Paths) -> tuple[int, dict[str, Any]] | None:
    """The pid of the embedded server's supervisor, if one runs, and its state.

    The state is {} until the supervisor's server first answers (or if the pid
    file is from an older After, whose pid file held the server itself).
    """
    pid = read_pid(paths.couchdb_pid)
    if pid is None or not process_running(pid):
        return None
    state = supervisor.read_state(couchdb_state_path(paths))
    return pid, state if state.get("supervisor_pid") == pid else {}


def announce(url: str, directory: Path) -> None:
    click.echo(f"embedded server at {url} (Fauxton: {url}_utils), data in {directory}")


@main.group(invoke_without_command=True)
@click.option("--port", default=5984, show_default=True, help="Port on 127.0.0.1.")
@click.option(
    "--dir", "data_dir", metavar="DIR", help="Data directory [default: AFTER_HOME/couchdb]."
)
@click.option(
    "--daemon",
    is_flag=True,
    help="Run in the background (pid file under AFTER_HOME); return once the server answers.",
)
@click.pass_context
@friendly_errors
def couchdb(ctx: click.Context, port: int, data_dir: str | None, daemon: bool) -> None:
    """Run the embedded CouchDB-compatible server (PouchDB Server) on 127.0.0.1, supervised.

    A supervisor restarts the server at once, on the same data, if it dies,
    and kills and restarts it if it stops answering database requests; each
    event is a line in DIR/server.log. `after couchdb stop` stops both. For
    local use and tests; production belongs on Apache CouchDB 3.x.
    """
    if ctx.invoked_subcommand:
        return
    paths = Paths(load_config().home)
    directory = (Path(data_dir).expanduser() if data_dir else paths.couchdb_dir).absolute()
    url = f"http://127.0.0.1:{port}/"
    running = running_supervisor(paths)
    if running:
        pid, state = running
        click.echo(
            f"the embedded server is already running (supervisor pid {pid}) "
            f"at {state.get('url', url)}"
        )
    elif daemon:
        start_supervisor_daemon(paths, port, directory)
        announce(url, directory)
    else:
        status = supervise(paths, port, directory)
        ctx.exit(status)


def supervise(paths: Paths, port: int, directory: Path) -> int:
    """Run the supervisor here, with the pid file, until it stops; its exit status."""
    watcher = supervisor.Supervisor(
        port,
        directory,
        timings=supervisor.Timings.from_environment(),
        state_path=couchdb_state_path(paths),
    )
    paths.couchdb_pid.parent.mkdir(parents=True, exist_ok=True)
    paths.couchdb_pid.write_text(str(os.getpid()))
    try:
        return watcher.run(on_ready=lambda: announce(watcher.url, directory))
    finally:
        if read_pid(paths.couchdb_pid) == os.getpid():
            paths.couchdb_pid.unlink(missing_ok=True)


def start_supervisor_daemon(paths: Paths, port: int, directory: Path) -> None:
    """Start `after couchdb` detached (its own session, output to the log); wait until it serves."""
    log_path = directory / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "after", "--home", str(paths.home), "couchdb"]
    argv += ["--port", str(port), "--dir", str(directory)]
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + supervisor.Timings().start_timeout + 10
    while supervisor.read_state(couchdb_state_path(paths)).get("supervisor_pid") != daemon.pid:
        if daemon.poll() is not None:
            code = daemon.returncode
            known = code in embedded.EXIT_MEANINGS
            reason = embedded.exit_reason(code) if known else last_line(log_path)
            fail(f"the embedded server did not start ({reason}); see {log_path}")
        if time.monotonic() > deadline:
            terminate(daemon.pid, timeout=30)  # whether or not it stops, the start failed
            fail(f"the embedded server did not answer at 127.0.0.1:{port}; see {log_path}")
        time.sleep(0.1)


def last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        if lines:
            return lines[-1]
    return "no output"


@couchdb.command(name="stop")
@friendly_errors
def couchdb_stop() -> None:
    """Stop the embedded server and its supervisor (with or without --daemon)."""
    paths = Paths(load_config().home)
    running = running_supervisor(paths)
    if running is None:
        paths.couchdb_pid.unlink(missing_ok=True)
        couchdb_state_path(paths).unlink(missing_ok=True)
        fail("the embedded server is not running")
    pid, state = running
    # The supervisor stops its server (up to 10 s before a SIGKILL), then itself.
    if not terminate(pid, timeout=30):
        fail(f"the embedded server's supervisor (pid {pid}) did not stop within 30 s")
    paths.couchdb_pid.unlink(missing_ok=True)
    couchdb_state_path(paths).unlink(missing_ok=True)
    server = f", server pid {state['server_pid']}" if state.get("server_pid") else ""
    click.echo(f"embedded server stopped (supervisor pid {pid}{server})")


def restart_supervised_server(paths: Paths, pid: int, state: dict[str, Any]) -> dict[str, Any]:
    """SIGHUP the supervisor: it restarts its server, which rereads its config.json.

    Returns the supervisor's state once the new server answers.
    """
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + supervisor.Timings().start_timeout + 10
    while True:
        running = running_supervisor(paths)
        if running is None:
            fail(f"the embedded server's supervisor (pid {pid}) stopped; see {state['log']}")
        elif running[1].get("server_pid") not in (None, state["server_pid"]):
            return running[1]
        elif time.monotonic() > deadline:
            fail(f"the embedded server did not come back at {state['url']}; see {state['log']}")
        time.sleep(0.1)


@couchdb.command(name="lock")
@click.option(
    "--user", "admin_name", default="admin", show_default=True, help="The server admin's name."
)
@click.pass_context
@friendly_errors
def couchdb_lock(ctx: click.Context, admin_name: str) -> None:
    """End the embedded server's "admin party": give it a server admin.

    Without an admin, anyone who can reach PouchDB Server is a server admin.
    This writes the admin (hashed) into the server's config.json and, if the
    server runs (supervised, with or without --daemon), has its supervisor
    restart it to apply it. The password comes from AFTER_ADMIN_PASSWORD or a
    prompt, never from the command line. Apache CouchDB 3.x needs no lock: it
    always has an admin (it refuses to start without one).
    """
    group = ctx.parent.params if ctx.parent else {}
    paths = Paths(load_config().home)
    running = running_supervisor(paths)
    pid, state = running if running else (None, {})
    if group.get("data_dir"):
        directory = Path(group["data_dir"]).expanduser()
    elif state:
        directory = Path(state["data_dir"])
    else:
        directory = paths.couchdb_dir
    if state and Path(state["data_dir"]).resolve() != directory.resolve():
        state = {}  # a server on other data: not the one we lock
    port = int(state["port"]) if state else group.get("port", 5984)
    url = f"http://127.0.0.1:{port}/"

    password = os.environ.get("AFTER_ADMIN_PASSWORD") or click.prompt(
        f"password for the server admin {admin_name}", hide_input=True, confirmation_prompt=True
    )
    if not password:
        fail("the server admin's password is empty")
    embedded.seed_admin(directory, (admin_name, password))
    # The server rewrites config.json (admin hashes, its cookie secret) with its own
    # mode: keep the whole data directory private instead.
    directory.chmod(0o700)
    click.echo(f"server admin {admin_name} written (hashed) to {directory / 'config.json'}")

    if pid is not None and state:
        restarted = restart_supervised_server(paths, pid, state)
        from after.security import admin_party

        if admin_party(url):
            fail(f"the embedded server at {url} restarted but is still in admin party")
        server_pid = restarted["server_pid"]
        click.echo(f"restarted the embedded server (pid {server_pid}) at {url}: locked")
    elif pid is not None:  # still starting, from an older After, or on other data
        click.echo(
            f"if the embedded server (pid {pid}) runs on {directory}, restart it to apply it "
            "(`after couchdb stop`, then `after couchdb --daemon`)"
        )
    else:
        click.echo(
            "it applies when the embedded server starts (`after couchdb --daemon`); "
            "Apache CouchDB 3.x needs no lock: it always has an admin"
        )
    click.echo(
        f"connect as the admin: AFTER_COUCHDB_URL=http://{admin_name}@127.0.0.1:{port}/ "
        "with AFTER_COUCHDB_PASSWORD (or both in a config file readable only by you)"
    )
