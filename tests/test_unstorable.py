"""No write can poison the others.

Apache CouchDB refuses a whole `_bulk_docs` request for one document it cannot
store (a lone surrogate or a NaN: 400 "invalid UTF-8 JSON"; one document over
`max_document_size`: 413), and writes nothing of it. Python's json writes both
kinds happily. So every write is checked before it is sent, a request refused as
a whole is split until the document at fault is found, and the task of that
document fails with the reason, while every other write goes through.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import new_task, wait_for
from test_worker import StartWorker, in_seconds, wait_status

from after import tasks
from after.couch import (
    MAX_DOCUMENT_SIZE,
    BulkWriter,
    CouchError,
    Database,
    Unstorable,
    encode_json,
    json_problem,
    storable_text,
)
from after.jobs import JobError, run_job


def test_what_couchdb_refuses_is_named_by_its_field() -> None:
    assert json_problem({"result": [1, {"x": float("nan")}]}) == (
        "result[1].x: nan is not a JSON number (only finite ones are)"
    )
    assert json_problem({"a": "bad \udc80 text"}) == (
        "a: the lone surrogate \\udc80 is not valid Unicode "
        "(text decoded with errors='surrogateescape'?)"
    )
    assert json_problem({"k\ud800": 1}).startswith("the key 'k\\ud800': the lone surrogate")
    assert json_problem(float("-inf"), "result") == (
        "result: -inf is not a JSON number (only finite ones are)"
    )
    assert json_problem({"ok": ["\U0001f600", 1.5, None, "مرحبا"]}) is None
    with pytest.raises(Unstorable, match=r"400 invalid_json: job.arguments\[0\]: the lone"):
        encode_json({"job": {"arguments": ["\udfff"]}})


def test_diagnostic_text_keeps_a_lone_surrogate_as_an_escape() -> None:
    assert storable_text("bad \udc80 text") == "bad \\udc80 text"
    assert storable_text("fine \U0001f600") == "fine \U0001f600"
    encode_json(storable_text("\ud800\udfff"))  # storable now


def test_a_job_result_couchdb_cannot_store_fails_the_job_naming_where() -> None:
    def surrogate() -> Any:
        return {"stdout": "bad \udc80 text"}

    def infinite() -> Any:
        return [1, float("inf")]

    with pytest.raises(JobError, match=r"result.stdout: the lone surrogate \\udc80"):
        run_job(surrogate, [])
    with pytest.raises(JobError, match=r"result\[1\]: inf is not a JSON number"):
        run_job(infinite, [])


def test_a_body_couchdb_would_refuse_is_not_sent_and_names_the_field(db: Database) -> None:
    with pytest.raises(Unstorable) as refused:
        db.post(new_task(job={"name": "echo", "arguments": ["ok", float("nan")]}))
    assert refused.value.status == 400
    assert "job.arguments[1]: nan is not a JSON number" in str(refused.value)
    assert f"POST {db.server.display_url}{db.name}" in str(refused.value)
    assert db.info()["doc_count"] == 1  # the design document alone


def test_a_document_couchdb_cannot_store_is_refused_alone_in_bulk(db: Database) -> None:
    docs = [
        new_task(_id="before"),
        new_task(_id="surrogate", job={"name": "echo", "arguments": ["bad \udc80"]}),
        new_task(_id="nan", job={"name": "echo", "arguments": [float("nan")]}),
        new_task(_id="huge", job={"name": "echo", "arguments": ["x" * MAX_DOCUMENT_SIZE]}),
        new_task(_id="after"),
    ]
    rows = db.bulk_docs(docs)
    assert [row["id"] for row in rows] == ["before", "surrogate", "nan", "huge", "after"]
    assert rows[0].get("ok") and rows[4].get("ok")
    assert rows[1]["error"] == rows[2]["error"] == "invalid_json"
    assert rows[1]["reason"].startswith("job.arguments[0]: the lone surrogate \\udc80")
    assert rows[2]["reason"].startswith("job.arguments[0]: nan is not a JSON number")
    assert rows[3]["error"] == "document_too_large"
    assert "8,000,000" in rows[3]["reason"]
    assert db.get("before") and db.get("after")
    assert db.get("surrogate") is db.get("nan") is db.get("huge") is None


def test_a_request_refused_as_a_whole_is_split_to_find_the_document_at_fault(
    db: Database,
) -> None:
    """Sent as Python's json writes it (NaN unchecked), the server refuses the whole
    request (400 on both servers): the split finds the one document and fails it."""
    requests_sent: list[int] = []
    original = db._json

    def counting(method: str, path: str = "", **kwargs: Any) -> Any:
        if path == "_bulk_docs":
            requests_sent.append(kwargs["body"].count(b'"_id"'))
        return original(method, path, **kwargs)

    db._json = counting  # type: ignore[method-assign]
    docs = [new_task(_id=f"t{n}") for n in range(16)]
    docs[11]["job"]["arguments"] = [float("nan")]
    rows = db.bulk_docs(docs, encode=lambda doc: json.dumps(doc).encode())
    assert [row["id"] for row in rows] == [doc["_id"] for doc in docs]
    refused = [row for row in rows if row.get("error")]
    assert [row["id"] for row in refused] == ["t11"]
    assert refused[0]["reason"].startswith("refused by the server (400): ")
    assert all(db.get(f"t{n}") for n in range(16) if n != 11)
    # halves, depth first: only a half that is refused is split again
    assert requests_sent == [16, 8, 8, 4, 2, 2, 1, 1, 4]


def test_the_writer_answers_every_write_at_once_whatever_one_of_them_holds(
    db: Database,
) -> None:
    writer = BulkWriter(db)
    rows: dict[str, dict[str, Any]] = {}
    all_back = threading.Event()

    def note(row: dict[str, Any]) -> None:
        rows[row["id"]] = row
        if len(rows) == 21:
            all_back.set()

    writer.start()
    try:
        for n in range(20):
            writer.write(new_task(_id=f"ok{n}"), note, within=0.05)
        writer.write(new_task(_id="bad", job={"name": "x", "arguments": ["\udc80"]}), note, 0.05)
        assert all_back.wait(10), "a write was held back (retried?)"
    finally:
        writer.stop()
    assert rows.pop("bad")["error"] == "invalid_json"
    assert all(row.get("ok") for row in rows.values())


# -- the worker: bad outcomes fail their own task, and nothing else ---------------------

BAD_JOBS = {
    "surrogate": (
        "def run():\n    return {'stdout': b'bad \\x80 text'.decode(errors='surrogateescape')}\n"
    ),
    "nan": "def run():\n    return [1.0, float('nan')]\n",
    "infinity": "def run():\n    return {'x': float('inf')}\n",
    "raises_surrogate": "def run():\n    raise ValueError('bad \\udc80 text')\n",
    "huge_result": "def run():\n    return 'x' * 10_000_000\n",
    "huge_error": "def run():\n    raise RuntimeError('y' * 10_000_000)\n",
    "text": "def run(size, *filler):\n    return 'z' * size\n",
    "ok": "def run(n):\n    return n\n",
}


@pytest.fixture
def bad_jobs(tmp_path: Path) -> Path:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    for name, source in BAD_JOBS.items():
        (jobs / f"{name}.py").write_text(source)
    return jobs


def test_bad_outcomes_fail_their_task_while_ordinary_tasks_due_with_them_run_on_time(
    db: Database, start_worker: StartWorker, bad_jobs: Path
) -> None:
    start_worker(jobs=bad_jobs, concurrency=8)
    due = in_seconds(1.5)
    bad = {
        name: new_task(_id=f"bad-{name}", date=due, job={"name": name})
        for name in ("surrogate", "nan", "infinity", "raises_surrogate", "huge_result")
    }
    bad["huge_error"] = new_task(_id="bad-huge_error", date=due, job={"name": "huge_error"})
    ordinary = [
        new_task(_id=f"ok-{n:02d}", date=due, job={"name": "ok", "arguments": [n]})
        for n in range(48)
    ]
    rows = db.bulk_docs([*bad.values(), *ordinary])
    assert all(row.get("ok") for row in rows)

    for doc in ordinary:
        done = wait_status(db, doc["_id"], "done", "err", timeout=20)
        assert done["status"] == "done" and done["result"] == doc["job"]["arguments"][0]
        late = tasks.parse_date(done["started_at"]) - tasks.parse_date(due)
        assert late.total_seconds() < 1.0, (doc["_id"], late)

    failed = {name: wait_status(db, doc["_id"], "done", "err") for name, doc in bad.items()}
    assert failed["surrogate"]["status"] == "err"
    assert "result.stdout: the lone surrogate \\udc80" in failed["surrogate"]["error"]["message"]
    assert "result[1]: nan is not a JSON number" in failed["nan"]["error"]["message"]
    assert "result.x: inf is not a JSON number" in failed["infinity"]["error"]["message"]
    assert failed["raises_surrogate"]["status"] == "err"  # the message kept, escaped
    assert failed["raises_surrogate"]["error"]["message"] == "bad \\udc80 text"
    # too big: cut, and the task says so
    assert failed["huge_result"]["status"] == "done"
    assert failed["huge_result"]["result"]["truncated"] is True
    assert failed["huge_result"]["result"]["size"] == 10_000_002
    assert failed["huge_error"]["status"] == "err"
    assert "[cut: " in failed["huge_error"]["error"]["message"]
    assert len(failed["huge_error"]["error"]["message"]) < 20_000


def test_an_outcome_couchdb_refuses_fails_the_run_with_the_reason(
    db: Database, start_worker: StartWorker, bad_jobs: Path
) -> None:
    """A task whose arguments fill nearly all of the size limit: claimed fine, but its
    outcome would take it over the limit. The run fails with what was refused."""
    task = new_task(job={"name": "text", "arguments": [60_000, ""]})
    task["job"]["arguments"][1] = "f" * (MAX_DOCUMENT_SIZE - 40_000 - len(encode_json(task)))
    task_id = db.post(task)[0]
    neighbour = db.post(new_task(job={"name": "ok", "arguments": [7]}))[0]
    start_worker(jobs=bad_jobs)
    doc = wait_status(db, task_id, "done", "err", timeout=30)
    assert doc["status"] == "err"
    assert doc["error"]["type"] == "OutcomeRefused"
    assert "document_too_large" in doc["error"]["message"]
    assert "max_document_size" in doc["error"]["message"]
    assert doc["history"][-1]["status"] == "err" and "result" not in doc
    assert wait_status(db, neighbour, "done")["result"] == 7


def test_a_lone_surrogate_escape_is_refused_by_the_server_as_apache_couchdb_does(
    db: Database,
) -> None:
    """Any HTTP client may send `"\\udc80"`: valid JSON syntax, not Unicode. Apache
    CouchDB refuses the request as a whole; the embedded server, guarded, does too, so
    no document is stored that could not be written back or replicated to CouchDB."""
    task = b'{"worker": "manobi", "date": "2011-10-12", "status": "waiting", "job": '
    for body, path in [
        (task + b'{"name": "ok", "arguments": ["bad \\udc80 text"]}}', db.path),
        (task + b'{"name": "ok", "arguments": {"\\ud800": 1}}}', db.path),
        (b'{"docs": [' + task + b'{"name": "ok", "arguments": ["\\udfff\\ud800"]}}]}',
         f"{db.path}/_bulk_docs"),
    ]:  # fmt: skip
        with pytest.raises(CouchError) as refused:
            db.server.request("POST", path, body=body)
        assert (refused.value.status, refused.value.reason) == (400, "invalid UTF-8 JSON")
    pair = task + b'{"name": "ok", "arguments": ["\\ud83d\\ude00 a pair is fine"]}}'
    task_id = db.server.request("POST", db.path, body=pair).json()["id"]
    assert db.get(task_id)["job"]["arguments"] == ["\U0001f600 a pair is fine"]


def test_a_task_the_worker_cannot_write_back_is_left_as_it_is_and_tried_once(
    db: Database, start_worker: StartWorker, bad_jobs: Path, caplog: Any
) -> None:
    """A client's task just under the size limit: the worker's claim would take it over,
    so the claim is refused before it is sent. The task stays as the client wrote it,
    the refusal is in the log once, and the worker goes on with the others."""
    task = new_task(job={"name": "ok", "arguments": [""]})
    task["job"]["arguments"] = ["f" * (MAX_DOCUMENT_SIZE - 60 - len(encode_json(task)))]
    task_id = db.post(task)[0]  # 60 bytes under the limit
    worker = start_worker(jobs=bad_jobs, horizon=2.0)  # sweeps the horizon every 0.5 s
    neighbour = db.post(new_task(job={"name": "ok", "arguments": [1]}))[0]
    assert wait_status(db, neighbour, "done")["result"] == 1
    wait_for(lambda: worker.writes.unstorable.get(task_id))
    time.sleep(1.5)  # three sweeps: it is not tried again
    refusals = [r for r in caplog.records if "refuses to store it" in r.getMessage()]
    assert len(refusals) == 1 and task_id in refusals[0].getMessage()
    assert "document_too_large" in refusals[0].getMessage()
    assert db.get(task_id)["status"] == "waiting"
