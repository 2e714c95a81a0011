"""Job loading and running.

A job is a module ``<jobs_dir>/<name>.py`` defining ``run(*arguments)``, a plain or
``async def`` function. Its result, if any, must be JSON-serialisable: it is stored in the
task document. A job that declares a keyword-only parameter named ``context`` also gets a
:class:`JobContext` (task id, attempt, worker, idempotency key).

Job names come from task documents, so they are treated as untrusted input:

* a name must match :data:`JOB_NAME` and must not start with ``__``;
* only files directly inside the jobs directory are loaded; a symlink is followed only if
  its target is also directly inside that directory;
* a job is compiled from its file and executed as a private module ``after_jobs.<name>``;
  nothing is looked up on ``sys.path`` and nothing stays in ``sys.modules``, so a job
  called ``json`` or ``os`` shadows nothing.

Edited jobs are picked up without a restart. A watchdog observer drops the cached module
of a file as soon as it changes, and :meth:`JobLoader.load` also compares the file's
identity, size and modification time with the loaded version (one ``os.stat`` per load)
and, within two seconds of a modification, its content too, so an edit immediately
followed by a run never runs the old code, even on filesystems with coarse timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import inspect
import json
import linecache
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from after.couch import Unstorable, encode_json

logger = logging.getLogger("after.jobs")

#: Syntax of a job name (dunder names are refused as well, see :func:`check_name`).
JOB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

#: Job modules are executed under the name ``after_jobs.<name>``.
MODULE_PREFIX = "after_jobs"

#: A loaded file modified less than this long before it was read is "racy": its timestamp
#: may not change on the next write (coarse filesystem clocks), so its content is compared.
RACY_WINDOW_NS = 2_000_000_000

NAME_RULE = (
    "a job name is 1 to 64 ASCII letters, digits and underscores, "
    "not starting with a digit or with '__'"
)

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_WATCHED_EVENTS = frozenset({"created", "modified", "deleted", "moved", "closed"})
_EXEC_LOCK = threading.RLock()

# (st_dev, st_ino, st_mtime_ns, st_size)
_Stamp = tuple[int, int, int, int]


class JobError(Exception):
    """Base class of the errors raised while loading or running a job."""


class UnknownJob(JobError):
    """No job file of that name exists in the jobs directory."""


class InvalidJobName(JobError):
    """The job name breaks the naming rule (see :data:`NAME_RULE`)."""


class BadJob(JobError):
    """The job file exists but cannot be used: it fails to import, has no callable ``run``,
    or resolves outside the jobs directory."""


@dataclass(frozen=True)
class JobContext:
    """What a job may learn about the task it runs for (keyword-only ``context``).

    ``idempotency_key`` defaults to ``"<task_id>:<attempt>"``: the same for a retry of the
    same attempt, different for a new attempt. ``couchdb_url`` (with the worker's
    credentials, never shown in a repr) and ``database`` say where the task lives, for a
    job that works on the worker's own CouchDB (``start_replication``).
    """

    task_id: str
    attempt: int
    worker: str
    idempotency_key: str = ""
    couchdb_url: str = field(default="", repr=False)
    database: str = ""

    def __post_init__(self) -> None:
        if not self.idempotency_key:
            object.__setattr__(self, "idempotency_key", f"{self.task_id}:{self.attempt}")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_name(name: object) -> str:
    """Return ``name`` if it is an acceptable job name, else raise :class:`InvalidJobName`."""
    if not isinstance(name, str):
        raise InvalidJobName(
            f"invalid job name {_short(name)}: expected a string, got {type(name).__name__}"
        )
    if not JOB_NAME.fullmatch(name) or name.startswith("__"):
        raise InvalidJobName(f"invalid job name {_short(name)}: {NAME_RULE}")
    return name


def _stamp(st: os.stat_result) -> _Stamp:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _read(path: Path) -> tuple[os.stat_result, bytes]:
    """Open ``path`` without following a final symlink; fstat it, then read it."""
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        return st, handle.read()


@dataclass
class _Entry:
    """A loaded job module and what it was loaded from."""

    path: Path
    stamp: _Stamp
    source: bytes
    checked_ns: int
    module: ModuleType
    run: Callable[..., Any]

    def racy(self) -> bool:
        return self.checked_ns - self.stamp[2] < RACY_WINDOW_NS


class _Invalidator(FileSystemEventHandler):
    """Watchdog handler: tells the loader which job files changed."""

    def __init__(self, loader: JobLoader) -> None:
        super().__init__()
        self._loader = loader

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in _WATCHED_EVENTS:
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw:
                self._loader._file_changed(Path(os.fsdecode(raw)))


class JobLoader:
    """Loads ``run`` functions from the job modules of one directory, with a cache that
    follows edits, additions and removals of job files."""

    def __init__(self, jobs_dir: Path, watch: bool = True) -> None:
        """Load jobs from ``jobs_dir``; with ``watch``, observe it for changes."""
        self.jobs_dir: Path = Path(jobs_dir).resolve()
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.RLock()
        self._observer: Any = None
        if watch:
            self._start_observer()

    # -- public API -----------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """True while a watchdog observer is watching the jobs directory."""
        observer = self._observer
        return observer is not None and observer.is_alive()

    def load(self, name: str) -> Callable[..., Any]:
        """Return the ``run`` function of job ``name``, (re)loading its file if needed.

        Raises :class:`InvalidJobName`, :class:`UnknownJob` or :class:`BadJob`.
        """
        name = check_name(name)
        path = self.jobs_dir / f"{name}.py"
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None:
                if self._is_current(entry, path):
                    return entry.run
                del self._cache[name]
            fresh = self._import(name, path)
            self._cache[name] = fresh
            if entry is not None:
                logger.info("job %r changed; running the new code", name)
            return fresh.run

    def available(self) -> list[str]:
        """Names of the job files currently in the jobs directory (not checked further)."""
        try:
            files = list(self.jobs_dir.glob("*.py"))
        except OSError:
            return []
        names = (file.stem for file in files)
        return sorted(name for name in names if JOB_NAME.fullmatch(name) and name[:2] != "__")

    def close(self) -> None:
        """Stop watching the jobs directory (idempotent); cached jobs stay loadable."""
        with self._lock:
            observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def __enter__(self) -> JobLoader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _start_observer(self) -> None:
        observer = Observer()
        try:
            observer.schedule(_Invalidator(self), str(self.jobs_dir), recursive=False)
            observer.start()
        except Exception as exc:
            logger.warning(
                "cannot watch %s for job changes (%s: %s); "
                "edited jobs are still reloaded by checking each file before it runs",
                self.jobs_dir,
                type(exc).__name__,
                exc,
            )
            try:
                observer.stop()
            except Exception:
                logger.debug("stopping the failed observer failed", exc_info=True)
            return
        self._observer = observer

    def _is_current(self, entry: _Entry, path: Path) -> bool:
        """True if ``path`` still holds exactly what ``entry`` was loaded from."""
        try:
            if _stamp(os.stat(path)) != entry.stamp:
                return False
            if not entry.racy():
                return True
            now = time.time_ns()
            _, source = _read(entry.path)
        except OSError:
            return False
        if source != entry.source:
            return False
        entry.checked_ns = now
        return True

    def _file_changed(self, path: Path) -> None:
        """Called from the observer thread: drop the cached module of a changed file."""
        if path.suffix != ".py" or path.parent != self.jobs_dir:
            return
        name = path.stem
        with self._lock:
            entry = self._cache.get(name)
            if entry is None or self._is_current(entry, path):
                return
            del self._cache[name]
        logger.info("job %r changed; the next run uses the new code", name)

    def _import(self, name: str, path: Path) -> _Entry:
        unknown = UnknownJob(f"unknown job {name!r}: no file {name}.py in {self.jobs_dir}")
        try:
            real = path.resolve(strict=True)
        except FileNotFoundError:
            raise unknown from None
        except (OSError, RuntimeError) as exc:  # e.g. a symlink loop
            raise BadJob(f"job {name!r}: cannot resolve {path}: {exc}") from exc
        if real.parent != self.jobs_dir:
            raise BadJob(
                f"job {name!r}: {path} resolves to {real}, outside the jobs directory "
                f"{self.jobs_dir}; refused"
            )
        checked_ns = time.time_ns()
        try:
            st, source = _read(real)
        except FileNotFoundError:
            raise unknown from None
        except OSError as exc:
            raise BadJob(f"job {name!r}: cannot read {real}: {exc}") from exc
        module = self._execute(name, real, source)
        run = getattr(module, "run", None)
        if not callable(run):
            raise BadJob(f"job {name!r}: {real} defines no callable run()")
        return _Entry(real, _stamp(st), source, checked_ns, module, run)

    @staticmethod
    def _execute(name: str, real: Path, source: bytes) -> ModuleType:
        """Compile and execute ``source`` as a fresh private module."""
        module_name = f"{MODULE_PREFIX}.{name}"
        spec = importlib.util.spec_from_file_location(module_name, real)
        if spec is None:
            raise BadJob(f"job {name!r}: cannot create a module for {real}")
        module = importlib.util.module_from_spec(spec)
        linecache.checkcache(str(real))  # tracebacks show the new source
        # Compiled here, not by the import system: no stale __pycache__ (its timestamps have
        # one-second resolution) and no bytecode written into the jobs directory.
        try:
            code = compile(source, str(real), "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            raise BadJob(f"job {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
        # Registered in sys.modules only while it executes (dataclasses, typing and pickle
        # look their module up there), then removed.
        with _EXEC_LOCK:
            previous = sys.modules.get(module_name)
            sys.modules[module_name] = module
            try:
                exec(code, module.__dict__)
            except (Exception, SystemExit) as exc:
                raise BadJob(f"job {name!r} failed to import: {type(exc).__name__}: {exc}") from exc
            finally:
                if sys.modules.get(module_name) is module:
                    if previous is None:
                        del sys.modules[module_name]
                    else:
                        sys.modules[module_name] = previous
        return module


# -- running --------------------------------------------------------------------------------

_CONTEXT_PARAMETER: weakref.WeakKeyDictionary[Callable[..., Any], bool] = (
    weakref.WeakKeyDictionary()
)
_CONTEXT_LOCK = threading.Lock()


def accepts_context(fn: Callable[..., Any]) -> bool:
    """True if ``fn`` declares a keyword-only parameter named ``context`` (cached)."""
    with _CONTEXT_LOCK:
        try:
            return _CONTEXT_PARAMETER[fn]
        except (KeyError, TypeError):
            pass
    try:
        parameter = inspect.signature(fn).parameters.get("context")
    except (TypeError, ValueError):
        parameter = None
    wanted = parameter is not None and parameter.kind is inspect.Parameter.KEYWORD_ONLY
    # A callable that is not weak-referenceable is just not cached.
    with _CONTEXT_LOCK, contextlib.suppress(TypeError):
        _CONTEXT_PARAMETER[fn] = wanted
    return wanted


def job_name_of(fn: Callable[..., Any]) -> str:
    """The job name of a function loaded by :class:`JobLoader`, else its qualified name."""
    module = getattr(fn, "__module__", None) or ""
    prefix = MODULE_PREFIX + "."
    if module.startswith(prefix):
        return module[len(prefix) :]
    return str(getattr(fn, "__qualname__", None) or repr(fn))


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


def _resolve(awaitable: Awaitable[Any]) -> Any:
    """Run an awaitable to completion in a new event loop."""
    coroutine: Coroutine[Any, Any, Any] = (
        awaitable if inspect.iscoroutine(awaitable) else _await(awaitable)
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # Called from inside an event loop: give the job a loop of its own in another thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="after-job") as pool:
        return pool.submit(asyncio.run, coroutine).result()


def run_job(
    fn: Callable[..., Any], arguments: Sequence[Any], context: JobContext | None = None
) -> Any:
    """Call ``fn(*arguments)`` (plus ``context=`` if it wants it) and return its result.

    Coroutine functions and returned awaitables are run with :func:`asyncio.run`. Exceptions
    raised by the job propagate unchanged. Raises :class:`JobError` if ``arguments`` is not
    a list or the result is not JSON-serialisable.
    """
    name = job_name_of(fn)
    if not isinstance(arguments, list | tuple):
        raise JobError(f"arguments of job {name!r} must be a list, got {type(arguments).__name__}")
    kwargs: dict[str, Any] = {"context": context} if accepts_context(fn) else {}
    result = fn(*arguments, **kwargs)
    if inspect.isawaitable(result):
        result = _resolve(result)
    try:
        encode_json(result, "result")
    except Unstorable as exc:  # NaN, a lone surrogate: CouchDB would refuse the outcome
        raise JobError(f"result of job {name!r} cannot be stored: {exc.reason}") from None
    except (TypeError, RecursionError) as exc:
        raise JobError(f"result of job {name!r} is not JSON-serialisable: {exc}") from exc
    return result


class NotBegun(Exception):
    """The job was not begun: the worker's lease ran out before it could (after.runner)."""


