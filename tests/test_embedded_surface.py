"""Every route of the embedded server answers every request, and the server stays healthy.

Started plainly, PouchDB Server leaves some requests without an answer (the
connection stays open while the server serves others) or dies on them. This
module starts its own guarded servers, one in admin party and one locked (a
server admin; the database's `_security` admits After's roles), and sends each
route of the CouchDB API a deterministic sample of the cross product of
methods, bodies (empty, malformed, wrongly typed, deeply nested, not UTF-8,
10 MB, wrong content types) and parameters, as nobody, as a member, as a user
who is not a member, as the server admin and with broken credentials. Every
request must get an HTTP status within ANSWER_WITHIN seconds, a server error
must be JSON (an HTML page is an exception that escaped a route), and after the
requests to each route `GET /`, a database read and a write must answer in
time. A server that dies is restarted, so one run lists every failure.

Feeds that legitimately stay open (`_changes` continuous and longpoll) are sent
apart: they must send their headers at once.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests

from after import embedded
from after.couch import Database, Server
from after.push import compile_all, push
from after.security import security_object

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("AFTER_TEST_COUCHDB_URL")),
    reason="about the embedded PouchDB Server's HTTP surface; AFTER_TEST_COUCHDB_URL is set",
)

ANSWER_WITHIN = 2.0  # seconds for any answer, and for each request of a health check
DB = "surface"
HEALTH_DB = "surface-health"  # the write of each health check goes here
ADMIN = ("boss", "surface-Pa55")
MEMBER = ("carol", "carols-password")  # role after_client: a member of DB when locked
STRANGER = ("bob", "bobs-password")  # a user without roles
NODE = "_node/node1@127.0.0.1"
# A task as After's validate_doc_update accepts it.
TASK = {
    "worker": "manobi",
    "job": {"name": "echo", "arguments": []},
    "status": "waiting",
    "date": "2030-01-01T00:00:00.000Z",
}
ATTACHMENT = {"att.txt": {"content_type": "text/plain", "data": "aGk="}}
CONCURRENCY = 4  # requests in flight per server
PER_METHOD = 2  # variants sampled for each route and method (besides the sweeps below)
SEED = 31
BIG = 10 * 1024 * 1024

BODY_METHODS = ("POST", "PUT", "PATCH")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "COPY", "OPTIONS", "PATCH")


@dataclass(frozen=True)
class Body:
    label: str
    data: bytes
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def json_body(label: str, value: Any) -> Body:
    return Body(label, json.dumps(value).encode())


MULTIPART = b'--xx\r\nContent-Disposition: form-data; name="_rev"\r\n\r\n1-x\r\n--xx--\r\n'
RELATED = b"--xx\r\nContent-Type: application/json\r\n\r\nnot json\r\n--xx--\r\n"

BODIES: list[Body] = [
    Body("empty", b""),
    Body("null", b"null"),
    Body("[]", b"[]"),
    Body("{}", b"{}"),
    Body("number", b"42"),
    Body("string", b'"x"'),
    Body("true", b"true"),
    json_body("docs=1", {"docs": 1}),
    json_body("docs=mixed", {"docs": [1, None, "x", []]}),
    json_body("docs=[{}]", {"docs": [{}]}),
    json_body("docs=bad ids", {"docs": [{"_id": 1}, {"_id": ""}, {"_id": "_bad"}]}),
    json_body("docs=str", {"docs": "x"}),
    json_body("docs=obj", {"docs": {}}),
    json_body("docs+new_edits", {"docs": [{"_id": "x", "_rev": "x"}], "new_edits": "no"}),
    json_body("docs=revs", {"docs": [{"id": "doc1", "rev": 1}, {"id": 1}, {"rev": "1-x"}]}),
    json_body("keys=str", {"keys": "x"}),
    json_body("keys=[{}]", {"keys": [{}]}),
    json_body("keys=mixed", {"keys": [1, None, [], "doc1"]}),
    json_body("selector=1", {"selector": 1}),
    json_body("selector=op", {"selector": {"$foo": 1}, "fields": "x", "sort": 1, "limit": -1}),
    json_body("index=1", {"index": 1, "ddoc": 1, "type": "x"}),
    json_body("index=fields", {"index": {"fields": 1}}),
    json_body("revs_diff", {"doc1": 1, "x": ["1-x", 2], "y": {}}),
    json_body("_id=1", {"_id": 1, "_rev": 1}),
    json_body("_id=design", {"_id": "_design/x", "views": 1, "validate_doc_update": 1}),
    json_body("_deleted", {"_deleted": "yes", "_rev": "9-x"}),
    json_body("attachments", {"_attachments": {"a": {"data": 1, "content_type": 2}}}),
    json_body("attachment stub", {"_attachments": {"a": {"stub": True, "digest": 1}}}),
    json_body("_revisions", {"_revisions": {"start": "x", "ids": 1}}),
    json_body("replication", {"source": 1, "target": {}, "continuous": "x", "cancel": 1}),
    json_body("replication=self", {"source": DB, "target": DB, "doc_ids": "x"}),
    json_body("session", {"name": 1, "password": []}),
    json_body("security", {"admins": 1, "members": "x"}),
    json_body("security=names", {"admins": {"names": 1}, "members": {"roles": "x"}}),
    json_body("map", {"map": 1, "reduce": {}}),
    json_body("doc_ids", {"doc_ids": "x"}),
    json_body("__proto__", {"__proto__": {"_admin": True}, "constructor": 1}),
    Body("nested 999", nested(999)),
    Body("doc nested 990", b'{"docs": [{"_id": "deep", "a": ' + nested(990) + b"}]}"),
    Body("nested 50000", nested(50_000)),
    Body("invalid json", b'{"docs": [1,'),
    Body("single quotes", b"{'a': 1}"),
    Body("not utf-8", b'{"docs": [{"_id": "\xff\xfe"}]}'),
    Body("lone surrogate", b'{"docs": [{"_id": "\\udc80"}]}'),
    Body("gzip garbage", b"garbage", "application/json", (("Content-Encoding", "gzip"),)),
    Body("unknown encoding", b"{}", "application/json", (("Content-Encoding", "zz"),)),
    Body("json as text/plain", b'{"docs": []}', "text/plain"),
    Body("form", b"name=carol&password=x&docs=1", "application/x-www-form-urlencoded"),
    Body("multipart, no boundary", b"garbage", "multipart/form-data"),
    Body("multipart garbage", b"garbage", "multipart/form-data; boundary=xx"),
    Body("multipart form", MULTIPART, "multipart/form-data; boundary=xx"),
    Body("related garbage", b"garbage", "multipart/related"),
    Body("related, not json", RELATED, "multipart/related; boundary=xx"),
    Body("octets", bytes(range(256)), "application/octet-stream"),
    Body("no content type", b'{"docs": []}', None),
]
BIG_BODIES = [
    Body("10 MB json", b'{"pad": "' + b"a" * BIG + b'"}'),
    Body("10 MB docs", b'{"docs": [' + b",".join([b'{"n": 1}'] * (BIG // 9)) + b"]}"),
    Body("10 MB bytes", b"\x00" * BIG, "application/octet-stream"),
]

PARAMS = [
    "",
    "limit=-1",
    "limit=abc",
    "limit=1e400",
    "limit=99999999999999999999",
    "skip=-1&descending=maybe",
    "include_docs=1&conflicts=[]",
    "keys=x",
    "keys=%5B%7B%7D%5D",
    "key=%7B",
    "startkey=%5B&endkey=%FF",
    "key=" + "%5B" * 3000 + "%5D" * 3000,
    "rev=x",
    "rev=1-abc&revs=x&revs_info=1",
    "open_revs=x",
    "open_revs=all",
    "open_revs=%5B1%5D",
    "attachments=true&atts_since=x&latest=x",
    "reduce=x&group_level=-1&stale=x",
    "update_seq=x&inclusive_end=x&sorted=x",
    "batch=ok&new_edits=x&w=x",
    "n=0&q=0",
    "count=-5",
    "count=1e9",
    "count=abc",
    "bytes=abc&offset=-1",
    "feed=normal&since=abc&style=x",
    "feed=abc&since=-1&limit=0",
    "filter=x",
    "filter=_doc_ids&doc_ids=x",
    "filter=_view&view=after/by_status",
    "filter=after/worker&heartbeat=-1&timeout=-1",
    "a=1&a=2&a[b]=1",
    "limit[$gt]=1&key[x]=1",
    "%zz=1&=&__proto__[x]=1",
    "x=" + "a" * 8000,
]
CHANGES_PARAMS = [
    "feed=normal",
    "feed=abc",
    "feed=eventsource&since=now",
    "since=now",
    "since=abc",
    "since=-1",
    "since=1e400",
    "limit=-1",
    "limit=abc",
    "style=all_docs",
    "style=x",
    "include_docs=true&conflicts=true&attachments=true",
    "include_docs=x",
    "descending=true",
    "filter=after/worker",
    "filter=after/nosuch",
    "filter=nosuch/x",
    "filter=_doc_ids&doc_ids=x",
    "filter=_doc_ids&doc_ids=%5B1%5D",
    "filter=_view&view=after/by_status",
    "filter=_view&view=x",
    "filter=_selector",
    "filter=%5B%5D",
    "heartbeat=-1",
    "heartbeat=x",
    "timeout=-1",
    "seq_interval=x",
    "selector=1",
]
DELETE_PARAMS = ["", "rev=x", "rev=1-abc", "rev=%5B%5D", "batch=ok"]
DESTINATIONS = ["", "doc-copy", "http://elsewhere/db/x", "_design/x", "../x", "doc1?rev=1-x"]


def db_routes(db: str, views: list[str]) -> list[str]:
    ddoc = f"{db}/_design/after"
    paths = [
        *BULK_ROUTES,
        "_changes",
        "_index/_design/x/json/y",
        "_compact",
        "_compact/after",
        "_view_cleanup",
        "_security",
        "_revs_limit",
        "_ensure_full_commit",
        "_local/x",
        "_local_docs",
        "_design_docs",
        "_temp_view",
        "doc1",
        "doc1/att.txt",
        "nosuch",
        "nosuch/att.txt",
        "_design/nosuch/_view/x",
    ]
    design = [
        "",
        "/_info",
        *(f"/_view/{view}" for view in [*views, "nosuch"]),
        "/_show/x",
        "/_show/x/doc1",
        "/_list/x/by_status",
        "/_update/x",
        "/_update/x/doc1",
        "/index.html",
        "/_rewrite",
        "/_rewrite/index.html",
        "/_rewrite/..%2F..%2F..%2F_config",
    ]
    return [db, *(f"{db}/{path}" for path in paths), *(ddoc + path for path in design)]


# The routes that take a body of documents, keys or revisions: each gets every body from
# nobody (the hole of issue #31).
BULK_ROUTES = [
    "_all_docs",
    "_bulk_docs",
    "_bulk_get",
    "_revs_diff",
    "_missing_revs",
    "_purge",
    "_find",
    "_explain",
    "_index",
]
SERVER_ROUTES = [
    "",
    "_all_dbs",
    "_session",
    "_uuids",
    "_replicate",
    "_active_tasks",
    "_config",
    "_config/couchdb",
    "_config/after_surface/key",
    "_log",
    "_stats",
    "_db_updates",
    "_utils/",
    "_restart",
    "_membership",
    "_up",
    "_dbs_info",
    "_scheduler/jobs",
    "favicon.ico",
    f"{NODE}/_config",
    f"{NODE}/_config/after_surface/key",
    f"{NODE}/_stats",
    "_node/_local/_config",
    "_users",
    "_users/_all_docs",
    "_users/_bulk_docs",
    f"_users/org.couchdb.user:{MEMBER[0]}",
    "_replicator",
    "_replicator/_bulk_docs",
    "nosuchdb",
    "nosuchdb/_bulk_docs",
    "nosuchdb/doc",
]
# Only these get the 10 MB bodies (each costs a parse of 10 MB, and maybe a write).
BIG_ROUTES = ["_session", f"{DB}/_bulk_docs", f"{DB}/_bulk_get", f"{DB}/_all_docs", f"{DB}/doc1"]


@dataclass(frozen=True)
class Probe:
    """One request: who sends it, how, where, with what."""

    principal: str
    method: str
    path: str
    query: str = ""
    body: Body | None = None
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        query = f"?{self.query[:60]}" if self.query else ""
        body = f" body {self.body.label!r} ({self.body.content_type})" if self.body else ""
        headers = "".join(f" {name}: {value!r}" for name, value in self.headers)
        return f"{self.principal} {self.method} /{self.path}{query}{body}{headers}"


@dataclass
class Running:
    name: str
    port: int
    data_dir: Path
    admin: tuple[str, str] | None
    process: subprocess.Popen
    principals: dict[str, dict[str, Any]]
    state: dict[str, bytes] = field(default_factory=dict)  # what restore() left

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin_request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", ANSWER_WITHIN)
        return requests.request(method, self.url + path, auth=self.admin, **kwargs)

    def start(self) -> None:
        self.process = embedded.start(self.port, self.data_dir, self.log_path, admin=self.admin)
        embedded.wait_healthy(self.url, timeout=30, process=self.process)

    def restart(self) -> None:
        """After a crash or a wedge: the failure is recorded, the next routes still run."""
        embedded.stop(self.process)
        self.start()
        restore(self)


def principals_of(admin: tuple[str, str] | None) -> dict[str, dict[str, Any]]:
    principals: dict[str, dict[str, Any]] = {
        "anonymous": {},
        "member": {"auth": MEMBER},
        "stranger": {"auth": STRANGER},
        "wrong-password": {"auth": (MEMBER[0], "wrong")},
        "bad-cookie": {"headers": {"Cookie": "AuthSession=Z2FyYmFnZQ"}},
        "bad-authorization": {"headers": {"Authorization": "Basic !!!"}},
    }
    if admin:
        principals["admin"] = {"auth": admin}
    return principals


def start_server(name: str, data_dir: Path, admin: tuple[str, str] | None) -> Running:
    port = embedded.free_port()
    log_path = data_dir / "server.log"
    process = embedded.start(port, data_dir, log_path, admin=admin)
    server = Running(name, port, data_dir, admin, process, principals_of(admin))
    try:
        embedded.wait_healthy(server.url, timeout=30, process=process)
        restore(server)
    except BaseException:
        embedded.stop(process)
        raise
    return server


@cache
def after_views() -> list[str]:
    return sorted(next(doc for doc in compile_all() if doc["_id"] == "_design/after")["views"])


def admin_session(server: Running) -> requests.Session:
    http = requests.Session()
    http.auth = server.admin
    http.trust_env = False  # loopback: no proxy, no .netrc credentials
    return http


def fingerprint(server: Running) -> dict[str, bytes]:
    """What the probes may change, as the server sends it (not decoded: a probe may have
    stored JSON deeper than Python's json reads)."""
    keys = json.dumps(["_design/after", "doc1", "doc2"])
    users = json.dumps([f"org.couchdb.user:{user}" for user in (MEMBER[0], STRANGER[0])])
    reads = [
        (f"{DB}/_all_docs", {"keys": keys}),
        (f"{DB}/_local/x", {}),
        (f"{DB}/_security", {}),
        ("_users/_all_docs", {"keys": users}),
        (HEALTH_DB, {}),
        ("_config/admins", {}),
    ]
    with admin_session(server) as http:
        answers = {
            path: http.get(server.url + path, params=params, timeout=ANSWER_WITHIN)
            for path, params in reads
        }
    return {
        path: TOTAL_ROWS.sub(b"", answer.content) if answer.status_code == 200 else b"missing"
        for path, answer in answers.items()
        if path != HEALTH_DB or answer.status_code != 200  # its document count changes
    }


TOTAL_ROWS = re.compile(rb'"total_rows":\d+,?')


def restore(server: Running) -> None:
    """Put back what the probes changed (the databases, After's design document, the
    documents, `_security`, the users) when any of it differs from the last time."""
    if server.state and fingerprint(server) == server.state:
        return
    url = server.url
    users = {MEMBER: ["after_client"], STRANGER: []}
    with admin_session(server) as http:

        def call(method: str, path: str, doc: Any = None) -> requests.Response:
            return http.request(method, url + path, json=doc, timeout=5 * ANSWER_WITHIN)

        for name in (DB, HEALTH_DB):
            call("PUT", name)  # 412 if it exists
        # PouchDB Server deletes the current revision when none is given
        for path in ("_design/after", "doc1", "doc2", "_local/x"):
            call("DELETE", f"{DB}/{path}")
        for name, _ in users:
            call("DELETE", f"_users/org.couchdb.user:{name}")
        couch = Server(url, server.admin, timeout=5 * ANSWER_WITHIN)
        push(Database(couch, DB), warm=False)
        couch.session.close()
        for path, doc in [
            ("doc1", {**TASK, "_attachments": ATTACHMENT}),
            ("doc2", {**TASK, "_attachments": ATTACHMENT}),
            ("_local/x", {"n": 1}),
            ("_security", security_object() if server.admin else {}),
        ]:
            call("PUT", f"{DB}/{path}", doc).raise_for_status()
        for (name, password), roles in users.items():
            user = {"name": name, "password": password, "roles": roles, "type": "user"}
            call("PUT", f"_users/org.couchdb.user:{name}", user).raise_for_status()
    server.state = fingerprint(server)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Running]]:
    """An admin-party server and a locked one, started side by side."""
    setups = {"party": None, "locked": ADMIN}
    started: dict[str, Running] = {}
    errors = []
    with ThreadPoolExecutor(2) as pool:
        futures = {
            name: pool.submit(start_server, name, tmp_path_factory.mktemp(name), admin)
            for name, admin in setups.items()
        }
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except Exception as exc:
                errors.append(f"{name}: {exc!r}")
    try:
        if errors:
            pytest.fail("could not start the servers: " + "; ".join(errors))
        yield started
    finally:
        for server in started.values():
            embedded.stop(server.process)


