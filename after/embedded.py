"""The embedded CouchDB-compatible server: PouchDB Server from npm, pinned.

It is the local default and the test server; production belongs on Apache
CouchDB 3.x. PouchDB Server dies on some ordinary requests when started
plainly, so it always runs with `--unhandled-rejections=warn`, bound to
loopback, with its data, config and log inside one directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
PINNED_VERSION = "4.2.0"


class EmbeddedServerError(RuntimeError):
    pass


def find_pouchdb_server() -> Path:
    """The pouchdb-server script: $AFTER_POUCHDB_SERVER, or node_modules here or in the cwd."""
    candidates = [os.environ.get("AFTER_POUCHDB_SERVER", "")]
    candidates += [
        str(base / "node_modules" / "pouchdb-server" / "bin" / "pouchdb-server")
        for base in (REPO_ROOT, Path.cwd())
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise EmbeddedServerError(
        "PouchDB Server is not installed: run `npm ci` in the After checkout "
        f"({REPO_ROOT}), or set AFTER_POUCHDB_SERVER to its bin/pouchdb-server"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(port: int, data_dir: Path) -> list[str]:
    node = shutil.which("node")
    if node is None:
        raise EmbeddedServerError("Node.js is not installed (`node` is not on PATH); After's embedded server needs Node.js 20")
    return [
        node,
        "--unhandled-rejections=warn",
        str(find_pouchdb_server()),
        "--port", str(port),
        "--host", "127.0.0.1",
        "--dir", str(data_dir),
        "--config", str(data_dir / "config.json"),
        "--no-stdout-logs",
    ]  # fmt: skip


def start(port: int, data_dir: Path, log_path: Path, detach: bool = False) -> subprocess.Popen:
    """Start the server in the background; its output goes to log_path."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command(port, data_dir),
            cwd=data_dir,  # PouchDB Server writes its log.txt into the working directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )


def wait_healthy(url: str, timeout: float = 30.0, process: subprocess.Popen | None = None) -> None:
    """Wait until the server answers `GET /` and a database request.

    `GET /` alone can answer while database requests hang (couchdb-compat.md),
    so the check also reads `_users`.
    """
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise EmbeddedServerError(f"the embedded server exited with code {process.returncode}")
        try:
            requests.get(url, timeout=2).raise_for_status()
            requests.get(url.rstrip("/") + "/_users", timeout=2).raise_for_status()
            return
        except requests.RequestException as exc:
            last_error = type(exc).__name__
        time.sleep(0.1)
    raise EmbeddedServerError(f"the embedded server at {url} was not healthy after {timeout:.0f}s ({last_error})")


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
