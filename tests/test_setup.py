"""`after setup` and `after couchdb`: users, database security, the embedded server."""

from __future__ import annotations

import os
from pathlib import Path

import requests
from conftest import after_cli

from after import embedded
from after.couch import Server
from after.security import ROLES


def test_setup_creates_the_database_a_worker_user_and_the_security(
    couch_url: str, server: Server, db_name: str, tmp_path: Path
) -> None:
    user = f"after-{db_name[-6:]}"
    env = {
        **os.environ,
        "AFTER_COUCHDB_URL": couch_url,
        "AFTER_DB": db_name,
        "AFTER_HOME": str(tmp_path),
        "AFTER_USER_PASSWORD": "s3cret-pass",
    }
    try:
        result = after_cli(env, "setup", "--user", user, "--role", "worker")
        assert result.returncode == 0, result.stderr
        assert "s3cret-pass" not in result.stdout + result.stderr
        assert f"user {user} has role {ROLES['worker']}" in result.stdout
        database = server.database(db_name)
        assert database.get("_design/after") is not None
        security = database.security()
        assert sorted(security["members"]["roles"]) == sorted(ROLES.values())
        session = requests.get(
            couch_url.rstrip("/") + "/_session", auth=(user, "s3cret-pass"), timeout=10
        ).json()
        assert session["userCtx"]["name"] == user
        assert ROLES["worker"] in session["userCtx"]["roles"]
        # Running it again updates the user instead of failing.
        assert after_cli(env, "setup", "--user", user).returncode == 0
    finally:
        users = server.database("_users")
        doc = users.get(f"org.couchdb.user:{user}")
        if doc:
            users.server.request(
                "DELETE", f"_users/org.couchdb.user:{user}", params={"rev": doc["_rev"]}
            )
        if server.database(db_name).exists():
            server.database(db_name).delete()


def test_the_embedded_server_runs_as_a_daemon_and_stops(tmp_path: Path) -> None:
    port = embedded.free_port()
    env = {**os.environ, "AFTER_HOME": str(tmp_path)}
    started = after_cli(env, "couchdb", "--daemon", "--port", str(port))
    url = f"http://127.0.0.1:{port}/"
    try:
        assert started.returncode == 0, started.stderr
        assert url in started.stdout
        assert requests.get(url + "_all_dbs", timeout=5).status_code == 200
        assert (tmp_path / "couchdb").is_dir()
        again = after_cli(env, "couchdb", "--daemon", "--port", str(port))
        assert "already running" in again.stdout
    finally:
        stopped = after_cli(env, "couchdb", "stop")
    assert stopped.returncode == 0, stopped.stderr
    try:
        requests.get(url, timeout=2)
        still_up = True
    except requests.ConnectionError:
        still_up = False
    assert not still_up
    assert after_cli(env, "couchdb", "stop").returncode != 0
