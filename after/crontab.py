"""Moving off cron: read a crontab and turn each entry into a repeating task.

Each entry becomes

- a job module ``jobs/cron_<hash>.py`` that runs exactly the entry's command
  (``SHELL -c COMMAND``, as cron does), with the crontab's environment lines, in
  the user's home directory, and returns its exit code and the end of its
  output; a non-zero exit raises, so the task's run is an ``err``. The command
  lives only there, on the worker's disk: a task document names a job, it never
  carries a shell string.
- a task ``cron-<hash>`` with ``repeat.cron`` (the 5 fields; ``@daily`` and the
  other macros written out) and ``repeat.timezone``: the crontab's ``CRON_TZ``
  (or ``TZ``) in force at that line, else this machine's zone, always stated.

The names are hashes of what they stand for (the job's: shell, command, input and
environment; the task's: worker, schedule, zone and job), so importing the same
entries again finds the same tasks and files and changes nothing.

What cron does that is kept, after cronie (crontab(5)):

- Environment lines (``NAME=value``, quotes around the value allowed) apply to
  the entries after them. Commands get cron's environment: ``HOME``, ``LOGNAME``,
  ``USER``, ``SHELL=/bin/sh``, ``PATH=/usr/bin:/bin``, then the crontab's lines.
  ``SHELL`` also chooses the shell. ``MAILTO`` is dropped: After sends no mail,
  a run's output is in the task (result, or error on a failure). ``CRON_TZ`` only
  sets the zone of the schedule; ``TZ`` sets it when there is no ``CRON_TZ`` and
  is passed to the command too, as cron passes it.
- ``%`` in a command: the first unescaped ``%`` ends the command and the rest is
  its standard input, each further ``%`` a newline (a final newline is added);
  ``\\%`` is a literal ``%``.
- ``@reboot`` (no date to schedule: leave it to the init system), unknown
  macros and lines that do not parse are skipped, each with its reason. A user
  crontab has no user field (that is /etc/crontab's format) and no seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from after.couch import Database
from after.recurrence import RepeatError, next_occurrence, parse_repeat
from after.tasks import Doc, iso, now

MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
DEFAULT_SHELL = "/bin/sh"
DEFAULT_PATH = "/usr/bin:/bin"  # cron's, not the importing shell's
ZONE_VARIABLES = ("CRON_TZ", "TZ")
NOT_CARRIED = ("CRON_TZ", "MAILTO")
TASK_PREFIX = "cron-"
JOB_PREFIX = "cron_"
HASH_LENGTH = 12
OUTPUT_TAIL = 2000  # characters of stdout and stderr a run keeps

_ENV_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
# A cron field: digits, names (jan, mon), * , - / (what crontab(5) allows).
_FIELD = re.compile(r"^[0-9A-Za-z*,/-]+$")


class CrontabError(ValueError):
    """A crontab that cannot be read at all; the message says why."""


@dataclass(frozen=True)
class Entry:
    """One crontab line that becomes a task."""

    line: int
    schedule: str  # 5 cron fields, macros written out
    zone: str
    command: str  # what the shell runs (cron's % handling applied)
    stdin: str | None
    shell: str
    env: tuple[tuple[str, str], ...]  # the crontab's lines in force, in order
    text: str  # the line as written

    @property
    def job_name(self) -> str:
        """``cron_<hash>`` of what the job does (shell, command, input, environment)."""
        what = [self.shell, self.command, self.stdin, [list(pair) for pair in self.env]]
        return JOB_PREFIX + _digest(what)

    def task_id(self, worker: str) -> str:
        """``cron-<hash>`` of worker, schedule, zone and job: the same entry, the same task."""
        return TASK_PREFIX + _digest([worker, self.schedule, self.zone, self.job_name])


@dataclass(frozen=True)
class Skipped:
    line: int
    text: str
    reason: str


@dataclass
class Crontab:
    entries: list[Entry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _digest(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:HASH_LENGTH]


# -- the local time zone ---------------------------------------------------------------


def valid_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def local_zone(
    etc: Path = Path("/etc"), environ: dict[str, str] | None = None
) -> tuple[str, str | None]:
    """This machine's zone as an IANA name, and a warning when it had to be UTC.

    Cron runs on the system's clock, so the system's zone comes first: the
    ``/etc/localtime`` symlink (…/zoneinfo/Europe/Paris), then ``/etc/timezone``
    (Debian), then ``TZ``.
    """
    environ = os.environ if environ is None else environ
    candidates = []
    try:
        target = os.readlink(etc / "localtime")
        if "zoneinfo/" in target:
            candidates.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    with contextlib.suppress(OSError):
        candidates.append((etc / "timezone").read_text().strip())
    candidates.append(environ.get("TZ", "").lstrip(":"))
    for name in candidates:
        if name and valid_zone(name):
            return name, None
    return "UTC", (
        "this machine's time zone was not found (/etc/localtime, /etc/timezone, TZ): "
        "entries without CRON_TZ use UTC; give --tz ZONE to say which"
    )


# -- parsing ---------------------------------------------------------------------------


def split_percent(text: str) -> tuple[str, str | None]:
    """Cron's ``%``: the command, and its standard input (None when there is no ``%``)."""
    command: list[str] = []
    stdin: list[str] | None = None
    part = command
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and text[index + 1 : index + 2] == "%":
            part.append("%")
            index += 2
            continue
        if char == "%":
            if stdin is None:
                stdin = []
                part = stdin
            else:
                part.append("\n")
        else:
            part.append(char)
        index += 1
    if stdin is None:
        return "".join(command), None
    data = "".join(stdin)
    return "".join(command), data if data.endswith("\n") else data + "\n"