# -- the requests ---------------------------------------------------------------------------


def variants(route: str, method: str) -> list[Probe]:
    """The requests of one route and method, for any principal."""
    if method == "OPTIONS":
        return [Probe("", method, route)]
    if method == "COPY":
        return [
            Probe("", method, route, headers=(("Destination", dest),) if dest else ())
            for dest in DESTINATIONS
        ]
    if method in BODY_METHODS:
        return [Probe("", method, route, body=body) for body in BODIES]
    if method == "DELETE":
        params = DELETE_PARAMS
    else:
        params = CHANGES_PARAMS if route.endswith("/_changes") else PARAMS
    return [Probe("", method, route, query=query) for query in params]


def as_principal(probe: Probe, principal: str) -> Probe:
    return Probe(principal, probe.method, probe.path, probe.query, probe.body, probe.headers)


def probes_of(server: Running) -> dict[str, list[Probe]]:
    """Route -> its probes, a deterministic sample of the cross product of routes,
    methods, bodies or parameters and principals:

    - for each route and method, PER_METHOD variants, their principals in turn;
    - the bulk routes of the database get every body by POST from nobody;
    - the big routes get each 10 MB body once.
    """
    rng = random.Random(f"{SEED}-{server.name}")
    principals = sorted(server.principals)
    routes = SERVER_ROUTES + db_routes(DB, after_views())
    chosen: dict[str, list[Probe]] = {route: [] for route in routes}
    turn = rng.randrange(len(principals))
    for route in routes:
        for method in METHODS:
            sample = variants(route, method)
            rng.shuffle(sample)
            for probe in sample[:PER_METHOD]:
                turn += 1
                chosen[route].append(as_principal(probe, principals[turn % len(principals)]))
    for route in BULK_ROUTES:
        path = f"{DB}/{route}"
        chosen[path] += [Probe("anonymous", "POST", path, body=body) for body in BODIES]
    for route in BIG_ROUTES:
        for body in BIG_BODIES:
            turn += 1
            method = "PUT" if route.endswith("doc1") else "POST"
            chosen[route].append(
                Probe(principals[turn % len(principals)], method, route, body=body)
            )
    # duplicates (a sweep may repeat a sampled probe) are sent once
    return {route: list(dict.fromkeys(probes)) for route, probes in chosen.items()}


