"""After on a real Apache CouchDB cluster: failover between nodes, and no task run twice
when a node is cut off from the others (a partition) while thousands of tasks are due.

Runs when AFTER_TEST_COUCHDB_CLUSTER names the nodes of one cluster, comma-separated,
with an admin's credentials (e.g. three copies of Apache CouchDB 3.5 on loopback ports,
joined with `PUT /_node/_local/_nodes/<node>`); the nodes must run on this machine, as
the same user, since the tests pause them (SIGSTOP). With AFTER_TEST_COUCHDB_COOKIE (the
nodes' Erlang cookie) a partition cuts a node's Erlang distribution while it keeps
serving HTTP, as a network split does; without it, the node is paused instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from test_resilience import (
    FINAL,
    Watch,
    WorkerProcess,
    Workers,
    insert_burst,
    ledger_jobs,
    percentiles,
    pid_of,
    read_all,
    read_ledger,
    report,
    seconds_between,
    workers,
)

from after import records
from after.config import node_urls, split_credentials, with_credentials
from after.couch import CouchError, Database, Server
from after.push import push
from soak.servers import PARTITION_ESCRIPT  # a node cut off from the others, while it serves

CLUSTER = os.environ.get("AFTER_TEST_COUCHDB_CLUSTER", "")
COOKIE = os.environ.get("AFTER_TEST_COUCHDB_COOKIE", "")
pytestmark = pytest.mark.skipif(
    len(node_urls(CLUSTER)) < 3, reason="AFTER_TEST_COUCHDB_CLUSTER names no cluster of 3 nodes"
)
__all__ = ["workers"]  # the fixture, shared with test_resilience
HEARTBEAT, LEASE = 1.0, 7.0  # the workers' lease: shorter than the partition (10 s)


@dataclass
class Node:
    url: str  # with the credentials
    name: str  # its Erlang node name
    pid: int  # of its beam.smp process

    def kill(self) -> Callable[[], None]:
        """Stop the node for good (SIGKILL); returns how to start it again as it was."""
        command = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        environ = Path(f"/proc/{self.pid}/environ").read_bytes().split(b"\0")[:-1]
        cwd = os.readlink(f"/proc/{self.pid}/cwd")
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        os.kill(self.pid, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{self.pid}").exists(), timeout=30)

        def start_again() -> None:
            process = subprocess.Popen(
                command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
            self.pid = process.pid
            wait_for(lambda: self.up(), timeout=90, interval=0.5)

        return start_again

    def up(self) -> bool:
        try:
            return self.server.json("GET", "_up").get("status") == "ok"
        except CouchError:
            return False

    @property
    def server(self) -> Server:
        plain, user, password = split_credentials(self.url)
        return Server(plain, (user, password or "") if user else None)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


def listening_pid(port: int) -> int:
    """The process listening on a loopback TCP port, found through /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"no process of ours listens on port {port}")


@pytest.fixture(scope="module")
def nodes() -> list[Node]:
    found = []
    for url in node_urls(CLUSTER)[:3]:
        plain = split_credentials(url)[0]
        node = Node(url, "", 0)
        node.name = node.server.json("GET", "_node/_local")["name"]
        node.pid = listening_pid(int(plain.rsplit(":", 1)[1].strip("/")))
        found.append(node)
    membership = found[0].server.json("GET", "_membership")
    assert sorted(membership["cluster_nodes"]) == sorted(n.name for n in found), membership
    return found


@pytest.fixture
def cluster_db(nodes: list[Node]) -> Iterator[Database]:
    db = nodes[0].server.database(f"after-test-cluster-{uuid.uuid4().hex[:10]}")
    push(db)
    try:
        yield db
    finally:
        for node in nodes:
            node.resume()  # never leave a node paused
        db.delete()


def urls_from(nodes: list[Node], first: int) -> str:
    """All the nodes' URLs, starting with nodes[first]: an instance attached to that node."""
    _, user, password = split_credentials(nodes[0].url)
    ordered = [split_credentials(n.url)[0] for n in nodes[first:] + nodes[:first]]
    return with_credentials(",".join(ordered), user, password)


