"""The role model: who may do what with tasks, as CouchDB roles.

The rules themselves live in the design document (validate_doc_update, with
the table in designdocs/after/lib/rules.json), where no client can skip them:

- clients (role `after_client`) create `waiting` tasks and make the "client"
  moves of the table (cancel, reschedule, steer a waiting task);
- workers (role `after_worker`) make the "worker" moves and alone write the
  worker-owned fields (`worker_fields`) and worker records;
- server admins may do what either may, and alone may edit a final task, by
  writing `"force": true` into it (which stays there as a trace);
- anybody else cannot write tasks (401 when anonymous, 403 otherwise).

The database's `_security` (security_object) admits the two roles and server
admins only. On Apache CouchDB an anonymous request then gets 401. An embedded
PouchDB Server without an admin ("admin party") makes every anonymous request
a server admin: `admin_party()` tells, and `after couchdb lock` ends it.
"""

from __future__ import annotations

import contextlib
from typing import Any

from after.couch import NotFound, Server
from after.push import load_rules

_RULES = load_rules()

# CouchDB role names by After role, from the same table validate_doc_update reads.
ROLES: dict[str, str] = _RULES["roles"]
# The field a server admin sets to true to edit a final task.
FORCE_FIELD: str = _RULES["force_field"]
# The fields only workers may write.
WORKER_FIELDS: list[str] = _RULES["worker_fields"]

LOCK_COMMAND = "after couchdb lock"


def security_object() -> dict[str, Any]:
    """The tasks database admits After's roles (and server admins), nobody else."""
    return {
        "admins": {"names": [], "roles": []},
        "members": {"names": [], "roles": sorted(ROLES.values())},
    }


def protect_databases(server: Server) -> list[str]:
    """Give every database of After's (one with `_design/after`) whose `_security`
    admits anybody (no member names or roles: public on PouchDB Server) the
    security_object; the names of those changed. Needs a server admin."""
    changed = []
    for name in server.json("GET", "_all_dbs"):
        if name.startswith("_"):
            continue
        database = server.database(name)
        if database.get("_design/after") is None:
            continue
        members = database.security().get("members") or {}
        if members.get("names") or members.get("roles"):
            continue
        database.set_security(security_object())
        changed.append(name)
    return changed


def user_context(server: Server) -> dict[str, Any]:
    """Who the server takes us for: `{"name": ..., "roles": [...]}` (GET /_session)."""
    return server.json("GET", "_session").get("userCtx") or {"name": None, "roles": []}


def is_server_admin(server: Server) -> bool:
    return "_admin" in (user_context(server).get("roles") or [])


def admin_party(url: str, timeout: float = 10.0) -> bool:
    """True when the server makes an anonymous request a server admin ("admin party").

    Asked without credentials, whatever the configuration holds: PouchDB Server
    starts that way; Apache CouchDB 3.x refuses to start without an admin.
    """
    return is_server_admin(Server(url, timeout=timeout))


def admin_party_warning(display_url: str) -> str:
    return (
        f'WARNING: {display_url} is in "admin party": anyone who can reach it is a server '
        f"admin; lock it down with `{LOCK_COMMAND}`"
    )


# -- the dashboard on Apache CouchDB >= 3.2 ---------------------------------------------

# What the dashboard needs and no more: its own files, requests to its own server,
# images of its own or inline (data:). No inline script or style, nothing elsewhere.
DASHBOARD_POLICY = "default-src 'self'; img-src 'self' data:"
DASHBOARD_COMMAND = "after setup --dashboard"
# The setting CouchDB serves as the Content-Security-Policy of every attachment.
CSP_SETTING = ("csp", "attachments_header_value")


def is_pouchdb_server(server: Server) -> bool:
    """PouchDB Server welcomes as express-pouchdb; Apache CouchDB as couchdb."""
    return "express-pouchdb" in server.welcome()


def cluster_nodes(server: Server) -> list[str]:
    """The nodes whose configuration a server-wide setting must be written to: every
    node of a cluster (`/_membership`), as `/_node/_local` is the answering node only."""
    nodes = server.json("GET", "_membership").get("cluster_nodes") or []
    return sorted(nodes) or ["_local"]


def attachment_policies(server: Server) -> dict[str, str | None]:
    """Each node's `[csp] attachments_header_value`, or None where it is not set
    (CouchDB then sends `sandbox`, which keeps the dashboard's script from running)."""
    section, key = CSP_SETTING
    policies: dict[str, str | None] = {}
    for node in cluster_nodes(server):
        try:
            policies[node] = server.json("GET", f"_node/{node}/_config/{section}/{key}")
        except NotFound:
            policies[node] = None
    return policies


def allow_dashboard(server: Server) -> dict[str, str | None]:
    """Serve attachments with DASHBOARD_POLICY instead of `sandbox`, on every node;
    return each node's policy before. Server-wide: HTML attachments of every database
    on the server may then run scripts from the same server."""
    section, key = CSP_SETTING
    before = attachment_policies(server)
    for node in before:
        server.json("PUT", f"_node/{node}/_config/{section}/{key}", body=DASHBOARD_POLICY)
    return before


def restore_attachment_policies(server: Server, policies: dict[str, str | None]) -> None:
    """Put back the policies `allow_dashboard` returned (None: CouchDB's default)."""
    section, key = CSP_SETTING
    for node, policy in policies.items():
        path = f"_node/{node}/_config/{section}/{key}"
        if policy is None:
            with contextlib.suppress(NotFound):
                server.json("DELETE", path)
        else:
            server.json("PUT", path, body=policy)
