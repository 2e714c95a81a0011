"""Jobs: how job modules are found, loaded, reloaded and run (after.jobs and jobs/).

None of these tests needs a CouchDB server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import delete_replications, wait_for

from after import jobs
from after.couch import NotFound, Server
from after.jobs import (
    JOB_NAME,
    BadJob,
    InvalidJobName,
    JobContext,
    JobError,
    JobLoader,
    UnknownJob,
    run_job,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "jobs"


def poll(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Return condition()'s first truthy value; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)
    return value


def write_job(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(source)
    return path


@pytest.fixture
def jobs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "jobs"
    directory.mkdir()
    return directory


@pytest.fixture
def loader(jobs_dir: Path) -> Iterator[JobLoader]:
    """A loader on an empty tmp_path jobs directory, without watchdog (stat checks only)."""
    with JobLoader(jobs_dir, watch=False) as job_loader:
        yield job_loader


@pytest.fixture
def watched(jobs_dir: Path) -> Iterator[JobLoader]:
    """A loader on the same directory, with a watchdog observer."""
    with JobLoader(jobs_dir, watch=True) as job_loader:
        yield job_loader


@pytest.fixture
def examples() -> Iterator[JobLoader]:
    with JobLoader(EXAMPLES, watch=False) as job_loader:
        yield job_loader


CONTEXT = JobContext(task_id="task-1", attempt=2, worker="manobi")


# -- the example jobs -------------------------------------------------------------------------


@pytest.fixture
def replication(couch_url: str, server: Server, db_name: str) -> Iterator[dict[str, Any]]:
    """A source database with one document, the name of a target, and a context as a
    worker gives it; the databases and `_replicator` documents made are deleted after."""
    source = server.database(db_name + "-source")
    source.create()
    source.put({"_id": "greeting", "text": "hello"})
    target = db_name + "-target"
    context = JobContext(
        task_id=f"task-{db_name}", attempt=1, worker="manobi", couchdb_url=couch_url
    )
    yield {"source": source.name, "target": target, "context": context}
    delete_replications(server, lambda doc: doc.get("task") == context.task_id)
    for name in (source.name, target):
        with contextlib.suppress(NotFound):
            server.database(name).delete()


def test_start_replication_replicates_on_the_workers_own_couchdb(
    examples: JobLoader, server: Server, replication: dict[str, Any]
) -> None:
    job = examples.load("start_replication")
    arguments = [replication["source"], replication["target"], "nightly"]
    result = run_job(job, arguments, replication["context"])
    assert result["replication"] == "nightly" and result["started"] is True
    assert (result["source"], result["target"]) == tuple(arguments[:2])
    document = server.database("_replicator").get(result["id"])
    assert document["label"] == "nightly" and document["create_target"] is True
    copy = server.database(replication["target"])
    wait_for(lambda: copy.exists() and copy.get("greeting") is not None, timeout=30)
    assert copy.get("greeting")["text"] == "hello"
    # A retry of the same attempt finds its replication; it does not start a second one.
    assert run_job(job, arguments, replication["context"])["id"] == result["id"]


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ([2, 3, "test"], "source: 2 is neither a database name"),
        (["tasks", "Not A Name", "x"], "target: 'Not A Name' is neither a database name"),
        (["tasks", {"db": "b"}, "x"], "target: {'db': 'b'} is neither a database name"),
    ],
)
def test_start_replication_names_the_argument_it_cannot_use(
    examples: JobLoader, arguments: list[Any], reason: str
) -> None:
    context = JobContext(task_id="t", attempt=1, worker="w", couchdb_url="http://127.0.0.1:1/")
    with pytest.raises(ValueError, match=re.escape(reason)):
        run_job(examples.load("start_replication"), arguments, context)


def test_start_replication_outside_a_worker_says_what_it_needs(examples: JobLoader) -> None:
    with pytest.raises(RuntimeError, match="needs the worker's CouchDB"):
        run_job(examples.load("start_replication"), ["a", "b", "c"], CONTEXT)


def test_the_context_never_shows_the_workers_credentials() -> None:
    context = JobContext(task_id="t", attempt=1, worker="w", couchdb_url="http://u:secret@h/")
    assert "secret" not in repr(context)


def test_echo_returns_and_logs_its_arguments(
    examples: JobLoader, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="after.jobs.echo")
    assert run_job(examples.load("echo"), ["a", 1, {"b": [True]}], CONTEXT) == [
        "a",
        1,
        {"b": [True]},
    ]
    assert run_job(examples.load("echo"), [], CONTEXT) == []
    assert any(r.name == "after.jobs.echo" and "'a', 1" in r.getMessage() for r in caplog.records)


def test_sleep_sleeps_and_returns_the_seconds(examples: JobLoader) -> None:
    started = time.monotonic()
    assert run_job(examples.load("sleep"), [0.05], CONTEXT) == 0.05
    assert time.monotonic() - started >= 0.05
    assert run_job(examples.load("sleep"), [0], CONTEXT) == 0


@pytest.mark.parametrize("seconds", [-1, "1", None, True, float("nan"), 10**9])
def test_sleep_refuses_nonsense_durations(examples: JobLoader, seconds: Any) -> None:
    with pytest.raises(ValueError, match="seconds"):
        run_job(examples.load("sleep"), [seconds], CONTEXT)


def test_fail_raises_its_message(examples: JobLoader) -> None:
    with pytest.raises(RuntimeError, match=r"^failed on purpose$"):
        run_job(examples.load("fail"), [], CONTEXT)
    with pytest.raises(RuntimeError, match=r"^disk on fire$"):
        run_job(examples.load("fail"), ["disk on fire"], CONTEXT)


class _Handler(BaseHTTPRequestHandler):
    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/hello":
            self._answer(200, b"hello, after")
        elif self.path == "/big":
            self._answer(200, b"x" * 5000)
        elif self.path == "/headers":
            self._answer(200, (self.headers.get("X-Token") or "").encode())
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/hello")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._answer(404, b"no such page")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        kind = self.headers.get("Content-Type", "")
        self._answer(201, f"{kind}|{body.decode()}".encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_base(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A tiny HTTP server on 127.0.0.1, in a thread; yields its base URL."""
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_http_request_returns_status_url_time_and_body(examples: JobLoader, http_base: str) -> None:
    result = run_job(examples.load("http_request"), [f"{http_base}/hello"], CONTEXT)
    assert result["status"] == 200
    assert result["url"] == f"{http_base}/hello"
    assert result["body"] == "hello, after"
    assert isinstance(result["elapsed_ms"], float)
    assert result["elapsed_ms"] >= 0
    assert set(result) == {"status", "url", "elapsed_ms", "body"}


