"""The embedded server loses no acknowledged write when it is killed with SIGKILL.

A thread writes documents (single PUTs and POSTs, updates of documents it wrote
before, and small `_bulk_docs` batches of new documents and updates) and
records every write the server acknowledged, with its revision. The server
process is killed with SIGKILL while the writes stream in, started again on the
same port and data directory, and every acknowledged write must be there, at
its acknowledged revision or at a later one that descends from it.

The server runs with a pre-seeded admin, as `after couchdb lock` leaves it; after
the restart its configuration must still be closed to anonymous requests through
the `/_node/node1@127.0.0.1/_config` prefix (test_embedded.py checks that on a
freshly started server; here it must hold again after a crash). Here the test
restarts the server itself; test_supervisor.py does the same with the
supervisor of `after couchdb` restarting it.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from after import embedded

ADMIN = ("durable", "Kill-9-proof")
NODE = "_node/node1@127.0.0.1"
DB = "durable"
ACKED_BEFORE_KILL = 1000  # acknowledged writes before the kill (the stream goes on meanwhile)


@dataclass
class Server:
    port: int
    data_dir: Path
    process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> None:
        log = self.data_dir / "server.log"
        self.process = embedded.start(self.port, self.data_dir, log, admin=ADMIN)
        embedded.wait_healthy(self.url, timeout=60, process=self.process)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Server]:
    """An embedded server of this test's own (not the session's), with a pre-seeded admin."""
    running = Server(embedded.free_port(), tmp_path / "couchdb")
    running.start()
    try:
        yield running
    finally:
        if running.process is not None:
            embedded.stop(running.process)


def rev_number(rev: str) -> int:
    return int(rev.split("-", 1)[0])


@dataclass
class Writer:
    """Writes until the server stops answering; keeps what was acknowledged."""

    url: str
    acked: dict[str, str] = field(default_factory=dict)  # id -> acknowledged revision
    counts: dict[str, int] = field(default_factory=dict)
    sending: threading.Event = field(default_factory=threading.Event)  # a request is out
    failure: BaseException | None = None

    def ack(self, doc_id: str, rev: str, how: str) -> None:
        previous = self.acked.get(doc_id)
        assert previous is None or rev_number(rev) > rev_number(previous), (doc_id, previous, rev)
        self.acked[doc_id] = rev
        self.counts[how] = self.counts.get(how, 0) + 1

    def run(self) -> None:
        pick = random.Random(5984)
        session = requests.Session()
        session.auth = ADMIN
        db = f"{self.url}{DB}"
        n = 0
        try:
            while True:  # until the server is gone
                n += 1
                body = {"n": n, "text": "x" * pick.randrange(0, 2000), "at": time.time()}
                how = pick.choice(["put", "post", "update", "bulk", "bulk"])
                self.sending.set()
                if how == "update" and self.acked:
                    doc_id = pick.choice(list(self.acked))
                    body["_rev"] = self.acked[doc_id]
                    answer = session.put(f"{db}/{doc_id}", json=body, timeout=5)
                elif how in ("put", "update"):
                    how, doc_id = "put", uuid.uuid4().hex
                    answer = session.put(f"{db}/{doc_id}", json=body, timeout=5)
                elif how == "post":
                    answer = session.post(db, json=body, timeout=5)
                else:
                    docs = [{**body, "_id": uuid.uuid4().hex} for _ in range(pick.randrange(2, 8))]
                    for doc_id in pick.sample(list(self.acked), min(len(self.acked), 3)):
                        docs.append({**body, "_id": doc_id, "_rev": self.acked[doc_id]})
                    answer = session.post(f"{db}/_bulk_docs", json={"docs": docs}, timeout=5)
                self.sending.clear()
                if answer.status_code not in (201, 202):
                    raise AssertionError(
                        f"a write failed: {answer.status_code} {answer.text[:200]}"
                    )
                if how == "bulk":
                    rows = answer.json()
                    assert all(row.get("ok") for row in rows), rows
                    for row in rows:
                        self.ack(row["id"], row["rev"], how)
                else:
                    result = answer.json()
                    self.ack(result["id"], result["rev"], how)
        except requests.RequestException:
            return  # the server is gone: the stream ends here
        except BaseException as exc:  # anything else is a failure of the test
            self.failure = exc
        finally:
            session.close()


def write_until_killed(url: str, kill: Callable[[], None]) -> Writer:
    """Stream writes to the database DB; once ACKED_BEFORE_KILL are acknowledged, kill().

    kill() runs while a write is on its way; the stream ends when the server is gone.
    """
    writer = Writer(url)
    thread = threading.Thread(target=writer.run, name="durability-writer", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while len(writer.acked) < ACKED_BEFORE_KILL and thread.is_alive():
        assert time.monotonic() < deadline, "the writes are too slow"
        time.sleep(0.01)
    assert thread.is_alive(), f"the writer stopped early: {writer.failure!r}"

    # Kill it while a write is on its way: a busy wait catches that moment, where a
    # woken Event.wait() may come too late.
    while not writer.sending.is_set():
        pass
    kill()
    thread.join(10)
    assert not thread.is_alive(), "the writer did not notice the server was gone"
    assert writer.failure is None, f"the writer failed: {writer.failure!r}"
    assert len(writer.acked) >= ACKED_BEFORE_KILL
    return writer


def assert_every_acknowledged_write_is_there(url: str, acked: dict[str, str]) -> int:
    """Each document at its acknowledged revision, or at a later one that descends from it.

    Returns how many are at a later revision (a write in flight at the kill landed).
    """
    admin = requests.Session()
    admin.auth = ADMIN
    current: dict[str, dict[str, Any]] = {}
    ids = sorted(acked)
    for start in range(0, len(ids), 500):
        rows = admin.post(
            f"{url}{DB}/_all_docs", json={"keys": ids[start : start + 500]}, timeout=30
        ).json()["rows"]
        current.update({row["key"]: row for row in rows})
    missing = [doc_id for doc_id in ids if "value" not in current[doc_id]]
    assert not missing, f"{len(missing)} acknowledged document(s) lost, e.g. {missing[:5]}"
    deleted = [doc_id for doc_id in ids if current[doc_id]["value"].get("deleted")]
    assert not deleted, f"acknowledged documents came back deleted: {deleted[:5]}"

    older, later = [], 0
    for doc_id, rev in acked.items():
        stored = current[doc_id]["value"]["rev"]
        if stored == rev:
            continue
        if rev_number(stored) < rev_number(rev):
            older.append((doc_id, rev, stored))
            continue
        # a later revision (a write in flight at the kill landed): it must descend from ours
        history = admin.get(f"{url}{DB}/{doc_id}", params={"revs": "true"}, timeout=10).json()[
            "_revisions"
        ]
        position = history["start"] - rev_number(rev)
        assert history["ids"][position] == rev.split("-", 1)[1], (doc_id, rev, history)
        later += 1
    assert not older, f"{len(older)} document(s) went back to an older revision: {older[:5]}"

    # Nothing stored is damaged: every document reads back whole.
    everything = admin.get(f"{url}{DB}/_all_docs", params={"include_docs": "true"}, timeout=30)
    rows = everything.json()["rows"]
    assert len(rows) >= len(acked)
    assert all(isinstance(row["doc"].get("n"), int) for row in rows)
    return later


def test_every_acknowledged_write_survives_a_sigkill(own_server: Server) -> None:
    server = own_server
    admin = requests.Session()
    admin.auth = ADMIN
    assert admin.put(server.url + DB, timeout=10).status_code == 201

    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        server.process.kill()  # SIGKILL, in the middle of the stream
        server.process.wait(10)

    writer = write_until_killed(server.url, kill)
    acked = dict(writer.acked)

    server.start()  # the same port, the same data directory
    restarted_in = time.monotonic() - killed_at[0]
    later = assert_every_acknowledged_write_is_there(server.url, acked)

    # The restarted server works, and its configuration is still closed to anonymous requests.
    assert admin.put(f"{server.url}{DB}/after-restart", json={"ok": 1}, timeout=10).ok
    for method, path, body in [
        ("GET", f"{NODE}/_config", None),
        ("GET", f"{NODE}/_config/admins", None),
        ("PUT", f"{NODE}/_config/admins/intruder", '"intruder-password"'),
    ]:
        answer = requests.request(method, server.url + path, data=body, timeout=10)
        assert answer.status_code in (401, 403, 404), (method, path, answer.status_code)
        assert "pbkdf2" not in answer.text and "couch_httpd_auth" not in answer.text
    assert admin.get(f"{server.url}{NODE}/_config/admins", timeout=10).json().keys() == {ADMIN[0]}
    assert (
        requests.get(
            server.url + "_session", auth=("intruder", "intruder-password"), timeout=10
        ).status_code
        == 401
    )

    print(
        f"\ndurability: {len(acked)} documents acknowledged ({writer.counts}), "
        f"SIGKILL mid-stream, back in {restarted_in:.1f}s; all present, "
        f"{later} at a later revision that descends from the acknowledged one"
    )
