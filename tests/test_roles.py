"""Who may do what, as `_design/after` and the database's `_security` enforce it.

Three real users are created in `_users` for this module (a client with the
role after_client, a worker with after_worker, and a plain user with neither)
and each reaches the same databases with its own Basic credentials; the
session fixture's connection is a server admin (PouchDB Server's admin party,
or the admin credentials of AFTER_TEST_COUCHDB_URL). The transition tests are
derived from the "who" column of `designdocs/after/lib/rules.json`.

Two databases: `secured` carries After's security object (members: the two
roles), as `after setup` leaves it; `public` has no members, so that requests
reach validate_doc_update whoever sends them, and the design document's own
rules can be seen refusing users with no After role.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import new_task, settled_write
from test_designdoc import path_to

from after.couch import CouchError, Database, Forbidden, Server
from after.push import load_rules, push
from after.security import (
    FORCE_FIELD,
    ROLES,
    WORKER_FIELDS,
    admin_party,
    security_object,
    user_context,
)

RULES = load_rules()
STATUSES: list[str] = RULES["statuses"]
INITIAL: str = RULES["initial"]
FINAL: list[str] = RULES["final"]
TRANSITIONS: dict[str, dict[str, str]] = RULES["transitions"]
PREFIX: str = RULES["record_prefix"]
OTHER = {"client": "worker", "worker": "client"}
PUBLIC = {"admins": {"names": [], "roles": []}, "members": {"names": [], "roles": []}}

MOVES = [
    pytest.param(source, target, who, id=f"{source}->{target}")
    for source, targets in TRANSITIONS.items()
    for target, who in targets.items()
]


# -- users and databases ---------------------------------------------------------------------


@dataclass
class Users:
    """Servers seen with each user's credentials; "admin" is the session's own connection."""

    servers: dict[str, Server]
    credentials: dict[str, tuple[str, str]]

    def db(self, who: str, database: Database) -> Database:
        return self.servers[who].database(database.name)


@contextmanager
def after_users(admin: Server) -> Iterator[Users]:
    """A client, a worker, a replicator and a plain user with unique names; deleted
    afterwards."""
    suffix = uuid.uuid4().hex[:10]
    roles = {
        "client": [ROLES["client"]],
        "worker": [ROLES["worker"]],
        "replicator": [ROLES["replicator"]],
        "plain": [],
    }
    created: dict[str, tuple[str, str]] = {}
    try:
        for kind, user_roles in roles.items():
            credentials = (f"after-test-{kind}-{suffix}", secrets.token_urlsafe(18))
            admin.put_user(*credentials, user_roles)
            created[kind] = credentials
        servers = {kind: Server(admin.url, credentials) for kind, credentials in created.items()}
        yield Users({**servers, "admin": admin}, created)
    finally:
        users = admin.database("_users")
        for name, _ in created.values():
            doc = users.get(f"org.couchdb.user:{name}")
            if doc:
                admin.request("DELETE", f"_users/{doc['_id']}", params={"rev": doc["_rev"]})


@pytest.fixture(scope="module")
def users(server: Server) -> Iterator[Users]:
    with after_users(server) as created:
        yield created


@contextmanager
def deployed(server: Server, security: dict[str, Any]) -> Iterator[Database]:
    """A database of one copy: what is tested here is validate_doc_update and the
    security object, the same on every copy (conftest.one_copy_db)."""
    name = f"after-test-roles-{uuid.uuid4().hex[:12]}"
    server.request("PUT", name, params={"n": 1})
    database = server.database(name)
    push(database)
    database.set_security(security)
    try:
        yield database
    finally:
        database.delete()


@pytest.fixture(scope="module")
def secured(server: Server) -> Iterator[Database]:
    """A tasks database as `after setup` leaves it: members are After's two roles."""
    with deployed(server, security_object()) as database:
        yield database


@pytest.fixture(scope="module")
def public(server: Server) -> Iterator[Database]:
    """No members: every request reaches validate_doc_update."""
    with deployed(server, PUBLIC) as database:
        yield database


