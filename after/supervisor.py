"""The embedded server's supervisor: it keeps PouchDB Server serving its data.

`after couchdb` runs one, in the foreground or detached (--daemon). It starts
the guarded server (after.embedded), waits until it answers, then watches it:

- the server exits: it is started again at once on the same port and data
  (PouchDB Server loses no acknowledged write to a SIGKILL); a crash loop
  backs off up to 5 s. Exit code 78 (not the pinned PouchDB Server) is final.
- a health check every 2 s asks for a database (embedded.health_problem):
  PouchDB Server can wedge so that `GET /` answers while every request that
  opens a database hangs. After 3 failed checks in a row the server is
  killed (SIGKILL) and started again.
- SIGTERM or SIGINT stops the server, then the supervisor; SIGHUP restarts
  the server, which rereads its config.json (`after couchdb lock` does that).

Until the server has answered once, a failure to start is reported, not
retried: nothing was serving yet, and the cause is in the setup (the port is
taken, the wrong PouchDB Server ...).

Each event is one line in the server's log (server.log in the data directory)
and on stderr. The state file (JSON: supervisor_pid, server_pid, port,
data_dir, url, log) is rewritten each time a new server answers, for
`after couchdb stop` and `after couchdb lock`. AFTER_COUCHDB_CHECK_INTERVAL and
AFTER_COUCHDB_CHECK_TIMEOUT (seconds) change the health check's pace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from after import embedded

LOG_PREFIX = "after couchdb:"
POLL_INTERVAL = 0.1  # seconds between looks at the server process and at signals


@dataclass(frozen=True)
class Timings:
    """How often and how patiently the supervisor looks at its server, in seconds."""

    check_interval: float = 2.0  # between two health checks
    check_timeout: float = 5.0  # a health check without an answer by then failed
    failed_checks: int = 3  # failed health checks in a row that make the server "wedged"
    start_timeout: float = 60.0  # for a new server to answer
    stop_timeout: float = 10.0  # between SIGTERM and SIGKILL when stopping the server
    longest_backoff: float = 5.0  # the longest wait before restarting a server that keeps dying
    stable_after: float = 60.0  # healthy running after which earlier deaths are forgiven

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> Timings:
        """The defaults, with AFTER_COUCHDB_CHECK_INTERVAL and AFTER_COUCHDB_CHECK_TIMEOUT."""
        return cls(
            check_interval=_seconds(environ, "AFTER_COUCHDB_CHECK_INTERVAL", cls.check_interval),
            check_timeout=_seconds(environ, "AFTER_COUCHDB_CHECK_TIMEOUT", cls.check_timeout),
        )


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise embedded.EmbeddedServerError(f"{name} must be a number of seconds, not {text!r}")
    return value


class Backoff:
    """The waits before restarting a server that keeps dying: 0, 0.5, 1, 2, 4, then 5 s.

    A server that had been healthy for `stable_after` seconds when it died
    starts the series again: one death now and then is restarted at once.
    """

    def __init__(self, longest: float, stable_after: float) -> None:
        self.longest = longest
        self.stable_after = stable_after
        self.deaths_in_a_row = 0

    def next_delay(self, healthy_for: float) -> float:
        if healthy_for >= self.stable_after:
            self.deaths_in_a_row = 0
        self.deaths_in_a_row += 1
        if self.deaths_in_a_row == 1:
            return 0.0
        return min(self.longest, 0.5 * 2 ** (self.deaths_in_a_row - 2))


@dataclass(frozen=True)
class Loss:
    """Why the running server must be replaced (or why a new one did not come up)."""

    reason: str  # for the log: "the server (pid 123) exited (code -9: killed by SIGKILL)"
    exit_code: int | None = None  # when the process exited
    crashed: bool = True  # False for a restart we asked for (SIGHUP): no back-off


def read_state(path: Path) -> dict[str, Any]:
    """A supervisor's state file; {} when it is missing or unreadable."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.after-tmp")
    temporary.write_text(json.dumps(state, indent=2) + "\n")
    temporary.replace(path)  # readers never see half a file


