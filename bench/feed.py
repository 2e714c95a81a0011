"""Watching tasks reach their final status, from the database's own changes feed."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any

import requests

from after.couch import Database
from bench.env import Bench

FINAL = {"done", "err", "canceled"}


class DoneWatcher(threading.Thread):
    """Follows `_changes` (continuous, include_docs) from a sequence taken before the tasks
    are inserted, keeps the latest version of each task, and notes when `expected` tasks
    are final (done/err/canceled). With `doc_ids` only those documents are followed
    (`filter=_doc_ids`). Bounded by `timeout`; `stop()` ends it at once.
    """

    def __init__(
        self,
        bench: Bench,
        db: Database,
        expected: int,
        timeout: float,
        doc_ids: list[str] | None = None,
    ) -> None:
        super().__init__(name="bench-done-watcher", daemon=True)
        self.bench, self.db, self.expected, self.timeout = bench, db, expected, timeout
        self.doc_ids = doc_ids
        self.since = db.info()["update_seq"]
        self.docs: dict[str, dict[str, Any]] = {}
        self.final: set[str] = set()
        self.first_seen: dict[str, float] = {}
        self.all_final_at: float | None = None
        self.done_event = threading.Event()
        self._stop = threading.Event()
        self._response: requests.Response | None = None
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        session = self.bench.session()
        since = self.since
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                params: dict[str, Any] = {
                    "feed": "continuous",
                    "include_docs": "true",
                    "heartbeat": 500,
                    "since": json.dumps(since) if not isinstance(since, str) else since,
                }
                url = f"{self.bench.bare_url}{self.db.path}/_changes"
                headers = {"Accept-Encoding": "identity"}
                if self.doc_ids is not None:
                    params["filter"] = "_doc_ids"
                    response = session.post(
                        url, params=params, json={"doc_ids": self.doc_ids},
                        stream=True, timeout=5, headers=headers,
                    )  # fmt: skip
                else:
                    response = session.get(
                        url, params=params, stream=True, timeout=5, headers=headers
                    )
                self._response = response
                response.raise_for_status()
                for line in response.iter_lines(chunk_size=None):
                    if self._stop.is_set() or time.monotonic() > deadline:
                        return
                    if not line.strip():
                        continue
                    change = json.loads(line)
                    if "seq" in change:
                        since = change["seq"]
                    doc = change.get("doc")
                    if not doc or change["id"].startswith("_design/"):
                        continue
                    self._seen(doc)
                    if self.done_event.is_set():
                        return
                response.close()
        except Exception as exc:  # reported by the scenario
            if not self._stop.is_set():
                self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                if self._response is not None:
                    self._response.close()

    def _seen(self, doc: dict[str, Any]) -> None:
        now = time.time()
        task_id = doc["_id"]
        self.first_seen.setdefault(task_id, now)
        self.docs[task_id] = doc
        if doc.get("status") in FINAL and task_id not in self.final:
            self.final.add(task_id)
            if len(self.final) >= self.expected and self.all_final_at is None:
                self.all_final_at = now
                self.done_event.set()

    def wait(self, timeout: float) -> bool:
        return self.done_event.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._response is not None:
                self._response.close()