@pytest.fixture(scope="module")
def party(server: Server) -> bool:
    return admin_party(server.url)


# -- helpers ---------------------------------------------------------------------------------


def create(db: Database, **fields: Any) -> dict[str, Any]:
    doc = new_task(**fields)
    doc["_id"], doc["_rev"] = db.post(doc)
    return doc


def put(db: Database, doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Write a copy of `doc` with `changes`; a change to None drops the field."""
    new = copy.deepcopy(doc)
    new.update(changes)
    new = {key: value for key, value in new.items() if value is not None}
    db.put(new)
    return new


def task_in(db: Database, status: str, **fields: Any) -> dict[str, Any]:
    """A task driven to `status` by the admin, through allowed moves only."""
    doc = create(db, **fields)
    for step in path_to(status):
        doc = put(db, doc, status=step)
    return doc


def refused(write: Callable[[], object], statuses: frozenset[int] = frozenset({403})) -> str:
    """Run a write that must be refused; return the refusal's reason."""
    with pytest.raises(Forbidden) as caught:
        settled_write(write)
    assert caught.value.status in statuses, caught.value
    return caught.value.reason


def role_rule(role: str) -> str:
    return f"{role}s (role {ROLES[role]})"


# -- the users themselves --------------------------------------------------------------------


def test_the_roles_are_distinct_user_roles() -> None:
    assert set(ROLES) == {"client", "worker", "replicator"}
    assert len(set(ROLES.values())) == 3
    assert not any(role.startswith("_") for role in ROLES.values()), "_ roles are CouchDB's own"
    # the moves of the table are the clients' and the workers'; a replicator makes none
    moves = {who for targets in TRANSITIONS.values() for who in targets.values()}
    assert moves == {"client", "worker"}


@pytest.mark.parametrize("kind", ["client", "worker", "plain"])
def test_each_user_is_seen_with_its_own_roles(users: Users, kind: str) -> None:
    """Even on a server in admin party, an authenticated request is that user, not an admin."""
    context = user_context(users.servers[kind])
    assert context["name"] == users.credentials[kind][0]
    assert "_admin" not in context["roles"]
    expected = {"client": [ROLES["client"]], "worker": [ROLES["worker"]], "plain": []}[kind]
    assert context["roles"] == expected


# -- creating tasks --------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["client", "worker"])
def test_clients_and_workers_create_waiting_tasks(
    users: Users, secured: Database, who: str
) -> None:
    doc = create(users.db(who, secured))
    assert secured.get(doc["_id"])["status"] == INITIAL


@pytest.mark.parametrize("who", ["client", "worker"])
def test_nobody_creates_a_task_in_another_status(users: Users, secured: Database, who: str) -> None:
    reason = refused(lambda: create(users.db(who, secured), status="scheduled"))
    assert reason.startswith("status:") and f'must start as "{INITIAL}"' in reason


def test_a_user_with_no_after_role_cannot_write_tasks(users: Users, public: Database) -> None:
    plain = users.db("plain", public)
    reason = refused(lambda: create(plain))
    assert reason.startswith("role:")
    assert role_rule("client") in reason and role_rule("worker") in reason
    assert users.credentials["plain"][0] in reason

    done = task_in(public, "done")
    reason = refused(
        lambda: plain.server.json(
            "DELETE", f"{public.path}/{done['_id']}", params={"rev": done["_rev"]}
        )
    )
    assert reason.startswith("role:")
    assert public.get(done["_id"]) == done


def test_on_a_public_database_the_design_doc_still_knows_the_roles(
    users: Users, public: Database
) -> None:
    """Without members, clients and workers write; the rules are the design doc's own."""
    doc = create(users.db("client", public))
    reason = refused(lambda: put(users.db("client", public), doc, status="scheduled"))
    assert reason == (
        f"status: only {role_rule('worker')} may change a task from waiting to scheduled"
    )
    put(users.db("worker", public), doc, status="scheduled")
    assert public.get(doc["_id"])["status"] == "scheduled"


# -- every move of the table, by the role of its "who" column --------------------------------


@pytest.mark.parametrize(("source", "target", "who"), MOVES)
def test_each_move_is_made_by_its_role_only(
    users: Users, secured: Database, source: str, target: str, who: str
) -> None:
    doc = task_in(secured, source)
    other = OTHER[who]
    reason = refused(lambda: put(users.db(other, secured), doc, status=target))
    assert reason == f"status: only {role_rule(who)} may change a task from {source} to {target}"
    assert secured.get(doc["_id"]) == doc, "a refused move leaves the task as it was"

    moved = put(users.db(who, secured), doc, status=target)
    assert secured.get(doc["_id"]) == moved


@pytest.mark.parametrize(("source", "target", "who"), MOVES)
def test_a_plain_user_makes_no_move(
    users: Users, public: Database, source: str, target: str, who: str
) -> None:
    doc = task_in(public, source)
    reason = refused(lambda: put(users.db("plain", public), doc, status=target))
    assert reason.startswith("role:") and ROLES[who] in reason
    assert public.get(doc["_id"]) == doc


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"date": "2031-06-01T08:00:00Z"}, id="date"),
        pytest.param({"worker": "other"}, id="worker"),
        pytest.param({"job": {"name": "echo", "arguments": [1]}}, id="job"),
    ],
)
def test_a_client_steers_a_task_nobody_holds(
    users: Users, secured: Database, change: dict[str, Any]
) -> None:
    doc = create(users.db("client", secured))
    moved = put(users.db("client", secured), doc, **change)
    assert secured.get(doc["_id"]) == moved


