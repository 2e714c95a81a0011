"""The embedded server (after.embedded) survives every hazard couchdb-compat.md lists.

These tests start their own PouchDB Server processes (never the session
server of conftest.py, never a mock), send each request that crashes, wedges
or leaks on a plainly started PouchDB Server 4.2.0, and then require that the
server still answers `GET /` and a full database round trip within a few
seconds, with no uncaught exception or unhandled rejection in its log.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from after import embedded

ADMIN = ("boss", "s3cret-Pa55")
USER = ("bob", "bobs-password")  # a _users user, not a server admin
NODE = "_node/node1@127.0.0.1"
HEALTH_WITHIN = 5.0  # seconds for the whole health check
REQUEST_TIMEOUT = 5.0  # seconds for any single triggering request


@dataclass
class Running:
    url: str
    process: subprocess.Popen
    data_dir: Path
    log_path: Path
    auth: tuple[str, str] | None  # credentials of a server admin, None in admin party

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", REQUEST_TIMEOUT)
        return requests.request(method, self.url + path, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.request(method, path, auth=self.auth, **kwargs)


def start_server(data_dir: Path, admin: tuple[str, str] | None = None) -> Running:
    port = embedded.free_port()
    log_path = data_dir / "server.log"
    process = embedded.start(port, data_dir, log_path, admin=admin)
    server = Running(f"http://127.0.0.1:{port}/", process, data_dir, log_path, admin)
    try:
        embedded.wait_healthy(server.url, timeout=30, process=process)
    except embedded.EmbeddedServerError:
        embedded.stop(process)
        raise
    return server


def prepare(server: Running) -> None:
    """A database `hazards` with a design document, and the non-admin user bob."""
    assert server.admin("PUT", "hazards").status_code == 201
    design = {
        "filters": {"f": "function (doc, req) { return true; }"},
        "views": {"v": {"map": "function (doc) { emit(doc._id, null); }"}},
        "rewrites": [
            {"from": "config", "to": "../../../_config"},
            {"from": "node-config", "to": f"../../../{NODE}/_config"},
        ],
    }
    assert server.admin("PUT", "hazards/_design/app", json=design).status_code == 201
    assert server.admin("PUT", "hazards/keep", json={"kept": True}).status_code == 201
    user = {"_id": f"org.couchdb.user:{USER[0]}", "name": USER[0], "password": USER[1]}
    user.update(type="user", roles=[])
    assert server.admin("PUT", f"_users/{user['_id']}", json=user).status_code == 201


@pytest.fixture(scope="module")
def party(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """The default embedded server: no admin ("admin party")."""
    server = start_server(tmp_path_factory.mktemp("party"))
    try:
        prepare(server)
        yield server
    finally:
        embedded.stop(server.process)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """An embedded server started with a pre-seeded server admin."""
    server = start_server(tmp_path_factory.mktemp("locked"), admin=ADMIN)
    try:
        prepare(server)
        yield server
    finally:
        embedded.stop(server.process)


def assert_healthy(server: Running) -> None:
    """`GET /` and a database round trip answer within HEALTH_WITHIN; nothing went wrong."""
    deadline = time.monotonic() + HEALTH_WITHIN

    def remaining() -> float:
        left = deadline - time.monotonic()
        assert left > 0, f"the server did not answer within {HEALTH_WITHIN}s"
        return left

    assert server.process.poll() is None, f"the server exited:\n{server.log()[-3000:]}"
    name = f"probe-{uuid.uuid4().hex[:10]}"
    try:
        with requests.Session() as session:
            session.auth = server.auth
            root = session.get(server.url, timeout=remaining())
            assert root.status_code == 200
            assert session.put(server.url + name, timeout=remaining()).status_code == 201
            doc = session.put(f"{server.url}{name}/doc", json={"n": name}, timeout=remaining())
            assert doc.status_code == 201
            back = session.get(f"{server.url}{name}/doc", timeout=remaining())
            assert back.status_code == 200
            assert back.json()["n"] == name
            kept = session.get(server.url + "hazards/keep", timeout=remaining())
            assert kept.status_code == 200
            assert kept.json()["kept"] is True
            session.delete(server.url + name, timeout=remaining())
    except requests.RequestException as exc:
        pytest.fail(f"the server did not answer: {exc!r}\n{server.log()[-3000:]}")
    assert server.process.poll() is None, f"the server exited:\n{server.log()[-3000:]}"
    log = server.log()
    assert "UnhandledPromiseRejection" not in log, log[-3000:]
    assert "after-embedded-guard: fatal" not in log, log[-3000:]


def assert_json_error(response: requests.Response, statuses: set[int]) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body.get("error"), str), body
    return body


# -- _changes with filters PouchDB Server cannot serve ------------------------------------------

CHANGES_TRIGGERS = [
    pytest.param("GET", "filter=nosuchddoc/f", {404}, id="unknown-design-doc"),
    pytest.param("GET", "filter=app/nosuch", {404}, id="unknown-filter"),
    pytest.param("GET", "filter=_selector", {400}, id="selector-get"),
    pytest.param("POST", "filter=_selector", {400}, id="selector-post"),
    pytest.param("GET", "filter=_design", {400}, id="design"),
    pytest.param("GET", "filter=_view", {400}, id="view-without-view"),
    pytest.param("GET", "filter=_view&view=app/nosuch", {404}, id="view-missing"),
    pytest.param("GET", "filter=_view&view=nosuchddoc/v", {404}, id="view-missing-ddoc"),
    pytest.param("GET", "filter=justname", {400}, id="justname"),
    pytest.param("GET", "filter=42", {400}, id="filter-not-a-string"),
    pytest.param("GET", "feed=longpoll&filter=nosuchddoc/f", {404}, id="longpoll-unknown"),
    pytest.param("GET", "feed=continuous&filter=nosuchddoc/f", {404}, id="continuous-unknown"),
]


@pytest.mark.parametrize(("method", "query", "statuses"), CHANGES_TRIGGERS)
def test_changes_with_a_filter_it_cannot_serve_is_refused_and_survived(
    party: Running, method: str, query: str, statuses: set[int]
) -> None:
    body = {"selector": {"kept": True}} if method == "POST" else None
    response = party.request(method, f"hazards/_changes?{query}", json=body)
    assert_json_error(response, statuses)
    assert_healthy(party)


@pytest.mark.parametrize(
    "query",
    ["filter=app/f", "filter=_view&view=app/v", "filter=_doc_ids&doc_ids=%5B%22keep%22%5D"],
)
def test_changes_filters_that_work_are_still_served(party: Running, query: str) -> None:
    response = party.request("GET", f"hazards/_changes?{query}")
    assert response.status_code == 200, response.text
    assert "keep" in {row["id"] for row in response.json()["results"]}
    assert_healthy(party)


# -- _replicate with an unreachable end -------------------------------------------------------


@pytest.mark.parametrize("unreachable", ["source", "target"])
@pytest.mark.parametrize("continuous", [False, True], ids=["one-shot", "continuous"])
def test_replicate_with_an_unreachable_end_is_survived(
    party: Running, unreachable: str, continuous: bool
) -> None:
    nowhere = f"http://127.0.0.1:{embedded.free_port()}/nowhere"  # nothing listens there
    body: dict[str, Any] = {"source": "hazards", "target": "hazards", "continuous": continuous}
    body[unreachable] = nowhere
    response = party.request("POST", "_replicate", json=body)
    if continuous:
        assert response.status_code == 200  # answered at once; the failure comes later
    else:
        assert_json_error(response, {500, 502, 503, 404})
    assert_healthy(party)


# -- non-admins creating and deleting databases ------------------------------------------------


def test_non_admin_put_db_is_refused_in_admin_party_and_survived(party: Running) -> None:
    assert_json_error(party.request("PUT", "bobs-db", auth=USER), {401, 403})
    assert party.request("GET", "bobs-db").status_code == 404
    assert_healthy(party)


def test_non_admin_delete_db_is_refused_and_does_not_wedge(party: Running) -> None:
    for _ in range(2):
        assert_json_error(party.request("DELETE", "hazards", auth=USER), {401, 403})
    assert party.request("GET", "hazards").status_code == 200
    # the wedge: afterwards every request that opens a database hung
    assert_json_error(party.request("PUT", "bobs-db", auth=USER), {401, 403})
    assert_healthy(party)


def test_log_with_bad_parameters_is_refused_and_survived(party: Running) -> None:
    for query in ("bytes=abc", "bytes=-5", "offset=1.5"):
        assert_json_error(party.request("GET", f"_log?{query}"), {400})
    assert party.request("GET", "_log?bytes=100").status_code == 200
    assert_healthy(party)


# -- /_node/node1@127.0.0.1/...: authorisation ran before the prefix was stripped ---------------


@pytest.mark.parametrize(
    "path",
    [
        f"{NODE}/_config",
        f"{NODE}/_config/couch_httpd_auth/secret",
        f"{NODE}/_config/admins",
        "_node/node1%40127.0.0.1/_config",
        "_NODE/node1@127.0.0.1/_config",
    ],
)
def test_config_through_node_prefix_cannot_be_read_anonymously(party: Running, path: str) -> None:
    response = party.request("GET", path)
    assert response.status_code in {401, 403, 404}, response.text
    assert "couch_httpd_auth" not in response.text
    assert party.request("GET", "_config/couch_httpd_auth/secret").status_code == 200
    secret = party.request("GET", "_config/couch_httpd_auth/secret").json()
    assert secret not in response.text
    assert_healthy(party)


def test_config_write_through_node_prefix_creates_no_admin(party: Running) -> None:
    response = party.request("PUT", f"{NODE}/_config/admins/evil", data='"evil-password"')
    assert response.status_code in {401, 403, 404}, response.text
    # still admin party: no server admin was created
    assert party.request("GET", "_config/admins").json() == {}
    assert party.request("GET", "_session").json()["userCtx"]["roles"] == ["_admin"]
    refused = party.request("GET", "_session", auth=("evil", "evil-password"))
    assert refused.status_code == 401
    assert "evil" not in (party.data_dir / "config.json").read_text()
    assert_healthy(party)


# -- validate_doc_update: compiled once per design-document revision (a speed patch) --------


def forbid(field: str) -> str:
    return f"function (doc) {{ if (doc.{field}) {{ throw({{forbidden: 'no {field} here'}}); }} }}"


def test_validation_follows_every_change_of_the_design_documents(party: Running) -> None:
    """The guard keeps compiled validate functions while the design docs stay the same:
    each new, changed or deleted design document applies from the next write."""
    db = f"validated-{uuid.uuid4().hex[:8]}"
    assert party.admin("PUT", db).status_code == 201

    def write(field: str) -> requests.Response:
        return party.request("POST", db, json={field: True})

    first = party.admin("PUT", f"{db}/_design/first", json={"validate_doc_update": forbid("a")})
    assert first.status_code == 201
    assert write("a").status_code == 403 and write("a").json()["reason"] == "no a here"
    assert write("b").status_code == 201
    # the documents of one request share one reading of the design documents
    docs = [{"_id": f"{field}{i}", field: 1} for i in range(3) for field in "ab"]
    bulk = party.request("POST", f"{db}/_bulk_docs", json={"docs": docs})
    assert bulk.status_code == 201  # (PouchDB Server lists the refused ones first)
    refused = {row["id"]: row.get("error") for row in bulk.json()}
    assert refused == {doc["_id"]: "forbidden" if "a" in doc else None for doc in docs}

    changed = {"_rev": first.json()["rev"], "validate_doc_update": forbid("b")}
    assert party.admin("PUT", f"{db}/_design/first", json=changed).status_code == 201
    assert write("a").status_code == 201
    assert write("b").status_code == 403

    second = party.admin("PUT", f"{db}/_design/second", json={"validate_doc_update": forbid("c")})
    assert second.status_code == 201
    assert write("c").status_code == 403 and write("b").status_code == 403

    gone = party.admin("DELETE", f"{db}/_design/second?rev={second.json()['rev']}")
    assert gone.status_code == 200
    assert write("c").status_code == 201 and write("b").status_code == 403
    assert party.admin("DELETE", db).status_code == 200
    assert_healthy(party)


class FeedReader(threading.Thread):
    """A continuous changes feed read in raw HTTP chunks until the document `end` arrives
    or the reader closes it."""

    def __init__(self, server: Running, db: str, query: str, heartbeat: int = 1000) -> None:
        super().__init__(daemon=True)
        # the server sends the headers with the first change or heartbeat
        url = f"{server.url}{db}/_changes?feed=continuous&heartbeat={heartbeat}&{query}"
        self.response = requests.get(
            url, stream=True, timeout=20, headers={"Accept-Encoding": "identity"}
        )
        self.chunks = 0
        self.changes: list[dict[str, Any]] = []
        self.closed = False
        self.start()

    def run(self) -> None:
        buffer = b""
        try:
            for chunk in self.response.raw.read_chunked(decode_content=False):
                self.chunks += 1
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in filter(None, (line.strip() for line in lines)):
                    self.changes.append(json.loads(line))
                    if self.changes[-1]["id"] == "end":
                        return self.response.close()
        except Exception:
            if not self.closed:
                raise

    def close(self) -> None:
        """Go away, as a client that closes its connection."""
        self.closed = True
        self.response.close()

    def last_of_each(self) -> dict[str, dict[str, Any]]:
        return {change["id"]: change for change in self.changes}


def test_continuous_feeds_bring_each_document_as_it_ends_up(party: Running) -> None:
    """The guard shares metadata reads between feeds, moves a filtered feed past the
    changes its filter left out, and writes the changes of one moment together: each
    feed still brings every document in its latest revision, conflicts and deletions
    included, in sequence order, and only what its filter lets through."""
    db = f"feeds-{uuid.uuid4().hex[:8]}"
    assert party.admin("PUT", db).status_code == 201
    even = "function (doc, req) { return doc.n % 2 === 0; }"
    design = {"filters": {"even": even}}
    assert party.admin("PUT", f"{db}/_design/app", json=design).status_code == 201
    query = "filter=app/even&include_docs=true&conflicts=true"
    filtered = [FeedReader(party, db, query), FeedReader(party, db, query)]
    everything = FeedReader(party, db, "include_docs=true&conflicts=true")
    time.sleep(0.5)  # the feeds are open

    docs = [{"_id": f"doc{i:02d}", "n": i} for i in range(40)]
    for _ in range(30):  # each document changes often, mostly while the feeds read
        rows = party.request("POST", f"{db}/_bulk_docs", json={"docs": docs}).json()
        docs = [
            {**doc, "_rev": row["rev"], "n": doc["n"] + 1}
            for doc, row in zip(docs, rows, strict=True)
        ]
    loser = {"_id": "doc00", "_rev": "31-" + "f" * 32, "n": 1000}  # as a replication brings
    conflict = {"docs": [loser], "new_edits": False}
    assert party.request("POST", f"{db}/_bulk_docs", json=conflict).status_code == 201
    gone = docs[1]
    assert party.request("DELETE", f"{db}/{gone['_id']}?rev={gone['_rev']}").status_code == 200
    assert party.request("PUT", f"{db}/end", json={"n": 0}).status_code == 201

    for reader in [*filtered, everything]:
        reader.join(timeout=20)
        assert not reader.is_alive(), "a feed did not bring the last document"
        seqs = [change["seq"] for change in reader.changes]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert reader.chunks < len(reader.changes)  # several changes to a chunk
    final = party.request("GET", f"{db}/_all_docs?include_docs=true&conflicts=true").json()
    latest = {row["id"]: row["doc"] for row in final["rows"] if not row["id"].startswith("_")}
    assert latest["doc00"]["_conflicts"]  # the conflict is there to be seen

    seen = everything.last_of_each()
    assert seen[gone["_id"]].get("deleted") is True
    assert {doc_id: seen[doc_id]["doc"] for doc_id in latest} == latest
    for reader in filtered:
        assert all(change["doc"]["n"] % 2 == 0 for change in reader.changes)
        last = reader.last_of_each()
        passing = {doc_id: doc for doc_id, doc in latest.items() if doc["n"] % 2 == 0}
        assert {doc_id: last[doc_id]["doc"] for doc_id in passing} == passing
    assert party.admin("DELETE", db).status_code == 200
    assert_healthy(party)


def test_a_continuous_feed_stops_when_its_client_goes(party: Running) -> None:
    """PouchDB Server went on serving a continuous feed after its client had gone, for
    nobody, until the server stopped: with a filter that takes 50 ms a document, each
    write then cost 50 ms for every feed ever closed. Here 8 closed feeds must cost
    nothing: a new feed sees 5 new documents in about 5 x 50 ms, not 45 x 50 ms."""
    db = f"closed-{uuid.uuid4().hex[:8]}"
    assert party.admin("PUT", db).status_code == 201
    slow = (
        "function (doc, req) { var end = Date.now() + 50; while (Date.now() < end) {} return 1; }"
    )
    design = {"filters": {"slow": slow}}
    assert party.admin("PUT", f"{db}/_design/app", json=design).status_code == 201
    query = "filter=app/slow&since=now"
    for reader in [FeedReader(party, db, query, heartbeat=100) for _ in range(8)]:
        reader.close()
    time.sleep(0.5)  # the server has seen them go
    fresh = FeedReader(party, db, query, heartbeat=100)
    began = time.monotonic()
    docs = [{"_id": f"doc{i}"} for i in range(4)] + [{"_id": "end"}]
    assert party.request("POST", f"{db}/_bulk_docs", json={"docs": docs}).status_code == 201
    fresh.join(timeout=10)
    took = time.monotonic() - began
    assert [change["id"] for change in fresh.changes] == [doc["_id"] for doc in docs]
    assert took < 1.2, f"the new feed waited {took:.2f} s: the closed feeds are still served"
    assert party.admin("DELETE", db).status_code == 200
    assert_healthy(party)


def test_a_refused_write_leaves_no_revision_behind_for_the_next_write_of_the_document(
    party: Running,
) -> None:
    """One `_bulk_docs` request, two writes of a conflicted document: an update of the
    revision that is no longer a leaf (refused, 409), then the deletion of the
    conflict's loser (accepted). This is what a worker resolving a conflict sends
    when a replica's update came first. The refused revision must not end up in
    the tree as a leaf without a body (left there by PouchDB Server's adapter, it
    was a conflict nobody could resolve and, once it won, crashed every feed)."""
    db = f"refused-{uuid.uuid4().hex[:8]}"
    assert party.admin("PUT", db).status_code == 201
    ids = [f"doc{i}" for i in range(10)]  # some refused revisions would win, some lose
    for doc_id in ids:
        first = party.request("PUT", f"{db}/{doc_id}", json={"v": 0}).json()["rev"]
        branches = [
            {"_id": doc_id, "_rev": f"2-{side * 32}", "v": side,
             "_revisions": {"start": 2, "ids": [side * 32, first.split("-")[1]]}}
            for side in "ab"
        ]  # fmt: skip
        replicated = {"docs": branches, "new_edits": False}
        assert party.request("POST", f"{db}/_bulk_docs", json=replicated).status_code == 201
        winner = party.request("GET", f"{db}/{doc_id}").json()
        loser = next(b["_rev"] for b in branches if b["_rev"] != winner["_rev"])
        updated = party.request("PUT", f"{db}/{doc_id}", json={**winner, "v": "replica"})
        assert updated.status_code == 201
        stale = {**winner, "v": f"stale update of {doc_id}"}
        deletion = {"_id": doc_id, "_rev": loser, "_deleted": True}
        rows = party.request("POST", f"{db}/_bulk_docs", json={"docs": [stale, deletion]}).json()
        assert sorted(row.get("error", "ok") for row in rows) == ["conflict", "ok"], rows

        json_please = {"Accept": "application/json"}
        leaves = party.request("GET", f"{db}/{doc_id}?open_revs=all", headers=json_please)
        assert leaves.status_code == 200
        assert [leaf for leaf in leaves.json() if "missing" in leaf] == [], leaves.json()
        current = party.request("GET", f"{db}/{doc_id}?conflicts=true").json()
        assert current["v"] == "replica" and "_conflicts" not in current, current
    feed = party.request("GET", f"{db}/_changes?include_docs=true&conflicts=true").json()
    assert sorted(row["id"] for row in feed["results"]) == ids
    assert all(row["doc"]["v"] == "replica" for row in feed["results"])
    assert party.admin("DELETE", db).status_code == 200
    assert_healthy(party)


# -- a server with a pre-seeded admin ---------------------------------------------------------


def test_preseeded_admin_is_stored_hashed_and_ends_admin_party(locked: Running) -> None:
    config = json.loads((locked.data_dir / "config.json").read_text())
    assert config["admins"][ADMIN[0]].startswith("-pbkdf2-")
    assert ADMIN[1] not in (locked.data_dir / "config.json").read_text()
    assert locked.request("GET", "_session").json()["userCtx"] == {"name": None, "roles": []}
    session = locked.request("GET", "_session", auth=ADMIN).json()
    assert session["userCtx"] == {"name": ADMIN[0], "roles": ["_admin"]}
    assert locked.request("GET", "_session", auth=(ADMIN[0], "wrong")).status_code == 401


@pytest.mark.parametrize("who", [None, USER], ids=["anonymous", "non-admin"])
def test_put_db_by_non_admin_is_refused_and_survived(
    locked: Running, who: tuple[str, str] | None
) -> None:
    assert_json_error(locked.request("PUT", "newdb", auth=who), {401, 403})
    assert locked.admin("GET", "newdb").status_code == 404
    assert_healthy(locked)


@pytest.mark.parametrize("who", [None, USER], ids=["anonymous", "non-admin"])
def test_delete_db_by_non_admin_is_refused_and_does_not_wedge(
    locked: Running, who: tuple[str, str] | None
) -> None:
    for _ in range(2):
        assert_json_error(locked.request("DELETE", "hazards", auth=who), {401, 403})
    # the wedge made a later non-admin PUT /newdb never answer, and every
    # request that opens a database hang
    assert_json_error(locked.request("PUT", "newdb", auth=who), {401, 403})
    assert locked.request("GET", "hazards/keep", auth=who).status_code == 200
    assert_healthy(locked)


def test_config_is_for_admins_only_also_through_node_prefix_and_rewrites(locked: Running) -> None:
    assert_json_error(locked.request("GET", "_config"), {401, 403})
    assert_json_error(locked.request("GET", f"{NODE}/_config"), {401, 403, 404})
    assert_json_error(locked.request("GET", f"{NODE}/_config", auth=USER), {401, 403, 404})
    # a design-document rewrite to /_config ran after authorisation too
    leaked = locked.request("GET", "hazards/_design/app/_rewrite/config")
    assert_json_error(leaked, {401, 403, 404})
    assert "couch_httpd_auth" not in leaked.text
    assert_json_error(locked.request("GET", "hazards/_design/app/_rewrite/node-config"), {404})
    # a logged-in server admin still has the config API, Fauxton's path included
    assert locked.admin("GET", f"{NODE}/_config/admins").json().keys() == {ADMIN[0]}
    assert locked.admin("GET", "hazards/_design/app/_rewrite/config").status_code == 200
    assert_healthy(locked)


def test_config_write_through_node_prefix_creates_no_admin_when_locked(locked: Running) -> None:
    put = locked.request("PUT", f"{NODE}/_config/admins/evil", data='"evil-password"')
    assert put.status_code in {401, 403, 404}, put.text
    assert locked.admin("GET", "_config/admins").json().keys() == {ADMIN[0]}
    assert locked.request("GET", "_session", auth=("evil", "evil-password")).status_code == 401
    assert_healthy(locked)


# -- start-up refusals and exit codes a supervisor can act on -----------------------------------


def wait_exit(process: subprocess.Popen, timeout: float = 15.0) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        embedded.stop(process)
        pytest.fail(f"the server process did not exit within {timeout}s")


def real_package_dir(name: str) -> Path:
    server_dir = embedded.find_pouchdb_server().resolve().parent.parent
    return (server_dir.parent / name).resolve()


def test_refuses_to_start_on_another_pouchdb_server_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "node_modules" / "pouchdb-server"
    (fake / "bin").mkdir(parents=True)
    (fake / "package.json").write_text(json.dumps({"name": "pouchdb-server", "version": "4.1.0"}))
    (fake / "bin" / "pouchdb-server").write_text("console.log('must not run');\n")
    monkeypatch.setenv("AFTER_POUCHDB_SERVER", str(fake / "bin" / "pouchdb-server"))
    data = tmp_path / "data"
    process = embedded.start(embedded.free_port(), data, data / "server.log")
    assert wait_exit(process) == embedded.EXIT_REFUSED
    log = (data / "server.log").read_text()
    assert "refusing to start: pouchdb-server 4.1.0 is installed" in log
    assert "must not run" not in log
    with pytest.raises(embedded.EmbeddedServerError, match="refused to start"):
        embedded.wait_healthy("http://127.0.0.1:9/", timeout=5, process=process)


def test_refuses_to_start_when_a_patched_file_was_modified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = tmp_path / "node_modules"
    copy = modules / "pouchdb-server"
    shutil.copytree(real_package_dir("pouchdb-server"), copy)
    with open(copy / "lib" / "index.js", "a") as index:
        index.write("\n// locally modified\n")
    for package in ("express-pouchdb", "pouchdb-adapter-leveldb"):  # the patched ones' homes
        (modules / package).symlink_to(real_package_dir(package))
    monkeypatch.setenv("AFTER_POUCHDB_SERVER", str(copy / "bin" / "pouchdb-server"))
    data = tmp_path / "data"
    process = embedded.start(embedded.free_port(), data, data / "server.log")
    assert wait_exit(process) == embedded.EXIT_REFUSED
    log = (data / "server.log").read_text()
    assert "refusing to start" in log
    assert "differs from the published pouchdb-server 4.2.0" in log


def test_port_in_use_exits_with_its_own_code(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = embedded.start(port, tmp_path, tmp_path / "server.log")
        assert wait_exit(process) == embedded.EXIT_LISTEN
    assert "fatal: cannot listen (EADDRINUSE)" in (tmp_path / "server.log").read_text()


def test_guarded_server_logs_it_and_stops_cleanly(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    try:
        assert "--unhandled-rejections=warn" in server.process.args
        assert str(embedded.GUARD) in server.process.args
        assert "PouchDB Server 4.2.0 guarded" in server.log()
    finally:
        embedded.stop(server.process)
    assert server.process.returncode == 0
    assert "stopping on SIGTERM" in server.log()


# -- seeding the admin ---------------------------------------------------------------------------


def test_seed_admin_keeps_other_settings_and_a_matching_hash(tmp_path: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({"admins": {"other": "-pbkdf2-ab,cd,10"}, "log": {"x": 1}}))
    embedded.seed_admin(tmp_path, ADMIN)
    first = json.loads(config_path.read_text())
    assert first["log"] == {"x": 1}
    assert first["admins"]["other"] == "-pbkdf2-ab,cd,10"
    stored = first["admins"][ADMIN[0]]
    assert stored.startswith("-pbkdf2-")
    assert stored.endswith(f",{embedded.ADMIN_HASH_ITERATIONS}")
    embedded.seed_admin(tmp_path, ADMIN)
    assert json.loads(config_path.read_text())["admins"][ADMIN[0]] == stored
    embedded.seed_admin(tmp_path, (ADMIN[0], "a new password"))
    assert json.loads(config_path.read_text())["admins"][ADMIN[0]] != stored
