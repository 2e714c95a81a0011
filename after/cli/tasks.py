"""`after schedule`, `cancel`, `reschedule`, `show`, `history`: tasks from the command line."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from after.cli.app import (
    connection_options,
    console,
    fail,
    friendly_errors,
    load_config,
    main,
)
from after.config import Config
from after.couch import Database, Forbidden, NotFound, Server


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