def _env_value(raw: str) -> str:
    """A value as cron reads it: matching quotes around it are removed."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def parse_crontab(text: str, default_zone: str) -> Crontab:
    """The entries of a user crontab, what is skipped (with why) and notes."""
    result = Crontab()
    env: dict[str, str] = {}
    zones: dict[str, str] = {}
    noted: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        first = line[0]
        match = _ENV_LINE.match(line)
        if match and not (first.isdigit() or first in "*@"):
            name, value = match.group(1), _env_value(match.group(2))
            if name in ZONE_VARIABLES:
                if not valid_zone(value):
                    result.notes.append(
                        f"line {number}: {name}={value} is not a known time zone: "
                        "the entries it would cover are skipped"
                    )
                zones[name] = value
            if name == "MAILTO" and "MAILTO" not in noted:
                noted.add("MAILTO")
                result.notes.append(
                    f"line {number}: MAILTO={value}: After sends no mail; each run's output "
                    "is kept in the task (result, or error when the command fails)"
                )
            if name == "SHELL" and value != DEFAULT_SHELL and "SHELL" not in noted:
                noted.add("SHELL")
                result.notes.append(f"line {number}: SHELL={value}: commands run with {value} -c")
            if name not in NOT_CARRIED:
                env[name] = value
            continue
        entry = _parse_entry(number, line, env, zones, default_zone)
        if isinstance(entry, Skipped):
            result.skipped.append(entry)
        else:
            result.entries.append(entry)
    return result


def _parse_entry(
    number: int, line: str, env: dict[str, str], zones: dict[str, str], default_zone: str
) -> Entry | Skipped:
    if line.startswith("@"):
        macro, command = ([*line.split(None, 1), ""])[:2]
        if macro.lower() == "@reboot":
            return Skipped(
                number,
                line,
                "@reboot has no date to schedule: start it from the init "
                "system (a systemd unit) instead",
            )
        if macro.lower() not in MACROS:
            return Skipped(number, line, f"unknown macro {macro}")
        schedule = MACROS[macro.lower()]
    else:
        parts = line.split(None, 5)
        if not (line[0].isdigit() or line[0] == "*"):
            return Skipped(
                number,
                line,
                "not an entry: neither a schedule (5 time fields and a command) "
                "nor an environment line (NAME=value)",
            )
        if len(parts) < 6:
            return Skipped(number, line, "not an entry: 5 time fields and a command expected")
        schedule, command = " ".join(parts[:5]), parts[5]
        if not all(_FIELD.match(part) for part in parts[:5]):
            return Skipped(
                number, line, "not an entry: a time field has characters cron does not allow"
            )
    if not command:
        return Skipped(number, line, "no command")
    zone = zones.get("CRON_TZ") or zones.get("TZ") or default_zone
    if not valid_zone(zone):
        return Skipped(number, line, f"unknown time zone {zone!r}")
    try:
        parse_repeat({"cron": schedule, "timezone": zone})
    except RepeatError as exc:
        return Skipped(number, line, str(exc))
    run, stdin = split_percent(command)
    return Entry(
        line=number,
        schedule=schedule,
        zone=zone,
        command=run,
        stdin=stdin,
        shell=env.get("SHELL", DEFAULT_SHELL),
        env=tuple(env.items()),
        text=line,
    )


# -- the generated job -----------------------------------------------------------------

_MODULE = '''# ruff: noqa: E501
"""Generated by `after import-crontab` from a crontab entry ({schedule}, {zone}).

