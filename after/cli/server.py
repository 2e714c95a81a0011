"""`after push`, `status`, `setup`, `couchdb`: the database, its users, the embedded server."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from after import embedded, supervisor
from after.cli.app import (
    Paths,
    connection_options,
    console,
    fail,
    friendly_errors,
    load_config,
    main,
    process_running,
    read_pid,
    terminate,
)
from after.config import Config
from after.couch import CouchError, Forbidden, NotFound, Server


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


@main.command()
@connection_options
@click.option(
    "--every",
    type=click.FloatRange(min=1.0),
    metavar="SECONDS",
    help="Write the metrics again every SECONDS until Ctrl-C (needs --output).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Write to FILE, replaced at once each time (node_exporter's textfile collector "
    "reads *.prom files from its --collector.textfile.directory) [default: stdout].",
)
@click.option(
    "--window",
    type=click.FloatRange(min=1.0),
    default=300.0,
    show_default=True,
    metavar="SECONDS",
    help="Runs that ended this long ago at most go into the duration and delay summaries.",
)
@friendly_errors
def metrics(
    couchdb_url: str | None,
    db: str | None,
    every: float | None,
    output: Path | None,
    window: float,
) -> None:
    """Tasks, runs and instances in the Prometheus text format.

    Tasks by worker and status, late tasks and the oldest lateness, runs and
    failures per instance, run durations and start delays, instances and the
    age of their heartbeats: read from the database's views, as `after status`.
    """
    from after import metrics as exposition

    if every is not None and output is None:
        raise click.UsageError("--every writes a file again and again: give it --output FILE")
    config = load_config(couchdb_url, db)
    database = Server.from_config(config).database(config.db)

    def once() -> None:
        try:
            text = exposition.render(exposition.collect(database, window=window))
        except NotFound:
            fail(
                f"database {config.db} has no _design/after at {config.display_url}: "
                "run `after push`"
            )
        if output is None:
            click.echo(text, nl=False)
        else:
            exposition.write_textfile(output, text)

    once()
    if every is None:
        return
    console.print(f"writing {output} every {every:g} s; Ctrl-C to stop", style="bright_black")
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(every)
            try:
                once()
            except CouchError as exc:  # an outage: keep the last file, try again
                console.print(f"not read ({exc}); trying again", style="red")


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
    if not running:
        # Installed from a wheel, not a checkout: the pinned server goes into AFTER_HOME once.
        try:
            script = embedded.find_pouchdb_server(paths.home)
        except embedded.EmbeddedServerError:
            script = embedded.install_pouchdb_server(paths.home, click.echo)
        os.environ["AFTER_POUCHDB_SERVER"] = str(script)  # the supervisor's server, and a daemon's
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
        from after.security import protect_databases

        for name in protect_databases(Server(url, (admin_name, password))):
            click.echo(
                f"{name}: _security set, only After's roles and server admins may read or "
                "write it (anonymous requests get 401)"
            )
    elif pid is not None:  # still starting, from an older After, or on other data
        click.echo(
            f"if the embedded server (pid {pid}) runs on {directory}, restart it to apply it "
            "(`after couchdb stop`, then `after couchdb --daemon`)"
        )
    else:
        click.echo(
            "it applies when the embedded server starts (`after couchdb --daemon`); then "
            "run `after setup` (as that admin) so that the database's _security admits only "
            "After's roles. Apache CouchDB 3.x needs no lock: it always has an admin"
        )
    click.echo(
        f"connect as the admin: AFTER_COUCHDB_URL=http://{admin_name}@127.0.0.1:{port}/ "
        "with AFTER_COUCHDB_PASSWORD (or both in a config file readable only by you)"
    )
