"""One soak run for one seed: set up, run with faults, let settle, check, report."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from after.couch import CouchError, Database
from after.push import push
from soak import checker, ledger, nemesis, tasks
from soak.clients import Client, Known
from soak.options import Options
from soak.processes import Instances
from soak.servers import Cluster, Embedded, Single, Target, admin

BATCH = 200  # tasks per _bulk_docs request when writing the initial ones
STARTUP = 2.0  # seconds after the write that the first tasks are due: instances start
MARGIN = 15.0  # seconds of the settling bound beyond leases, runs and series


@dataclass
class Result:
    seed: int
    line: str
    passed: bool
    report: checker.Report
    workdir: Path
    details: list[str]


def settle_bound(options: Options) -> float:
    """How long every task gets to settle once the faults stopped: two leases (a dead
    or paused owner's lease runs out, a peer takes over), the longest run, the longest
    series or retries, the latest reschedule a client made, and a margin."""
    longest = max(kind.longest for kind in tasks.KINDS.values())
    tail = max(kind.tail for kind in tasks.KINDS.values())
    return 2 * options.lease + longest + tail + 6.0 + MARGIN


def make_target(options: Options, workdir: Path) -> Target:
    if options.cluster:
        return Cluster(options.cluster, options.cookie, workdir)
    if options.url:
        return Single(options.url)
    return Embedded(workdir / "couchdb")


def fault_kinds(options: Options, target: Target) -> list[str]:
    """The kinds asked for (default: all), those that apply to this server."""
    applicable = set(nemesis.INSTANCE_FAULTS) | target.faults()
    wanted = options.faults if options.faults is not None else list(nemesis.FAULTS)
    return [kind for kind in wanted if kind in applicable]


def run_seed(options: Options, seed: int, say: Callable[[str], None] = print) -> Result:
    base = str(options.workdir) if options.workdir else None
    workdir = Path(tempfile.mkdtemp(prefix=f"soak-{seed}-", dir=base))
    target = make_target(options, workdir)
    target.start()
    db = admin(target.url).database(f"soak-{seed}-{uuid.uuid4().hex[:8]}")
    push(db)
    kinds = fault_kinds(options, target)
    nodes = len(target.nodes) if isinstance(target, Cluster) else 1
    mix = {**nemesis.DEFAULT_MIX, **options.mix}
    schedule = nemesis.schedule(
        seed, options.seconds, kinds, mix, options.fault_every, options.instances, nodes,
        options.lease,
    )  # fmt: skip
    say(
        f"soak seed={seed}: {options.server_kind} server, {options.instances} instances of "
        f"{','.join(options.names)}, {options.tasks} tasks, {len(schedule)} faults planned "
        f"({','.join(kinds)}), work directory {workdir}"
    )
    if options.verbose:
        for fault in schedule:
            say(f"  planned: {fault.line()}")

    ledger_path = workdir / "ledger.jsonl"
    instances = Instances(
        workdir, options.names, options.instances, db.name, ledger_path, target.worker_url,
        options.heartbeat, options.lease, options.horizon, options.concurrency,
    )  # fmt: skip
    stop = threading.Event()
    clients: list[Client] = []
    soak_errors: list[str] = []
    try:
        start_at = datetime.now(UTC) + timedelta(seconds=STARTUP)
        docs = tasks.initial_tasks(
            seed, options.tasks, options.names, start_at, 0.75 * options.seconds
        )
        for offset in range(0, len(docs), BATCH):
            refused = [r for r in db.bulk_docs(docs[offset : offset + BATCH]) if r.get("error")]
            if refused:
                raise RuntimeError(f"the server refused the soak's tasks: {refused[:3]}")
        instances.start_all()
        start = time.time()
        known = Known(docs)
        for number in range(options.clients):
            client = Client(
                number, seed, admin(target.url), db.name, known, options.names, stop,
                options.client_rate,
            )  # fmt: skip
            clients.append(client)
            client.start()

        def progress(phase: str = "faults") -> None:
            say(f"  [seed {seed}] {phase} t={time.time() - start:.0f}s {status_line()}")

        def status_line() -> str:
            faults = ",".join(f"{k}:{n}" for k, n in sorted(chaos.counts().items())) or "none"
            try:
                found = checker.read_tasks(db)
            except CouchError as exc:
                return f"faults {faults}; server unreachable ({exc.reason})"
            done = sum(1 for d in found.values() if checker.settled(d, time.time() + 3600))
            moves = sum(len(c.moves) for c in clients)
            runs = len(ledger.read(ledger_path)[0])
            return f"faults {faults}; tasks settled {done}/{len(found)}; runs {runs}; moves {moves}"

        chaos = nemesis.Nemesis(schedule, instances, target, progress)
        chaos.run(start, options.seconds)
        stop.set()
        for client in clients:
            client.join(60)
            if client.failure is not None:
                soak_errors.append(f"client {client.number} failed: {client.failure!r}")
        if options.verbose:
            for done in chaos.done:
                say(f"  fault: {done.line()}")
        for fault, why in chaos.skipped:
            say(f"  fault {fault.line()}: {why}")

        deadline = max(chaos.last_ended(), time.time()) + settle_bound(options)
        docs_now = wait_settled(db, deadline, instances, lambda: progress("settling"))
        instances.check()
        lines, bad = ledger.read(ledger_path)
        evidence = checker.Evidence(
            docs=docs_now,
            lines=lines,
            bad_lines=bad,
            moves=[move for client in clients for move in client.moves],
            instances=instances,
            faults=chaos.done,
            deadline=deadline,
            soak_errors=soak_errors,
        )
        report = checker.Checker(evidence).check()
    finally:
        stop.set()
        instances.stop_all()
        target.stop()
    line = result_line(seed, options, chaos.counts(), report)
    details = (
        failure_details(report, options, seed, workdir, chaos, db.name) if not report.passed else []
    )
    if report.passed and not options.keep:
        cleanup(db, target, workdir)
    return Result(seed, line, report.passed, report, workdir, details)


def wait_settled(
    db: Database, deadline: float, instances: Instances, progress: Callable[[], None]
) -> dict[str, dict]:
    """Every task read until all are settled, or the deadline passed."""
    next_progress = time.time() + 10.0
    while True:
        instances.check()
        try:
            docs = checker.read_tasks(db)
        except CouchError:
            docs = None
        now = time.time()
        if docs is not None and (
            all(checker.settled(d, deadline) for d in docs.values()) or now > deadline
        ):
            return docs
        if now > deadline + 60:
            raise RuntimeError("the server does not answer after the faults stopped")
        if now >= next_progress:
            progress()
            next_progress += 10.0
        time.sleep(1.0)


def result_line(seed: int, options: Options, faults: Counter[str], report: checker.Report) -> str:
    done = ",".join(f"{kind}:{n}" for kind, n in sorted(faults.items())) or "none"
    count = report.count
    verdict = "PASS" if report.passed else "FAIL"
    return (
        f"soak seed={seed} server={options.server_kind} minutes={options.seconds / 60:.1f} "
        f"faults={done} tasks={report.tasks} runs={report.runs} lost={count('lost')} "
        f"twice={count('twice')} (recorded {report.twice_recorded}, unrecorded "
        f"{report.twice_unrecorded}) unrecorded_runs={count('unrecorded')} "
        f"started_after_lost={count('started_after_lost')} "
        f"client_moves_lost={count('client_moves_lost')} wrong={count('wrong')} "
        f"conflicts={count('conflicts')} refused={count('refused')} died={count('died')} "
        f"internal_errors={count('internal_errors')}"
        + (f" ledger={count('ledger')}" if count("ledger") else "")
        + (f" soak_errors={count('soak')}" if count("soak") else "")
        + f": {verdict}"
    )


def failure_details(
    report: checker.Report,
    options: Options,
    seed: int,
    workdir: Path,
    chaos: nemesis.Nemesis,
    database: str,
) -> list[str]:
    lines = [
        f"seed {seed} failed; replay with: {options.replay(seed)}",
        f"work directory kept: {workdir} (worker logs worker-<slot>.<generation>.log, "
        f"ledger.jsonl, couchdb/ for the embedded server's data); database {database}",
        f"final statuses: {dict(report.statuses)}; client moves: {dict(report.moves)}",
        "faults carried out:",
        *(f"  {done.line()}" for done in chaos.done),
    ]
    for category in checker.CATEGORIES:
        found = [f for f in report.findings if f.category == category]
        if not found:
            continue
        lines.append(f"{category}: {len(found)}")
        for finding in found[:20]:
            lines.append(f"- {finding.summary}")
            lines.extend(finding.details)
        if len(found) > 20:
            lines.append(f"  ... and {len(found) - 20} more")
    return lines


def cleanup(db: Database, target: Target, workdir: Path) -> None:
    if not isinstance(target, Embedded):
        with contextlib.suppress(CouchError):
            db.delete()
    shutil.rmtree(workdir, ignore_errors=True)
