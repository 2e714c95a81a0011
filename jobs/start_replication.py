"""Start a replication on the worker's own CouchDB (the original README's example job).

It writes a ``_replicator`` document on the server the worker uses, so the server runs
the replication (one-shot) and keeps its state in that document.

Arguments:
    source: what to replicate from: a database name on the worker's server, or an
            ``http(s)://`` URL of a database anywhere.
    target: what to replicate to, likewise; created if it does not exist (which needs
            a server admin: the replication runs with the worker's credentials).
    label:  a name for the replication (kept in the document as ``label``).

Result:
    ``{"replication": label, "id": "<the _replicator document id>", "source": source,
    "target": target, "started": True}``

The document id comes from the run's idempotency key: a retry of the same attempt finds
the replication it started rather than starting a second one. Follow it with
``GET /_replicator/<id>`` (or ``/_scheduler/docs/_replicator/<id>`` on Apache CouchDB).
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any
from urllib.parse import quote

from after.config import split_credentials, with_credentials
from after.couch import Conflict, Server
from after.jobs import JobContext

logger = logging.getLogger("after.jobs.start_replication")

# CouchDB's rule for database names.
DATABASE_NAME = re.compile(r"^[a-z][a-z0-9_$()+/-]*$")


def run(source: Any, target: Any, label: Any = None, *, context: JobContext) -> dict[str, Any]:
    """Write the `_replicator` document that replicates `source` into `target`."""
    if not context.couchdb_url:
        raise RuntimeError("start_replication runs in a worker: it needs the worker's CouchDB")
    bare, user, password = split_credentials(context.couchdb_url)
    doc_id = "after-" + hashlib.sha256(context.idempotency_key.encode()).hexdigest()[:24]
    doc = {
        "_id": doc_id,
        "source": _endpoint("source", source, bare, user, password),
        "target": _endpoint("target", target, bare, user, password),
        "create_target": True,
        "label": label,
        "task": context.task_id,
    }
    replicator = Server(bare, (user, password or "") if user else None).database("_replicator")
    if replicator.get(doc_id) is not None:  # this attempt started it already (a retry)
        logger.info("replication %r was started already (%s)", label, doc_id)
    else:
        try:
            replicator.put(doc)
            logger.info("replication %r started: %s -> %s (%s)", label, source, target, doc_id)
        except Conflict:  # started by this attempt meanwhile
            logger.info("replication %r was started already (%s)", label, doc_id)
    return {"replication": label, "id": doc_id, "source": source, "target": target, "started": True}


def _endpoint(role: str, value: Any, bare: str, user: str | None, password: str | None) -> str:
    """A database name on the worker's server, as the URL CouchDB 3 wants, or a URL."""
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return value
    if isinstance(value, str) and DATABASE_NAME.match(value):
        return with_credentials(bare, user, password) + quote(value, safe="")
    raise ValueError(
        f"{role}: {value!r} is neither a database name (lower-case, starting with a letter) "
        "nor an http(s):// URL"
    )
