"""Compile `designdocs/<name>/` folders into design documents and deploy them.

One file per CouchDB function, so each is readable and lintable:

    designdocs/after/validate_doc_update.js   -> "validate_doc_update": "<source>"
    designdocs/after/filters/worker.js        -> "filters": {"worker": "<source>"}
    designdocs/after/views/by_status/map.js   -> "views": {"by_status": {"map": ...}}
    designdocs/after/views/by_status/reduce.json  ("_count")  -> a JSON value
    designdocs/after/lib/rules.json           -> "lib": {"rules": "module.exports = {...};"}
    designdocs/after/_attachments/index.html  -> "_attachments": {"index.html": {...}}

`.js` files are stored as their source text, `.json` files as their value, and
`.json` files under `lib/` as CommonJS modules that `require('lib/rules')`
returns (the table of statuses and transitions lives there, once).
Every file under `_attachments/` (any type, sub-folders kept in the name) is an
inline base64 attachment with its content type, served by the server at
`/<db>/_design/<name>/<file>` (the dashboard).
Deploying writes only what changed: an unchanged design doc gets no new revision
(attachments are compared by MD5 digest, or by content where the server's digest
is not the MD5 of the content).
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from after.couch import Database, NotFound

# A function file may open with a comment; CouchDB wants the source to be the
# function expression itself, so the comment stays in the file only.
_LEADING_COMMENTS = re.compile(r"\A(?:\s*/\*.*?\*/|\s*//[^\n]*)*", re.DOTALL)

ATTACHMENTS = "_attachments"

# `function name(` at the start of a design function's source.
_NAMED_FUNCTION = re.compile(r"\Afunction\s+([A-Za-z_$][\w$]*)\s*\(")
_COMMENTS = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)

# Content types of the files a dashboard is made of; anything else is guessed from
# its extension (`mimetypes`), and unknown ones are application/octet-stream.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".webmanifest": "application/manifest+json",
}


def designdocs_dir() -> Path:
    """The design documents beside the package (a checkout) or inside it (a wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "designdocs", here / "designdocs"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "the designdocs/ folder was not found beside or inside the after package"
    )


def content_type(path: Path) -> str:
    known = _CONTENT_TYPES.get(path.suffix.lower())
    if known:
        return known
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def compile_attachments(folder: Path) -> dict[str, dict[str, str]]:
    """The files under `folder` as inline attachments: {name: {content_type, data}}."""
    attachments = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue
        attachments[relative.as_posix()] = {
            "content_type": content_type(path),
            "data": base64.b64encode(path.read_bytes()).decode("ascii"),
        }
    return attachments