def test_http_request_keeps_the_first_2000_characters(examples: JobLoader, http_base: str) -> None:
    result = run_job(examples.load("http_request"), [f"{http_base}/big"], CONTEXT)
    assert result["body"] == "x" * 2000


def test_http_request_follows_redirects_and_reports_the_final_url(
    examples: JobLoader, http_base: str
) -> None:
    result = run_job(examples.load("http_request"), [f"{http_base}/redirect"], CONTEXT)
    assert (result["status"], result["url"]) == (200, f"{http_base}/hello")


def test_http_request_sends_method_body_and_headers(examples: JobLoader, http_base: str) -> None:
    run = examples.load("http_request")
    url = f"{http_base}/hook"
    as_json = run_job(run, [url, "post", {"a": 1}], CONTEXT)
    assert as_json["status"] == 201
    assert as_json["body"] == 'application/json|{"a": 1}'
    as_text = run_job(run, [url, "POST", "plain text", {"Content-Type": "text/plain"}], CONTEXT)
    assert as_text["body"] == "text/plain|plain text"
    headers = run_job(run, [f"{http_base}/headers", "GET", None, {"X-Token": "t0k"}, 5], CONTEXT)
    assert headers["body"] == "t0k"


def test_http_request_raises_on_error_status_naming_status_and_url(
    examples: JobLoader, http_base: str
) -> None:
    url = f"{http_base}/missing"
    with pytest.raises(RuntimeError) as raised:
        run_job(examples.load("http_request"), [url], CONTEXT)
    assert "404" in str(raised.value)
    assert url in str(raised.value)


def test_http_request_refuses_non_http_urls(examples: JobLoader) -> None:
    with pytest.raises(ValueError, match="http"):
        run_job(examples.load("http_request"), ["file:///etc/passwd"], CONTEXT)