# -- sending ----------------------------------------------------------------------------------

_local = threading.local()


def session() -> requests.Session:
    if not hasattr(_local, "session"):
        _local.session = requests.Session()
        _local.session.trust_env = False  # loopback: no proxy, no .netrc credentials
    return _local.session


def send(server: Running, probe: Probe) -> str | None:
    """None if the probe got a proper answer in time, else what went wrong."""
    http = session()
    http.cookies.clear()  # each probe is its principal's only
    options = dict(server.principals[probe.principal])
    headers = {"Accept-Encoding": "identity", **options.pop("headers", {})}  # less to do
    headers.update(probe.headers)
    data = None
    if probe.body is not None:
        data = probe.body.data
        headers.update(probe.body.headers)
        if probe.body.content_type:
            headers["Content-Type"] = probe.body.content_type
    url = server.url + probe.path + (f"?{probe.query}" if probe.query else "")
    began = time.monotonic()
    try:
        with http.request(
            probe.method,
            url,
            data=data,
            headers=headers,
            timeout=ANSWER_WITHIN,
            stream=True,
            allow_redirects=False,
            **options,
        ) as response:
            content = b""
            for chunk in response.iter_content(65536):
                content += chunk[: 65536 - len(content)]
                if time.monotonic() - began > 2 * ANSWER_WITHIN:
                    return f"{response.status_code}, but the body did not end in time"
    except requests.Timeout:
        return f"no answer within {ANSWER_WITHIN:g} s"
    except requests.RequestException as exc:
        return f"no answer: {type(exc).__name__}: {str(exc)[:150]}"
    return problem_of(probe, response, content)


