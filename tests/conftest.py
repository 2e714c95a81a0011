"""Test fixtures: a real CouchDB-compatible server, never a mock.

By default the session starts the pinned PouchDB Server (npm) on a free
loopback port with a temporary data directory. With AFTER_TEST_COUCHDB_URL
set (e.g. http://admin:secret@127.0.0.1:5984/) the suite runs against that
server instead, a real Apache CouchDB 3.x, in databases it creates with
unique names and deletes afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from after import embedded
from after.config import Config, split_credentials
from after.couch import Conflict, Database, NotFound, Server
from after.push import push
from after.worker import Worker

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def couch_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The server URL, with credentials if any."""
    given = os.environ.get("AFTER_TEST_COUCHDB_URL")
    if given:
        yield given
        return
    data = tmp_path_factory.mktemp("pouchdb")
    port = embedded.free_port()
    process = embedded.start(port, data, data / "server.log")
    url = f"http://127.0.0.1:{port}/"
    try:
        embedded.wait_healthy(url, timeout=60, process=process)
        yield url
    finally:
        embedded.stop(process)


@pytest.fixture(scope="session")
def server(couch_url: str) -> Server:
    url, user, password = split_credentials(couch_url)
    return Server(url, (user, password or "") if user else None)


@pytest.fixture
def db_name() -> str:
    return f"after-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def db(server: Server, db_name: str) -> Iterator[Database]:
    """A fresh database with After's design documents deployed."""
    database = server.database(db_name)
    push(database)
    yield database
    database.delete()


@pytest.fixture
def one_copy_db(server: Server, db_name: str) -> Iterator[Database]:
    """A database of one copy (`n=1`; a single node's default). For tests of one
    copy's behaviour (the writer's logic, validate_doc_update's contract, what the
    views emit): on a cluster, a write right after another may meet a copy that has
    not applied the first (it stores the write beside it, answered 202, or answers
    409 where the others refuse it with 403), and a view is read from one copy of
    each shard. What copies that disagree do is tested apart
    (test_couch.DisagreeingCopies, tests/test_cluster.py)."""
    server.request("PUT", db_name, params={"n": 1})
    database = server.database(db_name)
    push(database)
    yield database
    database.delete()


@pytest.fixture
def config(couch_url: str, db_name: str, tmp_path: Path) -> Config:
    """A Config pointing at the test server and the test database."""
    return Config.from_env({}).override(
        couchdb_url=couch_url, db=db_name, jobs=REPO / "jobs", home=tmp_path / "home"
    )


def after_cli(
    env: dict[str, str], *args: str, timeout: float = 60, **kwargs: Any
) -> subprocess.CompletedProcess:
    """Run one short `after` command (python -m after) to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "after", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        **kwargs,
    )


@pytest.fixture
def start_worker(config: Config) -> Iterator[Callable[..., Worker]]:
    """Start in-process workers on threads; all are stopped at the end of the test.

    start_worker(name="manobi", config_=None, jobs=None, **Worker options)
    """
    running: list[tuple[Worker, threading.Thread]] = []

    def start(
        name: str = "manobi",
        config_: Config | None = None,
        jobs: Path | None = None,
        **options: Any,
    ) -> Worker:
        base = config_ or config
        worker = Worker(base.override(jobs=jobs) if jobs else base, name, **options)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        assert worker.ready.wait(15), "the worker did not start"
        running.append((worker, thread))
        return worker

    yield start
    for worker, thread in running:
        worker.stop()
        thread.join(15)


FAST = {"heartbeat": 0.3, "lease": 1.5}


@pytest.fixture
def start_fast(start_worker: Callable[..., Worker]) -> Callable[..., Worker]:
    """In-process workers with short heartbeats and leases, so takeovers come quickly."""
    return lambda *args, **options: start_worker(*args, **{**FAST, **options})


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05) -> Any:
    """Poll until condition() is truthy and return its value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {condition}")
        time.sleep(interval)