def test_every_example_job_has_a_docstring_and_loads(examples: JobLoader) -> None:
    names = examples.available()
    assert {"echo", "fail", "http_request", "sleep", "start_replication"} <= set(names)
    for name in names:
        run = examples.load(name)
        assert callable(run)
        assert run.__module__ == f"after_jobs.{name}"
        assert run.__globals__["__doc__"], f"jobs/{name}.py has no module docstring"
        assert run.__doc__, f"run() of jobs/{name}.py has no docstring"


# -- names and paths --------------------------------------------------------------------------


def test_unknown_job_names_the_job_and_the_directory(loader: JobLoader, jobs_dir: Path) -> None:
    with pytest.raises(UnknownJob) as raised:
        loader.load("nope")
    message = str(raised.value)
    assert "'nope'" in message
    assert "nope.py" in message
    assert str(jobs_dir.resolve()) in message
    assert isinstance(raised.value, JobError)


@pytest.mark.parametrize(
    "name",
    ["../x", "os.path", "__init__", "__main__", "a-b", "", "a" * 65, "1st", "x\n", "a b", "é"],
)
def test_invalid_names_are_refused_before_touching_the_disk(loader: JobLoader, name: str) -> None:
    with pytest.raises(InvalidJobName, match="letters, digits and underscores"):
        loader.load(name)


@pytest.mark.parametrize("name", [None, 3, ["echo"], b"echo"])
def test_a_name_must_be_a_string(loader: JobLoader, name: Any) -> None:
    with pytest.raises(InvalidJobName, match="string"):
        loader.load(name)


def test_names_up_to_64_characters_and_single_underscores_are_fine(
    loader: JobLoader, jobs_dir: Path
) -> None:
    for name in ["a" * 64, "_private", "Job_2"]:
        assert JOB_NAME.match(name)
        write_job(jobs_dir, name, f"def run():\n    return {name!r}\n")
        assert run_job(loader.load(name), [], CONTEXT) == name