def problem_of(probe: Probe, response: requests.Response, content: bytes) -> str | None:
    """A server error must be JSON: an HTML page means an exception escaped a route."""
    if response.status_code < 500 or (probe.method == "HEAD" and not content):
        return None
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return None
    return f"{response.status_code} that is not a JSON error: {content[:120]!r}"


def fatal_line(server: Running) -> str:
    fatal = [line for line in server.log().splitlines() if "fatal" in line]
    return fatal[-1][:300] if fatal else "no fatal line in its log"


def health_problem(server: Running) -> str | None:
    """`GET /`, a database read and a write, each within ANSWER_WITHIN (a wedged
    PouchDB Server still answers `GET /` while database requests hang)."""
    if server.process.poll() is not None:
        reason = embedded.exit_reason(server.process.returncode)
        return f"the server exited ({reason}): {fatal_line(server)}"
    checks = [
        ("GET", "", None, 200),
        ("GET", DB, None, 200),
        ("PUT", f"{HEALTH_DB}/{uuid.uuid4().hex}", {"ok": True}, 201),
    ]
    for method, path, body, status in checks:
        try:
            answer = server.admin_request(method, path, json=body)
        except requests.RequestException as exc:
            return f"{method} /{path} got no answer ({type(exc).__name__})"
        if answer.status_code != status:
            return f"{method} /{path} answered {answer.status_code}: {answer.text[:150]}"
    return None