class Supervisor:
    """Runs the embedded server on one port and data directory, and keeps it serving."""

    def __init__(
        self,
        port: int,
        data_dir: Path,
        *,
        timings: Timings | None = None,
        state_path: Path | None = None,
    ) -> None:
        self.port = port
        self.data_dir = data_dir.resolve()
        self.url = f"http://127.0.0.1:{port}/"
        self.log_path = self.data_dir / "server.log"
        self.timings = timings or Timings()
        self.state_path = state_path
        self.server: subprocess.Popen | None = None
        self.healthy_since = 0.0  # time.monotonic() when the current server first answered
        self.restarts = 0  # servers started after the first one
        self.backoff = Backoff(self.timings.longest_backoff, self.timings.stable_after)
        self.stop_signal: signal.Signals | None = None  # SIGTERM or SIGINT received
        self.restart_requested = False  # SIGHUP received since the server started
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        self.stderr_is_log = _same_file(sys.stderr, self.log_path)  # a daemon's stderr is the log

    # -- the whole life -----------------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] = lambda: None) -> int:
        """Supervise until SIGTERM or SIGINT, then return 0; or give up and return non-zero.

        `on_ready` is called once, when the first server answers. The exit
        status when giving up is the server's exit code (78 for the wrong
        PouchDB Server, 71 for a port in use at the start), else 1.
        """
        with self._signals_handled():
            try:
                return self._supervise(on_ready)
            finally:
                self._stop_server()
                if self.state_path is not None:
                    self.state_path.unlink(missing_ok=True)

    def _supervise(self, on_ready: Callable[[], None]) -> int:
        self.say(
            f"supervising PouchDB Server on 127.0.0.1:{self.port}, data in {self.data_dir}; "
            f"health check: GET /_users every {self.timings.check_interval:g} s"
        )
        failure = self._start_server()
        if failure is not None:
            self.say(f"{failure.reason}; not restarting it, as it never answered")
            return _exit_status(failure)
        if self.stop_signal is None:
            self.say(f"the server (pid {self.server_pid}) answers at {self.url}")
            on_ready()
        while self.stop_signal is None:
            loss = self._watch()
            if loss is None:
                break
            status = self._replace_server(loss)
            if status is not None:
                return status
        return 0

    # -- watching -----------------------------------------------------------------------------

    def _watch(self) -> Loss | None:
        """Wait until the server must be replaced (and say why) or a stop is asked (None)."""
        assert self.server is not None
        failed_checks = 0
        next_check = time.monotonic() + self.timings.check_interval
        while self.stop_signal is None:
            if self.restart_requested:
                return Loss(
                    f"SIGHUP: the server (pid {self.server_pid}) is to reread its config.json",
                    crashed=False,
                )
            returncode = self.server.poll()
            if returncode is not None:
                reason = embedded.exit_reason(returncode)
                return Loss(f"the server (pid {self.server_pid}) exited ({reason})", returncode)
            if time.monotonic() >= next_check:
                problem = embedded.health_problem(self.url, self.timings.check_timeout)
                failed_checks = failed_checks + 1 if problem else 0
                if failed_checks >= self.timings.failed_checks:
                    return Loss(
                        f"the server (pid {self.server_pid}) is wedged: {failed_checks} health "
                        f"checks in a row failed ({problem}); killing it (SIGKILL)"
                    )
                next_check = time.monotonic() + self.timings.check_interval
            self._pause(POLL_INTERVAL)
        return None

    def _replace_server(self, loss: Loss) -> int | None:
        """Start servers until one answers (None), a stop is asked (None), or giving up (status)."""
        lost_at = time.monotonic()
        while True:
            if loss.exit_code == embedded.EXIT_REFUSED:
                self.say(f"{loss.reason}; not restarting it: install the pinned one (`npm ci`)")
                return embedded.EXIT_REFUSED
            healthy_for = time.monotonic() - self.healthy_since if self.healthy_since else 0.0
            delay = self.backoff.next_delay(healthy_for) if loss.crashed else 0.0
            self.restarts += 1
            when = f"in {delay:g} s" if delay else "now"
            self.say(f"{loss.reason}; restarting it {when} (restart {self.restarts})")
            self._end_server(gracefully=not loss.crashed)
            self._pause(delay)
            if self.stop_signal is not None:
                return None
            failure = self._start_server()
            if failure is None:
                if self.stop_signal is None:
                    down_for = time.monotonic() - lost_at
                    self.say(
                        f"the server (pid {self.server_pid}) answers again at {self.url}, "
                        f"{down_for:.1f} s after it went down (restart {self.restarts})"
                    )
                return None
            loss = failure

    # -- one server ---------------------------------------------------------------------------

    @property
    def server_pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def _start_server(self) -> Loss | None:
        """Start a server and wait until it answers; why not, if it does not (None: it does)."""
        self.restart_requested = False  # a new server reads its config anyway
        self.healthy_since = 0.0
        self.server = embedded.start(
            self.port, self.data_dir, self.log_path, detach=True, die_with_parent=True
        )
        # detach: its own session, so a Ctrl-C meant for us does not reach it
        # before we stop it in order; die_with_parent: it does not outlive us.
        deadline = time.monotonic() + self.timings.start_timeout
        while self.stop_signal is None:
            returncode = self.server.poll()
            if returncode is not None:
                reason = embedded.exit_reason(returncode)
                return Loss(f"the server (pid {self.server_pid}) exited ({reason})", returncode)
            if embedded.health_problem(self.url, self.timings.check_timeout) is None:
                self.healthy_since = time.monotonic()
                self._write_state()
                return None
            if time.monotonic() > deadline:
                self.server.kill()
                return Loss(
                    f"the server (pid {self.server_pid}) did not answer within "
                    f"{self.timings.start_timeout:g} s; killing it (SIGKILL)"
                )
            self._pause(POLL_INTERVAL)
        return None  # stopping: run() stops the server

    def _end_server(self, gracefully: bool) -> None:
        """Make sure the server process is gone (and reaped) before another one starts."""
        if self.server is None:
            return
        if gracefully:
            embedded.stop(self.server, self.timings.stop_timeout)
        else:
            self.server.kill()  # no effect on a process that has exited
            self.server.wait()

    def _stop_server(self) -> None:
        asked = f"{self.stop_signal.name}: " if self.stop_signal is not None else ""
        if self.server is not None and self.server.poll() is None:
            self.say(f"{asked}stopping the server (pid {self.server_pid})")
            embedded.stop(self.server, self.timings.stop_timeout)
            self.say(f"the server stopped ({embedded.exit_reason(self.server.returncode)})")
        elif asked:
            self.say(f"{asked}stopping")

    def _write_state(self) -> None:
        if self.state_path is None:
            return
        state = {
            "supervisor_pid": os.getpid(),
            "server_pid": self.server_pid,
            "port": self.port,
            "data_dir": str(self.data_dir),
            "url": self.url,
            "log": str(self.log_path),
        }
        write_state(self.state_path, state)

    # -- signals, waiting, the log ----------------------------------------------------------

    @contextmanager
    def _signals_handled(self) -> Iterator[None]:
        """SIGTERM and SIGINT ask for a stop, SIGHUP for a restart; the main loop acts on them."""

        def stop(signum: int, frame: FrameType | None) -> None:
            self.stop_signal = signal.Signals(signum)

        def restart(signum: int, frame: FrameType | None) -> None:
            self.restart_requested = True

        handlers = {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: restart}
        previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _pause(self, seconds: float) -> None:
        """Sleep, but no longer than it takes a signal to arrive."""
        until = time.monotonic() + seconds
        while self.stop_signal is None and time.monotonic() < until:
            time.sleep(min(POLL_INTERVAL, max(0.0, until - time.monotonic())))

    def say(self, message: str) -> None:
        """One line in the server's log (with the time) and on stderr."""
        line = f"{LOG_PREFIX} {message}"
        with open(self.log_path, "a") as log:
            log.write(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} {line}\n")
        if not self.stderr_is_log:
            print(line, file=sys.stderr, flush=True)


def _exit_status(failure: Loss) -> int:
    """The supervisor's exit status when it gives up: the server's own code if it had one."""
    if failure.exit_code is not None and failure.exit_code > 0:
        return failure.exit_code
    return 1


def _same_file(stream: Any, path: Path) -> bool:
    try:
        opened = os.fstat(stream.fileno())
        on_disk = path.stat()
    except (AttributeError, OSError, ValueError):
        return False
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)
