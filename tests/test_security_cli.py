"""Secrets, the admin-party warning, `after couchdb lock`, config files and cookie sessions.

The command line runs as a user runs it (`python -m after ...` processes)
against real servers: the session's test server, and, where a server with an
admin is needed (an anonymous request that is really anonymous, an expired
cookie), an embedded PouchDB Server started here with a pre-seeded admin.
No test passes a password on a command line, and every output is searched for it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from conftest import REPO, after_cli, new_task, wait_for
from test_roles import PUBLIC, Users, after_users

from after import embedded
from after.cli import process_running
from after.config import Config, ConfigError, redact, split_credentials
from after.couch import Forbidden, Server
from after.push import push
from after.security import LOCK_COMMAND, admin_party, security_object, user_context
from after.supervisor import read_state

WARNING = 'is in "admin party"'


def clean_env(**values: str) -> dict[str, str]:
    """The environment without any AFTER_ setting of the person running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AFTER_", "PYTEST_"))}
    env.update(COLUMNS="200", PYTHONIOENCODING="utf-8", **values)
    return env


def with_password(url: str, user: str, password: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{quote(user, safe='')}:{quote(password, safe='')}@{rest}"


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def write_config(path: Path, mode: int, **values: str) -> Path:
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    path.chmod(mode)
    return path


# -- servers, users, databases ---------------------------------------------------------------


@pytest.fixture(scope="module")
def users(server: Server) -> Iterator[Users]:
    with after_users(server) as created:
        yield created


@pytest.fixture(scope="module")
def secured(server: Server) -> Iterator[str]:
    """The name of a tasks database as `after setup` leaves it."""
    database = server.database(f"after-test-secrets-{uuid.uuid4().hex[:12]}")
    push(database)
    database.set_security(security_object())
    yield database.name
    database.delete()


@pytest.fixture(scope="module")
def party(server: Server) -> bool:
    return admin_party(server.url)


@dataclass
class Locked:
    """An embedded server with a server admin: anonymous requests are anonymous there."""

    url: str
    admin: Server
    client: tuple[str, str]
    db: str


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    data = tmp_path_factory.mktemp("locked")
    credentials = ("boss", secrets.token_urlsafe(12))
    port = embedded.free_port()
    process = embedded.start(port, data, data / "server.log", admin=credentials)
    url = f"http://127.0.0.1:{port}/"
    try:
        embedded.wait_healthy(url, timeout=60, process=process)
        admin = Server(url, credentials)
        database = admin.database("tasks")
        push(database)
        database.set_security(security_object())
        public = admin.database("public")
        push(public)
        public.set_security(PUBLIC)
        client = ("carol", secrets.token_urlsafe(12))
        admin.put_user(*client, ["after_client"])
        yield Locked(url, admin, client, "tasks")
    finally:
        embedded.stop(process)


# -- 1. the configuration file ---------------------------------------------------------------


def test_a_config_file_gives_every_setting(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "config.toml",
        0o600,
        couchdb_url="https://couch.example.com:6984/",
        db="jobs_db",
        user="after",
        password="p@ss word",
        auth="cookie",
        jobs="myjobs",
        home="/srv/after",
    )
    config = Config.from_env({"AFTER_CONFIG": str(path)})
    assert config.couchdb_url == "https://couch.example.com:6984/"
    assert (config.db, config.user, config.password) == ("jobs_db", "after", "p@ss word")
    assert config.auth_method == "cookie"
    assert config.jobs == tmp_path / "myjobs", "a relative path is relative to the file"
    assert config.home == Path("/srv/after")
    assert config.display_url == "https://after:***@couch.example.com:6984/"


def test_the_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "c.toml",
        0o600,
        couchdb_url="http://a:1/",
        db="from_file",
        user="after",
        password="file-secret",
    )
    env = {"AFTER_CONFIG": str(path), "AFTER_DB": "from_env", "AFTER_COUCHDB_URL": "http://b:2/"}
    config = Config.from_env(env)
    assert (config.couchdb_url, config.db) == ("http://b:2/", "from_env")
    assert (config.user, config.password) == ("after", "file-secret"), "credentials still apply"
    flagged = config.override(couchdb_url="http://c:3/", db="from_flag")
    assert (flagged.couchdb_url, flagged.db, flagged.user) == ("http://c:3/", "from_flag", "after")


