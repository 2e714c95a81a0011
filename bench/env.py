"""The bench's surroundings: the server, fresh databases, a jobs dir, worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from after import embedded
from after.config import node_urls, split_credentials
from after.couch import CouchError, Database, Server
from after.push import push
from bench.profile import ENV_DIR, PRELOAD, ServerProfiler

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

NOOP_JOB = "def run(*arguments):\n    return None\n"


class BenchError(RuntimeError):
    pass


def check_loopback(url: str) -> None:
    """The bench sends load: only to this machine."""
    host = requests.utils.urlparse(url).hostname or ""
    if not (host == "localhost" or host.startswith("127.") or host == "::1"):
        raise BenchError(f"the bench only talks to 127.0.0.1 (loopback); refusing {host!r}")


class Bench:
    """A temp dir, a server (embedded unless a URL is given) and helpers around them."""

    def __init__(self, url: str | None = None, keep: bool = False, profile: bool = False) -> None:
        if profile and url is not None:
            raise BenchError("--profile-server profiles the embedded server only")
        self.tmp = Path(tempfile.mkdtemp(prefix="after-bench-"))
        self.keep = keep
        self.process: subprocess.Popen | None = None
        self.profiler: ServerProfiler | None = None
        self.jobs = self.tmp / "jobs"
        self.jobs.mkdir()
        (self.jobs / "noop.py").write_text(NOOP_JOB)
        if url is None:
            port = embedded.free_port()
            self.url = f"http://127.0.0.1:{port}/"
            flags, env = (), None
            if profile:  # the preload starts and stops V8's profiler on SIGUSR2
                (self.tmp / "profiles").mkdir()
                flags = ("--require", str(PRELOAD))
                env = {**os.environ, ENV_DIR: str(self.tmp / "profiles")}
            self.process = embedded.start(
                port,
                self.tmp / "couchdb",
                self.tmp / "couchdb.log",
                detach=True,
                node_flags=flags,
                env=env,
            )
            embedded.wait_healthy(self.url, timeout=60, process=self.process)
            if profile:
                self.profiler = ServerProfiler(self.process, self.tmp / "profiles")
            self.server_kind = "PouchDB Server (embedded)"
        else:
            for one in node_urls(url):
                check_loopback(one)
            self.url = url if url.endswith("/") or "," in url else url + "/"
            self.server_kind = "given URL"
        bare, user, password = split_credentials(self.url)
        self.auth = (user, password or "") if user else None
        # The nodes of a cluster (or the one server): the bench's own requests go to the
        # first; worker instance i is attached to node i (its list starts there).
        self.node_urls = [u if u.endswith("/") else u + "/" for u in node_urls(bare)]
        self.bare_url = self.node_urls[0]
        self.server = Server(self.bare_url, self.auth, timeout=120)
        welcome = self.server.welcome()
        self.server_version = welcome.get("version", "?")
        self.server_welcome = {k: v for k, v in welcome.items() if isinstance(v, str)}
        if "couchdb" in welcome:
            self.server_kind = f"Apache CouchDB {self.server_version}{self._js_engine()}"
            if len(self.node_urls) > 1:
                self.server_kind += (
                    f", a cluster of {len(self.node_urls)} nodes (instance i attached to node i)"
                )
        elif "express-pouchdb" in welcome and self.process is None:
            self.server_kind = f"PouchDB Server {self.server_version} (given URL)"
        elif self.process is not None:
            self.server_kind = f"PouchDB Server {embedded.PINNED_VERSION} (embedded)"
        self.databases: list[Database] = []

    def _js_engine(self) -> str:
        """`, JavaScript engine <name>` from the node's config (needs an admin), or ''.
        Design functions cost differently on QuickJS and SpiderMonkey."""
        try:
            engine = self.server.json("GET", "_node/_local/_config/couchdb/js_engine")
        except CouchError:
            return ""
        return f", JavaScript engine {engine}"

    # -- databases ------------------------------------------------------------------------
    def fresh_db(self, label: str, design: bool = True) -> Database:
        name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        db = self.server.database(name)
        if design:
            push(db)
        else:
            db.create()
        self.databases.append(db)
        return db

    def drop(self, db: Database) -> None:
        with contextlib.suppress(Exception):
            db.delete()
        if db in self.databases:
            self.databases.remove(db)

    def session(self) -> requests.Session:
        session = requests.Session()
        session.auth = self.auth
        session.headers["Content-Type"] = "application/json"
        session.headers["Accept"] = "application/json"
        return session

    def server_rss(self) -> int | None:
        if self.process is None:
            return None
        try:
            import psutil

            return psutil.Process(self.process.pid).memory_info().rss
        except Exception:
            return None

    def server_cpu(self) -> float | None:
        """CPU seconds (user + system) the embedded server has used so far."""
        return _cpu(self.process.pid) if self.process is not None else None

    def close(self) -> None:
        for db in list(self.databases):
            self.drop(db)
        if self.process is not None:
            embedded.stop(self.process)
        if not self.keep:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)


class WorkerProcess:
    """One `python -m after start NAME --foreground` process with its own AFTER_HOME."""

    def __init__(self, bench: Bench, db: Database, name: str, tag: str = "", node: int = 0) -> None:
        self.bench = bench
        self.name = name
        self.home = bench.tmp / f"home-{db.name}-{name}{tag}"
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = self.home / "worker.log"
        self.state_path = self.home / "workers" / f"{name}.json"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AFTER_")}
        env["AFTER_HOME"] = str(self.home)
        if bench.auth:
            env["AFTER_COUCHDB_USER"], env["AFTER_COUCHDB_PASSWORD"] = bench.auth
        first = node % len(bench.node_urls)
        urls = ",".join(bench.node_urls[first:] + bench.node_urls[:first])
        self.argv = [
            PYTHON, "-m", "after", "start", name, "--foreground",
            "--couchdb", urls, "--db", db.name, "--jobs", str(bench.jobs),
        ]  # fmt: skip
        self.spawned = time.time()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.ready_at: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Until the worker's state file appears (written once it follows its feed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state_path.exists() or b"start-up:" in self._tail():
                self.ready_at = time.time()
                return self.ready_at
            if self.process.poll() is not None:
                raise BenchError(
                    f"worker {self.name} exited with {self.process.returncode}:\n"
                    + self._tail().decode(errors="replace")[-2000:]
                )
            time.sleep(0.01)
        raise BenchError(f"worker {self.name} was not ready after {timeout:.0f}s")

    def state(self) -> dict[str, Any] | None:
        with contextlib.suppress(OSError, ValueError):
            return json.loads(self.state_path.read_text())
        return None

    def rss(self) -> int | None:
        try:
            import psutil

            return psutil.Process(self.pid).memory_info().rss
        except Exception:
            return None

    def cpu(self) -> float | None:
        return _cpu(self.pid)

    def _tail(self) -> bytes:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 65536))
                return fh.read()
        except OSError:
            return b""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, graceful: bool = True, timeout: float = 15.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        return self.process.returncode


def _cpu(pid: int) -> float | None:
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return round(times.user + times.system, 3)
    except Exception:
        return None


@contextlib.contextmanager
def workers(
    bench: Bench, db: Database, names: list[str], tags: list[str] | None = None
) -> Iterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    try:
        for i, name in enumerate(names):
            tag = (tags or [""] * len(names))[i]
            started.append(WorkerProcess(bench, db, name, tag, node=i))
        yield started
    finally:
        for worker in started:
            worker.stop(graceful=False)