def test_a_symlink_to_a_file_outside_the_directory_is_refused(
    loader: JobLoader, jobs_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    marker = tmp_path / "executed"
    (outside / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef run():\n    return 'pwned'\n"
    )
    (jobs_dir / "evil.py").symlink_to(outside / "evil.py")
    with pytest.raises(BadJob, match="outside the jobs directory"):
        loader.load("evil")
    assert not marker.exists(), "the outside file was executed"


def test_a_symlink_within_the_directory_is_followed(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "real", "def run():\n    return 'real'\n")
    (jobs_dir / "alias.py").symlink_to(jobs_dir / "real.py")
    assert run_job(loader.load("alias"), [], CONTEXT) == "real"


def test_files_in_subdirectories_are_not_jobs(loader: JobLoader, jobs_dir: Path) -> None:
    (jobs_dir / "sub").mkdir()
    write_job(jobs_dir / "sub", "inner", "def run():\n    return 1\n")
    with pytest.raises(UnknownJob):
        loader.load("inner")
    with pytest.raises(InvalidJobName):
        loader.load("sub/inner")


def test_a_job_named_like_a_stdlib_module_shadows_nothing(
    loader: JobLoader, jobs_dir: Path
) -> None:
    write_job(jobs_dir, "json", "def run():\n    return 'my json'\n")
    before = sys.modules["json"]
    assert run_job(loader.load("json"), [], CONTEXT) == "my json"
    assert sys.modules["json"] is before
    assert json.dumps([1]) == "[1]"
    assert "after_jobs.json" not in sys.modules


def test_jobs_are_not_looked_up_on_sys_path(loader: JobLoader) -> None:
    assert "os" in sys.modules
    with pytest.raises(UnknownJob):
        loader.load("os")


# -- bad modules ------------------------------------------------------------------------------


def test_a_syntax_error_gives_bad_job_and_breaks_no_other_job(
    loader: JobLoader, jobs_dir: Path
) -> None:
    write_job(jobs_dir, "good", "def run():\n    return 'good'\n")
    write_job(jobs_dir, "broken", "def run(:\n    return 1\n")
    with pytest.raises(BadJob) as raised:
        loader.load("broken")
    assert "'broken'" in str(raised.value)
    assert "SyntaxError" in str(raised.value)
    assert run_job(loader.load("good"), [], CONTEXT) == "good"
    write_job(jobs_dir, "broken", "def run():\n    return 'fixed'\n")
    assert run_job(loader.load("broken"), [], CONTEXT) == "fixed"


def test_an_exception_at_import_gives_bad_job_with_its_type_and_text(
    loader: JobLoader, jobs_dir: Path
) -> None:
    write_job(jobs_dir, "boom", "raise ValueError('no config')\ndef run():\n    return 1\n")
    with pytest.raises(BadJob, match="ValueError: no config"):
        loader.load("boom")
    write_job(jobs_dir, "leaves", "import sys\nsys.exit(3)\n")
    with pytest.raises(BadJob, match="SystemExit"):
        loader.load("leaves")


@pytest.mark.parametrize("source", ["x = 1\n", "run = 5\n", ""])
def test_a_module_without_a_callable_run_gives_bad_job(
    loader: JobLoader, jobs_dir: Path, source: str
) -> None:
    write_job(jobs_dir, "norun", source)
    with pytest.raises(BadJob, match="run"):
        loader.load("norun")


def test_a_job_module_may_define_dataclasses(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(
        jobs_dir,
        "typed",
        "from __future__ import annotations\n"
        "from dataclasses import asdict, dataclass\n"
        "@dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "def run(x):\n"
        "    return asdict(Point(x))\n",
    )
    assert run_job(loader.load("typed"), [4], CONTEXT) == {"x": 4}


def test_no_bytecode_is_written_into_the_jobs_directory(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "plain", "def run():\n    return 1\n")
    loader.load("plain")
    assert not (jobs_dir / "__pycache__").exists()


# -- running ----------------------------------------------------------------------------------


def test_async_jobs_are_awaited(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(
        jobs_dir,
        "later",
        "import asyncio\nasync def run(x):\n    await asyncio.sleep(0)\n    return x * 2\n",
    )
    assert run_job(loader.load("later"), [21], CONTEXT) == 42


def test_a_returned_awaitable_is_awaited(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(
        jobs_dir,
        "deferred",
        "async def _work(x):\n    return [x]\ndef run(x):\n    return _work(x)\n",
    )
    assert run_job(loader.load("deferred"), ["y"], CONTEXT) == ["y"]


def test_async_jobs_run_even_from_inside_an_event_loop(loader: JobLoader, jobs_dir: Path) -> None:
    import asyncio

    write_job(jobs_dir, "coro", "async def run():\n    return 'ok'\n")
    run = loader.load("coro")

    async def caller() -> Any:
        return run_job(run, [], CONTEXT)

    assert asyncio.run(caller()) == "ok"


def test_a_job_declaring_context_gets_it(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(
        jobs_dir,
        "aware",
        "def run(a, *, context):\n"
        "    return {'a': a, 'task': context.task_id, 'attempt': context.attempt,\n"
        "            'worker': context.worker, 'key': context.idempotency_key}\n",
    )
    assert run_job(loader.load("aware"), [1], CONTEXT) == {
        "a": 1,
        "task": "task-1",
        "attempt": 2,
        "worker": "manobi",
        "key": "task-1:2",
    }


def test_async_jobs_get_context_too(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "aaware", "async def run(*, context=None):\n    return context.worker\n")
    assert run_job(loader.load("aaware"), [], CONTEXT) == "manobi"


def test_other_jobs_do_not_get_context(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "kw", "def run(*args, **kwargs):\n    return [list(args), kwargs]\n")
    write_job(jobs_dir, "positional", "def run(context=None):\n    return context\n")
    assert run_job(loader.load("kw"), [1], CONTEXT) == [[1], {}]
    assert run_job(loader.load("positional"), [], CONTEXT) is None


def test_context_has_an_idempotency_key_per_attempt() -> None:
    assert JobContext("t", 1, "w").idempotency_key == "t:1"
    assert JobContext("t", 2, "w").idempotency_key == "t:2"
    assert JobContext("t", 2, "w", "custom").idempotency_key == "custom"
    with pytest.raises(AttributeError):
        CONTEXT.attempt = 3  # type: ignore[misc]


NOT_JSON = "result of job 'weird' is not JSON-serialisable: "
NOT_STORABLE = "result of job 'weird' cannot be stored: "


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("object()", NOT_JSON + "Object of type object is not JSON serializable"),
        ("{1, 2}", NOT_JSON + "Object of type set is not JSON serializable"),
        ("float('nan')", NOT_STORABLE + "result: nan is not a JSON number (only finite ones are)"),
        ("[1, {'x': -float('inf')}]", NOT_STORABLE + "result[1].x: -inf is not a JSON number"),
        ("{'out': 'a \\udc80'}", NOT_STORABLE + "result.out: the lone surrogate \\udc80 is not"),
    ],
)
def test_a_result_that_is_not_json_is_refused(
    loader: JobLoader, jobs_dir: Path, expression: str, message: str
) -> None:
    write_job(jobs_dir, "weird", f"def run():\n    return {expression}\n")
    with pytest.raises(JobError) as raised:
        run_job(loader.load("weird"), [], CONTEXT)
    assert str(raised.value).startswith(message)


def test_exceptions_from_the_job_propagate_unchanged(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "oops", "def run():\n    raise KeyError('k')\n")
    with pytest.raises(KeyError):
        run_job(loader.load("oops"), [], CONTEXT)


def test_arguments_must_be_a_list(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "one", "def run(*a):\n    return list(a)\n")
    assert run_job(loader.load("one"), (1, 2), CONTEXT) == [1, 2]
    with pytest.raises(JobError, match="must be a list"):
        run_job(loader.load("one"), "abc", CONTEXT)  # type: ignore[arg-type]


# -- reloading --------------------------------------------------------------------------------


def test_an_edit_followed_at_once_by_a_run_runs_the_new_code(
    loader: JobLoader, jobs_dir: Path
) -> None:
    write_job(jobs_dir, "v", "def run():\n    return 1\n")
    assert run_job(loader.load("v"), [], CONTEXT) == 1
    write_job(jobs_dir, "v", "def run():\n    return 2\n")  # same size, same instant
    assert run_job(loader.load("v"), [], CONTEXT) == 2
    write_job(jobs_dir, "v", "def run():\n    return 'three'\n")
    assert run_job(loader.load("v"), [], CONTEXT) == "three"


def test_an_edit_is_seen_even_if_the_timestamp_did_not_change(
    loader: JobLoader, jobs_dir: Path
) -> None:
    path = write_job(jobs_dir, "same", "def run():\n    return 'old'\n")
    before = path.stat()
    assert run_job(loader.load("same"), [], CONTEXT) == "old"
    path.write_text("def run():\n    return 'new'\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # a coarse clock
    assert path.stat().st_size == before.st_size
    assert run_job(loader.load("same"), [], CONTEXT) == "new"


def test_an_atomic_replace_is_seen(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(jobs_dir, "swap", "def run():\n    return 'a'\n")
    assert run_job(loader.load("swap"), [], CONTEXT) == "a"
    tmp = jobs_dir / "swap.tmp"
    tmp.write_text("def run():\n    return 'b'\n")
    os.replace(tmp, jobs_dir / "swap.py")
    assert run_job(loader.load("swap"), [], CONTEXT) == "b"


def test_an_unchanged_job_is_not_reexecuted(loader: JobLoader, jobs_dir: Path) -> None:
    write_job(
        jobs_dir, "counted", "loads = []\nloads.append(1)\ndef run():\n    return len(loads)\n"
    )
    first = loader.load("counted")
    assert loader.load("counted") is first
    assert run_job(first, [], CONTEXT) == 1


def test_a_job_added_after_start_up_is_found(loader: JobLoader, jobs_dir: Path) -> None:
    with pytest.raises(UnknownJob):
        loader.load("newcomer")
    write_job(jobs_dir, "newcomer", "def run():\n    return 'hi'\n")
    assert run_job(loader.load("newcomer"), [], CONTEXT) == "hi"


def test_a_removed_job_is_unknown(loader: JobLoader, jobs_dir: Path) -> None:
    path = write_job(jobs_dir, "gone", "def run():\n    return 1\n")
    loader.load("gone")
    path.unlink()
    with pytest.raises(UnknownJob):
        loader.load("gone")


def test_an_edit_that_breaks_a_job_is_reported_not_hidden_by_the_old_code(
    loader: JobLoader, jobs_dir: Path
) -> None:
    write_job(jobs_dir, "fragile", "def run():\n    return 1\n")
    loader.load("fragile")
    write_job(jobs_dir, "fragile", "def run(:\n")
    with pytest.raises(BadJob, match="SyntaxError"):
        loader.load("fragile")


def test_the_watcher_drops_a_changed_job_and_logs_it(
    watched: JobLoader, jobs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="after.jobs")
    assert watched.watching
    write_job(jobs_dir, "echo", "def run():\n    return 'old'\n")
    assert run_job(watched.load("echo"), [], CONTEXT) == "old"
    write_job(jobs_dir, "echo", "def run():\n    return 'new'\n")
    expected = "job 'echo' changed; the next run uses the new code"
    poll(lambda: any(r.getMessage() == expected for r in caplog.records))
    assert "echo" not in watched._cache
    assert run_job(watched.load("echo"), [], CONTEXT) == "new"


def test_with_the_watcher_an_immediate_run_still_gets_the_new_code(
    watched: JobLoader, jobs_dir: Path
) -> None:
    for version in range(5):
        write_job(jobs_dir, "w", f"def run():\n    return {version}\n")
        assert run_job(watched.load("w"), [], CONTEXT) == version
    write_job(jobs_dir, "late", "def run():\n    return 'late'\n")
    assert run_job(watched.load("late"), [], CONTEXT) == "late"


def test_without_a_working_watcher_it_warns_and_still_reloads(
    jobs_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenObserver:
        def schedule(self, *args: Any, **kwargs: Any) -> None:
            pass

        def start(self) -> None:
            raise OSError(28, "inotify watch limit reached")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(jobs, "Observer", BrokenObserver)
    caplog.set_level(logging.WARNING, logger="after.jobs")
    with JobLoader(jobs_dir) as loader:
        assert not loader.watching
        assert any(
            r.levelno == logging.WARNING and "inotify watch limit" in r.getMessage()
            for r in caplog.records
        )
        write_job(jobs_dir, "j", "def run():\n    return 1\n")
        assert run_job(loader.load("j"), [], CONTEXT) == 1
        write_job(jobs_dir, "j", "def run():\n    return 2\n")
        assert run_job(loader.load("j"), [], CONTEXT) == 2


def test_a_missing_jobs_directory_is_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="after.jobs")
    missing = tmp_path / "missing"
    with JobLoader(missing) as loader:
        assert not loader.watching
        assert any("cannot watch" in r.getMessage() for r in caplog.records)
        with pytest.raises(UnknownJob, match=str(missing)):
            loader.load("anything")
        missing.mkdir()
        write_job(missing, "anything", "def run():\n    return 'found'\n")
        assert run_job(loader.load("anything"), [], CONTEXT) == "found"


def test_close_stops_the_watcher_and_is_idempotent(watched: JobLoader) -> None:
    assert watched.watching
    watched.close()
    assert not watched.watching
    watched.close()


def _alive(pid: int) -> bool:
    """Running, not a zombie left for a parent that does not reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_a_timeout_stops_the_job_and_what_it_started(jobs_dir: Path, tmp_path: Path) -> None:
    from after.jobs import JobTimeout, run_job_in_process

    pid_file = tmp_path / "child.pid"
    write_job(
        jobs_dir,
        "spawner",
        "import subprocess, time\n"
        "def run(pid_file):\n"
        "    child = subprocess.Popen(['sleep', '60'])\n"
        "    open(pid_file, 'w').write(str(child.pid))\n"
        "    time.sleep(60)\n",
    )
    with pytest.raises(JobTimeout, match=r"^timeout: job 'spawner' ran longer than 1 s"):
        run_job_in_process(jobs_dir, "spawner", [str(pid_file)], CONTEXT, timeout=1.0)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_child_process_started_past_the_lease_does_not_begin_the_job(
    jobs_dir: Path, tmp_path: Path
) -> None:
    """The worker was paused while the job's process started, past its lease (the soak,
    seed 9: the job began 5 s after a peer had judged its run lost): the child checks
    the lease's deadline before it begins the job, and says it did not."""
    from after.jobs import NotBegun, run_job_in_process

    ran = tmp_path / "ran"
    write_job(jobs_dir, "touch", f"def run():\n    open({str(ran)!r}, 'w').close()\n")
    with pytest.raises(NotBegun):
        run_job_in_process(jobs_dir, "touch", [], CONTEXT, timeout=10, not_after=time.time() - 1)
    assert not ran.exists()
    run_job_in_process(jobs_dir, "touch", [], CONTEXT, timeout=10, not_after=time.time() + 30)
    assert ran.exists()
