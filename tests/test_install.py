"""After installed as a Python tool: a wheel, pip, a virtualenv outside the checkout.

Slow (a wheel build, a virtualenv, `npm ci` of PouchDB Server): it is what a new user
does once, and what a checkout never exercises.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import requests
from conftest import REPO

from after import embedded

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout."""
    wheels = tmp_path_factory.mktemp("wheels")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)]
    subprocess.run(build, check=True, timeout=300)
    (built,) = wheels.glob("after-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `after` script of that wheel, installed with pip (its dependencies from the
    package index) into a virtualenv of its own, far from the checkout."""
    venv = tmp_path_factory.mktemp("pip-alone") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)]
    subprocess.run(pip, check=True, timeout=300)
    return venv / "bin" / "after"


def run(
    after: Path, home: Path, *args: str, path: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    """`after ARGS` as a user runs it: outside the checkout, no After settings but ours."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("AFTER_", "PYTEST_"))}
    environment.update(AFTER_HOME=str(home), **env)
    if path is not None:
        environment["PATH"] = path
    return subprocess.run(
        [str(after), *args],
        env=environment,
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=480,
    )


def test_the_wheel_carries_the_pinned_server_and_the_design_documents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in embedded.NPM_FILES:
            packaged = archive.read(f"after/node/{name}")
            assert packaged == (REPO / name).read_bytes(), f"{name} is the checkout's, as pinned"
    assert "after/node/guard.js" in names
    assert "after/designdocs/after/validate_doc_update.js" in names


def test_after_couchdb_from_a_wheel_installs_the_pinned_server_once(
    installed: Path, tmp_path: Path
) -> None:
    home, port = tmp_path / "home", embedded.free_port()
    started = run(installed, home, "couchdb", "--daemon", "--port", str(port))
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"installing PouchDB Server {embedded.PINNED_VERSION}" in started.stdout
        assert (home / "node" / embedded.SERVER_SCRIPT).is_file()
        welcome = requests.get(f"http://127.0.0.1:{port}/", timeout=10).json()
        assert welcome["version"] == embedded.PINNED_VERSION
        url = f"http://127.0.0.1:{port}/"
        pushed = run(installed, home, "push", AFTER_COUCHDB_URL=url)
        assert pushed.returncode == 0, pushed.stderr
        assert "deployed _design/after" in pushed.stdout
    finally:
        stopped = run(installed, home, "couchdb", "stop")
    assert stopped.returncode == 0, stopped.stderr
    again = run(installed, home, "couchdb", "--daemon", "--port", str(port))
    try:
        assert again.returncode == 0, again.stderr
        assert "installing" not in again.stdout  # once
    finally:
        run(installed, home, "couchdb", "stop")


def test_without_node_the_embedded_server_says_what_to_install(
    installed: Path, tmp_path: Path
) -> None:
    result = run(installed, tmp_path / "home", "couchdb", "--daemon", path=str(installed.parent))
    assert result.returncode == 1
    assert "needs Node.js 20 or later and npm: node and npm not found on PATH" in result.stderr
    assert "apt install nodejs npm" in result.stderr and "AFTER_COUCHDB_URL" in result.stderr


def make_plan(target: str) -> str:
    """What `make TARGET` would run in a fresh checkout (a dry run, every step forced)."""
    plan = subprocess.run(
        ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert plan.returncode == 0, plan.stderr
    return plan.stdout


def test_make_run_installs_only_what_running_needs() -> None:
    run_plan = make_plan("run")
    assert "pip install --quiet -e .\n" in run_plan
    assert "[dev]" not in run_plan and "[bench]" not in run_plan
    assert "npm ci" in run_plan and "after start manobi --foreground" in run_plan


def test_make_test_and_make_bench_add_their_extras() -> None:
    test_plan = make_plan("test")
    assert "-e '.[dev]'" in test_plan and "-e '.[bench]'" in test_plan
    bench_plan = make_plan("bench")
    assert "-e '.[bench]'" in bench_plan and "[dev]" not in bench_plan
