"""Run one job in a child process, so that it can really be stopped.

Jobs of tasks with a `timeout` run here: `python -m after.jobrunner` reads
{"jobs": DIR, "name": NAME, "arguments": [...], "context": {...}} as JSON on
standard input and writes one JSON line, {"result": ...} or {"error": {...}},
on standard output. What the job itself prints goes to standard error, which
the worker keeps only the end of. The worker kills the process when the
timeout is reached or the task is canceled.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

from after.jobs import JobContext, JobLoader, run_job


def main() -> None:
    request = json.loads(sys.stdin.read())
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the job's prints go to stderr
    loader = JobLoader(Path(request["jobs"]), watch=False)
    not_after = request.get("not_after")
    if not_after is not None and time.time() > not_after:
        # The worker's lease ran out while this process started (it was paused): a peer
        # may be taking the task over. Not begun; the worker reads the task back.
        protocol.write(json.dumps({"not_begun": True}) + "\n")
        protocol.flush()
        return
    try:
        fn = loader.load(request["name"])
        result = run_job(fn, request["arguments"], JobContext(**request["context"]))
        reply = {"result": result}
    except BaseException as exc:
        reply = {
            "error": {
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": "".join(traceback.format_exception(exc)),
            }
        }
    protocol.write(json.dumps(reply) + "\n")
    protocol.flush()


if __name__ == "__main__":
    main()
