"""after.couch: the one place that talks to CouchDB (here the session's real server)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import requests
from conftest import new_task, put_on_every_copy

from after.config import split_credentials
from after.couch import (
    BulkWriter,
    CouchError,
    Database,
    Server,
    Unreachable,
    _refusal,
    one_write_per_document,
    unconfirmed,
)
from after.embedded import free_port


class RecordingDatabase:
    """The real database, with the documents of each `_bulk_docs` request noted."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.requests: list[list[str]] = []

    def bulk_docs(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.requests.append([doc["_id"] for doc in docs])
        return self.db.bulk_docs(docs)


def test_a_request_carries_one_write_per_document_and_later_ones_follow_in_order(
    one_copy_db: Database,
) -> None:
    db = one_copy_db
    recorder = RecordingDatabase(db)
    writer = BulkWriter(recorder)  # type: ignore[arg-type]
    results: list[tuple[str, dict[str, Any]]] = []
    all_back = threading.Event()

    def note(label: str) -> Any:
        def on_result(row: dict[str, Any]) -> None:
            results.append((label, row))
            if len(results) == 4:
                all_back.set()

        return on_result

    # queued before the writer starts, so that all four could go in one request
    writer.write(new_task(_id="x", worker="first"), note("x first"))
    writer.write(new_task(_id="y"), note("y"))
    writer.write(new_task(_id="x", worker="again"), note("x again"))  # no _rev: a conflict
    writer.write(new_task(_id="z"), note("z"))
    writer.start()
    assert all_back.wait(15)
    writer.stop()

    assert recorder.requests == [["x", "y", "z"], ["x"]]
    assert [label for label, _ in results] == ["x first", "y", "z", "x again"]
    rows = dict(results)
    assert all(rows[label].get("ok") for label in ("x first", "y", "z"))
    assert rows["x again"].get("error") == "conflict"
    assert db.get("x")["worker"] == "first"


def conflict_of_two(db: Database) -> tuple[str, str, str]:
    """A task with two revisions on one parent, as a replication leaves them: its id,
    our `scheduled` revision and the replicated `cancel` one."""
    doc_id, first = db.post(new_task(status="waiting"))
    mine = db.put({**db.get(doc_id), "status": "scheduled"})
    generation, parent = first.split("-")
    theirs = f"{int(generation) + 1}-{'0' * 32}"
    replicated = {**db.get(doc_id), "_rev": theirs, "status": "cancel"}
    replicated["_revisions"] = {"start": int(generation) + 1, "ids": ["0" * 32, parent]}
    db.server.json("POST", f"{db.path}/_bulk_docs", body={"docs": [replicated], "new_edits": False})
    return doc_id, mine, theirs


def test_the_revisions_of_a_conflict_are_read_in_one_request(server: Server, db_name: str) -> None:
    db = server.database(db_name + "-revisions")  # no design doc: replicated writes go
    db.create()
    try:
        doc_id, mine, theirs = conflict_of_two(db)
        assert db.get(doc_id, conflicts=True)["_conflicts"] == [theirs]

        found = db.revisions(doc_id, [theirs, mine, f"9-{'e' * 32}"])  # the last never was

        assert [(d["_rev"], d["status"]) for d in found] == [
            (theirs, "cancel"),
            (mine, "scheduled"),
        ]
        assert db.revisions(doc_id, []) == []
    finally:
        db.delete()


class Results:
    """Each write's row by label, and an event set once `expected` rows are back."""

    def __init__(self, expected: int) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.at: dict[str, float] = {}
        self.expected = expected
        self.all_back = threading.Event()

    def note(self, label: str) -> Any:
        def on_result(row: dict[str, Any]) -> None:
            self.rows[label], self.at[label] = row, time.monotonic()
            if len(self.rows) == self.expected:
                self.all_back.set()

        return on_result


@contextmanager
def running_writer(db: Database) -> Iterator[tuple[BulkWriter, RecordingDatabase]]:
    recorder = RecordingDatabase(db)
    writer = BulkWriter(recorder)  # type: ignore[arg-type]
    writer.start()
    try:
        yield writer, recorder
    finally:
        writer.stop()


def test_writes_that_may_wait_share_the_request_of_the_first_one_due(db: Database) -> None:
    results = Results(3)
    with running_writer(db) as (writer, recorder):
        writer.write(new_task(_id="outcome"), results.note("outcome"), within=30)
        writer.write(new_task(_id="commit"), results.note("commit"), within=30)
        time.sleep(0.3)
        assert recorder.requests == []  # they wait for company
        writer.write(new_task(_id="claim"), results.note("claim"))  # due at once
        assert results.all_back.wait(10)
    assert recorder.requests == [["outcome", "commit", "claim"]]
    assert all(row.get("ok") for row in results.rows.values())


def test_a_write_that_may_wait_is_sent_by_its_time_alone(db: Database) -> None:
    results = Results(1)
    with running_writer(db) as (writer, recorder):
        sent = time.monotonic()
        writer.write(new_task(_id="outcome"), results.note("outcome"), within=0.3)
        assert results.all_back.wait(10)
    assert recorder.requests == [["outcome"]]
    assert results.at["outcome"] - sent >= 0.3
    assert db.get("outcome") is not None


def test_stopping_the_writer_sends_the_writes_that_wait_at_once(db: Database) -> None:
    writer = BulkWriter(db)
    writer.start()
    results = Results(2)
    writer.write(new_task(_id="a"), results.note("a"), within=60)
    writer.write(new_task(_id="b"), results.note("b"), within=60)
    stopping = time.monotonic()
    writer.stop()
    assert time.monotonic() - stopping < 10  # not the minute they might have waited
    assert results.all_back.is_set()
    assert db.get("a") is not None and db.get("b") is not None


def test_a_callback_that_raises_does_not_end_the_writer(db: Database) -> None:
    writer = BulkWriter(db)
    writer.start()

    def broken(row: dict[str, Any]) -> None:
        raise RuntimeError("a caller's bug")

    writer.write(new_task(_id="a"), broken)
    results = Results(1)
    writer.write(new_task(_id="b"), results.note("b"), within=0.2)
    assert results.all_back.wait(10), "the writer thread died with the first callback"
    assert writer.stop(timeout=10)


def test_a_stop_while_the_server_is_down_gives_up_in_time() -> None:
    """A worker that shuts down during an outage must not hang on its last writes."""
    down = Server(f"http://127.0.0.1:{free_port()}/").database("nothing-here")
    writer = BulkWriter(down)
    writer.start()
    writer.write(new_task(_id="a"), lambda row: None)
    time.sleep(0.3)  # its first request failed: it is waiting to retry
    stopping = time.monotonic()
    assert writer.stop(timeout=1.0) is False
    assert time.monotonic() - stopping < 4
    assert not writer.thread.is_alive()


class AnswerLosingDatabase:
    """The real database, whose first `_bulk_docs` request goes unanswered: the server
    stored it (`stored=True`) or not, and another client may write meanwhile."""

    def __init__(
        self,
        db: Database,
        stored: bool,
        meanwhile: dict[str, Any] | None = None,
        error: Exception | None = None,
    ):
        self.db, self.stored, self.meanwhile = db, stored, meanwhile
        self.error = error or Unreachable(0, "unreachable", "ConnectionError: reset", "POST")
        self.requests = 0

    def bulk_docs(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.requests += 1
        if self.requests > 1:
            return self.db.bulk_docs(docs)
        if self.stored:
            self.db.bulk_docs([dict(doc) for doc in docs])
        if self.meanwhile is not None:
            put_on_every_copy(self.db, self.meanwhile)
        raise self.error

    def all_docs(self, **params: Any) -> dict[str, Any]:
        return self.db.all_docs(**params)


def write_through(database: AnswerLosingDatabase, doc: dict[str, Any]) -> dict[str, Any]:
    writer = BulkWriter(database)  # type: ignore[arg-type]
    results = Results(1)
    writer.start()
    writer.write(doc, results.note("it"))
    assert results.all_back.wait(15)
    writer.stop()
    return results.rows["it"]


def test_a_write_stored_by_a_request_whose_answer_was_lost_is_answered_as_stored(
    one_copy_db: Database,
) -> None:
    db = one_copy_db
    doc_id, _ = db.post(new_task())
    canceled = {**db.get(doc_id), "status": "cancel"}
    losing = AnswerLosingDatabase(db, stored=True)

    row = write_through(losing, canceled)

    stored = db.get(doc_id)
    assert losing.requests == 2  # sent again, refused as stale by the server
    assert stored["status"] == "cancel" and stored["_rev"].startswith("2-")
    assert row == {"id": doc_id, "rev": stored["_rev"], "ok": True}


def test_a_bulk_request_a_cluster_failed_in_part_is_sent_again_and_answered_as_stored(
    one_copy_db: Database,
) -> None:
    db = one_copy_db
    # Apache CouchDB answers 500 with the rows when copies did not answer; some
    # documents may be stored. The writer neither dies of it nor takes them as refused.
    response = requests.Response()
    rows = [
        {"id": "a", "rev": "2-x", "ok": True},
        {"id": "b", "error": "unknown_error", "reason": "timeout"},
    ]
    response.status_code, response._content = 500, json.dumps(rows).encode()
    error = _refusal(response, "POST /tasks/_bulk_docs")
    assert (error.status, error.error) == (500, "unknown_error")
    assert "1 of 2 document(s) failed, e.g. b: timeout" in str(error)

    doc_id, _ = db.post(new_task())
    canceled = {**db.get(doc_id), "status": "cancel"}
    row = write_through(AnswerLosingDatabase(db, stored=True, error=error), canceled)
    assert row == {"id": doc_id, "rev": db.get(doc_id)["_rev"], "ok": True}


class DisagreeingCopies(Database):
    """The real database, answering `_bulk_docs` as a CouchDB 3.5 cluster does when its
    copies disagree on a document (one refuses it with 403, another with 409, or does
    not answer): HTTP 500, each document's row, and `error` (default `conflict`) in
    the rows of the documents not stored. `stored_as_failed`: ids whose row says
    failed although the request stored them (one copy took the write, the others
    answered 409: the row says conflict)."""

    def __init__(self, db: Database, error: str = "conflict", stored_as_failed: tuple = ()):
        super().__init__(db.server, db.name)
        self.error, self.stored_as_failed = error, set(stored_as_failed)

    def _json(self, method: str, path: str = "", **kwargs: Any) -> Any:
        answer = super()._json(method, path, **kwargs)
        if path != "_bulk_docs":
            return answer
        rows = [
            {"id": row["id"], "error": self.error, "reason": "Document update conflict."}
            if row.get("error") or row["id"] in self.stored_as_failed
            else row
            for row in answer
        ]
        raise CouchError(500, self.error, "1 document failed", "POST _bulk_docs", rows)


def test_a_refusal_a_cluster_reports_as_a_failed_conflict_gets_its_own_answer(
    db: Database,
) -> None:
    doc_id, _ = put_on_every_copy(db, new_task())
    put_on_every_copy(db, {**db.get(doc_id), "status": "cancel"})
    put_on_every_copy(db, {**db.get(doc_id), "status": "canceled"})
    reopened = {**db.get(doc_id), "status": "waiting"}
    created = new_task(_id="new-one")

    rows = DisagreeingCopies(db).bulk_docs([reopened, created])

    assert rows[0]["error"] == "forbidden"  # the document was sent alone: the real answer
    assert "canceled is final" in rows[0]["reason"]
    assert rows[1]["ok"] and db.get("new-one")["_rev"] == rows[1]["rev"]
    assert db.get(doc_id)["status"] == "canceled"


def test_a_write_a_failed_cluster_request_stored_is_answered_as_stored_unconfirmed(
    db: Database,
) -> None:
    doc_id, _ = put_on_every_copy(db, new_task())
    canceled = {**db.get(doc_id), "status": "cancel"}

    disagreeing = DisagreeingCopies(db, stored_as_failed=(doc_id,))
    (row,) = disagreeing.bulk_docs([canceled])

    stored = db.get(doc_id)
    assert stored["status"] == "cancel"
    assert row == {"ok": True, "id": doc_id, "rev": stored["_rev"], "accepted": True}


def test_a_cluster_request_failed_for_copies_that_did_not_answer_fails_as_a_whole(
    db: Database,
) -> None:
    doc_id, _ = put_on_every_copy(db, new_task())
    canceled = {**db.get(doc_id), "status": "cancel"}
    with pytest.raises(CouchError) as failed:  # the writer sends the batch again
        DisagreeingCopies(db, error="unknown_error", stored_as_failed=(doc_id,)).bulk_docs(
            [canceled]
        )
    assert failed.value.status == 500 and failed.value.error == "unknown_error"


def test_a_real_conflict_in_a_failed_cluster_request_stays_a_conflict(db: Database) -> None:
    doc_id, _ = put_on_every_copy(db, new_task())
    current = db.get(doc_id)
    put_on_every_copy(db, {**current, "status": "cancel"})  # someone else wrote first

    (row,) = DisagreeingCopies(db).bulk_docs([{**current, "date": "2012-01-01"}])

    assert row["error"] in ("conflict", "forbidden"), row  # PouchDB Server: forbidden
    assert db.get(doc_id)["status"] == "cancel"


def test_the_writer_survives_an_unexpected_failure_and_sends_again(db: Database) -> None:
    doc_id, _ = db.post(new_task())
    canceled = {**db.get(doc_id), "status": "cancel"}
    losing = AnswerLosingDatabase(db, stored=False, error=AttributeError("a bug of ours"))
    row = write_through(losing, canceled)
    assert row.get("ok") and db.get(doc_id)["status"] == "cancel"


def test_a_write_sent_again_stays_refused_when_someone_else_wrote_meanwhile(
    db: Database,
) -> None:
    doc_id, _ = put_on_every_copy(db, new_task())
    current = db.get(doc_id)
    losing = AnswerLosingDatabase(db, stored=False, meanwhile={**current, "status": "cancel"})

    row = write_through(losing, {**current, "date": "2012-01-01"})

    assert row.get("error") in ("conflict", "forbidden"), row
    assert db.get(doc_id)["status"] == "cancel"
    assert db.get(doc_id)["date"] == "2011-10-12"


def test_one_write_per_document_keeps_the_order_and_the_limit() -> None:
    def write(doc_id: str | None, n: int) -> tuple[dict[str, Any], Any, float]:
        doc = {"n": n} if doc_id is None else {"_id": doc_id, "n": n}
        return doc, None, 0.0

    writes = [write("a", 1), write("b", 2), write("a", 3), write(None, 4), write(None, 5),
              write("c", 6), write("a", 7), write("d", 8)]  # fmt: skip
    batch, left = one_write_per_document(writes, limit=4)
    assert [doc["n"] for doc, _, _ in batch] == [1, 2, 4, 5]
    assert [doc["n"] for doc, _, _ in left] == [3, 6, 7, 8]
    batch, left = one_write_per_document(left, limit=4)
    assert [doc["n"] for doc, _, _ in batch] == [3, 6, 8]
    assert [doc["n"] for doc, _, _ in left] == [7]


class DroppingServer(threading.Thread):
    """A TCP server that reads each request and closes the first `drops` connections
    without an answer (as a server closing an idle kept-alive connection does just as
    the client reuses it), then answers `{"ok": true}`."""

    def __init__(self, drops: int, silent: bool = False) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/"
        self.drops, self.connections = drops, 0
        self.silent, self.held = silent, list[socket.socket]()  # silent: never answers
        self.start()

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.silent:  # kept open and never answered, as by a paused (SIGSTOPped) server
                self.held.append(connection)
                continue
            with connection:
                self.connections += 1
                connection.recv(65536)
                if self.connections > self.drops:
                    body = b'{"ok": true}'
                    head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                    connection.sendall(head.encode() + body)


def test_a_connection_closed_without_an_answer_is_tried_once_more() -> None:
    once = DroppingServer(drops=1)
    assert Server(once.url).json("POST", "db/_all_docs", body={"keys": []}) == {"ok": True}
    assert once.connections == 2
    always = DroppingServer(drops=10)
    with pytest.raises(Unreachable, match="did not accept the connection"):
        Server(always.url).json("GET", "db")
    assert always.connections == 2  # once more, not in a loop


# -- the environment, read once ---------------------------------------------------------


def test_the_environments_proxies_and_ca_bundle_are_taken_once_at_the_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/our-ca.pem")
    server = Server("http://couch.example:5984/", ("admin", "secret"))
    assert server.session.proxies["http"] == "http://proxy.example:3128"
    assert server.session.verify == "/etc/our-ca.pem"
    assert server.session.auth == ("admin", "secret")
    assert server.session.trust_env is False  # not looked up again on every request


def test_a_host_in_no_proxy_is_reached_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "couch.example")
    assert "http" not in Server("http://couch.example:5984/").session.proxies


def test_credentials_come_from_netrc_when_none_are_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine couch.example login alice password wonderland\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert Server("http://couch.example:5984/").session.auth == ("alice", "wonderland")
    given = Server("http://couch.example:5984/", ("bob", "builder"))
    assert given.session.auth == ("bob", "builder")


# -- the nodes of a cluster ------------------------------------------------------------------


def test_a_node_that_does_not_answer_makes_the_next_one_current(couch_url: str) -> None:
    plain, user, password = split_credentials(couch_url)
    dead = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    server = Server(f"{dead},{plain}", (user, password or "") if user else None)
    assert server.urls == [dead, plain] and server.url == dead

    with pytest.raises(Unreachable):
        server.welcome()
    assert server.url == plain  # the caller's retry goes to the next node
    assert "version" in server.welcome()
    server.failed(dead)  # a late report about the node already left changes nothing
    assert server.url == plain
    server.failed(plain)
    assert server.url == dead  # round the list again


def test_a_feed_whose_node_stops_answering_moves_to_the_next_node(db: Database) -> None:
    quiet = DroppingServer(drops=0, silent=True)  # never answers: a paused node
    server = Server([quiet.url, db.server.url], db.server.credentials)
    with pytest.raises(Unreachable):
        next(server.database(db.name).follow(0, heartbeat_ms=200))
    assert server.url == db.server.url
    first = next(server.database(db.name).follow(0, heartbeat_ms=200))
    assert first["id"].startswith("_design/")


def test_a_write_says_whether_the_quorum_confirmed_it(db: Database) -> None:
    """One node (or PouchDB Server) answers 201: confirmed. (A cluster node cut off
    from the others answers 202; tests/test_cluster.py sees that on a real cluster.)"""
    doc = new_task()
    doc["_id"] = "confirmed"
    assert db.put_confirmed(doc) is True and doc["_rev"].startswith("1-")
    assert unconfirmed({"id": "a", "rev": "1-a", "ok": True, "accepted": True})
    assert not unconfirmed({"id": "a", "rev": "1-a", "ok": True})
    assert not unconfirmed({"id": "a", "error": "conflict", "accepted": True})


def test_the_leaves_of_a_document_include_every_conflicting_revision(
    server: Server, db_name: str
) -> None:
    db = server.database(db_name + "-leaves")  # no design doc: replicated writes go
    db.create()
    try:
        single, first = db.post(new_task(status="waiting"))
        assert [leaf["_rev"] for leaf in db.leaves(single)] == [first]
        doc_id, mine, theirs = conflict_of_two(db)
        assert sorted(leaf["_rev"] for leaf in db.leaves(doc_id)) == sorted([mine, theirs])
        db.put({"_id": doc_id, "_rev": theirs, "_deleted": True})
        assert [leaf["_rev"] for leaf in db.leaves(doc_id)] == [mine]  # deleted ones left out
    finally:
        db.delete()
