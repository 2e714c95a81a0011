"""All of After's CouchDB access: one small HTTP client over `requests`.

Written to CouchDB's documented behaviour so that it runs unchanged on Apache
CouchDB 3.x and on the embedded PouchDB Server (see couchdb-compat.md):
sequences are opaque, `_bulk_docs` results are matched by id, every request
has a client-side deadline, and view queries are paged (default limits would
truncate silently).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import requests
import urllib3

from after.config import Config, node_urls, redact

Doc = dict[str, Any]
log = logging.getLogger("after.couch")

# View parameters CouchDB expects as JSON values.
_JSON_PARAMS = {"key", "keys", "startkey", "endkey", "start_key", "end_key"}


class CouchError(Exception):
    """A refusal or failure from the server, with CouchDB's own error and reason."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        what: str = "",
        rows: list[dict[str, Any]] | None = None,
    ) -> None:
        self.status, self.error, self.reason, self.what = status, error, reason, what
        self.rows = rows  # a `_bulk_docs` error answered with each document's row
        super().__init__(
            f"{what}: {status} {error}: {reason}" if what else f"{status} {error}: {reason}"
        )


class Conflict(CouchError):
    """409: the document changed since the revision we based the write on."""


class Forbidden(CouchError):
    """403 (or 401): a validate_doc_update rule or the database's security refused."""


class NotFound(CouchError):
    """404."""


class Unreachable(CouchError):
    """The server did not answer (refused, timed out, reset)."""


class Unstorable(CouchError):
    """A document CouchDB refuses as it is (found before it is sent, or by the server
    refusing a request as a whole): a number that is not finite, a string that is not
    valid Unicode, a document over the size limit. The reason names the field."""


# CouchDB's default `[couchdb] max_document_size`, in bytes of JSON. A server set
# lower answers 413, and the write is found and refused on its own all the same.
MAX_DOCUMENT_SIZE = 8_000_000
# Whole-request refusals that a document of the request may cause: the request is
# split to find it (Apache CouchDB 3.5 answers 400 "invalid UTF-8 JSON" for one lone
# surrogate, 413 for one document over the limit, and writes nothing of the request).
_REFUSED_WHOLE = {400, 413}


def _error_for(status: int) -> type[CouchError]:
    return {409: Conflict, 403: Forbidden, 401: Forbidden, 404: NotFound}.get(status, CouchError)


def encode_json(value: Any, path: str = "") -> bytes:
    """`value` as the JSON bytes CouchDB accepts, or Unstorable naming the field at
    fault: Python's json writes NaN and lone surrogates (`"\\udc80"`), which Apache
    CouchDB refuses for the whole request."""
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        problem = json_problem(value, path) or "not valid JSON"
        raise Unstorable(400, "invalid_json", problem) from None


def json_problem(value: Any, path: str = "") -> str | None:
    """Why `value` is not JSON that CouchDB stores, naming where (`result.items[2]`,
    under `path`), or None. Walked only once encoding failed: the usual path pays nothing."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where or 'the value'}: {item!r} is not a JSON number (only finite ones are)"
        if isinstance(item, str):
            bad = _LONE_SURROGATE.search(item)
            if bad:
                return (
                    f"{where or 'the value'}: the lone surrogate \\u{ord(bad.group()):04x} is "
                    "not valid Unicode (text decoded with errors='surrogateescape'?)"
                )
        elif isinstance(item, dict):
            for key, inner in reversed(list(item.items())):
                child = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and _LONE_SURROGATE.search(key):
                    return json_problem(key, f"the key {child!r}")
                stack.append((child, inner))
        elif isinstance(item, list | tuple):
            stack.extend((f"{where}[{n}]", inner) for n, inner in reversed(list(enumerate(item))))
    return None


# A surrogate code point not part of a pair; Python keeps pairs as one code point, so
# any surrogate in a str is one CouchDB cannot decode as UTF-8.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """`text` with each lone surrogate written out as `\\udc80`: an error message or a
    traceback (diagnostics, often decoded process output) is kept, not refused."""
    if not _LONE_SURROGATE.search(text):
        return text
    return _LONE_SURROGATE.sub(lambda bad: f"\\u{ord(bad.group()):04x}", text)


def _refusal(response: requests.Response, what: str) -> CouchError:
    """The CouchError for an error response, with CouchDB's error and reason."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error, reason = str(payload.get("error", "")), str(payload.get("reason", ""))
    elif isinstance(payload, list):
        # Apache CouchDB answers a `_bulk_docs` 500 with its rows, some stored and some
        # not (a cluster's copies did not answer): the request as a whole failed.
        failed = [row for row in payload if isinstance(row, dict) and row.get("error")]
        first = failed[0] if failed else {}
        error = str(first.get("error", "http_error"))
        reason = f"{len(failed)} of {len(payload)} document(s) failed" + (
            f", e.g. {first.get('id')}: {first.get('reason', '')}" if first else ""
        )
    else:
        error, reason = "http_error", response.text[:200]
    rows = payload if isinstance(payload, list) else None
    return _error_for(response.status_code)(response.status_code, error, reason, what, rows)


