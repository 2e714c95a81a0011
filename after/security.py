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

from typing import Any

from after.couch import Server
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
