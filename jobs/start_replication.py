"""Describe the replication that a real deployment would start (the README's example job).

The original README schedules ``start_replication`` with the arguments ``[2, 3, "test"]``.
This module is a stand-in for "start a replication between two things": it does not contact
any server or start anything. It returns, as the task's result, the description of the
replication it stands for, so the example runs anywhere and shows how arguments reach a job.

Arguments:
    source: what to replicate from; any JSON value (a database name, a URL, a number...).
    target: what to replicate to; any JSON value.
    label:  a name for the replication; any JSON value, usually a string.

Result:
    ``{"replication": label, "source": source, "target": target, "started": True}``
    e.g. ``{"replication": "test", "source": 2, "target": 3, "started": True}`` for
    ``[2, 3, "test"]``.

To make it real, replace the body of ``run`` with a request to the server, for CouchDB e.g.
``POST /_replicate`` with ``{"source": source, "target": target}``.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("after.jobs.start_replication")


def run(source: Any, target: Any, label: Any) -> dict[str, Any]:
    """Return the description of the replication ``label`` from ``source`` to ``target``."""
    logger.info("replication %r: %r -> %r (stand-in, nothing contacted)", label, source, target)
    return {"replication": label, "source": source, "target": target, "started": True}