Runs the entry's command as cron does: SHELL -c COMMAND, in the home
directory, with cron's environment and the crontab's lines. Returns the exit
code and the last {tail} characters of stdout and stderr; a non-zero exit
raises, so the run is an err. Importing again never overwrites an edited file.
"""

from __future__ import annotations

import os
import pwd
import subprocess

# fmt: off
SHELL = {shell}
COMMAND = {command}
STDIN = {stdin}
CRONTAB_ENV = {env}
# fmt: on
CRON_PATH = {path}
TAIL = {tail}


class CommandFailed(Exception):
    """The command exited with a non-zero status."""


def environment() -> dict[str, str]:
    """cron's environment for this user, then the crontab's lines."""
    try:
        user = pwd.getpwuid(os.getuid())
        home, name = user.pw_dir, user.pw_name
    except KeyError:
        home, name = os.path.expanduser("~"), os.environ.get("USER", "")
    env = {{"HOME": home, "LOGNAME": name, "USER": name, "SHELL": "/bin/sh", "PATH": CRON_PATH}}
    env.update(CRONTAB_ENV)
    return env


def run() -> dict:
    env = environment()
    cwd = env["HOME"] if os.path.isdir(env["HOME"]) else "/"
    completed = subprocess.run(
        [SHELL, "-c", COMMAND],
        env=env,
        cwd=cwd,
        input=STDIN,
        stdin=None if STDIN is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        errors="replace",
    )
    result = {{
        "exit_code": completed.returncode,
        "stdout": completed.stdout[-TAIL:],
        "stderr": completed.stderr[-TAIL:],
    }}
    if completed.returncode != 0:
        raise CommandFailed(
            f"exit code {{completed.returncode}}; stderr: {{result['stderr'][-500:]!r}}; "
            f"stdout: {{result['stdout'][-500:]!r}}"
        )
    return result
'''


def _literal(value: str | dict[str, str] | None) -> str:
    """A Python literal in the style of the code around it: a JSON string or object
    of strings is one (with ensure_ascii=False only quotes, backslashes and control
    characters are escaped, and those escapes mean the same in Python)."""
    return "None" if value is None else json.dumps(value, ensure_ascii=False)


def job_module(entry: Entry) -> str:
    """The source of the entry's job module (the same text for the same entry)."""
    return _MODULE.format(
        schedule=entry.schedule,
        zone=entry.zone,
        shell=_literal(entry.shell),
        command=_literal(entry.command),
        stdin=_literal(entry.stdin),
        env=_literal(dict(entry.env)),
        path=_literal(DEFAULT_PATH),
        tail=OUTPUT_TAIL,
    )


def task_doc(entry: Entry, worker: str, at: datetime | None = None) -> Doc:
    """The entry's task: its first run is the schedule's next time after `at` (now)."""
    current = at or now()
    repeat = {"cron": entry.schedule, "timezone": entry.zone}
    first = next_occurrence(parse_repeat(repeat), current, current)
    assert first is not None  # a cron schedule without `until` never ends
    return {
        "_id": entry.task_id(worker),
        "worker": worker,
        "date": iso(first),
        "job": {"name": entry.job_name, "arguments": []},
        "status": "waiting",
        "repeat": repeat,
    }


# -- planning and applying the import --------------------------------------------------


@dataclass
class Step:
    """What the import does with one entry."""

    entry: Entry
    task: Doc
    job_path: Path
    source: str
    task_state: str = "new"  # new, or exists (<status>)
    job_state: str = "new"  # new, same, or edited (left as it is)

    @property
    def changes(self) -> bool:
        return self.task_state == "new" or self.job_state == "new"


@dataclass
class Plan:
    worker: str
    jobs_dir: Path
    steps: list[Step]
    crontab: Crontab

    @property
    def changes(self) -> bool:
        return any(step.changes for step in self.steps)


