"""`after import-crontab`: a crontab moved to repeating tasks and job modules."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console

from after.cli.app import (
    connection_options,
    console,
    fail,
    friendly_errors,
    load_config,
    main,
)
from after.cli.tasks import client_errors, database_of


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
