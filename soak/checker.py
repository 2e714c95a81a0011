"""The checker: what the tasks, the ledger, the clients' moves and the worker logs say
once the faults have stopped.

Every rule here can fail, and each finding names its task, shows the task's document,
its ledger lines, the clients' moves of it and the worker log lines that mention it:

- lost: a task not settled within the bound: neither final (done, err, canceled) nor
  waiting, unowned, for a date after the bound (a far-future task). Says where it is
  stuck and whose it was.
- twice: two ledger lines with one idempotency key (task, occurrence of a repeat,
  attempt): one attempt run twice; recorded when every one of those runs is in the task
  (its history, takeovers or conflicts_resolved), unrecorded otherwise.
- unrecorded: a run in the ledger that the task does not record at all.
- started_after_lost: a run that began after a peer had recorded it as lost ("worker
  lost", its instance's lease having run out): a commit made before the instance was
  paused or cut off, started when it woke up, though After had given that run up.
- client_moves_lost: a client's move answered 201 (or 202 on a cluster) that did not
  hold: a cancel of a task not yet running that did not end `canceled`, or with a run
  begun after it; a cancel of a running task followed by another attempt; a reschedule
  that ran before its new date, or never ran at it; a creation that is gone.
  The rules of tests/test_resilience.py's racing-client test.
- wrong: a final status the task cannot reach (a `fail` job `done`, a far-future task
  run before its date, `canceled` with no cancel asked, `done` with no run).
- conflicts: a document still in conflict.
- refused: a worker's write refused by CouchDB's rules (ERROR log lines).
- died: a worker instance that exited by itself.
- internal_errors: "internal error" or a Traceback in a worker log.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from after.couch import Database, rev_number
from after.tasks import FINAL, LOST, parse_date
from soak import tasks
from soak.clients import Move, stamp
from soak.ledger import Line
from soak.nemesis import Done
from soak.processes import Instances

Doc = dict[str, Any]
ENDED = {*FINAL, "err"}
EARLY = 0.01  # seconds a run may start before its date (clock reads; none expected)
CHILD_START = 2.0  # seconds a job's child process takes to start, when /proc cannot say
PAGE = 1000
LOG_LINES = 12  # worker log lines shown per task in a finding
CATEGORIES = (
    "lost",
    "twice",
    "unrecorded",
    "started_after_lost",
    "client_moves_lost",
    "wrong",
    "conflicts",
    "refused",
    "died",
    "internal_errors",
    "ledger",
    "soak",
)


@dataclass
class Finding:
    category: str
    summary: str
    task_id: str | None = None
    details: list[str] = field(default_factory=list)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    tasks: int = 0
    runs: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    twice_recorded: int = 0
    twice_unrecorded: int = 0
    moves: Counter[str] = field(default_factory=Counter)

    def count(self, category: str) -> int:
        return sum(1 for f in self.findings if f.category == category)

    @property
    def passed(self) -> bool:
        return not self.findings


# -- reading the database ------------------------------------------------------------------


def read_tasks(db: Database) -> dict[str, Doc]:
    """Every soak task, read fresh with its conflicts, a page of `_all_docs` at a time
    (CouchDB's default limits truncate silently)."""
    docs: dict[str, Doc] = {}
    params: dict[str, Any] = {
        "include_docs": True,
        "conflicts": True,
        "startkey": tasks.PREFIX,
        "endkey": tasks.PREFIX + "\ufff0",
        "limit": PAGE + 1,
    }
    while True:
        rows = db.all_docs(**params)["rows"]
        for row in rows[:PAGE]:
            if row.get("doc"):
                docs[row["id"]] = row["doc"]
        if len(rows) <= PAGE:
            return docs
        params["startkey"] = rows[PAGE]["id"]


def settled(doc: Doc, deadline: float) -> bool:
    """Final, or waiting unowned for a date after the deadline; never in conflict."""
    if doc.get("_conflicts"):
        return False
    if doc.get("status") in ENDED:
        return True
    return (
        doc.get("status") == "waiting"
        and not doc.get("owner")
        and parse_date(doc["date"]).timestamp() > deadline
    )


# -- the check -----------------------------------------------------------------------------


def pid_of(instance: Any) -> int | None:
    """The pid in an instance id `name@host:pid:id`."""
    try:
        return int(str(instance).rsplit(":", 2)[1])
    except (IndexError, ValueError):
        return None


@dataclass
class Evidence:
    docs: dict[str, Doc]
    lines: list[Line]
    bad_lines: list[str]
    moves: list[Move]
    instances: Instances
    faults: list[Done]
    deadline: float  # time.time() by which every task had to settle
    soak_errors: list[str] = field(default_factory=list)


class Checker:
    def __init__(self, evidence: Evidence) -> None:
        self.e = evidence
        self.report = Report()
        self.pids = evidence.instances.by_pid()
        self.keys = {instance.key: instance for instance in evidence.instances.every}
        self.runs: dict[str, list[Line]] = defaultdict(list)
        for line in evidence.lines:
            self.runs[line.task].append(line)
        self.moves: dict[str, list[Move]] = defaultdict(list)
        for move in evidence.moves:
            self.moves[move.task_id].append(move)
        self.logs = {i.log.name: i.log_text().splitlines() for i in evidence.instances.every}

    def check(self) -> Report:
        e, report = self.e, self.report
        report.tasks, report.runs = len(e.docs), len(e.lines)
        report.statuses = Counter(str(d.get("status")) for d in e.docs.values())
        report.moves = Counter(
            f"{m.action}:{m.outcome}" + (f":{m.http}" if m.http else "") for m in e.moves
        )
        for task_id, doc in sorted(e.docs.items()):
            self.check_task(task_id, doc)
        self.check_gone()
        self.check_ledger()
        self.check_instances()
        self.check_logs()
        for error in e.soak_errors:
            self.add("soak", error)
        return report

    def add(self, category: str, summary: str, task_id: str | None = None) -> None:
        details = self.task_details(task_id) if task_id else []
        self.report.findings.append(Finding(category, summary, task_id, details))

    # -- one task ----------------------------------------------------------------------------

    def check_task(self, task_id: str, doc: Doc) -> None:
        lines = sorted(self.runs.get(task_id, []), key=lambda line: line.at)
        if doc.get("_conflicts"):
            self.add("conflicts", f"{task_id}: conflicting revisions {doc['_conflicts']}", task_id)
        if not settled(doc, self.e.deadline):
            self.add("lost", f"{task_id}: {self.stuck(doc)}", task_id)
        by_key: dict[str, list[Line]] = defaultdict(list)
        for line in lines:
            by_key[line.key].append(line)
        for key, same in by_key.items():
            if len(same) > 1:
                recorded = all(self.recorded(doc, line) for line in same)
                if recorded:
                    self.report.twice_recorded += 1
                else:
                    self.report.twice_unrecorded += 1
                who = ", ".join(f"{self.who(line)} at {stamp(line.at)}" for line in same)
                kind = "recorded" if recorded else "unrecorded"
                self.add(
                    "twice", f"{task_id}: {key} ran {len(same)} times ({kind}): {who}", task_id
                )
        for line in lines:
            judged = self.judged_lost_at(doc, line)
            # A job with a timeout writes its line from a child process, which takes a
            # second or so to start: the run began when the worker started that process.
            child = line.pid != self.worker_pid(line)
            began = (line.process_started or line.at - CHILD_START) if child else line.at
            if judged is not None and began > judged:
                self.add(
                    "started_after_lost",
                    f"{task_id}: {line.key} began on {self.who(line)} at {stamp(began)}, "
                    f"{began - judged:.1f}s after its run was judged lost ({stamp(judged)})",
                    task_id,
                )
        for line in lines:
            if len(by_key[line.key]) == 1 and not self.recorded(doc, line):
                self.add(
                    "unrecorded",
                    f"{task_id}: the run of {line.key} by {self.who(line)} at {stamp(line.at)} "
                    "is not in the task",
                    task_id,
                )
        self.check_outcome(task_id, doc, lines)
        self.check_moves(task_id, doc, lines)

    def stuck(self, doc: Doc) -> str:
        status, owner = doc.get("status"), doc.get("owner")
        where = str(status)
        if status == "waiting" and doc.get("date"):
            late = datetime.now(UTC).timestamp() - parse_date(doc["date"]).timestamp()
            where = f"waiting past its date by {late:.0f}s" if late > 0 else where
        if doc.get("_conflicts"):
            where += f" (in conflict: {len(doc['_conflicts'])} other revisions)"
        return f"stuck {where}, owner {owner or 'none'} ({self.owner_state(owner)})"

    def owner_state(self, owner: Any) -> str:
        pid = pid_of(owner)
        instance = self.pids.get(pid) if pid else None
        if instance is None:
            return "no instance of this run" if owner else "unowned"
        if instance.expected_exit and not instance.alive():
            return f"{instance.label}, killed by the nemesis"
        if not instance.alive():
            return f"{instance.label}, exited by itself"
        return f"{instance.label}, alive"

    def worker_pid(self, line: Line) -> int | None:
        """The worker process that ran the line's job (itself, or its child's parent)."""
        if line.instance in self.keys:
            return self.keys[line.instance].pid
        if line.pid in self.pids:
            return line.pid
        if line.ppid in self.pids:
            return line.ppid
        return None

    def who(self, line: Line) -> str:
        pid = self.worker_pid(line)
        return self.pids[pid].label if pid else f"pid {line.pid} (ppid {line.ppid})"

    def history_of(self, doc: Doc, line: Line) -> list[Doc]:
        """The task's history entries of this run: its attempt, its occurrence (a
        repeat's), and the instance whose process wrote the ledger line."""
        pid = self.worker_pid(line)
        return [
            entry
            for entry in doc.get("history") or []
            if isinstance(entry, dict)
            and entry.get("attempt") == line.attempt
            and pid_of(entry.get("instance")) == pid
            and (line.occurrence is None or entry.get("occurrence") == line.occurrence)
        ]

    def recorded(self, doc: Doc, line: Line) -> bool:
        """Whether the task records this run: an entry of its history (the attempt, the
        occurrence of a repeat, the instance), a takeover of that run, a losing revision
        of a conflict that ran it, or its current run."""
        pid = self.worker_pid(line)
        if self.history_of(doc, line):
            return True
        for entry in doc.get("conflicts_resolved") or []:
            if (
                isinstance(entry, dict)
                and entry.get("attempt") == line.attempt
                and pid_of(entry.get("owner")) == pid
            ):
                return True
        return (
            doc.get("status") in ("running", "cancel")
            and pid_of(doc.get("owner")) == pid
            and doc.get("attempt") == line.attempt
        )

    def judged_lost_at(self, doc: Doc, line: Line) -> float | None:
        """When a peer recorded this run as lost ("worker lost": its instance's lease ran
        out), or None. A run that begins after that was given up by After itself."""
        for entry in self.history_of(doc, line):
            if str(entry.get("error", "")).startswith("worker lost") and isinstance(
                entry.get("finished_at"), str
            ):
                return parse_date(entry["finished_at"]).timestamp()
        return None

    def check_outcome(self, task_id: str, doc: Doc, lines: list[Line]) -> None:
        kind = tasks.KINDS.get(tasks.kind_of(task_id))
        status = doc.get("status")
        moves = [m for m in self.moves.get(task_id, []) if m.outcome in ("landed", "unanswered")]
        canceled_by_client = any(m.action == "cancel" for m in moves)
        rescheduled = any(m.action == "reschedule" for m in moves)
        error = doc.get("error") if isinstance(doc.get("error"), dict) else {}
        message = str(error.get("message", ""))
        if kind is None:
            return self.add("wrong", f"{task_id}: not a task of the soak's kinds", task_id)
        if status == "canceled":
            if not canceled_by_client:
                self.add("wrong", f"{task_id}: canceled, but no client canceled it", task_id)
            return
        if status not in ENDED:
            if kind.name == "far" and lines and not rescheduled:
                self.add("wrong", f"{task_id}: far-future task ran before its date", task_id)
            return
        if status == "err" and error.get("type") == LOST:
            return  # its run was interrupted by the nemesis: allowed for every kind
        if not lines:
            self.add("wrong", f"{task_id}: {status} without any run in the ledger", task_id)
            return
        ends = {"done"} if kind.name == "far" else kind.ends
        if status not in ends:
            self.add("wrong", f"{task_id}: {status}, a {kind.name} task ends {set(ends)}", task_id)
        elif kind.name in ("nan", "surrogate") and "cannot be stored" not in message:
            self.add("wrong", f"{task_id}: failed, but not as unstorable: {message}", task_id)
        elif kind.name == "timeout" and not message.startswith("timeout"):
            self.add("wrong", f"{task_id}: failed, but not by its timeout: {message}", task_id)
        elif kind.name == "huge" and not (doc.get("result") or {}).get("truncated"):
            self.add("wrong", f"{task_id}: its 10 MB result is not cut", task_id)
        if status == "done" and kind.name not in ("cron", "interval"):
            # The run that ended it: its attempt, by its owner.
            owner = pid_of(doc.get("owner"))
            ended_by = [line for line in lines if line.attempt == doc.get("attempt")]
            if not any(self.worker_pid(line) == owner for line in ended_by):
                self.add(
                    "wrong",
                    f"{task_id}: done by {doc.get('owner')} at attempt {doc.get('attempt')}, "
                    f"which the ledger does not show: {self.show(ended_by)}",
                    task_id,
                )

    # -- the clients' moves --------------------------------------------------------------------

    def check_moves(self, task_id: str, doc: Doc, lines: list[Line]) -> None:
        landed = sorted(
            (m for m in self.moves.get(task_id, []) if m.landed and m.action != "create"),
            key=lambda m: rev_number(m.rev),
        )
        for n, move in enumerate(landed):
            following = landed[n + 1] if n + 1 < len(landed) else None
            if move.http == 202:
                if not self.carried_out_or_recorded(doc, move, following):
                    self.add(
                        "client_moves_lost",
                        f"{task_id}: {move.action} answered 202 neither carried out nor "
                        "recorded in conflicts_resolved",
                        task_id,
                    )
                continue
            problem = (
                self.cancel_problem(doc, move, lines)
                if move.action == "cancel"
                else self.reschedule_problem(doc, move, following, lines)
            )
            if problem:
                self.add("client_moves_lost", f"{task_id}: {move.action} (201) {problem}", task_id)

    def cancel_problem(self, doc: Doc, move: Move, lines: list[Line]) -> str | None:
        if doc.get("status") != "canceled":
            return f"did not hold: the task ended {doc.get('status')}"
        late = [line for line in lines if line.at > move.answered_at]
        if move.from_status == "running":
            # The run it found may go on (a job without a timeout runs to its end, a
            # commit made just ahead of its date may still start); no other may begin.
            running = move.from_key
            late = [line for line in late if line.key != running]
            if late:
                return f"of a running task, then another run began: {self.show(late)}"
        elif late:
            return f"of a {move.from_status} task, then it ran: {self.show(late)}"
        return None

    def reschedule_problem(
        self, doc: Doc, move: Move, following: Move | None, lines: list[Line]
    ) -> str | None:
        assert move.date is not None
        date = parse_date(move.date).timestamp()
        until = following.read_at if following else float("inf")
        after = [line for line in lines if move.answered_at < line.at < until]
        early = [line for line in after if line.at < date - EARLY]
        if early:
            return f"to {move.date}, but it ran before that: {self.show(early)}"
        if following is None and not after and not self.run_recorded_at(doc, move.date):
            return f"to {move.date}, but it never ran at that date (it is {doc.get('status')})"
        return None

    @staticmethod
    def run_recorded_at(doc: Doc, date: str) -> bool:
        """Whether the task records a run of the occurrence at `date`: a run committed
        there whose instance then died ends "worker lost" before its job began."""
        return any(
            isinstance(entry, dict) and entry.get("occurrence") == date
            for entry in doc.get("history") or []
        )

    def carried_out_or_recorded(self, doc: Doc, move: Move, following: Move | None) -> bool:
        entries = doc.get("conflicts_resolved") or []
        recorded = any(
            isinstance(e, dict)
            and (
                e.get("rev") == move.rev
                or (move.action == "cancel" and e.get("status") in ("cancel", "canceled"))
                or (move.action == "reschedule" and e.get("date") == move.date)
            )
            for e in entries
        )
        if move.action == "cancel":
            return recorded or doc.get("status") == "canceled"
        return recorded or following is not None or doc.get("date") == move.date

    def show(self, lines: list[Line]) -> str:
        return "; ".join(f"{line.key} by {self.who(line)} at {stamp(line.at)}" for line in lines)

    # -- what is not about one task ------------------------------------------------------------

    def check_gone(self) -> None:
        for move in self.e.moves:
            if move.action == "create" and move.landed and move.task_id not in self.e.docs:
                self.add("client_moves_lost", f"{move.task_id}: created (201), then gone")

    def check_ledger(self) -> None:
        for text in self.e.bad_lines:
            self.add("ledger", f"a ledger line that cannot be read: {text[:200]!r}")
        for task_id in sorted(set(self.runs) - set(self.e.docs)):
            self.add("ledger", f"{task_id} ran (ledger) but no such task is in the database")

    def check_instances(self) -> None:
        for died in self.e.instances.died:
            self.add(
                "died",
                f"{died.instance.label} exited by itself (code {died.returncode})",
            )
            self.report.findings[-1].details = ["  log tail:", *indent(died.tail.splitlines())]

    def check_logs(self) -> None:
        for instance in self.e.instances.every:
            text = self.logs.get(instance.log.name, [])
            for number, line in enumerate(text):
                if re.search(r"\b(ERROR|CRITICAL)\b", line) and re.search(
                    r"refus|forbidden", line, re.IGNORECASE
                ):
                    self.add("refused", f"{instance.log.name}:{number + 1}: {line[:300]}")
                elif "internal error" in line or line.startswith("Traceback"):
                    self.add("internal_errors", f"{instance.log.name}:{number + 1}: {line[:300]}")
                    self.report.findings[-1].details = indent(text[number : number + 25])

    # -- the details of a finding ----------------------------------------------------------------

    def task_details(self, task_id: str) -> list[str]:
        doc = self.e.docs.get(task_id)
        details = []
        if doc is not None:
            details.append(f"  task: {summary(doc)}")
            for entry in doc.get("history") or []:
                details.append(f"    history: {entry}")
            for entry in doc.get("takeovers") or []:
                details.append(f"    takeover: {entry}")
            for entry in doc.get("conflicts_resolved") or []:
                details.append(f"    conflict resolved: {entry}")
        for line in sorted(self.runs.get(task_id, []), key=lambda line: line.at):
            details.append(f"  ledger: {self.who(line)}: {line.text}")
        for move in self.moves.get(task_id, []):
            details.append(f"  client: {move.line()}")
        mentions = [
            f"{name}: {line}"
            for name, text in self.logs.items()
            for line in text
            if task_id in line
        ]
        details += [f"  log {line[:300]}" for line in sorted(mentions, key=log_time)[-LOG_LINES:]]
        return details


def log_time(line: str) -> str:
    """Sort key: the timestamp after the log file's name."""
    return line.split(": ", 1)[-1][:24]


def summary(doc: Doc) -> str:
    keep = ("status", "owner", "attempt", "date", "occurrence", "runs", "repeat", "retry")
    fields = {k: doc[k] for k in keep if k in doc}
    error = doc.get("error")
    if isinstance(error, dict):
        fields["error"] = f"{error.get('type')}: {str(error.get('message'))[:160]}"
    return f"{doc['_id']} rev {doc.get('_rev')} {fields}"


def indent(lines: list[str]) -> list[str]:
    return [f"    {line}" for line in lines]