def test_a_client_reschedules_a_held_task_with_a_new_date(users: Users, secured: Database) -> None:
    doc = task_in(secured, "scheduled")
    client = users.db("client", secured)
    moved = put(client, doc, status="reschedule", date="2031-01-01T00:00:00Z")
    assert secured.get(doc["_id"])["date"] == moved["date"]
    reason = refused(lambda: put(client, moved, worker="other"))
    assert reason.startswith("worker, job:"), "the existing rules hold for clients too"


def test_bulk_docs_gives_each_of_a_clients_writes_its_own_result(
    users: Users, secured: Database
) -> None:
    to_cancel, to_claim = create(secured), create(secured)
    rows = users.db("client", secured).bulk_docs(
        [{**to_cancel, "status": "cancel"}, {**to_claim, "status": "scheduled"}]
    )
    assert rows[0].get("ok") is True
    assert rows[1]["error"] == "forbidden" and ROLES["worker"] in rows[1]["reason"]
    assert secured.get(to_cancel["_id"])["status"] == "cancel"
    assert secured.get(to_claim["_id"])["status"] == INITIAL


# -- the worker's fields ---------------------------------------------------------------------


@pytest.mark.parametrize("field", WORKER_FIELDS)
def test_a_client_cannot_create_a_task_with_a_worker_field(
    users: Users, secured: Database, field: str
) -> None:
    reason = refused(lambda: create(users.db("client", secured), **{field: "x"}))
    assert reason.startswith(f"{field}:")
    assert role_rule("worker") in reason


@pytest.mark.parametrize(
    ("field", "value"), [("owner", "manobi@a:1:x"), ("result", {"any": ["json"]}), ("attempt", 1)]
)
def test_a_worker_may_write_its_fields(
    users: Users, secured: Database, field: str, value: Any
) -> None:
    doc = create(users.db("worker", secured), **{field: value})
    assert secured.get(doc["_id"])[field] == value


@pytest.mark.parametrize(
    ("field", "value"), [("owner", ["x"]), ("attempt", [1]), ("history", 5), ("runs", -1)]
)
def test_worker_fields_keep_the_shape_the_worker_writes(
    users: Users, secured: Database, field: str, value: Any
) -> None:
    """Even a worker-role user cannot leave a task that a worker could not read."""
    reason = refused(lambda: create(users.db("worker", secured), **{field: value}))
    assert reason.startswith(f"{field}: must be")


