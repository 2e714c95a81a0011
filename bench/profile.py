"""Where the embedded server spends its CPU during a scenario (`--profile-server`).

The server is started with `bench/node/profiler.js` preloaded: SIGUSR2 starts V8's
CPU profiler and the next SIGUSR2 writes the profile. The bench reads it back
and keeps a summary: self time by package and by function, and inclusive time
(a function and what it calls), as shares of the sampled time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

PRELOAD = Path(__file__).resolve().parent / "node" / "profiler.js"
ENV_DIR = "AFTER_BENCH_PROFILE_DIR"
TOP = 15


class ServerProfiler:
    """Start and stop the CPU profiler of a server started with PRELOAD."""

    def __init__(self, process: subprocess.Popen, folder: Path) -> None:
        self.process = process
        self.folder = folder
        self.taken = 0
        self.running = False

    def start(self) -> None:
        self.process.send_signal(signal.SIGUSR2)
        self.running = True

    def stop(self, timeout: float = 60.0) -> Path:
        """Stop profiling (if a scenario has not already: it leaves out its own checks);
        the path of the profile once the server has written it."""
        target = self.folder / f"{self.taken}.cpuprofile"
        if not self.running:
            return target
        self.running = False
        self.taken += 1
        target = self.folder / f"{self.taken}.cpuprofile"
        self.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while not target.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise TimeoutError(f"the server wrote no profile to {target}")
            time.sleep(0.1)
        return target


def _frame_name(node: dict[str, Any]) -> str:
    frame = node["callFrame"]
    url = frame["url"].split("node_modules/")[-1]
    where = f" {url}:{frame['lineNumber'] + 1}" if url else ""
    return f"{frame['functionName'] or ('(anonymous)' if url else '(native code)')}{where}"


def _package(node_id: int, nodes: dict[int, dict[str, Any]], parent: dict[int, int]) -> str:
    """The package of a function; native code (no source) counts for its JavaScript caller."""
    walk: int | None = node_id
    while walk is not None:
        frame = nodes[walk]["callFrame"]
        url = frame["url"]
        if "node_modules/" in url:
            return url.split("node_modules/")[-1].split("/")[0]
        if url.startswith("node:"):
            return "node (built-in modules)"
        if url:
            return url
        if frame["functionName"].startswith("("):  # (idle), (garbage collector), (program)
            return frame["functionName"]
        walk = parent.get(walk)
    return "(native)"


def summarize(profile: dict[str, Any], top: int = TOP) -> dict[str, Any]:
    """Shares (%) of the sampled time: by package and function (self), and inclusive."""
    nodes = {node["id"]: node for node in profile["nodes"]}
    parent = {child: node["id"] for node in profile["nodes"] for child in node.get("children", [])}
    sampled: Counter[int] = Counter()
    for node_id, delta in zip(profile["samples"], profile["timeDeltas"], strict=True):
        sampled[node_id] += delta
    total = sum(sampled.values()) or 1
    by_package: Counter[str] = Counter()
    by_function: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for node_id, time_us in sampled.items():
        node = nodes[node_id]
        by_package[_package(node_id, nodes, parent)] += time_us
        by_function[_frame_name(node)] += time_us
        names = set()  # a recursive function counts once per sample
        walk: int | None = node_id
        while walk is not None:
            names.add(_frame_name(nodes[walk]))
            walk = parent.get(walk)
        for name in names:
            inclusive[name] += time_us

    def shares(counter: Counter[str], skip: set[str] = set()) -> list[list[Any]]:  # noqa: B006
        rows = [(k, v) for k, v in counter.most_common() if k not in skip][:top]
        return [[name, round(100 * value / total, 1)] for name, value in rows]

    idle = sum(v for k, v in by_function.items() if k == "(idle)")
    return {
        "sampled_s": round(total / 1e6, 1),
        "busy_pct": round(100 * (total - idle) / total, 1),
        "self_by_package": shares(by_package),
        "self_by_function": shares(by_function),
        "inclusive": shares(inclusive, skip={"(root)"}),
    }


def summarize_file(path: Path, top: int = TOP) -> dict[str, Any]:
    return summarize(json.loads(path.read_text()), top)


def as_text(key: str, summary: dict[str, Any]) -> str:
    lines = [
        f"Server CPU profile, scenario {key}: {summary['sampled_s']} s sampled, "
        f"main thread busy {summary['busy_pct']} % (shares of the sampled time)",
    ]
    for title, rows in (
        ("self time by package", summary["self_by_package"]),
        ("self time by function", summary["self_by_function"]),
        ("inclusive time (a function and what it calls)", summary["inclusive"]),
    ):
        lines += ["", title] + [f"{share:6.1f} %  {name}" for name, share in rows]
    return "\n".join(lines) + "\n"
