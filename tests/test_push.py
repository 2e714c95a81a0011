"""Compiling designdocs/ into design documents and deploying them."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from after.couch import Database, Server
from after.push import (
    PushResult,
    anonymous,
    compile_all,
    compile_designdoc,
    designdocs_dir,
    push,
    watch,
)

# How Apache CouchDB 3 compiles a design function (share/server/util.js): it evaluates
# the source as a script and refuses it unless the script's value is a function. Its
# engines read a script that opens with `function (` as a function expression (QuickJS
# is patched to, SpiderMonkey does); any other script is evaluated as it is, so a
# named `function map(doc) {}` is a declaration, whose value is undefined.
COUCHDB_COMPILE = r"""
const vm = require('vm');
const sources = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const verdicts = {};
for (const [where, source] of Object.entries(sources)) {
  try {
    const value = /^function\s*\(/.test(source)
      ? vm.runInNewContext('(\n' + source + '\n)')
      : vm.runInNewContext(source);
    verdicts[where] = typeof value === 'function'
      ? 'ok' : 'Expression does not eval to a function';
  } catch (error) {
    verdicts[where] = 'compilation_error: ' + error.message;
  }
}
process.stdout.write(JSON.stringify(verdicts));
"""


def couchdb_compile(sources: dict[str, str]) -> dict[str, str]:
    """What CouchDB 3.x makes of each design function's source: 'ok' or its error."""
    answer = subprocess.run(
        ["node", "-e", COUCHDB_COMPILE],
        input=json.dumps(sources),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return json.loads(answer.stdout)


def design_functions(doc: dict[str, Any]) -> dict[str, str]:
    """Every function source of a design document, by its path in the document."""
    found: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else key)
        elif isinstance(node, str) and not node.startswith("_"):  # "_count": built in
            found[path] = node

    walk(
        {
            k: v
            for k, v in doc.items()
            if k not in ("_id", "language", "lib", "_attachments", "rewrites")
        },
        "",
    )
    return found


def test_one_file_per_function_compiles_to_one_design_document() -> None:
    doc = compile_designdoc(designdocs_dir() / "after")
    assert doc["_id"] == "_design/after"
    assert doc["validate_doc_update"].startswith("function (newDoc, oldDoc, userCtx, secObj) {")
    assert doc["filters"]["worker"].startswith("function (doc, req) {")
    assert doc["views"]["by_worker"]["map"].startswith("function (doc) {")
    assert doc["views"]["by_status"]["reduce"] == "_count"
    assert doc["lib"]["rules"].startswith("module.exports = {")
    assert '"transitions"' in doc["lib"]["rules"]


def test_leading_comments_stay_in_the_file_only(tmp_path: Path) -> None:
    folder = tmp_path / "app"
    (folder / "filters").mkdir(parents=True)
    (folder / "filters" / "f.js").write_text(
        "// why\n/* more\n why */\nfunction f(doc) { return true; }\n"
    )
    assert compile_designdoc(folder)["filters"]["f"] == "function (doc) { return true; }"


def test_push_creates_the_database_and_is_idempotent(server: Server, db_name: str) -> None:
    db = server.database(db_name)
    try:
        first = push(db)
        assert first == PushResult(created_db=True, changed=["_design/after"], unchanged=[])
        rev = db.get("_design/after")["_rev"]
        second = push(db)
        assert second == PushResult(created_db=False, changed=[], unchanged=["_design/after"])
        assert db.get("_design/after")["_rev"] == rev
    finally:
        db.delete()


def test_push_updates_a_changed_design_document(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "designdocs"
    shutil.copytree(designdocs_dir(), root)
    (root / "after" / "filters" / "extra.js").write_text("function extra(doc) { return false; }")
    result = push(db, root)
    assert result.changed == ["_design/after"]
    assert db.get("_design/after")["filters"]["extra"] == "function (doc) { return false; }"
    assert len(compile_all(root)) == 1


def test_watch_redeploys_when_a_design_file_changes(db: Database, tmp_path: Path) -> None:
    root = tmp_path / "designdocs"
    shutil.copytree(designdocs_dir(), root)
    reports: list[PushResult] = []
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(db, reports.append, root, stop), daemon=True)
    thread.start()
    try:
        wait_for(lambda: thread.is_alive())
        target = root / "after" / "filters" / "worker.js"
        for attempt in range(20):  # the observer may need a moment to start watching
            target.write_text(target.read_text() + f"\n// edit {attempt}\n")
            try:
                wait_for(lambda: reports, timeout=1)
                break
            except AssertionError:
                continue
        assert reports and reports[-1].changed == ["_design/after"]
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_every_deployed_function_is_in_the_form_apache_couchdb_compiles() -> None:
    functions = design_functions(compile_designdoc(designdocs_dir() / "after"))
    assert {"validate_doc_update", "filters.worker", "views.by_status.map"} <= set(functions)
    verdicts = couchdb_compile(functions)
    assert verdicts == dict.fromkeys(functions, "ok")


def test_the_compile_check_refuses_what_couchdb_refuses() -> None:
    verdicts = couchdb_compile(
        {
            "named": "function map(doc) { emit(doc._id, null); }",
            "statements after it": "function (doc) { emit(doc._id); }; var x = 1;",
            "not a function": "var f = 1;",
            "anonymous": "function (doc) { emit(doc._id, null); }\n// a trailing comment",
        }
    )
    assert verdicts["named"] == "Expression does not eval to a function"
    assert verdicts["statements after it"].startswith("compilation_error")
    assert verdicts["not a function"] == "Expression does not eval to a function"
    assert verdicts["anonymous"] == "ok"


def test_a_named_function_that_calls_itself_is_refused_at_push() -> None:
    source = "function walk(doc) { return doc.next ? walk(doc.next) : doc; }"
    with pytest.raises(ValueError, match=r"views/walk/map.js: function walk calls itself"):
        anonymous(source, "views/walk/map.js")
    assert anonymous("function walk(doc) { return doc.walk(1); }", "x") == (
        "function (doc) { return doc.walk(1); }"
    )