def settled_write(write: Callable[[], Any], tries: int = 40) -> Any:
    """Run a write; on a 409, run it again a few times. On a CouchDB cluster a write
    right after another one of the same document can meet a copy that has not applied
    the first yet (the first was answered once two of three copies had it): that copy
    answers 409 where the others refuse with 403 (or accept), and the coordinator may
    pass the 409 on. A real conflict is a 409 every time, and is raised."""
    for attempt in range(tries):
        try:
            return write()
        except Conflict:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)
    return None


def put_on_every_copy(db: Database, doc: dict[str, Any]) -> tuple[str, str]:
    """Write a document as `db.post` does (its id and new revision, set on `doc` too),
    answered once every copy of a 3-copy cluster has it (`w=3`; a single node answers
    202, PouchDB Server ignores it): a write right after it meets no copy still
    without it, which would answer 409 or store a stale write beside it as a conflict."""
    doc.setdefault("_id", uuid.uuid4().hex)
    path = f"{db.path}/{quote(doc['_id'], safe='')}"
    doc["_rev"] = db.server.request("PUT", path, params={"w": 3}, body=doc).json()["rev"]
    return doc["_id"], doc["_rev"]


def new_task(**fields: Any) -> dict[str, Any]:
    """A valid task document; fields override."""
    task: dict[str, Any] = {
        "worker": "manobi",
        "date": "2011-10-12",
        "job": {"name": "echo", "arguments": [2, 3, "test"]},
        "status": "waiting",
    }
    task.update(fields)
    return task


@contextmanager
def replicator_user(*admins: Server) -> Iterator[tuple[str, str]]:
    """A user with After's replicator role on each server, the credentials a replication
    runs as (Apache CouchDB validates replicated revisions too); deleted afterwards."""
    from after.security import ROLES

    name, password = f"after-test-replicator-{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(18)
    try:
        for admin in admins:
            admin.put_user(name, password, [ROLES["replicator"]])
        yield name, password
    finally:
        for admin in admins:
            users = admin.database("_users")
            doc = users.get(f"org.couchdb.user:{name}")
            if doc:
                users.bulk_docs([{**doc, "_deleted": True}])


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` (without credentials) with these in it."""
    return url.replace("://", f"://{user}:{password}@", 1)


@pytest.fixture
def spawn(config: Config, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Worker processes through the real CLI, killed at the end."""
    processes: list[subprocess.Popen] = []

    def spawn_worker(
        name: str = "manobi", jobs: Path | None = None, home: str = "a", *options: str
    ) -> subprocess.Popen:
        env = {
            **os.environ,
            "AFTER_COUCHDB_URL": config.couchdb_url,
            "AFTER_DB": config.db,
            "AFTER_HOME": str(tmp_path / home),
        }
        if config.user:
            env.update(AFTER_COUCHDB_USER=config.user, AFTER_COUCHDB_PASSWORD=config.password or "")
        jobs_dir = str(jobs or REPO / "jobs")
        command = [sys.executable, "-m", "after", "start", name, "--foreground", "--jobs", jobs_dir]
        command += ["--heartbeat", "0.3", "--lease", "1.5", *options]
        log = tmp_path / f"{home}.log"
        with open(log, "w") as output:  # a file, not a pipe: a full pipe would block the worker
            process = subprocess.Popen(command, env=env, stderr=output, cwd=REPO)
        processes.append(process)
        state = tmp_path / home / "workers" / f"{name}.json"
        wait_for(lambda: state.exists() or process.poll() is not None, timeout=20)
        assert process.poll() is None, log.read_text()
        return process

    yield spawn_worker
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def delete_replications(server: Server, made_by: Callable[[dict[str, Any]], bool]) -> None:
    """Delete the `_replicator` documents a test made. The server updates a
    replication's state in its document as it runs, so a delete may meet a newer
    revision: read it again and retry."""
    replicator = server.database("_replicator")
    for _ in range(20):
        mine = [
            row["doc"]
            for row in replicator.all_docs(include_docs=True)["rows"]
            if row.get("doc") and not row["id"].startswith("_design/") and made_by(row["doc"])
        ]
        if not mine:
            return
        for doc in mine:
            with contextlib.suppress(Conflict, NotFound):
                server.json("DELETE", f"_replicator/{doc['_id']}?rev={doc['_rev']}")
        time.sleep(0.1)
    raise AssertionError(f"the test's replications could not be deleted: {mine}")
