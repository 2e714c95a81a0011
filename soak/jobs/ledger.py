"""The soak's one job: record the run, then behave as the task asks.

Every run appends one JSON line to the ledger file named by SOAK_LEDGER, first thing,
so a run killed later still shows. The line is written with a single write() on a file
opened with O_APPEND: lines of concurrent processes never interleave. It is the job's
own account of what ran, to hold against what the task documents say.

`run(behaviour, seconds=0, *, context)`, behaviour one of:
    ok          sleep `seconds`, return the idempotency key
    fail        raise after `seconds`
    flaky       fail while the attempt is below `seconds` (a whole number), then succeed
    sleep       sleep `seconds` (longer than the task's timeout: the run times out)
    nan         return a NaN (not JSON CouchDB can store)
    surrogate   return text holding a lone surrogate (not valid Unicode)
    huge        return a 10 MB string (over CouchDB's 8 MB document limit)
"""

import json
import os
import time
from typing import Any


def process_started() -> float:
    """When this process was started (time.time() scale), from /proc (Linux); 0 elsewhere.
    A job with a timeout runs in a child process that takes a second or so to get here:
    its start is when the worker began the run."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as uptime:
            up = float(uptime.read().split()[0])
        return time.time() - (up - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def record(behaviour: str, context: Any) -> None:
    line = {
        "task": context.task_id,
        "attempt": context.attempt,
        "key": context.idempotency_key,
        "pid": os.getpid(),
        "ppid": os.getppid(),  # the worker, when the job runs in a child (a timeout)
        # The soak's name of the worker process (slot.generation), inherited by a child:
        # a child whose worker was killed before it wrote this line has ppid 1.
        "instance": os.environ.get("SOAK_INSTANCE", ""),
        "worker": context.worker,
        "behaviour": behaviour,
        "at": time.time(),
        "process_started": process_started(),
    }
    path = os.environ["SOAK_LEDGER"]
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def run(behaviour: str, seconds: float = 0, *, context: Any) -> Any:
    record(behaviour, context)
    if behaviour == "ok":
        time.sleep(seconds)
        return context.idempotency_key
    if behaviour == "fail":
        time.sleep(seconds)
        raise RuntimeError(f"soak: failing on purpose ({context.idempotency_key})")
    if behaviour == "flaky":
        if context.attempt < seconds:
            raise RuntimeError(f"soak: attempt {context.attempt} fails, {seconds} will pass")
        return context.idempotency_key
    if behaviour == "sleep":
        time.sleep(seconds)
        return "woke up: the timeout did not stop this run"
    if behaviour == "nan":
        return {"value": float("nan")}
    if behaviour == "surrogate":
        return {"stdout": b"bad \x80 text".decode(errors="surrogateescape")}
    if behaviour == "huge":
        return "x" * 10_000_000
    raise ValueError(f"soak: unknown behaviour {behaviour!r}")
