"""The `after` command group and what its commands share: paths, options, errors."""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from after import __version__, embedded
from after.config import Config, ConfigError
from after.couch import CouchError

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
        help="CouchDB server URL, credentials allowed; the nodes of a cluster "
        "comma-separated, to fail over between [env AFTER_COUCHDB_URL; "
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
