"""The soak with a nemesis (issue #31), short, for CI: `python -m soak` for a few fixed
seeds, each passing whole (no task lost, none run twice, no client's move lost, no
conflict left, no refusal, no instance dead by itself, no internal error).

Each seed runs real worker processes through the CLI on an embedded server of its own
(killed and started again by the nemesis), or, with AFTER_TEST_COUCHDB_URL, on that
server in a database of its own (its process paused when it listens on this machine).
About a minute and a half per seed on a 2-core machine. SOAK_SKIP=1 skips it;
SOAK_SEEDS (comma-separated) and SOAK_SECONDS change the seeds and their length.

The checker's rules are tested too, on made-up tasks and ledgers (no server, a second):
each rule must catch the case it is there for, or it proves nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from after.tasks import parse_date
from soak import checker
from soak.clients import Move
from soak.ledger import Line
from soak.options import Options
from soak.processes import Instance, Instances
from soak.run import run_seed, settle_bound

SEEDS = [int(s) for s in os.environ.get("SOAK_SEEDS", "3101,3102").split(",") if s.strip()]
SECONDS = float(os.environ.get("SOAK_SECONDS", "45"))

SKIP = os.environ.get("SOAK_SKIP", "") not in ("", "0")


@pytest.mark.skipif(SKIP, reason="SOAK_SKIP is set")
@pytest.mark.timeout(int(SECONDS + settle_bound(Options()) + 240))
@pytest.mark.parametrize("seed", SEEDS)
def test_a_short_soak_with_a_nemesis_passes(seed: int) -> None:
    options = Options(seconds=SECONDS, url=os.environ.get("AFTER_TEST_COUCHDB_URL") or None)
    result = run_seed(options, seed)
    print(result.line)
    assert result.passed, f"soak seed {seed} failed:\n{result.line}\n" + "\n".join(result.details)


# -- the checker's rules can fail: each one on a made-up case -------------------------------


def made_up(
    tmp_path: Path, docs: list[dict[str, Any]], lines: list[dict[str, Any]], **more: Any
) -> checker.Report:
    """The checker's report on made-up tasks and ledger lines of one (finished) worker
    process, whose instance id is `w@host:<pid>:x` and ledger name `0.0`."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    log = tmp_path / "worker-0.0.log"
    log.write_text(more.pop("log", ""))
    instances = Instances(tmp_path, ["w"], 1, "db", tmp_path / "ledger", str, 0.5, 4, 120, 4)
    instance = Instance(0, "w", 0, process, tmp_path, log, 0.0, expected_exit=True)
    instances.every.append(instance)
    instances.current[0] = instance
    owner = f"w@host:{process.pid}:x"
    for doc in docs:
        doc.setdefault("_rev", "3-a")
        if doc.get("owner") == "OWNER":
            doc["owner"] = owner
        for entry in doc.get("history", []):
            entry.setdefault("instance", owner)
    ledger = [
        Line(row["task"], row.get("attempt", 1), row.get("key", f"{row['task']}:1"),
             process.pid, 1, row["at"], "ok", "0.0", json.dumps(row))
        for row in lines
    ]  # fmt: skip
    evidence = checker.Evidence(
        docs={doc["_id"]: doc for doc in docs},
        lines=ledger,
        bad_lines=[],
        moves=more.pop("moves", []),
        instances=instances,
        faults=[],
        deadline=time.time(),
    )
    return checker.Checker(evidence).check()


DATE = "2026-12-08T00:00:00.000Z"
AT = parse_date(DATE).timestamp()


def done_once(task_id: str = "soak-1-00001-once", **fields: Any) -> dict[str, Any]:
    doc = {
        "_id": task_id,
        "status": "done",
        "date": DATE,
        "owner": "OWNER",
        "attempt": 1,
        "history": [{"attempt": 1, "occurrence": DATE, "status": "done"}],
    }
    return {**doc, **fields}


def test_the_checker_passes_a_task_run_once_as_recorded(tmp_path: Path) -> None:
    report = made_up(tmp_path, [done_once()], [{"task": "soak-1-00001-once", "at": AT}])
    assert report.passed, [f.summary for f in report.findings]


@pytest.mark.parametrize(
    ("case", "category"),
    [
        ("stuck scheduled", "lost"),
        ("waiting past its date", "lost"),
        ("ran twice", "twice"),
        ("a run the task does not record", "unrecorded"),
        ("a run begun after it was judged lost", "started_after_lost"),
        ("ran after a cancel", "client_moves_lost"),
        ("ran before its new date", "client_moves_lost"),
        ("a far task ran", "wrong"),
        ("a failing job done", "wrong"),
        ("in conflict", "conflicts"),
        ("a write refused", "refused"),
        ("a traceback", "internal_errors"),
    ],
)
def test_each_rule_of_the_checker_can_fail(tmp_path: Path, case: str, category: str) -> None:
    run = {"task": "soak-1-00001-once", "at": AT}
    docs, lines, more = [done_once()], [run], {}
    if case == "stuck scheduled":
        docs = [done_once(status="scheduled")]
    elif case == "waiting past its date":
        docs, lines = [done_once(status="waiting", owner=None, history=[])], []
    elif case == "ran twice":
        lines = [run, {**run, "at": AT + 1}]
    elif case == "a run the task does not record":
        docs = [done_once(history=[])]
    elif case == "a run begun after it was judged lost":
        lost = {"attempt": 1, "status": "err", "error": "worker lost: ...", "finished_at": DATE}
        docs = [done_once(status="err", history=[lost])]
        lines = [{**run, "at": AT + 2}]
    elif case == "ran after a cancel":
        docs = [done_once(status="canceled")]
        cancel = Move(0, "cancel", "soak-1-00001-once", "landed", 201, AT - 2, AT - 1, "waiting")
        more = {"moves": [dataclasses.replace(cancel, rev="2-c")]}
    elif case == "ran before its new date":
        move = Move(0, "reschedule", "soak-1-00001-once", "landed", 201, AT - 2, AT - 1)
        later = "2026-12-08T00:00:05.000Z"
        more = {"moves": [dataclasses.replace(move, from_status="waiting", rev="2-r", date=later)]}
    elif case == "a far task ran":
        docs = [done_once("soak-1-00001-far", status="waiting", owner=None, date="2099-01-01")]
        lines = [{**run, "task": "soak-1-00001-far", "key": "soak-1-00001-far:1"}]
    elif case == "a failing job done":
        docs = [done_once("soak-1-00001-fail")]
        lines = [{**run, "task": "soak-1-00001-fail", "key": "soak-1-00001-fail:1"}]
    elif case == "in conflict":
        docs = [done_once(_conflicts=["2-b"])]
    elif case == "a write refused":
        more = {"log": "2026-12-08T00:00:00.000Z ERROR after.worker: task t: write refused: "
                "forbidden: status: cannot change from waiting to done\n"}  # fmt: skip
    elif case == "a traceback":
        more = {"log": "Traceback (most recent call last):\n  File ...\n"}
    report = made_up(tmp_path, docs, lines, **more)
    found = {f.category for f in report.findings}
    assert category in found, (case, [f.summary for f in report.findings])
    assert not report.passed