def test_a_password_in_the_file_goes_only_with_the_files_user(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.toml", 0o600, user="after", password="file-secret")
    config = Config.from_env({"AFTER_CONFIG": str(path), "AFTER_COUCHDB_USER": "someone"})
    assert (config.user, config.password) == ("someone", None)
    both = Config.from_env({"AFTER_CONFIG": str(path), "AFTER_COUCHDB_PASSWORD": "env-secret"})
    assert (both.user, both.password) == ("after", "env-secret")


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"user": "after", "password": "file-secret"}, id="password-key"),
        pytest.param({"couchdb_url": "http://after:file-secret@127.0.0.1:5984/"}, id="in-url"),
    ],
)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_file_with_a_password_others_can_read_is_refused(
    tmp_path: Path, values: dict[str, str], mode: int
) -> None:
    path = write_config(tmp_path / "config.toml", mode, **values)
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AFTER_CONFIG": str(path)})
    message = str(caught.value)
    assert str(path) in message and f"chmod 600 {path}" in message
    assert "file-secret" not in message


def test_a_file_without_a_password_may_be_readable_by_others(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", 0o644, couchdb_url="http://h:1/", user="after")
    config = Config.from_env({"AFTER_CONFIG": str(path), "AFTER_COUCHDB_PASSWORD": "env-secret"})
    assert config.couchdb_url == "http://h:1/"
    assert (config.user, config.password) == ("after", "env-secret")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param('password = "file-secret\nuser = 1', "not valid TOML", id="bad-toml"),
        pytest.param('pasword = "file-secret"', "unknown key pasword", id="unknown-key"),
        pytest.param("db = 42", "db must be a string", id="not-a-string"),
        pytest.param('auth = "digest"', "must be one of basic, cookie", id="bad-auth"),
    ],
)
def test_a_broken_file_is_one_clear_error_without_its_content(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "config.toml"
    path.write_text(content + "\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"AFTER_CONFIG": str(path)})
    assert expected in str(caught.value)
    assert "file-secret" not in str(caught.value)


def test_the_default_file_is_read_from_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [key for key in os.environ if key.startswith("AFTER_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".after").mkdir()
    write_config(tmp_path / ".after" / "config.toml", 0o600, db="from_home_file")
    assert Config.from_env().db == "from_home_file"
    assert Config.from_env({}).db == "tasks", "an explicit environment names its own file"


def test_the_cli_refuses_a_readable_file_with_one_line(tmp_path: Path) -> None:
    path = write_config(tmp_path / "config.toml", 0o644, user="after", password="file-secret")
    env = clean_env(AFTER_CONFIG=str(path), AFTER_HOME=str(tmp_path))
    for command in (["status"], ["list"], ["push"]):
        result = after_cli(env, *command)
        assert result.returncode != 0
        assert "Traceback" not in output(result)
        assert f"chmod 600 {path}" in result.stderr
        assert "file-secret" not in output(result)


# -- 2. URLs: HTTPS, redaction ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url", "user", "password"),
    [
        (
            "https://after:s%3Acret@couch.example.com:6984/",
            "https://couch.example.com:6984/",
            "after",
            "s:cret",
        ),
        ("https://couch.example.com", "https://couch.example.com/", None, None),
        (
            "https://u:pw-9q@couch.example.com/prefix/couchdb",
            "https://couch.example.com/prefix/couchdb/",
            "u",
            "pw-9q",
        ),
        ("https://u:pw-9q@[::1]:6984/", "https://[::1]:6984/", "u", "pw-9q"),
    ],
)
def test_https_urls_keep_their_scheme_host_port_and_path(
    given: str, url: str, user: str | None, password: str | None
) -> None:
    assert split_credentials(given) == (url, user, password)
    shown = redact(given)
    assert shown.startswith("https://")
    if password:
        assert f"{user}:***@" in shown and password not in shown
        config = Config.from_env({"AFTER_COUCHDB_URL": given})
        assert config.display_url == shown
        assert Server.from_config(config).display_url == shown


def test_the_nodes_of_a_cluster_are_given_as_one_comma_separated_list() -> None:
    given = "http://after:s3cret@10.0.0.1:5984/, http://10.0.0.2:5984,http://10.0.0.3:5984/"
    nodes = ["http://10.0.0.1:5984/", "http://10.0.0.2:5984/", "http://10.0.0.3:5984/"]
    assert split_credentials(given) == (",".join(nodes), "after", "s3cret")
    config = Config.from_env({"AFTER_COUCHDB_URL": given})
    assert config.couchdb_urls == nodes
    assert config.auth == ("after", "s3cret")
    assert "s3cret" not in config.display_url and "s3cret" not in redact(given)
    assert config.display_url.count("after:***@") == 3
    server = Server.from_config(config)
    assert server.urls == nodes and server.url == nodes[0]
    assert server.node_url == nodes[0] and "s3cret" not in server.display_url
    flag = config.override(couchdb_url="http://10.0.0.4:5984,http://10.0.0.5:5984")
    assert flag.couchdb_urls == ["http://10.0.0.4:5984/", "http://10.0.0.5:5984/"]
    assert flag.auth == ("after", "s3cret")  # the URLs named no credentials: kept


# -- 3. no password in any output ------------------------------------------------------------


def cli_envs(couch_url: str, db: str, users: Users, tmp_path: Path) -> dict[str, dict[str, str]]:
    """The three ways to give the client's credentials: URL, environment, config file."""
    name, password = users.credentials["client"]
    plain_url, _, _ = split_credentials(couch_url)
    base = {"AFTER_DB": db, "AFTER_HOME": str(tmp_path / "home"), "AFTER_JOBS": str(REPO / "jobs")}
    config = write_config(
        tmp_path / "config.toml", 0o600, couchdb_url=plain_url, user=name, password=password
    )
    return {
        "url": clean_env(AFTER_COUCHDB_URL=with_password(plain_url, name, password), **base),
        "env": clean_env(
            AFTER_COUCHDB_URL=plain_url,
            AFTER_COUCHDB_USER=name,
            AFTER_COUCHDB_PASSWORD=password,
            **base,
        ),
        "file": clean_env(AFTER_CONFIG=str(config), **base),
        "cookie": clean_env(AFTER_CONFIG=str(config), AFTER_COUCHDB_AUTH="cookie", **base),
    }


@pytest.mark.parametrize("how", ["url", "env", "file", "cookie"])
def test_status_and_list_work_for_a_client_and_never_show_its_password(
    couch_url: str, server: Server, secured: str, users: Users, tmp_path: Path, how: str
) -> None:
    name, password = users.credentials["client"]
    worker = f"w-{how}"
    server.database(secured).post(new_task(worker=worker, date="2030-01-01"))
    env = cli_envs(couch_url, secured, users, tmp_path)[how]

    counts = after_cli(env, "status", "--json")
    assert counts.returncode == 0, counts.stderr
    assert json.loads(counts.stdout)["workers"][worker] == {"waiting": 1}
    table = after_cli(env, "status")
    assert table.returncode == 0, table.stderr
    assert f"{name}:***@" in table.stdout, "the URL is shown, with the password redacted"
    listing = after_cli(env, "list")
    assert listing.returncode == 0, listing.stderr
    assert f"{name}:***@" in listing.stdout
    for result in (counts, table, listing):
        assert password not in output(result)
        assert quote(password, safe="") not in output(result)


@pytest.mark.parametrize("how", ["url", "env", "file"])
def test_refusals_name_the_url_without_the_password(
    couch_url: str, secured: str, users: Users, tmp_path: Path, how: str
) -> None:
    """A client is not a server admin: push and setup are refused, in one clear line."""
    name, password = users.credentials["client"]
    env = cli_envs(couch_url, secured, users, tmp_path)[how]
    pushed = after_cli(env, "push", "--db", f"after-test-never-{uuid.uuid4().hex[:8]}")
    assert pushed.returncode != 0 and "Traceback" not in output(pushed)
    assert f"{name}:***@" in pushed.stderr
    set_up = after_cli({**env, "AFTER_USER_PASSWORD": "new-user-secret"}, "setup", "--user", "x")
    assert set_up.returncode != 0 and "needs a server admin" in set_up.stderr
    assert f"user {name}" in set_up.stderr
    for result in (pushed, set_up):
        assert password not in output(result) and "new-user-secret" not in output(result)


def test_a_wrong_password_is_refused_without_showing_it(
    couch_url: str, secured: str, users: Users, tmp_path: Path
) -> None:
    name, _ = users.credentials["client"]
    plain_url, _, _ = split_credentials(couch_url)
    env = clean_env(
        AFTER_COUCHDB_URL=with_password(plain_url, name, "wrong-secret-123"),
        AFTER_DB=secured,
        AFTER_HOME=str(tmp_path),
    )
    for auth in ("basic", "cookie"):
        result = after_cli({**env, "AFTER_COUCHDB_AUTH": auth}, "status")
        assert result.returncode != 0 and "Traceback" not in output(result)
        assert "401" in result.stderr and f"{name}:***@" in result.stderr
        assert "wrong-secret-123" not in output(result)


def test_a_worker_daemon_runs_as_the_worker_role_and_logs_no_password(
    couch_url: str, server: Server, secured: str, users: Users, tmp_path: Path
) -> None:
    """The worker with only the after_worker role claims, runs and reports a task."""
    name, password = users.credentials["worker"]
    plain_url, _, _ = split_credentials(couch_url)
    config = write_config(
        tmp_path / "config.toml",
        0o600,
        couchdb_url=plain_url,
        user=name,
        password=password,
        db=secured,
        jobs=str(REPO / "jobs"),
    )
    home = tmp_path / "home"
    env = clean_env(AFTER_CONFIG=str(config), AFTER_HOME=str(home))
    worker = f"roles{uuid.uuid4().hex[:6]}"
    task_id, _ = server.database(secured).post(
        new_task(worker=worker, job={"name": "echo", "arguments": ["hi"]}, date="2000-01-01")
    )
    started = after_cli(env, "start", worker)
    try:
        assert started.returncode == 0, output(started)
        tasks = server.database(secured)
        done = wait_for(lambda: (doc := tasks.get(task_id))["status"] == "done" and doc, 30)
        assert done["result"] == ["hi"]
        assert done["owner"].startswith(f"{worker}@"), "the claim was the worker user's write"
        listing = after_cli(env, "list")
        assert worker in listing.stdout
    finally:
        stopped = after_cli(env, "stop", worker)
    assert stopped.returncode == 0, output(stopped)
    log = (home / "workers" / f"{worker}.log").read_text()
    for text in (started.stdout, started.stderr, listing.stdout, stopped.stdout, log):
        assert password not in text and quote(password, safe="") not in text


# -- 4. admin party: the warning and `after couchdb lock` ------------------------------------


def test_status_warns_when_the_server_is_in_admin_party(
    couch_url: str, server: Server, secured: str, party: bool, tmp_path: Path
) -> None:
    env = clean_env(AFTER_COUCHDB_URL=couch_url, AFTER_DB=secured, AFTER_HOME=str(tmp_path))
    counts = after_cli(env, "status", "--json")
    assert counts.returncode == 0, counts.stderr
    assert json.loads(counts.stdout)["database"] == secured, "stdout stays pure JSON"
    table = after_cli(env, "status")
    assert table.returncode == 0, table.stderr
    for result in (counts, table):
        warnings = [line for line in result.stderr.splitlines() if WARNING in line]
        if party:
            assert warnings == [
                f'WARNING: {Server(*split_credentials(couch_url)[:1]).display_url} is in "admin '
                f'party": anyone who can reach it is a server admin; lock it down with '
                f"`{LOCK_COMMAND}`"
            ]
        else:
            assert warnings == []


def test_status_does_not_warn_about_a_server_with_an_admin(locked: Locked, tmp_path: Path) -> None:
    admin_name, admin_password = locked.admin.credentials
    env = clean_env(
        AFTER_COUCHDB_URL=locked.url,
        AFTER_COUCHDB_USER=admin_name,
        AFTER_COUCHDB_PASSWORD=admin_password,
        AFTER_DB=locked.db,
        AFTER_HOME=str(tmp_path),
    )
    result = after_cli(env, "status")
    assert result.returncode == 0, result.stderr
    assert WARNING not in output(result)
    assert f"{admin_name}:***@" in result.stdout and admin_password not in output(result)


@pytest.fixture
def embedded_home(tmp_path: Path) -> Iterator[tuple[dict[str, str], int]]:
    """AFTER_HOME for `after couchdb` daemons; whatever runs there is stopped at the end."""
    env = clean_env(AFTER_HOME=str(tmp_path / "home"))
    yield env, embedded.free_port()
    after_cli(env, "couchdb", "stop")


def anonymous_roles(url: str) -> list[str]:
    return requests.get(url + "_session", timeout=5).json()["userCtx"]["roles"]


@pytest.mark.parametrize("how", ["--daemon", "foreground"])
def test_lock_gives_a_running_server_an_admin_and_has_its_supervisor_restart_it(
    embedded_home: tuple[dict[str, str], int], how: str
) -> None:
    env, port = embedded_home
    url = f"http://127.0.0.1:{port}/"
    home = Path(env["AFTER_HOME"])
    foreground = None
    if how == "--daemon":
        started = after_cli(env, "couchdb", "--daemon", "--port", str(port))
        assert started.returncode == 0, output(started)
    else:
        foreground = subprocess.Popen(
            [sys.executable, "-m", "after", "couchdb", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: read_state(home / "couchdb.json").get("url") == url, timeout=60)
    try:
        assert admin_party(url)
        push(Server(url).database("tasks"))  # public, as a database is in admin party
        assert requests.get(url + "tasks/_all_docs", timeout=5).status_code == 200
        supervisor_pid = int((home / "couchdb.pid").read_text())
        old_server_pid = read_state(home / "couchdb.json")["server_pid"]

        password = secrets.token_urlsafe(12)
        locked = after_cli(
            {**env, "AFTER_ADMIN_PASSWORD": password}, "couchdb", "lock", "--user", "root"
        )
        assert locked.returncode == 0, output(locked)
        assert "locked" in locked.stdout and url in locked.stdout
        assert password not in output(locked)

        assert not admin_party(url), "anonymous requests are anonymous now"
        assert anonymous_roles(url) == []
        assert "tasks: _security set" in locked.stdout
        assert requests.get(url + "tasks/_all_docs", timeout=5).status_code == 401
        assert (
            requests.post(url + "tasks/_find", json={"selector": {}}, timeout=5).status_code == 401
        )
        root = user_context(Server(url, ("root", password)))
        assert root == {"name": "root", "roles": ["_admin"]}
        # The supervisor stays; it replaced its server, which read the new config.json.
        assert int((home / "couchdb.pid").read_text()) == supervisor_pid
        assert process_running(supervisor_pid)
        new_server_pid = read_state(home / "couchdb.json")["server_pid"]
        assert new_server_pid != old_server_pid
        assert f"(pid {new_server_pid})" in locked.stdout
        assert not process_running(old_server_pid)
        stored = (home / "couchdb" / "config.json").read_text()
        assert json.loads(stored)["admins"]["root"].startswith("-pbkdf2-")
        assert password not in stored
        assert (home / "couchdb").stat().st_mode & 0o077 == 0, "its data (and config) are private"
    finally:
        if foreground is not None:
            foreground.terminate()
            assert foreground.wait(30) == 0


def test_lock_before_the_server_starts_applies_when_it_starts(
    embedded_home: tuple[dict[str, str], int],
) -> None:
    env, port = embedded_home
    password = secrets.token_urlsafe(12)
    locked = after_cli({**env, "AFTER_ADMIN_PASSWORD": password}, "couchdb", "lock")
    assert locked.returncode == 0, output(locked)
    assert "applies when the embedded server starts" in locked.stdout
    assert password not in output(locked)
    started = after_cli(env, "couchdb", "--daemon", "--port", str(port))
    assert started.returncode == 0, output(started)
    url = f"http://127.0.0.1:{port}/"
    assert not admin_party(url)
    assert "_admin" in user_context(Server(url, ("admin", password)))["roles"]


def test_lock_reads_the_password_from_a_prompt_never_from_an_argument(
    embedded_home: tuple[dict[str, str], int],
) -> None:
    env, _ = embedded_home
    argument = after_cli(env, "couchdb", "lock", "--password", "on-the-command-line")
    assert argument.returncode == 2 and "No such option" in argument.stderr
    password = secrets.token_urlsafe(12)
    # Without a terminal (a new session), the hidden prompt reads stdin.
    prompted = after_cli(
        env, "couchdb", "lock", input=f"{password}\n{password}\n", start_new_session=True
    )
    assert prompted.returncode == 0, output(prompted)
    assert password not in output(prompted)
    config = json.loads((Path(env["AFTER_HOME"]) / "couchdb" / "config.json").read_text())
    assert embedded._admin_hash_matches(config["admins"]["admin"], password)


def test_setup_on_a_locked_server_leaves_anonymous_requests_refused(
    locked: Locked, tmp_path: Path
) -> None:
    admin_name, admin_password = locked.admin.credentials
    db = f"after-test-setup-{uuid.uuid4().hex[:8]}"
    user = f"after-{uuid.uuid4().hex[:6]}"
    env = clean_env(
        AFTER_COUCHDB_URL=with_password(locked.url, admin_name, admin_password),
        AFTER_DB=db,
        AFTER_HOME=str(tmp_path),
        AFTER_USER_PASSWORD="user-secret-1",
    )
    result = after_cli(env, "setup", "--user", user, "--role", "client")
    assert result.returncode == 0, output(result)
    assert f"anonymous requests to {db} are refused (401)" in result.stdout
    assert WARNING not in output(result)
    assert admin_password not in output(result) and "user-secret-1" not in output(result)
    assert requests.get(locked.url + db, timeout=5).status_code == 401
    assert user_context(Server(locked.url, (user, "user-secret-1")))["roles"] == ["after_client"]


# -- 5. anonymous requests on a server with an admin -----------------------------------------


# Every route of PouchDB Server that reads documents: (method, path after /db/, body).
READING_ROUTES = [
    ("GET", "", None),
    ("GET", "_all_docs", None),
    ("POST", "_all_docs", {"keys": ["t1"]}),
    ("POST", "_find", {"selector": {"worker": "manobi"}}),
    ("POST", "_explain", {"selector": {"worker": "manobi"}}),
    ("GET", "_index", None),
    ("POST", "_bulk_get", {"docs": [{"id": "t1"}]}),
    ("GET", "_changes", None),
    ("POST", "_changes", {}),
    ("GET", "_changes?filter=after/worker&worker=manobi", None),
    ("GET", "_design/after/_view/by_status?reduce=false", None),
    ("GET", "_design/after", None),
    ("GET", "t1", None),
    ("POST", "_revs_diff", {"t1": ["1-x"]}),
    ("GET", "_security", None),
]


@pytest.mark.parametrize(("method", "path", "body"), READING_ROUTES)
def test_a_locked_database_answers_401_to_anonymous_reads_on_every_route(
    locked: Locked, method: str, path: str, body: Any
) -> None:
    """As Apache CouchDB with `_security` set; PouchDB Server's `_find`, `_explain`,
    `_index` and `_bulk_get` ignored it (the guard applies it). A member reads."""
    db_url = f"{locked.url}{locked.db}/"
    if locked.admin.database(locked.db).get("t1") is None:
        locked.admin.database(locked.db).put(new_task(_id="t1"))
    anonymous = requests.request(method, db_url + path, json=body, timeout=10)
    assert anonymous.status_code == 401, (path, anonymous.text)
    assert anonymous.json()["error"] == "unauthorized"
    member = requests.request(method, db_url + path, json=body, auth=locked.client, timeout=10)
    assert member.status_code in (200, 201), (path, member.text)


def test_an_anonymous_request_gets_401_on_a_locked_embedded_server(locked: Locked) -> None:
    anonymous = Server(locked.url)
    for attempt in (
        lambda: anonymous.database(locked.db).info(),
        lambda: anonymous.database(locked.db).post(new_task()),
    ):
        with pytest.raises(Forbidden) as caught:
            attempt()
        assert caught.value.status == 401
    # Without members, the design document itself refuses the anonymous writer.
    with pytest.raises(Forbidden) as caught:
        anonymous.database("public").post(new_task())
    assert caught.value.status == 401
    assert caught.value.reason.startswith("role:") and "anonymous" in caught.value.reason


# -- 6. cookie sessions ----------------------------------------------------------------------


def test_a_cookie_session_logs_in_once_and_sends_no_password(
    server: Server, secured: str, users: Users
) -> None:
    name, password = users.credentials["worker"]
    worker = Server(server.url, (name, password), cookie=True)
    assert worker.logins == 0
    assert user_context(worker) == {"name": name, "roles": ["after_worker"]}
    response = worker.request("GET", secured)
    assert "Authorization" not in response.request.headers
    assert "AuthSession=" in response.request.headers["Cookie"]
    task_id, _ = worker.database(secured).post(new_task())
    assert worker.database(secured).get(task_id)["status"] == "waiting"
    assert worker.logins == 1


def test_a_cookie_login_with_a_wrong_password_is_a_clear_401(server: Server, users: Users) -> None:
    name, _ = users.credentials["client"]
    wrong = Server(server.url, (name, "wrong-secret-456"), cookie=True)
    with pytest.raises(Forbidden) as caught:
        wrong.json("GET", "_session")
    assert caught.value.status == 401
    assert "wrong-secret-456" not in str(caught.value) and f"{name}:***@" in str(caught.value)


def test_an_expired_cookie_logs_in_again_once(locked: Locked) -> None:
    """On a server with an admin a dead cookie makes a request anonymous, hence a 401."""
    client = Server(locked.url, locked.client, cookie=True)
    task_id, _ = client.database(locked.db).post(new_task())
    assert client.logins == 1
    client.session.cookies.clear()  # an expired (or forged) cookie in its place
    client.session.cookies.set("AuthSession", "Y2Fyb2w6MDAwMDAwMDA6AAAAAAAAAAAAAAAAAAAAAAAAAAA")
    assert client.database(locked.db).get(task_id)["status"] == "waiting"
    assert client.logins == 2
    assert user_context(client)["name"] == locked.client[0]