@pytest.fixture
def claimed(users: Users, secured: Database) -> dict[str, Any]:
    """A task a worker claimed, with the fields a claim writes (nested values included)."""
    doc = create(users.db("client", secured))
    takeovers = [{"from": "manobi@a:1:x", "status": "scheduled", "at": "2030-01-01T00:00:00.000Z"}]
    return put(
        users.db("worker", secured),
        doc,
        status="scheduled",
        owner="manobi@b:2:y",
        claimed_at="2030-01-01T00:00:01.000Z",
        takeovers=takeovers,
    )


def test_a_client_writes_back_the_worker_fields_it_read(
    users: Users, secured: Database, claimed: dict[str, Any]
) -> None:
    client = users.db("client", secured)
    as_read = client.get(claimed["_id"])
    moved = put(client, as_read, status="cancel")
    assert secured.get(claimed["_id"]) == moved
    assert moved["owner"] == claimed["owner"] and moved["takeovers"] == claimed["takeovers"]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"owner": "intruder@c:3:z"}, id="owner-changed"),
        pytest.param({"owner": None}, id="owner-dropped"),
        pytest.param({"takeovers": []}, id="takeovers-emptied"),
        pytest.param({"result": {"forged": True}}, id="result-added"),
    ],
)
def test_a_client_cannot_change_a_worker_field(
    users: Users, secured: Database, claimed: dict[str, Any], change: dict[str, Any]
) -> None:
    field = next(iter(change))
    reason = refused(lambda: put(users.db("client", secured), claimed, status="cancel", **change))
    assert reason.startswith(f"{field}:") and role_rule("worker") in reason
    assert secured.get(claimed["_id"]) == claimed


# -- final tasks and the admin's forced edit -------------------------------------------------


@pytest.mark.parametrize("status", FINAL)
@pytest.mark.parametrize("who", ["client", "worker", "admin"])
def test_a_final_task_does_not_change_without_force(
    users: Users, secured: Database, status: str, who: str
) -> None:
    doc = task_in(secured, status)
    reason = refused(lambda: put(users.db(who, secured), doc, note="edited"))
    assert reason.startswith(f"status: a {status} task cannot change ({status} is final)")
    assert f'"{FORCE_FIELD}": true' in reason, "it says how an admin may force it"
    assert secured.get(doc["_id"]) == doc


@pytest.mark.parametrize("status", FINAL)
@pytest.mark.parametrize("who", ["client", "worker"])
def test_only_a_server_admin_may_force_an_edit(
    users: Users, secured: Database, status: str, who: str
) -> None:
    doc = task_in(secured, status)
    reason = refused(lambda: put(users.db(who, secured), doc, note="x", **{FORCE_FIELD: True}))
    assert reason.startswith(f"{FORCE_FIELD}: only server admins may force-edit a final task")
    assert secured.get(doc["_id"]) == doc
    forced = put(secured, doc, status=INITIAL, note="run it again", **{FORCE_FIELD: True})
    stored = secured.get(doc["_id"])
    assert stored == forced
    assert stored[FORCE_FIELD] is True, "the forced edit stays visible in the task"


@pytest.mark.parametrize("value", [False, "true", 1])
def test_force_must_be_exactly_true(secured: Database, value: Any) -> None:
    doc = task_in(secured, "done")
    reason = refused(lambda: put(secured, doc, note="x", **{FORCE_FIELD: value}))
    assert "done is final" in reason


@pytest.mark.parametrize("who", ["client", "worker"])
def test_only_admins_write_the_force_field(users: Users, secured: Database, who: str) -> None:
    reason = refused(lambda: create(users.db(who, secured), **{FORCE_FIELD: True}))
    assert reason.startswith(f"{FORCE_FIELD}:") and "server admins" in reason


