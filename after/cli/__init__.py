"""The `after` command line. Thin: each command reads the config and calls one module.

One module per group of commands, each registering its commands on `main`:
after.cli.workers (start, stop, log, list, clean), after.cli.tasks (schedule,
cancel, reschedule, show, history), after.cli.crontab (import-crontab) and
after.cli.server (push, status, setup, couchdb); what they share (the group,
paths, options, errors, process helpers) is in after.cli.app.
"""

from after.cli import crontab, server, tasks, workers
from after.cli.app import main, process_running

__all__ = ["crontab", "main", "process_running", "server", "tasks", "workers"]
