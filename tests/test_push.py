"""Compiling designdocs/ into design documents and deploying them."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

from conftest import wait_for

from after.couch import Database, Server
from after.push import PushResult, compile_all, compile_designdoc, designdocs_dir, push, watch


def test_one_file_per_function_compiles_to_one_design_document() -> None:
    doc = compile_designdoc(designdocs_dir() / "after")
    assert doc["_id"] == "_design/after"
    assert doc["validate_doc_update"].startswith("function validate_doc_update(")
    assert doc["filters"]["worker"].startswith("function worker(")
    assert doc["views"]["by_worker"]["map"].startswith("function map(")
    assert doc["views"]["by_status"]["reduce"] == "_count"
    assert doc["lib"]["rules"].startswith("module.exports = {")
    assert '"transitions"' in doc["lib"]["rules"]


def test_leading_comments_stay_in_the_file_only(tmp_path: Path) -> None:
    folder = tmp_path / "app"
    (folder / "filters").mkdir(parents=True)
    (folder / "filters" / "f.js").write_text(
        "// why\n/* more\n why */\nfunction f(doc) { return true; }\n"
    )
    assert compile_designdoc(folder)["filters"]["f"] == "function f(doc) { return true; }"


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
    assert db.get("_design/after")["filters"]["extra"] == "function extra(doc) { return false; }"
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