def died(server: Running, problems: dict[Probe, str | None]) -> bool:
    """Whether the server has exited; after refused or reset connections, give it a moment."""
    if not any(problem and problem.startswith("no answer:") for problem in problems.values()):
        return server.process.poll() is not None
    try:
        server.process.wait(1)  # refused connections: it may be on its way out
    except subprocess.TimeoutExpired:
        return False
    return True


def run_route(
    server: Running, send_all: Callable[[list[Probe]], list[str | None]], probes: list[Probe]
) -> list[str]:
    """Send one route's probes, then check the server; the failures found."""
    problems = dict(zip(probes, send_all(probes), strict=True))
    # Sent again alone, a request that timed out while the others kept the server
    # busy must answer in time too (one that hangs never does).
    for probe, problem in problems.items():
        if problem and problem.startswith("no answer within") and server.process.poll() is None:
            problems[probe] = send(server, probe)
    if died(server, problems):
        # Requests in flight and after failed with it: send each of those again,
        # alone, to name the ones that kill it.
        suspects = [probe for probe, problem in problems.items() if problem]
        server.restart()
        for probe in suspects:
            problems[probe] = send(server, probe)
            if server.process.poll() is not None or died(server, {probe: problems[probe]}):
                problems[probe] = f"the server died on it: {fatal_line(server)}"
                server.restart()
    failures = [
        f"{server.name}: {probe}: {problem}" for probe, problem in problems.items() if problem
    ]
    try:
        restore(server)
    except Exception as exc:
        failures.append(f"{server.name}: could not restore the state: {exc!r}")
    # a second look: a wedge stays, a moment of load passes
    problem = health_problem(server) and health_problem(server)
    if problem:
        failures.append(
            f"{server.name}: unhealthy after the requests to /{probes[0].path}: {problem}"
        )
        server.restart()
    return failures