def compile_designdoc(folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = {"_id": f"_design/{folder.name}", "language": "javascript"}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.relative_to(folder).parts[0] == ATTACHMENTS:
            continue  # files, not functions: below
        parts = path.relative_to(folder).with_suffix("").parts
        if path.suffix == ".js":
            source = _LEADING_COMMENTS.sub("", path.read_text(encoding="utf-8")).strip()
            value: Any = anonymous(source, path.relative_to(folder).as_posix())
        elif path.suffix == ".json":
            value = json.loads(path.read_text(encoding="utf-8"))
            if parts[0] == "lib":
                value = lib_module(value)
        else:
            continue
        node = doc
        for key in parts[:-1]:
            node = node.setdefault(key, {})
        node[parts[-1]] = value
    if (folder / ATTACHMENTS).is_dir():
        attachments = compile_attachments(folder / ATTACHMENTS)
        if attachments:
            doc[ATTACHMENTS] = attachments
    return doc


def anonymous(source: str, where: str) -> str:
    """A design function's source in the form every CouchDB compiles: anonymous.

    Apache CouchDB 3 evaluates the source as a script and wants its value to be a
    function. Its engines (QuickJS, SpiderMonkey) take a script that opens with
    `function (` as a function expression, whose value is the function; a named
    `function map(doc) {...}` is a declaration, whose value is nothing, and the
    design document is refused ("Expression does not eval to a function"). The
    files keep their names, so each stays valid, lintable JavaScript.
    """
    named = _NAMED_FUNCTION.match(source)
    if named is None:
        return source
    name, body = named.group(1), source[named.end() :]
    code = _COMMENTS.sub(" ", body)
    if re.search(rf"(?<![\w$.]){re.escape(name)}\s*\(", code):
        raise ValueError(
            f"{where}: function {name} calls itself by name, which its deployed, "
            "anonymous form cannot: move the recursion into an inner function"
        )
    return "function (" + body


def compile_all(root: Path | None = None) -> list[dict[str, Any]]:
    root = root or designdocs_dir()
    return [compile_designdoc(folder) for folder in sorted(root.iterdir()) if folder.is_dir()]


def load_rules(root: Path | None = None) -> dict[str, Any]:
    """The task rules table (statuses, transitions) the design doc enforces."""
    path = (root or designdocs_dir()) / "after" / "lib" / "rules.json"
    return json.loads(path.read_text(encoding="utf-8"))


_MODULE_START, _MODULE_END = "module.exports = ", ";"


def lib_module(value: Any) -> str:
    """A JSON value as the CommonJS module a design doc's `lib/` holds."""
    return f"{_MODULE_START}{json.dumps(value, sort_keys=True)}{_MODULE_END}"


def deployed_rules(design: dict[str, Any]) -> dict[str, Any]:
    """The rules table a deployed design doc enforces (its `lib/rules` module), or {}
    when it has none that can be read."""
    lib = design.get("lib")
    source = lib.get("rules") if isinstance(lib, dict) else None
    if not isinstance(source, str):
        return {}
    try:
        rules = json.loads(source.removeprefix(_MODULE_START).removesuffix(_MODULE_END))
    except ValueError:
        return {}
    return rules if isinstance(rules, dict) else {}


@dataclass
class PushResult:
    created_db: bool
    changed: list[str]
    unchanged: list[str]


def push(db: Database, root: Path | None = None, warm: bool = True) -> PushResult:
    """Create the database if missing and deploy every design doc that changed."""
    created = db.create()
    changed, unchanged = [], []
    for doc in compile_all(root):
        current = db.get(doc["_id"])
        if current is not None:
            if _without_meta(current) == _without_meta(doc) and same_attachments(db, current, doc):
                unchanged.append(doc["_id"])
                continue
            doc["_rev"] = current["_rev"]
        db.put(doc)
        changed.append(doc["_id"])
        if warm:
            warm_views(db, doc)
    return PushResult(created, changed, unchanged)


def warm_views(db: Database, doc: dict[str, Any]) -> None:
    """Query each view once so that the first real query does not wait for the build."""
    name = doc["_id"].split("/", 1)[1]
    for view in doc.get("views", {}):
        db.view(name, view, limit=1, reduce=False)


def _without_meta(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in ("_rev", "_revisions", ATTACHMENTS)}


def md5_digest(data: bytes) -> str:
    """An attachment digest as CouchDB and PouchDB Server write it: md5-<base64>."""
    digest = hashlib.md5(data, usedforsecurity=False).digest()
    return "md5-" + base64.b64encode(digest).decode("ascii")


def same_attachments(db: Database, current: dict[str, Any], compiled: dict[str, Any]) -> bool:
    """Whether the deployed design doc already has exactly the compiled attachments.

    The server lists its attachments as stubs (content_type, length, digest). A
    digest equal to the MD5 of our file settles it at no cost; where it differs
    (Apache CouchDB may digest what it stores, gzip for compressible types) the
    attachment is read back and compared byte for byte, so an unchanged push
    writes nothing on either server.
    """
    stubs = current.get(ATTACHMENTS) or {}
    wanted = compiled.get(ATTACHMENTS) or {}
    if set(stubs) != set(wanted):
        return False
    for name, attachment in wanted.items():
        stub = stubs[name]
        data = base64.b64decode(attachment["data"])
        if stub.get("content_type") != attachment["content_type"]:
            return False
        if isinstance(stub.get("length"), int) and stub["length"] != len(data):
            return False
        if stub.get("digest") == md5_digest(data):
            continue
        if read_attachment(db, current["_id"], name) != data:
            return False
    return True


def read_attachment(db: Database, doc_id: str, name: str) -> bytes | None:
    path = "/".join(quote(part, safe="") for part in [*doc_id.split("/", 1), *name.split("/")])
    try:
        return db.server.request("GET", f"{db.path}/{path}", headers={"Accept": "*/*"}).content
    except NotFound:
        return None


def watch(
    db: Database,
    report: Callable[[PushResult], None],
    root: Path | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Re-deploy whenever a design file changes (watchdog), until `stop` is set or interrupted."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    root = root or designdocs_dir()
    dirty = threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if not event.is_directory:
                dirty.set()

    observer = Observer()
    observer.schedule(Handler(), str(root), recursive=True)
    observer.start()
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            if not dirty.wait(0.2):
                continue
            time.sleep(0.2)  # editors write in several steps: let them finish
            dirty.clear()
            try:
                report(push(db, root))
            except (ValueError, OSError) as exc:  # a half-written JSON file: wait for the next save
                print(f"not pushed: {exc}")
    finally:
        observer.stop()
        observer.join()