def plan_import(
    db: Database, crontab: Crontab, worker: str, jobs_dir: Path, at: datetime | None = None
) -> Plan:
    """What importing `crontab` for `worker` would write; reads, writes nothing."""
    steps: list[Step] = []
    seen: set[str] = set()
    for entry in crontab.entries:
        task = task_doc(entry, worker, at)
        if task["_id"] in seen:
            crontab.skipped.append(
                Skipped(entry.line, entry.text, "the same entry as an earlier line")
            )
            continue
        seen.add(task["_id"])
        path = jobs_dir / f"{entry.job_name}.py"
        steps.append(Step(entry, task, path, job_module(entry)))
    existing = _existing(db, [step.task["_id"] for step in steps])
    for step in steps:
        if step.task["_id"] in existing:
            step.task_state = f"exists ({existing[step.task['_id']]})"
        try:
            current = step.job_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        step.job_state = "same" if current == step.source else "edited (kept)"
    return Plan(worker, jobs_dir, steps, crontab)


def _existing(db: Database, ids: list[str]) -> dict[str, str]:
    """The status of each of these tasks that exists (deleted ones do not)."""
    found: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        rows = db.all_docs(keys=ids[start : start + 500], include_docs=True)["rows"]
        for row in rows:
            if row.get("doc"):
                found[row["id"]] = str(row["doc"].get("status"))
    return found


def write_job(path: Path, source: str) -> None:
    """Write a job module whole: a worker never loads half a file.

    Readable by its owner only: crontab commands often hold passwords.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(source)
    os.replace(temporary, path)


@dataclass
class Applied:
    jobs_written: int = 0
    tasks_created: int = 0
    refused: list[tuple[Step, str]] = field(default_factory=list)


def apply_plan(
    db: Database, plan: Plan, advance: Callable[[int], None] = lambda n: None
) -> Applied:
    """Write the new job files, then the new tasks (a task never names a job that is
    not on disk yet); `advance(n)` reports n more entries done (a progress bar)."""
    applied = Applied()
    for step in plan.steps:
        if step.job_state == "new":
            write_job(step.job_path, step.source)
            applied.jobs_written += 1
        advance(1 if step.task_state != "new" else 0)
    new = [step for step in plan.steps if step.task_state == "new"]
    for batch in _batches(new, 200):
        results = db.bulk_docs([dict(step.task) for step in batch])
        for step, result in zip(batch, results, strict=True):
            if result.get("ok"):
                applied.tasks_created += 1
            elif result.get("error") == "conflict":
                step.task_state = "exists (written meanwhile)"
            else:
                applied.refused.append((step, f"{result.get('error')}: {result.get('reason')}"))
        advance(len(batch))
    return applied


def _batches(items: list[Step], size: int) -> Iterable[list[Step]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_user_crontab() -> str:
    """The current user's crontab (`crontab -l`)."""
    try:
        completed = subprocess.run(
            ["crontab", "-l"], capture_output=True, text=True, timeout=30, check=False
        )
    except FileNotFoundError:
        raise CrontabError(
            "`crontab` is not installed here: give the crontab as a FILE (or - for stdin)"
        ) from None
    if completed.returncode != 0:
        reason = completed.stderr.strip().splitlines()[-1:] or [f"exit {completed.returncode}"]
        raise CrontabError(f"`crontab -l` failed: {reason[0]}")
    return completed.stdout


# -- showing the plan ------------------------------------------------------------------


def _short(text: str, width: int = 60) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def render_plan(plan: Plan) -> RenderableType:
    """The import as tables: each entry's task and job and what happens to them, then
    the lines skipped and why."""
    table = Table(title=f"crontab → tasks for worker {plan.worker}", title_justify="left")
    for column in ("line", "schedule", "zone", "command", "task", "job", "task state", "job state"):
        table.add_column(column, overflow="fold")
    for step in plan.steps:
        entry = step.entry
        command = entry.command + (" (with input)" if entry.stdin is not None else "")
        table.add_row(
            str(entry.line),
            entry.schedule,
            entry.zone,
            Text(_short(command)),
            step.task["_id"],
            f"{entry.job_name}.py",
            step.task_state,
            step.job_state,
        )
    parts: list[RenderableType] = [table]
    if plan.crontab.skipped:
        skipped = Table(title="skipped", title_justify="left")
        for column in ("line", "entry", "reason"):
            skipped.add_column(column, overflow="fold")
        for item in sorted(plan.crontab.skipped, key=lambda s: s.line):
            skipped.add_row(str(item.line), Text(_short(item.text)), Text(item.reason))
        parts.append(skipped)
    return Group(*parts)