def run_surface(server: Running) -> tuple[int, list[str]]:
    sent = 0
    failures: list[str] = []
    with ThreadPoolExecutor(CONCURRENCY) as pool:

        def send_all(probes: list[Probe]) -> list[str | None]:
            return list(pool.map(lambda probe: send(server, probe), probes))

        for probes in probes_of(server).values():
            sent += len(probes)
            failures += run_route(server, send_all, probes)
    return sent, failures


def test_every_route_answers_every_request_in_time(servers: dict[str, Running]) -> None:
    began = time.monotonic()
    with ThreadPoolExecutor(len(servers)) as pool:
        results = dict(zip(servers, pool.map(run_surface, servers.values()), strict=True))
    took = time.monotonic() - began
    sent = sum(count for count, _ in results.values())
    failures = [failure for _, found in results.values() for failure in found]
    print(f"\n{sent} requests in {took:.1f} s, {len(failures)} failures")
    assert not failures, f"{len(failures)} of {sent} requests failed:\n" + "\n".join(failures)


# -- feeds that stay open ----------------------------------------------------------------------

# (query, what is expected): "open" feeds must send their headers (200) at once and
# stay open; the others must be refused at once.
FEEDS = [
    ("feed=continuous&since=now&timeout=300", "open"),
    ("feed=continuous&since=now&timeout=300&heartbeat=100", "beats"),
    ("feed=continuous&since=0&timeout=300&include_docs=true&conflicts=true", "open"),
    ("feed=continuous&since=now&timeout=300&filter=after/worker&worker=manobi", "open"),
    ("feed=continuous&since=now&timeout=300&filter=_view&view=after/by_status", "open"),
    ("feed=continuous&since=now&timeout=300&filter=_doc_ids&doc_ids=%5B%22doc1%22%5D", "open"),
    ("feed=longpoll&since=now&timeout=300", "open"),
    ("feed=longpoll&since=now&timeout=300&heartbeat=100", "beats"),
    ("feed=longpoll&since=0&timeout=300&style=all_docs", "open"),
    ("feed=eventsource&since=now&timeout=300", "open"),
    ("feed=continuous&timeout=300&heartbeat=0", "refused"),
    ("feed=continuous&timeout=300&heartbeat=-1", "refused"),
    ("feed=continuous&timeout=300&heartbeat=1e10", "refused"),
    ("feed=longpoll&timeout=300&heartbeat=x", "refused"),
    ("feed=continuous&timeout=300&filter=nosuch/x", "refused"),
    ("feed=continuous&timeout=300&filter=after/nosuch", "refused"),
    ("feed=continuous&timeout=300&filter=_view&view=after/nosuch", "refused"),
    ("feed=continuous&timeout=300&filter=_selector", "refused"),
]