class Server:
    """A CouchDB server: one pooled HTTP session, credentials never shown.

    `url` may list the nodes of one cluster (a list, or comma-separated): requests
    go to one node, and a node that does not answer (refused, timed out) makes the
    next one current, so the caller's retry goes there (`failed`). Sequences and
    documents are the cluster's, not a node's, so a changes feed resumes on the
    next node from the last sequence it processed.

    `auth` = (name, password) is sent as Basic auth on every request, or, with
    `cookie=True`, exchanged once for an AuthSession cookie (`POST /_session`)
    that the following requests carry; a 401 logs in again, once, and repeats
    the request. HTTPS URLs work as they are (certificates checked by requests;
    REQUESTS_CA_BUNDLE names a private CA).
    """

    def __init__(
        self,
        url: str | list[str],
        auth: tuple[str, str] | None = None,
        timeout: float = 30.0,
        *,
        cookie: bool = False,
    ) -> None:
        urls = node_urls(url) if isinstance(url, str) else url
        if not urls:
            raise ValueError("no CouchDB URL given")
        self.urls = [one if one.endswith("/") else one + "/" for one in urls]
        self.node = 0  # the index in `urls` of the node requests go to
        self._node_lock = threading.Lock()
        self.timeout = timeout
        self.session = requests.Session()
        self.credentials = auth
        self.cookie = bool(cookie and auth)
        self.session.auth = None if self.cookie else auth
        self._read_environment_once()
        self.session.headers["Accept"] = "application/json"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self._login_lock = threading.Lock()
        self.logins = 0  # how many times a cookie session was opened

    def _read_environment_once(self) -> None:
        """Take the environment's proxies, CA bundle and ~/.netrc credentials now, as
        requests would, instead of on every request: at hundreds of writes a second
        those look-ups were a tenth of the writer thread's CPU."""
        session = self.session
        for url in reversed(self.urls):  # one cluster: the nodes share one proxy set-up
            session.proxies.update(requests.utils.get_environ_proxies(url))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if bundle:
            session.verify = bundle
        if self.credentials is None:
            session.auth = requests.utils.get_netrc_auth(self.url)
        session.trust_env = False

    @classmethod
    def from_config(cls, config: Config, timeout: float = 30.0) -> Server:
        return cls(config.couchdb_urls, config.auth, timeout, cookie=config.auth_method == "cookie")

    @property
    def url(self) -> str:
        """The URL of the node requests go to now."""
        return self.urls[self.node]

    @property
    def node_url(self) -> str:
        """The current node's URL as it may be shown (no credentials are in it)."""
        return redact(self.url)

    def failed(self, url: str) -> None:
        """The node at `url` did not answer: the next node (if any) becomes current.
        Only once per failure: threads that saw the same node fail move on once."""
        with self._node_lock:
            if len(self.urls) < 2 or self.url != url:
                return
            self.node = (self.node + 1) % len(self.urls)
            log.warning(
                "CouchDB node %s does not answer; moving to %s", redact(url), redact(self.url)
            )

    @property
    def display_url(self) -> str:
        user = self.credentials[0] if self.credentials else None
        if not user:
            return redact(self.url)
        scheme, rest = self.url.split("://", 1)
        return f"{scheme}://{quote(user, safe='')}:***@{rest}"

    def login(self, seen: int | None = None) -> None:
        """Open a cookie session with the credentials (`POST /_session`).

        `seen` is the login count a failed request was sent under: if another
        thread has logged in since, its fresh cookie is used instead.
        """
        assert self.credentials is not None
        with self._login_lock:
            if seen is not None and seen != self.logins:
                return
            name, password = self.credentials
            what = f"POST {self.display_url}_session"
            self.session.cookies.clear()
            node = self.url
            try:
                response = self.session.post(
                    node + "_session",
                    data={"name": name, "password": password},
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                self.failed(node)
                raise Unreachable(0, "unreachable", _plain_reason(exc), what) from None
            if response.status_code >= 400:
                raise _refusal(response, what)
            if "AuthSession" not in self.session.cookies:
                raise Forbidden(401, "unauthorized", "the server set no AuthSession cookie", what)
            self.logins += 1

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        timeout: float | None = None,
        stream: bool = False,
        headers: dict[str, str] | None = None,
    ) -> requests.Response:
        """Send one request; raise a CouchError subclass for any error status."""
        node = self.url
        url = node + path.lstrip("/")
        what = f"{method} {self.display_url}{path.lstrip('/')}"
        if body is not None and not isinstance(body, bytes):
            try:
                body = encode_json(body)
            except Unstorable as exc:  # never sent: say what is wrong with it
                raise Unstorable(exc.status, exc.error, exc.reason, what) from None

        def send(again: bool = True) -> requests.Response:
            try:
                return self.session.request(
                    method,
                    url,
                    params=_encode_params(params),
                    data=body,
                    headers={
                        **({"Content-Type": "application/json"} if body is not None else {}),
                        **(headers or {}),
                    },
                    timeout=timeout or self.timeout,
                    stream=stream,
                )
            except requests.ConnectionError as exc:
                if again and _dropped(exc):
                    # A kept-alive connection the server closed just as it was reused
                    # (Node closes idle ones after 5 s): nothing was answered; once more.
                    return send(again=False)
                self.failed(node)
                raise Unreachable(0, "unreachable", _plain_reason(exc), what) from None
            except requests.RequestException as exc:
                self.failed(node)
                raise Unreachable(0, "unreachable", _plain_reason(exc), what) from None

        if self.cookie and self.logins == 0:
            self.login(seen=0)
        seen = self.logins
        response = send()
        if response.status_code == 401 and self.cookie:
            response.close()
            self.login(seen=seen)  # the session expired (or the server restarted): once more
            response = send()
        if response.status_code >= 400:
            raise _refusal(response, what)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    def database(self, name: str) -> Database:
        return Database(self, name)

    def clock_skew(self) -> float | None:
        """Seconds the server's clock is ahead of ours, from its `Date` header
        (whole seconds, so within about half a second); None without the header."""
        before = time.time()
        response = self.request("GET", "")
        after = time.time()
        header = response.headers.get("Date")
        if not header:
            return None
        server = email.utils.parsedate_to_datetime(header).timestamp() + 0.5
        return server - (before + after) / 2

    def welcome(self) -> dict[str, Any]:
        return self.json("GET", "")

    def serves_selector_feeds(self) -> bool:
        """Whether `_changes?filter=_selector` is served: Apache CouchDB 2 and later
        (Mango, in Erlang: no JavaScript process per change). Detected by the welcome,
        never by trying: an unguarded PouchDB Server dies on that request."""
        welcome = self.welcome()
        if "couchdb" not in welcome or "express-pouchdb" in welcome:
            return False
        major = str(welcome.get("version", "")).split(".", 1)[0]
        return major.isdigit() and int(major) >= 2

    def put_user(self, name: str, password: str, roles: list[str]) -> None:
        """Create or update a user in `_users` (keeps its revision)."""
        users = self.database("_users")
        doc_id = f"org.couchdb.user:{name}"
        doc = users.get(doc_id) or {"_id": doc_id, "name": name, "type": "user"}
        doc.update(password=password, roles=roles)
        users.put(doc)