def start_workers(
    workers: Workers, nodes: list[Node], on: list[int], db: Database, jobs: Path
) -> list[WorkerProcess]:
    launched = [workers.launch(urls_from(nodes, n), db.name, jobs, HEARTBEAT, LEASE) for n in on]
    for worker in launched:
        wait_for(lambda w=worker: w.state_file.exists() or not w.alive(), timeout=60)
        assert worker.alive(), worker.log_text()
    return launched


@contextmanager
def cut_off(node: Node, peers: list[Node], tmp_path: Path) -> Iterator[str]:
    """The node cut off from its peers while it keeps serving HTTP (or, without the
    cluster's cookie, paused); joined again at the end."""
    if not COOKIE:
        node.pause()
        try:
            yield "paused (SIGSTOP)"
        finally:
            node.resume()
        return
    script = tmp_path / "partition.escript"
    script.write_text(PARTITION_ESCRIPT.format(tag=uuid.uuid4().hex[:8]))

    def run(action: str) -> str:
        command = ["escript", str(script), action, COOKIE, node.name, *(p.name for p in peers)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    connected = run("cut")
    assert connected == "[]", f"{node.name} still reaches {connected}"
    try:
        yield "cut off (its Erlang distribution), still serving HTTP"
    finally:
        run("heal")


def settled(db: Database, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every task final, and no conflict left on it."""

    left: list[Counter[str]] = []

    def read() -> dict[str, dict[str, Any]] | None:
        # A task missing from one read counts as not settled, not as lost: on this
        # cluster a read has shown a task deleted while a conflict's resolution spread
        # (a copy holding its deleted branch only). Lost for good fails at the timeout.
        docs = read_all(db, ids, missing_ok=True, conflicts=True)
        open_ = [d for d in docs.values() if d["status"] not in FINAL or d.get("_conflicts")]
        open_ += [{"status": "missing"} for task_id in ids if task_id not in docs]
        left[:] = [
            Counter(f"{d['status']}{'+conflict' if d.get('_conflicts') else ''}" for d in open_)
        ]
        return None if open_ else docs

    try:
        return wait_for(read, timeout=240, interval=1.0)
    except AssertionError:
        raise AssertionError(f"tasks not settled: {left}") from None


def held_back(instances: list[WorkerProcess], why: str) -> int:
    return sum(w.log_text().count(why) for w in instances)


# -- a kill -9 and a partition while 2,000 tasks are due ------------------------------------


@pytest.mark.timeout(600)
def test_a_killed_instance_and_a_cut_off_node_run_no_task_twice(
    nodes: list[Node], cluster_db: Database, workers: Workers, tmp_path: Path
) -> None:
    db = cluster_db
    jobs, ledger = ledger_jobs(tmp_path)
    instances = start_workers(workers, nodes, [0, 1, 2, 0], db, jobs)
    on_cut_node = instances[2]
    inserted = time.monotonic()
    ids = insert_burst(db, 2000, first=3.0, last=15.0, pause=0.02)
    # A third of the way through: kill the instance on node 2 (no graceful stop).
    time.sleep(max(0.0, inserted + 3.0 + 4.0 - time.monotonic()))
    victim = instances[1]
    dead = victim.instance
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(10)
    # Then cut node 3 off for 10 s while the rest of the tasks come due.
    with cut_off(nodes[2], nodes[:2], tmp_path) as how:
        time.sleep(10)
    docs = settled(db, ids)

    runs = read_ledger(ledger)
    statuses = Counter(d["status"] for d in docs.values())
    twice = {}
    for task_id, doc in docs.items():
        lines = runs.get(task_id, [])
        interrupted = [t for t in doc.get("takeovers", []) if t["status"] == "running"]
        # A run the killed instance had begun may have started; nothing else runs twice.
        begun_by_victim = [r for r in lines if r.pid == victim.pid]
        if len(lines) - min(len(begun_by_victim), len(interrupted)) > 1:
            twice[task_id] = (lines, doc.get("conflicts_resolved"))
    finished = [d for d in docs.values() if d.get("started_at")]
    delays = [seconds_between(d["date"], d["started_at"]) for d in finished]
    resolved = sum(1 for d in docs.values() if d.get("conflicts_resolved"))
    unconfirmed = held_back(instances, "stored without the cluster's quorum; not run")
    beside = held_back(instances, "other revision(s)")
    written_over = held_back(instances, "our run's outcome is written over it")
    report(
        "3-node cluster (n=3), 4 instances on nodes 1, 2, 3, 1; 2,000 tasks of 20 ms due over "
        f"12 s; the instance on node 2 killed with SIGKILL, then node 3 {how} for 10 s",
        f"final statuses: {dict(statuses)}; conflicts resolved on {resolved} task(s)",
        f"claims and commits answered 202 and not run: {unconfirmed}",
        f"commits answered 201 and not run, found beside another branch: {beside}",
        f"outcomes written over another instance's running: {written_over}",
        f"start delay after the due time: {percentiles(delays)}",
        f"ledger: {sum(len(r) for r in runs.values())} runs of {len(runs)} tasks; "
        f"ran twice: {len(twice)}",
    )
    assert set(docs) == set(ids), "tasks lost"
    assert not twice, f"{len(twice)} task(s) ran twice: {list(twice.items())[:3]}"
    for task_id, doc in docs.items():
        if doc["status"] == "err":  # a run the killed instance had begun, or one of the
            # cut-off node's instance: its lease (7 s) ran out during the 10 s partition
            assert doc["error"]["type"] == "WorkerLost", (task_id, doc["error"])
            assert doc["takeovers"][-1]["from"] in (dead, on_cut_node.instance), (task_id, doc)
        else:
            assert doc["status"] == "done", (task_id, doc)
            assert runs[task_id][-1].pid == pid_of(doc["owner"]), (task_id, doc)
    assert all(w.alive() for w in instances if w is not victim)
    if COOKIE:  # cut off while serving: it met 202s, and it ran tasks again after the heal
        assert "cut off from the rest of its cluster" in on_cut_node.log_text()
        assert "claiming resumes" in on_cut_node.log_text()


# -- a node stopped for good ---------------------------------------------------------------


@pytest.mark.timeout(600)
def test_a_node_stopped_for_good_leaves_every_worker_running_on_the_others(
    nodes: list[Node], cluster_db: Database, workers: Workers, tmp_path: Path
) -> None:
    db = cluster_db
    jobs, ledger = ledger_jobs(tmp_path)
    instances = start_workers(workers, nodes, [0, 1, 2], db, jobs)
    moved = instances[2]
    # Killed, not paused: a paused node holds its peers' Erlang connections open, and
    # their writes wait for it until the distribution gives up (net_ticktime, 60 s).
    start_again = nodes[2].kill()
    stopped = time.monotonic()
    ids = insert_burst(db, 600, first=2.0, last=8.0)
    watch = Watch(db)
    watch.wait(lambda counts: sum(counts[s] for s in FINAL) == len(ids), timeout=120)
    docs = read_all(db, ids)
    runs = read_ledger(ledger)
    start_again()

    def moved_record() -> dict[str, Any] | None:
        record = db.get(records.record_id(moved.instance))
        return record if record and record.get("node") != nodes[2].server.node_url else None

    record = wait_for(moved_record, timeout=60)
    moved_after = time.monotonic() - stopped
    by_owner = Counter(pid_of(d["owner"]) for d in docs.values())
    report(
        "3-node cluster, 3 instances on nodes 1, 2, 3; node 3 stopped (SIGKILL), 600 tasks due",
        f"final statuses: {dict(Counter(d['status'] for d in docs.values()))}",
        f"the instance on node 3 moved to {record['node']} (recorded {moved_after:.0f} s "
        "after the stop)",
        f"tasks per instance: {sorted(by_owner.values())}",
    )
    assert all(len(runs.get(i, [])) <= 1 for i in ids), "a task ran twice"
    assert all(d["status"] == "done" for d in docs.values()), Counter(
        (d["status"], d.get("error", {}).get("type")) for d in docs.values()
    )
    assert all(w.alive() for w in instances), "a worker exited when its node stopped"
    assert record["node"] in {n.server.node_url for n in nodes[:2]}
    assert "does not answer; moving to" in moved.log_text()
