"""The dashboard: served by the database from _design/after's attachments, and
used end to end in a real headless browser (Debian's chromium driven by
Playwright; no browser download).

The browser tests need /usr/bin/chromium (`apt-get install chromium`; as root
they install it themselves when it is missing) and the `playwright` package;
without them they are skipped with the reason. Screenshots go to
test-artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import REPO, after_cli, new_task, wait_for

from after.config import Config, split_credentials
from after.couch import Database, Server
from after.push import compile_designdoc, designdocs_dir, md5_digest, push, same_attachments
from after.security import (
    DASHBOARD_POLICY,
    allow_dashboard,
    attachment_policies,
    is_pouchdb_server,
    restore_attachment_policies,
)
from after.tasks import iso

CHROMIUM = os.environ.get("AFTER_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"
TIMEOUT_MS = 20_000

# Room for the first browser test to install a missing chromium (as root, with apt-get).
pytestmark = pytest.mark.timeout(600)


# -- served by the database ---------------------------------------------------------------


def test_the_dashboards_built_in_rules_are_the_rules_of_the_design_document() -> None:
    """app.js carries a copy of the transitions for the moment before it has read
    lib/rules.json; the copy must not drift from the table."""
    source = (designdocs_dir() / "after" / "_attachments" / "app.js").read_text()
    literal = source[source.index("var DEFAULT_RULES = ") + len("var DEFAULT_RULES = ") :]
    literal = literal[: literal.index("\n  };") + len("\n  }")]
    node = shutil.which("node")
    assert node, "Node.js runs the embedded server; it is needed here too"
    printed = subprocess.run(
        [node, "-e", f"console.log(JSON.stringify({literal}))"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    rules = json.loads((designdocs_dir() / "after" / "lib" / "rules.json").read_text())
    built_in = json.loads(printed)
    assert built_in["transitions"] == rules["transitions"]
    assert built_in["statuses"] == rules["statuses"]
    assert built_in["record_prefix"] == rules["record_prefix"]


def test_the_dashboard_files_compile_to_attachments_with_their_content_types() -> None:
    doc = compile_designdoc(designdocs_dir() / "after")
    attachments = doc["_attachments"]
    assert attachments["index.html"]["content_type"] == "text/html; charset=utf-8"
    assert attachments["app.js"]["content_type"] == "text/javascript; charset=utf-8"
    assert attachments["style.css"]["content_type"] == "text/css; charset=utf-8"
    assert attachments["favicon.svg"]["content_type"] == "image/svg+xml"
    html = base64.b64decode(attachments["index.html"]["data"]).decode()
    assert '<script src="app.js" defer></script>' in html
    # A .js file under _attachments/ is a file to serve, not a design function.
    assert "app" not in doc and "_attachments" not in doc.get("lib", {})
    assert doc["rewrites"] == [{"from": "", "to": "index.html"}, {"from": "*", "to": "*"}]


def test_the_dashboard_is_served_by_the_database(
    couch_url: str, server: Server, db: Database
) -> None:
    base = f"{split_credentials(couch_url)[0]}{db.name}/_design/after/"
    expected = {
        "index.html": "text/html",
        "app.js": "text/javascript",
        "style.css": "text/css",
        "_rewrite/": "text/html",  # the array rewrites: the same page one path shorter
        "_rewrite/app.js": "text/javascript",
    }
    for path, content_type in expected.items():
        response = server.session.get(base + path, headers={"Accept": "*/*"}, timeout=10)
        assert response.status_code == 200, (path, response.status_code)
        assert response.headers["Content-Type"].startswith(content_type), path
    page = server.session.get(base + "index.html", timeout=10).text
    assert page == (designdocs_dir() / "after" / "_attachments" / "index.html").read_text()


def test_a_changed_or_removed_dashboard_file_is_deployed_and_an_unchanged_one_is_not(
    db: Database, tmp_path: Path
) -> None:
    root = tmp_path / "designdocs"
    shutil.copytree(designdocs_dir(), root)
    files = root / "after" / "_attachments"
    assert push(db, root).changed == []  # the same files as the fixture deployed
    (files / "extra.txt").write_text("hello\n")
    assert push(db, root).changed == ["_design/after"]
    stub = db.get("_design/after")["_attachments"]["extra.txt"]
    assert stub["content_type"] == "text/plain; charset=utf-8"
    assert stub["digest"] == md5_digest(b"hello\n") or stub["length"] == 6
    assert push(db, root).changed == []
    (files / "extra.txt").write_text("hello again\n")
    assert push(db, root).changed == ["_design/after"]
    (files / "extra.txt").unlink()
    assert push(db, root).changed == ["_design/after"]
    assert "extra.txt" not in db.get("_design/after")["_attachments"]
    (files / ".hidden").write_text("editor state")
    assert push(db, root).changed == []  # dot files are not deployed


def test_attachments_are_compared_by_content_where_the_digest_differs(db: Database) -> None:
    """Apache CouchDB digests what it stores (gzip for text types), so a digest that
    is not the MD5 of our file is settled by reading the attachment back."""
    compiled = compile_designdoc(designdocs_dir() / "after")
    current = db.get("_design/after")
    for stub in current["_attachments"].values():
        stub["digest"] = "md5-notthecontentsdigest=="
    assert same_attachments(db, current, compiled)
    compiled["_attachments"]["index.html"]["data"] = base64.b64encode(b"<p>changed</p>").decode()
    current["_attachments"]["index.html"]["length"] = len(b"<p>changed</p>")
    assert not same_attachments(db, current, compiled)


# -- in a real browser ------------------------------------------------------------------------


def chromium_problem() -> str | None:
    """Why the browser tests cannot run, or None; as root, a missing chromium is installed."""
    if Path(CHROMIUM).exists():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "chromium"],
            check=True,
            timeout=900,
            capture_output=True,
            env=env,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{CHROMIUM} is missing and `apt-get install chromium` failed: {exc}"
    return None if Path(CHROMIUM).exists() else f"{CHROMIUM} is still missing after apt-get"


@pytest.fixture
def db(one_copy_db: Database) -> Database:
    """What is checked here is what the page shows of the views, not a cluster's
    consistency: on a cluster a view is read from one copy of each shard, which may
    lack the writes just made (docs/couchdb.md). One copy, as on a single node."""
    return one_copy_db


@pytest.fixture(scope="module")  # closed after this file: Playwright keeps an event loop running
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the playwright package is not installed (pip install playwright)",
    )
    problem = chromium_problem()
    if problem:
        pytest.skip(problem)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def dashboard_allowed(server: Server) -> Iterator[None]:
    """On Apache CouchDB >= 3.2 the page's script runs only after `after setup
    --dashboard` (tested below); the browser tests set the same policy through the
    same function, and put the server's own policy back afterwards."""
    if is_pouchdb_server(server):
        yield
        return
    before = allow_dashboard(server)
    try:
        yield
    finally:
        restore_attachment_policies(server, before)


@pytest.fixture
def page(
    browser: Any, request: pytest.FixtureRequest, db: Database, dashboard_allowed: None
) -> Iterator[Any]:
    """A fresh browser context; the page's errors fail the test; a screenshot at the end
    (taken before the test database goes away)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        tab.screenshot(path=str(ARTIFACTS / f"dashboard-{request.node.name}.png"), full_page=True)
    finally:
        context.close()
    assert not errors, f"errors in the page: {errors}"


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def credentials(couch_url: str) -> tuple[str, str | None, str | None]:
    return split_credentials(couch_url)


def log_in_as_fauxton_would(page: Any, couch_url: str, index: str) -> bool:
    """A database only members may read (Apache CouchDB's default) does not serve the
    page to a browser without a session: CouchDB redirects it to Fauxton's login,
    /_utils/session.html, which logs in through `_session` and comes back. This
    build has no Fauxton, so the session is opened as that page opens it. True if
    a session was needed."""
    url, user, password = credentials(couch_url)
    anonymous = requests.get(index, headers={"Accept": "text/html"}, allow_redirects=False)
    if anonymous.status_code == 200 or not user:
        return False
    assert anonymous.status_code == 302, (anonymous.status_code, anonymous.text)
    path = index.removeprefix(url.rstrip("/"))
    assert anonymous.headers["Location"].endswith(
        f"/_utils/session.html?return={requests.utils.quote(path, safe='')}"
        "&reason=You%20are%20not%20authorized%20to%20access%20this%20db."
    ), anonymous.headers["Location"]
    answer = page.request.post(f"{url}_session", form={"name": user, "password": password})
    assert answer.ok, answer.text()
    return True


def open_dashboard(page: Any, couch_url: str, db: Database) -> None:
    """Open the dashboard of `db`; on a server with credentials, log in through its form,
    or, where the page itself needs a session, as Fauxton's login would."""
    url, user, password = credentials(couch_url)
    index = f"{url}{db.name}/_design/after/index.html"
    logged_in = log_in_as_fauxton_would(page, couch_url, index)
    response = page.goto(index)
    policy = response.headers.get("content-security-policy", "") if response else ""
    if "sandbox" in policy and "allow-scripts" not in policy:
        pytest.fail(
            f"the server sends `Content-Security-Policy: {policy}` with attachments, which "
            "blocks the dashboard's script (Apache CouchDB >= 3.2 does by default): a server "
            "admin must set [csp] attachments_enable = false"
        )
    expect(page.locator("#script-blocked")).to_be_hidden()
    if logged_in:
        expect(page.locator("#who")).to_contain_text(f"Logged in as {user}")
    elif user:
        log_in(page, user, password or "")
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#live")).to_have_attribute("data-state", "live")


def log_in(page: Any, user: str, password: str) -> None:
    box = page.locator("#login-box")
    if box.get_attribute("open") is None:
        page.locator("#login-summary").click()
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(password)
    page.locator("#login-form button[type=submit]").click()
    expect(page.locator("#who")).to_contain_text(f"Logged in as {user}")


def post_task(couch_url: str, db: Database, **fields: Any) -> str:
    """Create a task through the plain HTTP API, as any client would."""
    url, user, password = credentials(couch_url)
    response = requests.post(
        f"{url}{db.name}",
        json=new_task(**fields),
        auth=(user, password or "") if user else None,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return response.json()["id"]


def in_minutes(minutes: float) -> str:
    return iso(datetime.now(UTC) + timedelta(minutes=minutes))


def row(page: Any, table: str, task_id: str) -> Any:
    return page.locator(f"#{table} tbody tr[data-id='{task_id}']")


@pytest.fixture
def worker(config: Config) -> Iterator[Any]:
    """An in-process worker "manobi" on a thread, stopped at the end of the test."""
    from after.worker import Worker

    running = Worker(config, "manobi", heartbeat=0.5, lease=5)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    assert running.ready.wait(15), "the worker did not start"
    yield running
    running.stop()
    thread.join(15)


def test_who_is_logged_in_is_shown_and_the_login_form_logs_in(
    page: Any, couch_url: str, server: Server, db: Database
) -> None:
    open_dashboard(page, couch_url, db)
    session = server.json("GET", "_session")["userCtx"]
    if session["name"] is None and "_admin" in session["roles"]:
        # PouchDB Server's admin party: anonymous access works, and the page says so plainly.
        expect(page.locator("#who")).to_contain_text("Admin party")
        expect(page.locator("#who")).to_contain_text("anyone who can reach this server")
        name, password = f"dash-{uuid.uuid4().hex[:8]}", "s3cret-pass"
        server.put_user(name, password, ["after_client"])
        try:
            page.reload()
            log_in(page, name, password)
            expect(page.locator("#who")).to_contain_text("after_client")
            expect(page.locator("#logout")).to_be_visible()
            page.locator("#logout").click()
            expect(page.locator("#who")).to_contain_text("Admin party")
        finally:
            users = server.database("_users")
            doc = users.get(f"org.couchdb.user:{name}")
            if doc:
                server.json(
                    "DELETE", f"_users/org.couchdb.user:{name}", params={"rev": doc["_rev"]}
                )
    else:
        _, user, _ = credentials(couch_url)
        expect(page.locator("#who")).to_contain_text(f"Logged in as {user}")
        page.locator("#logout").click()
        expect(page.locator("#who")).to_contain_text("Not logged in")
    if page.locator("#login-box").get_attribute("open") is None:
        page.locator("#login-summary").click()
    page.get_by_label("User name").fill("nobody-" + uuid.uuid4().hex[:6])
    page.get_by_label("Password").fill("wrong")
    page.locator("#login-form button[type=submit]").click()
    expect(page.locator("#login-error")).not_to_be_empty()


def test_a_task_created_over_http_appears_live_and_is_canceled_from_the_page(
    page: Any, couch_url: str, db: Database, worker: Any
) -> None:
    open_dashboard(page, couch_url, db)
    expect(page.locator("#instances tbody tr[data-state='live']")).to_contain_text("manobi")

    task_id = post_task(
        couch_url, db, date=in_minutes(60), job={"name": "echo", "arguments": ["hi"]}
    )
    upcoming = row(page, "upcoming", task_id)
    expect(upcoming).to_contain_text("echo")  # no reload: the changes feed brought it
    expect(upcoming).to_contain_text('["hi"]')
    expect(page.locator("#counts [data-status=waiting] .n")).to_have_text("1")
    expect(page.locator("#activity")).to_contain_text("echo · manobi")

    upcoming.get_by_role("button", name="Cancel task").click()
    dialog = page.locator("#action-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Cancel this task?")
    dialog.get_by_role("button", name="Cancel task").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#notice")).to_contain_text("cancel requested")

    # The worker confirms: cancel -> canceled, in the database and on the page.
    wait_for(lambda: db.get(task_id)["status"] == "canceled", timeout=15)
    expect(page.locator("#counts [data-status=canceled] .n")).to_have_text("1")
    expect(upcoming).to_have_count(0)
    expect(page.locator("#activity li").first).to_contain_text("canceled")


def test_a_failed_run_shows_its_error_live_and_in_recent_runs(
    page: Any, couch_url: str, db: Database, worker: Any
) -> None:
    open_dashboard(page, couch_url, db)
    ok = post_task(couch_url, db, date=in_minutes(0), job={"name": "echo", "arguments": [1]})
    failing = post_task(
        couch_url, db, date=in_minutes(0), job={"name": "fail", "arguments": ["disk full on /srv"]}
    )
    failed = row(page, "failed", failing)
    expect(failed).to_contain_text("RuntimeError: disk full on /srv")
    expect(failed.get_by_role("button", name="Retry task")).to_be_visible()
    failed.locator("details.trace summary").click()
    expect(failed.locator("details.trace pre")).to_contain_text("Traceback")
    expect(page.locator("#failed-count")).to_have_text("1")
    expect(row(page, "runs", ok)).to_contain_text("done")
    expect(row(page, "runs", failing)).to_contain_text("err")
    expect(page.locator("#chart svg rect.bar-err")).to_have_count(1)
    expect(page.locator("#chart-caption")).to_contain_text(
        "2 runs in the last 30 minutes, 1 failed"
    )
    assert db.get(failing)["error"]["message"] == "disk full on /srv"


def done_run(db: Database, date: str, started: datetime, finished: datetime) -> str:
    """A run written as a worker would, step by step: done, started `started`."""
    doc = new_task(date=date, job={"name": "echo", "arguments": []})
    doc["_id"], doc["_rev"] = db.post(doc)
    for fields in (
        {"status": "scheduled", "owner": "manobi@host:1:abcd"},
        {"status": "running", "attempt": 1, "started_at": iso(started)},
        {"status": "done", "finished_at": iso(finished), "duration_ms": 3.0, "result": None},
    ):
        doc.update(fields)
        doc["_rev"] = db.put(doc)
    return doc["_id"]


def test_one_run_years_late_does_not_flatten_the_delay_chart(
    page: Any, couch_url: str, db: Database
) -> None:
    """The original README's task, dated 2011 and run today, beside runs a few tens of
    milliseconds late: the delay scale is capped below it, it is marked at the top, and
    every label is a duration (not a count of minutes such as 833333m)."""
    now = datetime.now(UTC)
    for minutes_ago, late_ms in ((20, 40), (10, 80)):
        due = now - timedelta(minutes=minutes_ago)
        done_run(db, iso(due), due + timedelta(milliseconds=late_ms), due + timedelta(seconds=1))
    done_run(db, "2011-10-12", now - timedelta(minutes=1), now - timedelta(seconds=59))
    open_dashboard(page, couch_url, db)
    chart = page.locator("#chart svg")
    expect(chart.locator("polygon.late-off")).to_have_count(1)
    expect(chart.locator("circle.late-dot")).to_have_count(2)
    expect(page.locator("#chart-caption")).to_contain_text(
        "delay scale capped at 100ms, 1 minute above it"
    )
    labels = chart.locator("text.axis").all_text_contents()
    assert "100ms" in labels and "worst delay (capped)" in labels, labels
    assert not [label for label in labels if re.fullmatch(r"\d{4,}.*", label)], labels


def test_a_failed_task_is_retried_from_the_page(page: Any, couch_url: str, db: Database) -> None:
    """No worker here: the err task is written as a worker would, step by step."""
    doc = new_task(date=in_minutes(-1), job={"name": "fail", "arguments": []})
    doc["_id"], doc["_rev"] = db.post(doc)
    task_id = doc["_id"]
    for fields in (
        {"status": "scheduled", "owner": "manobi@host:1:abcd"},
        {"status": "running", "attempt": 1, "started_at": in_minutes(-1)},
        {
            "status": "err",
            "finished_at": in_minutes(0),
            "duration_ms": 2.5,
            "error": {
                "type": "RuntimeError",
                "message": "failed on purpose",
                "traceback": "Traceback: ...",
            },
        },
    ):
        doc.update(fields)
        db.put(doc)
    open_dashboard(page, couch_url, db)
    failed = row(page, "failed", task_id)
    expect(failed).to_contain_text("RuntimeError: failed on purpose")
    failed.get_by_role("button", name="Retry task").click()
    dialog = page.locator("#action-dialog")
    expect(dialog).to_contain_text("Retry this failed task")
    new_date = in_minutes(30)
    dialog.get_by_label("New date").fill(new_date)
    dialog.get_by_role("button", name="Retry").click()
    expect(dialog).to_be_hidden()
    wait_for(lambda: db.get(task_id)["status"] == "reschedule")
    assert db.get(task_id)["date"] == new_date
    expect(failed).to_have_count(0)  # no longer failed: waiting for a worker to take it up
    expect(row(page, "upcoming", task_id)).to_contain_text("reschedule")


def test_a_refused_action_shows_the_servers_reason(page: Any, couch_url: str, db: Database) -> None:
    open_dashboard(page, couch_url, db)

    # Creating a task with a job name no module can have.
    page.get_by_label("Job").fill("9lives")
    page.get_by_label("Arguments").fill('[1, "two"]')
    page.get_by_role("button", name="Create task").click()
    message = page.locator("#new-task-message")
    expect(message).to_contain_text("Refused by the server: job.name: must be a job module name")
    expect(page.locator("#counts [data-status=waiting] .n")).to_have_text("0")

    # Arguments that are not JSON never reach the server.
    page.get_by_label("Job").fill("echo")
    page.get_by_label("Arguments").fill("[1, 2")
    page.get_by_role("button", name="Create task").click()
    expect(message).to_contain_text("Arguments: not valid JSON")

    # A valid one is created, then rescheduled to a date that does not exist.
    page.get_by_label("Arguments").fill('["from the form"]')
    page.locator("#new-date").fill(in_minutes(90))
    page.get_by_role("button", name="Create task").click()
    expect(message).to_contain_text("Created task")
    task_id = message.inner_text().split("Created task ", 1)[1].split(" ", 1)[0]
    upcoming = row(page, "upcoming", task_id)
    expect(upcoming).to_contain_text('["from the form"]')
    before = db.get(task_id)

    upcoming.get_by_role("button", name="Reschedule task").click()
    dialog = page.locator("#action-dialog")
    dialog.get_by_label("New date").fill("2011-02-30")
    dialog.get_by_role("button", name="Reschedule").click()
    error = dialog.locator("#action-error")
    expect(error).to_contain_text(
        'Refused by the server: date: "2011-02-30" is not a real calendar date'
    )
    expect(page.locator("#notice")).to_contain_text("is not a real calendar date")
    expect(dialog).to_be_visible()  # stays open to correct the date
    assert db.get(task_id) == before

    later = in_minutes(120)
    dialog.get_by_label("New date").fill(later)
    dialog.get_by_role("button", name="Reschedule").click()
    expect(dialog).to_be_hidden()
    wait_for(lambda: db.get(task_id)["status"] == "reschedule")
    assert db.get(task_id)["date"] == later


def test_late_tasks_and_worker_records_are_shown(page: Any, couch_url: str, db: Database) -> None:
    late_id = post_task(couch_url, db, worker="nightly", date=in_minutes(-14), job={"name": "echo"})
    now = datetime.now(UTC)
    instance = "nightly@box:7:feedbeef"
    db.put(
        {
            "_id": f"after-worker:{instance}",
            "type": "worker",
            "name": "nightly",
            "instance": instance,
            "host": "box",
            "pid": 7,
            "last_seen": iso(now - timedelta(minutes=3)),
            "lease_until": iso(now - timedelta(minutes=2)),
            "state": "running",
            "held": 0,
            "done": 4,
            "failed": 1,
        }
    )
    open_dashboard(page, couch_url, db)
    late = row(page, "late", late_id)
    expect(late).to_contain_text("late by 14m")
    expect(late).to_contain_text("nightly")
    expect(page.locator("#late-count")).to_have_text("1")
    record = page.locator(f"#instances tbody tr[data-instance='{instance}']")
    expect(record).to_have_attribute("data-state", "stale")
    expect(record).to_contain_text("3m")
    expect(record).to_contain_text("ago")
    expect(page.locator("#workers tbody tr[data-worker=nightly]")).to_contain_text("1 waiting")


def test_readable_on_a_phone_and_labelled(browser: Any, couch_url: str, db: Database) -> None:
    for index in range(3):
        post_task(
            couch_url, db, date=in_minutes(5 + index), job={"name": "echo", "arguments": [index]}
        )
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True
    )
    try:
        phone = context.new_page()
        phone.set_default_timeout(TIMEOUT_MS)
        open_dashboard(phone, couch_url, db)
        expect(phone.locator("#upcoming tbody tr")).to_have_count(3)
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width}px wide on a 390px screen"
        # On a phone each row is a card whose cells name their column.
        expect(phone.locator("#upcoming tbody td[data-label=Worker]").first).to_have_text("manobi")
        unlabelled = phone.evaluate(
            """() => Array.from(document.querySelectorAll('input, select, textarea'))
                 .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
                 .map(el => el.id)"""
        )
        assert unlabelled == []
        nameless = phone.evaluate(
            """() => Array.from(document.querySelectorAll('button'))
                 .filter(el => !(el.getAttribute('aria-label') || el.textContent.trim()))
                 .map(el => el.id)"""
        )
        assert nameless == []
        ARTIFACTS.mkdir(exist_ok=True)
        phone.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    finally:
        context.close()


def with_policy(page: Any, policy: str) -> None:
    """Serve the page with a Content-Security-Policy header, as Apache CouchDB may."""

    def handle(route: Any) -> None:
        response = route.fetch()
        route.fulfill(
            response=response, headers={**response.headers, "content-security-policy": policy}
        )

    page.route("**/_design/after/index.html", handle)


def test_a_page_whose_script_is_blocked_says_why(page: Any, couch_url: str, db: Database) -> None:
    """Apache CouchDB >= 3.2 serves attachments with `Content-Security-Policy: sandbox`."""
    with_policy(page, "sandbox")
    index = f"{credentials(couch_url)[0]}{db.name}/_design/after/index.html"
    log_in_as_fauxton_would(page, couch_url, index)
    page.goto(index)
    banner = page.locator("#script-blocked")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("after setup --dashboard")
    expect(page.locator("#main")).to_be_hidden()


def test_after_setup_dashboard_makes_the_page_run_on_a_default_server(
    browser: Any, couch_url: str, server: Server, db: Database
) -> None:
    """Apache CouchDB >= 3.2 as installed: its own `sandbox` header keeps the script from
    running and the page says what to run; after the command, the dashboard works.
    PouchDB Server sends no policy: the command says nothing is needed."""
    url = split_credentials(couch_url)[0]
    index = f"{url}{db.name}/_design/after/index.html"
    env = {**os.environ, "AFTER_COUCHDB_URL": couch_url, "AFTER_DB": db.name}
    before = None if is_pouchdb_server(server) else attachment_policies(server)
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    try:
        if before is not None:
            restore_attachment_policies(server, dict.fromkeys(before))  # CouchDB's default
            tab = context.new_page()
            log_in_as_fauxton_would(tab, couch_url, index)
            answer = tab.goto(index)
            assert answer is not None and answer.headers["content-security-policy"] == "sandbox"
            expect(tab.locator("#script-blocked")).to_be_visible()
            expect(tab.locator("#script-blocked")).to_contain_text("after setup --dashboard")
            tab.close()
        result = after_cli(env, "setup", "--dashboard")
        assert result.returncode == 0, result.stderr
        if before is None:
            assert "needs no setting" in result.stdout
        else:
            assert f"attachments_header_value = {DASHBOARD_POLICY} (was: " in result.stdout
            assert "server-wide" in result.stdout
            assert set(attachment_policies(server).values()) == {DASHBOARD_POLICY}
        tab = context.new_page()
        answer = tab.goto(index + "?after-setup")  # not the copy the browser keeps
        assert answer is not None
        assert answer.headers.get("content-security-policy") in (None, DASHBOARD_POLICY)
        expect(tab.locator("#script-blocked")).to_be_hidden()
        user, password = split_credentials(couch_url)[1:]
        if before is not None:  # logged in above
            expect(tab.locator("#who")).to_contain_text(f"Logged in as {user}")
        elif user:
            log_in(tab, user, password or "")
        expect(tab.locator("#main")).to_be_visible()
    finally:
        context.close()
        if before is not None:
            restore_attachment_policies(server, before)


def test_the_dashboard_works_under_a_strict_content_security_policy(
    page: Any, couch_url: str, db: Database
) -> None:
    """No inline script or style: a policy of `default-src 'self'` does not break it."""
    violations: list[str] = []
    page.on(
        "console",
        lambda message: (
            violations.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    with_policy(page, "default-src 'self'; img-src 'self' data:")
    task_id = post_task(couch_url, db, date=in_minutes(10))
    open_dashboard(page, couch_url, db)
    expect(row(page, "upcoming", task_id)).to_be_visible()
    expect(page.locator("#chart svg")).to_be_visible()
    assert violations == []