class Database:
    def __init__(self, server: Server, name: str) -> None:
        self.server = server
        self.name = name
        self.path = quote(name, safe="")
        self._bulk_get_gives_winner_only: bool | None = None  # PouchDB Server's; asked once

    def __repr__(self) -> str:
        return f"<Database {self.server.display_url}{self.name}>"

    def _json(self, method: str, path: str = "", **kwargs: Any) -> Any:
        return self.server.json(method, f"{self.path}/{path}" if path else self.path, **kwargs)

    # -- the database itself -------------------------------------------------
    def info(self) -> dict[str, Any]:
        return self._json("GET")

    def exists(self) -> bool:
        try:
            self.info()
        except NotFound:
            return False
        return True

    def create(self) -> bool:
        """Create the database; False if it already existed."""
        try:
            self._json("PUT")
        except CouchError as exc:
            if exc.status == 412:
                return False
            raise
        return True

    def delete(self) -> None:
        self._json("DELETE")

    def security(self) -> dict[str, Any]:
        return self._json("GET", "_security")

    def set_security(self, security: dict[str, Any]) -> None:
        self._json("PUT", "_security", body=security)

    # -- documents -------------------------------------------------------------
    def get(self, doc_id: str, **params: Any) -> Doc | None:
        try:
            return self._json("GET", _doc_path(doc_id), params=params or None)
        except NotFound:
            return None

    def revisions(self, doc_id: str, revs: list[str]) -> list[Doc]:
        """The given revisions of a document (a conflict's losers), in one request and
        in the order given; one the server no longer has (compacted) is left out."""
        if not revs:
            return []
        rows = self._json(
            "GET",
            _doc_path(doc_id),
            params={"open_revs": json.dumps(revs)},
            headers={"Accept": "application/json"},  # not multipart/mixed
        )
        found = {row["ok"]["_rev"]: row["ok"] for row in rows if "ok" in row}
        return [found[rev] for rev in revs if rev in found]

    def put(self, doc: Doc) -> str:
        """Write a document (with its `_rev` if it has one); return the new revision."""
        self.put_confirmed(doc)
        return doc["_rev"]

    def put_confirmed(self, doc: Doc) -> bool:
        """Write a document as `put` does (its `_rev` set to the new revision); whether
        the write reached the cluster's write quorum. A node cut off from the others
        stores the write all the same and answers 202 instead of 201: False."""
        response = self.server.request("PUT", f"{self.path}/{_doc_path(doc['_id'])}", body=doc)
        doc["_rev"] = response.json()["rev"]
        return response.status_code != 202

    def leaves(self, doc_id: str) -> list[Doc]:
        """Every leaf revision of a document not deleted, as merged from the copies
        that answered (a quorum of them on a cluster): a conflict that reached any
        of those copies is among them."""
        rows = self._json(
            "GET",
            _doc_path(doc_id),
            params={"open_revs": "all"},
            headers={"Accept": "application/json"},  # not multipart/mixed
        )
        return [row["ok"] for row in rows if "ok" in row and not row["ok"].get("_deleted")]

    def leaves_of(self, doc_ids: list[str]) -> dict[str, list[Doc]]:
        """`leaves` for many documents in one request (`_bulk_get` without revisions:
        every leaf, merged from a quorum of copies on a cluster); a missing document
        has none. PouchDB Server's `_bulk_get` gives the winner only: there, one
        request each."""
        if self._bulk_get_gives_winner_only is None:
            self._bulk_get_gives_winner_only = "express-pouchdb" in self.server.welcome()
        if self._bulk_get_gives_winner_only:
            return {doc_id: self._leaves_or_none(doc_id) for doc_id in doc_ids}
        answer = self._json("POST", "_bulk_get", body={"docs": [{"id": i} for i in doc_ids]})
        found: dict[str, list[Doc]] = {doc_id: [] for doc_id in doc_ids}
        for result in answer.get("results", []):
            leaves = found.setdefault(result.get("id"), [])
            for row in result.get("docs", []):
                if "ok" in row and not row["ok"].get("_deleted"):
                    leaves.append(row["ok"])
        return found

    def _leaves_or_none(self, doc_id: str) -> list[Doc]:
        try:
            return self.leaves(doc_id)
        except NotFound:
            return []

    def post(self, doc: Doc) -> tuple[str, str]:
        result = self._json("POST", body=doc)
        return result["id"], result["rev"]

    def bulk_docs(
        self, docs: list[Doc], encode: Callable[[Doc], bytes] | None = None
    ) -> list[dict[str, Any]]:
        """Write many documents; one result per document, in the order given.

        Each document succeeds or fails on its own (a 409 or 403 in its row), and
        no document can make the others fail: one CouchDB would refuse for the
        whole request (not valid JSON, over the size limit) gets an error row of its
        own without being sent, and a request refused as a whole anyway (400, 413)
        is split until the document at fault is found. PouchDB Server returns the
        rows in another order, so rows are matched by id; documents without an
        `_id` get one from us first. `encode` is for tests: what is sent of a doc.
        """
        for doc in docs:
            if "_id" not in doc:
                doc["_id"] = _new_id()
        rows: dict[int, dict[str, Any]] = {}
        encoded: list[tuple[int, bytes]] = []
        for n, doc in enumerate(docs):
            try:
                data = (encode or encode_json)(doc)
            except Unstorable as exc:
                rows[n] = _error_row(doc, exc.error, exc.reason)
                continue
            if len(data) > MAX_DOCUMENT_SIZE:
                reason = (
                    f"the document is {len(data):,} bytes of JSON, over CouchDB's "
                    f"max_document_size ({MAX_DOCUMENT_SIZE:,})"
                )
                rows[n] = _error_row(doc, "document_too_large", reason)
                continue
            encoded.append((n, data))
        self._bulk_encoded(docs, encoded, rows)
        return [rows[n] for n in range(len(docs))]

    def _bulk_encoded(
        self, docs: list[Doc], encoded: list[tuple[int, bytes]], rows: dict[int, dict[str, Any]]
    ) -> None:
        if not encoded:
            return
        body = b'{"docs":[' + b",".join(data for _, data in encoded) + b"]}"
        try:
            answer = self._json("POST", "_bulk_docs", body=body)
        except CouchError as exc:
            if exc.rows is not None and exc.status >= 500:
                self._rows_of_failed_request(docs, encoded, exc, rows)
                return
            if exc.status not in _REFUSED_WHOLE:
                raise  # the server's state (down, credentials), not a document's
            if len(encoded) == 1:
                (n, _), what = encoded[0], f"refused by the server ({exc.status})"
                rows[n] = _error_row(docs[n], exc.error, f"{what}: {exc.reason}")
                return
            middle = len(encoded) // 2
            self._bulk_encoded(docs, encoded[:middle], rows)
            self._bulk_encoded(docs, encoded[middle:], rows)
            return
        by_id = _rows_by_id(answer)
        for n, _ in encoded:
            rows[n] = by_id[docs[n]["_id"]].pop(0)

    def _rows_of_failed_request(
        self,
        docs: list[Doc],
        encoded: list[tuple[int, bytes]],
        error: CouchError,
        rows: dict[int, dict[str, Any]],
    ) -> None:
        """The rows of a `_bulk_docs` request answered 500 with a row per document.

        An Apache CouchDB 3.5 cluster answers so when its copies disagree on a
        document: one refused it with validate_doc_update's 403, another (one that
        had not applied the document's last revision yet) with a 409; the row then
        says `conflict` or `forbidden`, whichever came first. The rows that say `ok`
        were stored; each document of the others is written again alone, once, and
        its own answer (the 403 and its reason, a 409, or stored) is its row. Any
        other error (a copy did not answer) fails the request, sent again later."""
        answer = error.rows or []
        if any(row.get("error") not in (None, "conflict", "forbidden") for row in answer):
            raise error
        by_id = _rows_by_id(answer)
        for n, data in encoded:
            doc = docs[n]
            found = by_id.get(doc["_id"], [])
            if not found:
                raise error
            row = found.pop(0)
            rows[n] = self._put_alone(doc, data) if row.get("error") else row

    def _put_alone(self, doc: Doc, data: bytes) -> dict[str, Any]:
        """Write one encoded document by PUT; its answer as a `_bulk_docs` row. A 409
        for a document that holds this very write (stored on the copies that took it)
        is answered as stored unconfirmed, like a 202."""
        doc_id = doc["_id"]
        try:
            response = self.server.request("PUT", f"{self.path}/{_doc_path(doc_id)}", body=data)
        except Conflict as exc:
            current = self.get(doc_id)
            if current is not None and is_own_write(current, doc):
                return {"ok": True, "id": doc_id, "rev": current["_rev"], "accepted": True}
            return _error_row(doc, exc.error, exc.reason)
        except CouchError as exc:
            if exc.status == 0 or exc.status >= 500:
                raise  # unanswered or failed on the server: the batch is sent again
            return _error_row(doc, exc.error, exc.reason)
        row = {"ok": True, "id": doc_id, "rev": response.json()["rev"]}
        return {**row, "accepted": True} if response.status_code == 202 else row

    def all_docs(self, **params: Any) -> dict[str, Any]:
        if "keys" in params:
            keys = params.pop("keys")
            return self._json("POST", "_all_docs", params=params, body={"keys": keys})
        return self._json("GET", "_all_docs", params=params)

    # -- views -------------------------------------------------------------------
    def view(self, ddoc: str, name: str, **params: Any) -> dict[str, Any]:
        return self._json("GET", f"_design/{ddoc}/_view/{name}", params=params)

    def iter_view(
        self,
        ddoc: str,
        name: str,
        page_size: int = 1000,
        first_page: int | None = None,
        **params: Any,
    ) -> Iterator[dict]:
        """Every row of a (non-reduced) view range, fetched a page at a time.

        A smaller `first_page` gets the first rows to the caller sooner.
        """
        size = first_page or page_size
        params = {"reduce": False, **params}
        while True:
            page = self.view(ddoc, name, **params, limit=size + 1)["rows"]
            yield from page[:size]
            if len(page) <= size:
                return
            # The next page starts at the first row not yet returned (key, then doc id).
            params.update(startkey=page[size]["key"], startkey_docid=page[size]["id"])
            size = page_size

    # -- changes -------------------------------------------------------------
    def changes(self, selector: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
        """One normal (non-continuous) request to `_changes`, filtered by `selector` if given."""
        if selector is not None:
            params = {**params, "filter": "_selector"}
            return self._json("POST", "_changes", params=params, body={"selector": selector})
        return self._json("GET", "_changes", params=params)

    def follow(
        self,
        since: Any,
        *,
        heartbeat_ms: int = 5000,
        stop: threading.Event | None = None,
        selector: dict[str, Any] | None = None,
        **params: Any,
    ) -> Iterator[dict[str, Any]]:
        """Follow the continuous changes feed from `since`.

        Yields each change row. CouchDB honours `timeout`, PouchDB Server does
        not and keeps the feed open forever, so liveness is checked on our side:
        the server sends a newline every heartbeat, and a read that sees nothing
        for three heartbeats raises Unreachable. The caller resumes from the
        last `seq` it processed. With a `selector`, the feed is filtered by it
        (`filter=_selector`, see Server.serves_selector_feeds).
        """
        query = {"feed": "continuous", "since": since, "heartbeat": heartbeat_ms, **params}
        node = self.server.url
        if selector is not None:
            query["filter"] = "_selector"
        response = self.server.request(
            "POST" if selector is not None else "GET",
            f"{self.path}/_changes",
            params=query,
            body={"selector": selector} if selector is not None else None,
            stream=True,
            timeout=3 * heartbeat_ms / 1000,
            # A compressed feed (PouchDB Server gzips) is held back in buffers: ask for it plain.
            headers={"Accept-Encoding": "identity"},
        )
        try:
            for line in response.iter_lines(chunk_size=None):
                if stop is not None and stop.is_set():
                    return
                if not line.strip():
                    continue
                try:
                    change = json.loads(line)
                except (ValueError, RecursionError):
                    # A document too deep for Python's json (CouchDB stores it): skip
                    # that change, not the feed.
                    log.error(
                        "a changes-feed line could not be read; skipped (%d bytes)", len(line)
                    )
                    continue
                if "last_seq" in change and "id" not in change:
                    return  # the server ended the feed; the caller reconnects
                yield change
        except requests.RequestException as exc:
            self.server.failed(node)  # no heartbeat for three of them: that node is stuck
            raise Unreachable(
                0, "unreachable", _plain_reason(exc), f"{self} changes feed"
            ) from None
        finally:
            response.close()


# What a `_bulk_docs` row's error says when a rule or another writer refused the
# write; any other error is about the document itself, which cannot be stored.
_REFUSED_BY_RULE = {"conflict", "forbidden", "unauthorized"}


def refused_as_is(row: dict[str, Any]) -> bool:
    """Whether a write was refused for what the document holds (not valid JSON, too
    large), rather than by a rule or a conflict: the same write would be refused again."""
    error = row.get("error")
    return bool(error) and error not in _REFUSED_BY_RULE


def unconfirmed(row: dict[str, Any]) -> bool:
    """Whether a `_bulk_docs` write was stored without reaching the cluster's write
    quorum: a node cut off from the others answers it `"accepted": true`. The other
    side of the partition may accept a different write of the same document."""
    return bool(row.get("accepted")) and not row.get("error")


def _error_row(doc: Doc, error: str, reason: str) -> dict[str, Any]:
    """A `_bulk_docs` row for a document not stored: the error and its reason."""
    return {"id": doc["_id"], "error": error, "reason": reason}


def _rows_by_id(answer: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of a `_bulk_docs` answer by document id, in order (an id may be
    written twice in one request)."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in answer:
        by_id.setdefault(row.get("id", ""), []).append(row)
    return by_id


def _doc_path(doc_id: str) -> str:
    if doc_id.startswith("_design/"):
        return "_design/" + quote(doc_id[len("_design/") :], safe="")
    return quote(doc_id, safe="")


def _encode_params(params: dict[str, Any] | None) -> dict[str, str] | None:
    if not params:
        return None
    encoded = {}
    for key, value in params.items():
        if key in _JSON_PARAMS or not isinstance(value, str | int | float | bool):
            encoded[key] = json.dumps(value)
        elif isinstance(value, bool):
            encoded[key] = "true" if value else "false"
        else:
            encoded[key] = str(value)
    return encoded


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex


def _dropped(exc: requests.ConnectionError) -> bool:
    """The connection was open and then closed without an answer (not refused)."""
    return bool(exc.args) and isinstance(exc.args[0], urllib3.exceptions.ProtocolError)


def _plain_reason(exc: requests.RequestException) -> str:
    """A one-line reason without URLs (which may carry credentials)."""
    name = type(exc).__name__
    if isinstance(exc, requests.ConnectionError):
        return f"{name}: the server did not accept the connection"
    if isinstance(exc, requests.Timeout):
        return f"{name}: no answer in time"
    return name


# A document to write, what to call with its result, and by when (monotonic) it is sent.
Write = tuple[Doc, Callable[[dict[str, Any]], None], float]
# Seconds between tries of a write the server did not take, at most: after an outage
# the writes held back go out within this long of the server's return.
WRITE_RETRY_MAX = 5.0


class BulkWriter:
    """Batches document writes through `_bulk_docs`, one result per document.

    A write may wait a moment (`within`) for others to share its request: the
    server's cost is mostly per request, not per document (PouchDB Server spends
    80 % of a core on 400 one-document requests a second, 20 % on the same
    documents ten to a request; docs/benchmarks.md). A request goes as soon as
    any write in it is due, carrying every write taken so far.

    A request carries at most one write of each document; a further write of it
    (a conflict's resolution updates the winner and deletes each loser) goes in
    the next request, in the order written. Rows are matched to writes by id,
    and PouchDB Server's adapter corrupted a document's revision tree when one
    request held a refused write of it and then another write of it.
    """

    def __init__(self, db: Database, max_batch: int = 1000) -> None:
        self.db = db
        self.max_batch = max_batch
        self.queue: queue.Queue[Write | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="after-writer", daemon=True)
        self.given_up = threading.Event()  # a stop ran out of time: end without sending

    def start(self) -> None:
        self.thread.start()

    def write(
        self, doc: Doc, on_result: Callable[[dict[str, Any]], None], within: float = 0.0
    ) -> None:
        """Write `doc` within `within` seconds; `on_result` gets its row of the answer."""
        self.queue.put((doc, on_result, time.monotonic() + within))

    def stop(self, timeout: float | None = None) -> bool:
        """Send what is queued, at once, then end; give up after `timeout` seconds (the
        server is down: what is not sent stays as the database has it). True if all
        was sent."""
        self.queue.put(None)
        self.thread.join(timeout)
        if not self.thread.is_alive():
            return True
        self.given_up.set()
        log.warning("the writer could not send its last writes in %ss; giving up", timeout)
        self.thread.join(WRITE_RETRY_MAX)
        return False

    def _loop(self) -> None:
        backoff = 0.5
        taken: list[Write] = []  # from the queue, in order, not yet written
        stopping = False
        # Documents whose last request went unanswered: the server may have stored them.
        unanswered: set[str] = set()
        while taken or not stopping:
            if not taken:
                item = self.queue.get()
                if item is None:
                    return
                taken.append(item)
            stopping = stopping or self._take_queued(taken)
            wait = min(send_by for _, _, send_by in taken) - time.monotonic()
            if wait > 0 and not stopping and len(taken) < self.max_batch:
                with contextlib.suppress(queue.Empty):  # nothing came: the first one is due
                    item = self.queue.get(timeout=wait)
                    if item is None:
                        stopping = True
                    else:
                        taken.append(item)
                        continue  # take what else came, and look at the times again
            batch, taken = one_write_per_document(taken, self.max_batch)
            try:
                rows = self.db.bulk_docs([doc for doc, _, _ in batch])
            except Exception as exc:  # the writer never dies: a worker without it is stuck
                # Nothing is lost: the same batch is sent again once the server answers.
                log.warning(
                    "writing %d task(s) failed (%s); retrying in %.1fs", len(batch), exc, backoff
                )
                if not isinstance(exc, CouchError) or exc.status == 0 or exc.status >= 500:
                    # Unanswered, or failed on the server's side: some may be stored.
                    unanswered.update(doc["_id"] for doc, _, _ in batch if "_id" in doc)
                taken = batch + taken
                if self.given_up.wait(backoff):
                    return
                backoff = min(backoff * 2, WRITE_RETRY_MAX)
                continue
            backoff = 0.5
            docs = [doc for doc, _, _ in batch]
            rows = self._stored_unanswered(docs, rows, unanswered)
            unanswered.difference_update(doc.get("_id") for doc in docs)
            for (doc, on_result, _), row in zip(batch, rows, strict=True):
                try:
                    on_result(row)
                except Exception:  # a caller's bug must not end the writer of every task
                    log.exception(
                        "the answer to a write of %s could not be handled", doc.get("_id")
                    )

    def _stored_unanswered(
        self, docs: list[Doc], rows: list[dict[str, Any]], unanswered: set[str]
    ) -> list[dict[str, Any]]:
        """The rows of writes, those sent again after their first request went
        unanswered checked. A refusal of such a write as stale may mean that the first
        request was stored and only its answer lost: when the document's current
        revision is the next one after the revision written on and holds just what was
        written, that write landed. The documents to check are read in one request."""
        stale = {
            doc["_id"]: doc
            for doc, row in zip(docs, rows, strict=True)
            if doc.get("_id") in unanswered
            and "_rev" in doc
            and row.get("error") in ("conflict", "forbidden")  # PouchDB Server: forbidden
        }
        if not stale:
            return rows
        try:
            read = self.db.all_docs(keys=list(stale), include_docs=True)["rows"]
        except CouchError:
            return rows  # the caller re-reads the task on a refusal anyway
        landed = {
            found["id"]: found["doc"]["_rev"]
            for found in read
            if found.get("doc") and is_own_write(found["doc"], stale[found["id"]])
        }
        for doc_id in landed:
            log.info("%s: stored by a request whose answer was lost", doc_id)
        return [
            {"id": row.get("id"), "rev": landed[row.get("id")], "ok": True}
            if row.get("id") in landed
            else row
            for row in rows
        ]

    def _take_queued(self, taken: list[Write]) -> bool:
        """Move what is queued into `taken`, up to a batch; True when told to stop."""
        while len(taken) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            taken.append(item)
        return False


def is_own_write(stored: Doc, written: Doc) -> bool:
    """Whether the version read back is the write itself: the next revision after the
    one written on, holding just what was written."""
    if rev_number(stored["_rev"]) != rev_number(written.get("_rev")) + 1:
        return False
    meta = ("_rev", "_conflicts", "_revisions")
    return {k: v for k, v in stored.items() if k not in meta} == {
        k: v for k, v in written.items() if k not in meta
    }


def rev_number(rev: str | None) -> int:
    """The generation of a revision ("3-abc" -> 3); 0 for none."""
    return int(rev.split("-", 1)[0]) if rev else 0


def one_write_per_document(writes: list[Write], limit: int) -> tuple[list[Write], list[Write]]:
    """The next request's writes (at most `limit`, no document twice) and those left,
    each list in the order given."""
    batch: list[Write] = []
    left: list[Write] = []
    ids: set[str] = set()
    for write in writes:
        doc_id = write[0].get("_id")
        if len(batch) >= limit or (doc_id is not None and doc_id in ids):
            left.append(write)
            continue
        if doc_id is not None:
            ids.add(doc_id)
        batch.append(write)
    return batch, left