# -- worker records --------------------------------------------------------------------------


def record(instance: str) -> dict[str, Any]:
    name = instance.split("@", 1)[0]
    return {
        "_id": PREFIX + instance,
        "type": "worker",
        "name": name,
        "instance": instance,
        "state": "running",
        "lease_until": "2030-01-01T00:00:30.000Z",
    }


def test_worker_records_are_written_and_deleted_by_workers_only(
    users: Users, secured: Database
) -> None:
    client, worker = users.db("client", secured), users.db("worker", secured)
    doc = record(f"manobi@host:1:{uuid.uuid4().hex[:6]}")
    reason = refused(lambda: client.put(dict(doc)))
    assert reason.startswith("type:") and role_rule("worker") in reason
    worker.put(doc)
    assert secured.get(doc["_id"])["instance"] == doc["instance"]

    path = f"{secured.path}/{doc['_id']}"
    reason = refused(lambda: client.server.json("DELETE", path, params={"rev": doc["_rev"]}))
    assert reason.startswith("type:") and role_rule("worker") in reason
    worker.server.json("DELETE", path, params={"rev": doc["_rev"]})
    assert secured.get(doc["_id"]) is None


@pytest.mark.parametrize("who", ["client", "worker"])
def test_clients_and_workers_delete_finished_tasks(
    users: Users, secured: Database, who: str
) -> None:
    doc = task_in(secured, "done")
    users.db(who, secured).server.json(
        "DELETE", f"{secured.path}/{doc['_id']}", params={"rev": doc["_rev"]}
    )
    assert secured.get(doc["_id"]) is None


# -- the database's security -----------------------------------------------------------------


def test_the_security_object_admits_the_two_roles_and_admins_only(secured: Database) -> None:
    assert security_object() == {
        "admins": {"names": [], "roles": []},
        "members": {"names": [], "roles": sorted(ROLES.values())},
    }
    assert secured.security() == security_object()


@pytest.mark.parametrize("who", ["client", "worker"])
def test_members_read_the_tasks_and_the_views(users: Users, secured: Database, who: str) -> None:
    doc = create(secured)
    database = users.db(who, secured)
    assert database.get(doc["_id"]) == doc
    assert any(row["id"] == doc["_id"] for row in database.all_docs()["rows"])
    assert database.view("after", "by_status", reduce=False, limit=1)["rows"]


def test_a_user_with_no_after_role_is_refused_reads_and_writes(
    users: Users, secured: Database
) -> None:
    """403 on Apache CouchDB for a logged-in non-member; PouchDB Server says 401."""
    doc = create(secured)
    plain = users.db("plain", secured)
    either = frozenset({401, 403})
    refused(lambda: plain.get(doc["_id"]), either)
    refused(lambda: plain.all_docs(), either)
    refused(lambda: plain.view("after", "by_status"), either)
    refused(lambda: plain.changes(), either)
    refused(lambda: plain.post(new_task()), either)
    refused(lambda: plain.put({**doc, "status": "cancel"}), either)
    assert secured.get(doc["_id"]) == doc


def test_an_anonymous_request_is_refused_with_401(
    server: Server, secured: Database, public: Database, party: bool
) -> None:
    if party:
        pytest.skip("admin party (PouchDB Server without an admin): no request is anonymous")
    anonymous = Server(server.url)
    for write in (
        lambda: anonymous.database(secured.name).info(),
        lambda: anonymous.database(secured.name).post(new_task()),
    ):
        refused(write, frozenset({401}))
    # A database without members: the design doc itself sends the anonymous writer away.
    reason = refused(lambda: anonymous.database(public.name).post(new_task()), frozenset({401}))
    assert reason.startswith("role:") and "anonymous" in reason