def open_feed(server: Running, who: str, method: str, query: str, expected: str) -> str | None:
    """None if the feed behaved as `expected`, else what it did."""
    options = dict(server.principals[who])
    headers = options.pop("headers", {})  # gzip is accepted: a feed must not be held back by it
    began = time.monotonic()
    try:
        with requests.request(
            method,
            f"{server.url}{DB}/_changes?{query}",
            json={} if method == "POST" else None,
            headers=headers,
            stream=True,
            timeout=ANSWER_WITHIN,
            **options,
        ) as response:
            status = response.status_code
            if status != 200:
                # refused as expected, or a reader who may not read the database
                allowed = expected == "refused" or (who != "admin" and status in (401, 403))
                error = response.json().get("error") if status >= 400 else None
                return None if allowed and isinstance(error, str) else f"answered {status}"
            if expected == "refused":
                return "answered 200"
            if expected == "beats":
                # the feed's first bytes or a heartbeat, at once and not held in a compressor
                first = response.raw.read(1)
                late = time.monotonic() - began > ANSWER_WITHIN
                if first not in (b"\n", b"{") or late or "Content-Encoding" in response.headers:
                    return f"nothing readable in time (got {first!r})"
    except (requests.RequestException, ValueError) as exc:
        return f"no answer within {ANSWER_WITHIN:g} s ({type(exc).__name__})"
    return None


def test_feeds_that_stay_open_send_their_headers_at_once(servers: dict[str, Running]) -> None:
    probes = [
        (server, principal, method, query, expected)
        for server in servers.values()
        for principal in ("anonymous", "member", "stranger", "admin")
        if principal in server.principals
        for method in ("GET", "POST")
        for query, expected in FEEDS
    ]
    with ThreadPoolExecutor(16) as pool:
        problems = list(pool.map(lambda probe: open_feed(*probe), probes))
    failures = [
        f"{server.name}: {principal} {method} /{DB}/_changes?{query}: {problem}"
        for (server, principal, method, query, _), problem in zip(probes, problems, strict=True)
        if problem
    ]
    for server in servers.values():
        problem = health_problem(server)
        if problem:
            failures.append(f"{server.name}: unhealthy after the feeds: {problem}")
    assert not failures, f"{len(failures)} of {len(probes)} feeds failed:\n" + "\n".join(failures)
