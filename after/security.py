"""The role model: who may do what with tasks, as CouchDB roles."""

from __future__ import annotations

from typing import Any

from after.push import load_rules

# CouchDB role names by After role, from the same table validate_doc_update reads.
ROLES: dict[str, str] = load_rules()["roles"]


def security_object() -> dict[str, Any]:
    """The tasks database admits After's roles (and server admins), nobody else."""
    return {
        "admins": {"names": [], "roles": []},
        "members": {"names": [], "roles": sorted(ROLES.values())},
    }