def test_in_admin_party_an_anonymous_request_is_a_server_admin(
    server: Server, secured: Database, party: bool
) -> None:
    """What `after status` warns about: the security object cannot keep anybody out."""
    if not party:
        pytest.skip("the server has an admin: anonymous requests are anonymous")
    anonymous = Server(server.url)
    assert "_admin" in user_context(anonymous)["roles"]
    doc = create(anonymous.database(secured.name))
    forced = put(anonymous.database(secured.name), task_in(secured, "done"), **{FORCE_FIELD: True})
    assert secured.get(doc["_id"])["status"] == INITIAL
    assert secured.get(forced["_id"])[FORCE_FIELD] is True


def test_a_wrong_password_is_refused_not_taken_for_anonymous(
    users: Users, secured: Database
) -> None:
    name, _ = users.credentials["client"]
    wrong = Server(secured.server.url, (name, "not-the-password"))
    with pytest.raises(CouchError) as caught:
        wrong.database(secured.name).info()
    assert caught.value.status == 401


def test_a_worker_may_record_a_resolved_conflict_on_a_final_task(one_copy_db: Database) -> None:
    """Only `conflicts_resolved` may change, and only by a worker (or an admin)."""
    db = one_copy_db
    task_id, _ = db.post(new_task())
    doc = db.get(task_id)
    for status in ("scheduled", "running", "done"):
        doc = {**doc, "status": status, "owner": "manobi@a:1:x"}
        db.put(doc)
    db.put({**doc, "conflicts_resolved": [{"rev": "2-x", "status": "scheduled"}]})
    with pytest.raises(Forbidden) as refused:
        db.put({**db.get(task_id), "conflicts_resolved": [], "result": "forged"})
    assert "is final" in refused.value.reason


# -- replication ------------------------------------------------------------------------------


def test_a_replicator_writes_what_another_server_made_checked_for_shape_only(
    users: Users, secured: Database
) -> None:
    """A replication writes each document's latest revision as the source has it: a task
    never seen here arrives done, one seen waiting arrives after several moves, and
    deletions come as they were made. Its user (role after_replicator) gets them in."""
    replicator = users.db("replicator", secured)
    done = new_task(
        _id=f"r-{uuid.uuid4().hex[:8]}",
        status="done",
        owner="manobi@elsewhere:1:abcd",
        attempt=1,
        result={"ok": True},
        history=[],
    )
    replicator.put(done)  # new here, and done already
    waiting = create(users.db("client", secured))
    jumped = put(replicator, replicator.get(waiting["_id"]), status="done", owner="m@x:1:a")
    assert secured.get(waiting["_id"])["status"] == "done" == jumped["status"]
    running = task_in(secured, "running")
    replicator.bulk_docs([{"_id": running["_id"], "_rev": running["_rev"], "_deleted": True}])
    assert secured.get(running["_id"]) is None
    record = {"_id": f"{PREFIX}manobi@h:1:r", "type": "worker", "name": "manobi",
              "instance": "manobi@h:1:r", "state": "running"}  # fmt: skip
    replicator.put(record)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"date": "2011-02-30"}, 'date: "2011-02-30" is not a real calendar date'),
        ({"status": "lost"}, "status: must be one of"),
        ({"attempt": -1}, "attempt: must be a whole number of at least 0"),
        ({"type": "other"}, 'type: unknown document type "other"'),
    ],
)
def test_a_replicator_cannot_write_a_task_of_the_wrong_shape(
    users: Users, secured: Database, change: dict[str, Any], reason: str
) -> None:
    replicator = users.db("replicator", secured)
    doc = {**new_task(_id=f"r-{uuid.uuid4().hex[:8]}", status="done"), **change}
    assert refused(lambda: replicator.put(doc)).startswith(reason)


def test_the_replicator_role_is_never_implied_not_even_for_server_admins(
    server: Server, secured: Database
) -> None:
    """A server admin's writes keep every rule (a new task is waiting)."""
    doc = new_task(_id=f"r-{uuid.uuid4().hex[:8]}", status="done")
    assert "a new task must start as" in refused(lambda: secured.put(doc))