class JobTimeout(JobError):
    """The job ran longer than its task's timeout and was stopped."""


class JobFailed(JobError):
    """A job run in a child process raised: its type, message and traceback, as text."""

    def __init__(self, error: dict[str, str]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


def stop_job_process(process: subprocess.Popen) -> None:
    """Kill a job's child process and everything it started (its process group)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()


def run_job_in_process(
    jobs_dir: Path,
    name: str,
    arguments: Sequence[Any],
    context: JobContext,
    timeout: float | None,
    started: Callable[[subprocess.Popen], None] = lambda process: None,
    not_after: float | None = None,
) -> Any:
    """Run a job in a child process (after.jobrunner) and kill it after `timeout` seconds.

    `started(process)` lets the caller keep the process, to stop it on a cancel.
    Only the last 4 KB of what the job printed is kept (for the error message).
    `not_after` (a `time.time()`): the child does not begin the job past it, and
    NotBegun is raised (the worker's lease ran out while the child started: a pause).
    """
    request = json.dumps(
        {
            "jobs": str(jobs_dir),
            "name": name,
            "arguments": list(arguments),
            "context": dataclasses.asdict(context),
            "not_after": not_after,
        }
    )
    with tempfile.TemporaryFile() as printed:
        process = subprocess.Popen(
            [sys.executable, "-m", "after.jobrunner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=printed,
            start_new_session=True,  # its own process group: what it starts is stopped too
        )
        started(process)
        try:
            output, _ = process.communicate(request.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_job_process(process)
            process.communicate()
            message = f"timeout: job {name!r} ran longer than {timeout:g} s and was stopped"
            raise JobTimeout(message) from None
        if not output.strip():
            printed.seek(max(0, printed.seek(0, 2) - 4096))
            tail = printed.read().decode(errors="replace")
            raise JobError(f"job {name!r} stopped (exit code {process.returncode}): {tail[-2000:]}")
    reply = json.loads(output.decode().strip().splitlines()[-1])
    if reply.get("not_begun"):
        raise NotBegun(f"job {name!r} not begun: the worker's lease ran out as it started")
    if "error" in reply:
        raise JobFailed(reply["error"])
    return reply["result"]


__all__ = [
    "JOB_NAME",
    "NAME_RULE",
    "BadJob",
    "InvalidJobName",
    "JobContext",
    "JobError",
    "JobFailed",
    "JobLoader",
    "JobTimeout",
    "NotBegun",
    "UnknownJob",
    "accepts_context",
    "check_name",
    "job_name_of",
    "run_job",
    "run_job_in_process",
    "stop_job_process",
]
