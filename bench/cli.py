"""`python -m bench [--quick] [--url URL] [--only a,b] ...`: run the scenarios, report."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from after import __version__
from after.config import redact
from bench import profile, report, scenarios
from bench.env import ROOT, Bench

SCENARIOS = ["ceiling", "burst", "trickle", "scale", "peers"]

console = Console()
if not console.is_terminal:
    console = Console(width=150)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    p.add_argument("--url", help="a CouchDB-compatible server (loopback only) instead of the "
                   "embedded PouchDB Server; credentials in the URL; the nodes of a cluster "
                   "comma-separated (worker instance i attached to node i)")  # fmt: skip
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    p.add_argument("--burst", type=int, help="burst size (default 10,000; quick 1,000)")
    p.add_argument("--trickle-rate", type=int, default=200, help="tasks/s (default 200)")
    p.add_argument("--trickle-seconds", type=float, help="default 30; quick 5")
    p.add_argument("--scale-future", type=int, help="default 100,000; quick 2,000")
    p.add_argument("--scale-due", type=int, help="default 1,000; quick 100")
    p.add_argument("--ceiling-docs", type=int, help="_bulk_docs documents (10,000; quick 1,000)")
    p.add_argument("--ceiling-seconds", type=float, help="single-POST runs (3 s; quick 0.75)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results",
                   help="where latest.json and the plots go")  # fmt: skip
    p.add_argument("--no-docs", action="store_true", help="do not append to docs/benchmarks.md")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs) for inspection")
    p.add_argument("--profile-server", action="store_true",
                   help="profile the embedded server's CPU during each scenario: a summary "
                   "in RESULTS/profile-<scenario>.txt, the V8 profile beside it")  # fmt: skip
    return p.parse_args(argv)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "after": __version__,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    commands = {
        "commit": ["git", "rev-parse", "--short", "HEAD"],
        "node": ["node", "--version"],
        "after_tree_changes": ["git", "status", "--porcelain", "after", "designdocs"],
    }
    for key, argv in commands.items():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=10)
            info[key] = out.stdout.strip()
    # the worker measured may be an uncommitted working tree: say so
    info["after_tree_modified"] = bool(info.pop("after_tree_changes", ""))
    return info


def command_line(argv: list[str]) -> str:
    python = sys.executable
    with contextlib.suppress(ValueError):
        python = os.path.relpath(python, ROOT) if python.startswith(str(ROOT)) else python
    args = [redact(a) if "://" in a else a for a in argv]
    return " ".join(shlex.quote(x) for x in [python, "-m", "bench", *args])


def save_profile(key: str, path: Path, folder: Path) -> dict[str, Any]:
    """Keep a scenario's server profile (for Chrome DevTools) and its summary in text."""
    folder.mkdir(parents=True, exist_ok=True)
    summary = profile.summarize_file(path)
    shutil.copyfile(path, folder / f"profile-{key}.cpuprofile")
    (folder / f"profile-{key}.txt").write_text(profile.as_text(key, summary))
    return summary


def misbehaved(result: dict[str, Any], n: int) -> str | None:
    if not result.get("all_done"):
        return "not every task reached done in time"
    if result.get("statuses") != {"done": n}:
        return f"final statuses {result.get('statuses')}"
    if result.get("attempts_over_1"):
        return f"{result['attempts_over_1']} task(s) ran more than once"
    if not all(result.get("workers_alive", [True])):
        return "a worker process died"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    quick = args.quick
    only = set((args.only or ",".join(SCENARIOS)).split(","))
    unknown = only - set(SCENARIOS)
    if unknown:
        console.print(f"[red]unknown scenario(s): {', '.join(sorted(unknown))}[/]")
        return 2
    if args.profile_server and args.url:
        console.print("[red]--profile-server profiles the embedded server only: drop --url[/]")
        return 2
    n_burst = args.burst or (1_000 if quick else 10_000)
    trickle_s = args.trickle_seconds or (5.0 if quick else 30.0)
    future = args.scale_future if args.scale_future is not None else (2_000 if quick else 100_000)
    due = args.scale_due or (100 if quick else 1_000)
    began = time.time()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    results: dict[str, Any] = {
        "date": report.now_iso(),
        "command": command_line(argv),
        "quick": quick,
        "machine": machine(),
        "sizes": {
            "burst": n_burst,
            "trickle_rate": args.trickle_rate,
            "trickle_seconds": trickle_s,
            "scale_future": future,
            "scale_due": due,
        },
        "scenarios": {},
        "errors": {},
        "notes": [],
    }
    s, notes = results["scenarios"], results["notes"]

    def run(key: str, fn, *a, **kw) -> dict[str, Any] | None:
        t0 = time.time()
        console.print(f"[bold]{key}[/] …", end=" ")
        # APScheduler and Huey do not use the server: nothing to profile there
        profiler = None if key.startswith(("aps_", "huey_")) else bench.profiler
        try:
            if profiler is not None:
                profiler.start()
            try:
                out = fn(*a, **kw)
            finally:
                if profiler is not None:
                    profile_summary = save_profile(key, profiler.stop(), args.results)
            if profiler is not None:
                out["server_profile"] = profile_summary
        except Exception as exc:
            message = " ".join(str(exc).split())
            if len(message) > 300:
                message = message[:300] + " …"
            console.print(f"[red]failed: {type(exc).__name__}: {escape(message)}[/]")
            results["errors"][key] = "".join(traceback.format_exception(exc))[-4000:]
            return None
        out["elapsed_s"] = round(time.time() - t0, 2)
        s[key] = out
        console.print(f"done in {out['elapsed_s']} s")
        return out

    console.print(f"After benchmark ({'quick' if quick else 'full'}): {results['command']}")
    bench = Bench(args.url, keep=args.keep, profile=args.profile_server)
    try:
        results["server"] = {"kind": bench.server_kind, "url": redact(bench.url),
                             "version": bench.server_version}  # fmt: skip
        console.print(f"server: {bench.server_kind} at {redact(bench.url)}; temp {bench.tmp}")
        rates: dict[str, Any] = {}
        if "ceiling" in only:
            rates = (
                run(
                    "ceiling",
                    scenarios.ceiling,
                    bench,
                    quick,
                    n_docs=args.ceiling_docs,
                    seconds=args.ceiling_seconds,
                )
                or {}
            )
        if "burst" in only:
            run("burst_1", scenarios.burst, bench, n_burst, 1, True, rates)
            four = run("burst_4", scenarios.burst, bench, n_burst, 4, True, rates)
            problem = misbehaved(four, n_burst) if four else "it failed"
            if problem:
                if four:
                    s["burst_4_same_name"] = s.pop("burst_4")
                notes.append(
                    f"4 instances of one worker name misbehaved ({problem}); burst_4 uses 4 "
                    f"different worker names with {n_burst // 4:,} tasks each instead"
                )
                run("burst_4", scenarios.burst, bench, n_burst, 4, False, rates)
            elif not quick:
                # beside it: 4 worker names, each with its share (no contention between them)
                run("burst_4_distinct", scenarios.burst, bench, n_burst, 4, False, rates)
        if "trickle" in only:
            run("trickle", scenarios.trickle, bench, args.trickle_rate, trickle_s)
            # "run this now": each task due the moment it is created (lateness = created -> started)
            now_rate, now_s = min(50, args.trickle_rate), min(trickle_s, 10.0)
            run("trickle_now", scenarios.trickle, bench, now_rate, now_s, lead=0.0)
        if "scale" in only:
            run("scale", scenarios.scale, bench, future, due)
        if "peers" in only:
            try:
                from bench import peers
            except ImportError as exc:
                notes.append(
                    f"peers skipped: {exc} (install the bench extra: pip install -e '.[bench]')"
                )
            else:
                n_trickle = int(args.trickle_rate * trickle_s)
                if "burst" in only:
                    run("aps_burst", peers.aps, bench, "burst", n_burst)
                    run("aps_mem_burst", peers.aps, bench, "burst", n_burst, memory=True)
                    run("huey_burst", peers.huey_run, bench, "burst", n_burst)
                if "trickle" in only:
                    run("aps_trickle", peers.aps, bench, "trickle", n_trickle, trickle_s)
                    run(
                        "aps_mem_trickle",
                        peers.aps,
                        bench,
                        "trickle",
                        n_trickle,
                        trickle_s,
                        memory=True,
                    )
                    run("huey_trickle", peers.huey_run, bench, "trickle", n_trickle, trickle_s)
        results["server"]["rss_mb_at_end"] = (
            round(bench.server_rss() / 2**20, 1) if bench.server_rss() else None
        )
    finally:
        bench.close()
    results["elapsed_s"] = round(time.time() - began, 1)
    # other processes on the machine skew every figure: keep the load beside them
    results["machine"]["load_average_at_start"] = load_at_start
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if max(load_at_start[0], results["machine"]["load_average_at_end"][0]) > (os.cpu_count() or 2):
        notes.append(
            f"the machine was busy with other work (load average {load_at_start[0]} at the "
            f"start, {results['machine']['load_average_at_end'][0]} at the end on "
            f"{os.cpu_count()} CPUs): figures are pessimistic and noisy"
        )
    if (uneven := report.uneven_trickle_note(results)) is not None:
        notes.append(uneven)
    if (floor := report.validation_floor_note(results)) is not None:
        notes.append(floor)
    b1 = s.get("burst_1") or {}
    c = s.get("ceiling") or {}
    if b1.get("throughput_db_per_s") and c.get("ceiling_tasks_per_s"):
        results["burst_fraction_of_ceiling"] = {
            k: round((s.get(k) or {}).get("throughput_db_per_s", 0) / c["ceiling_tasks_per_s"], 3)
            for k in ("burst_1", "burst_4") if s.get(k)
        }  # fmt: skip
        notes.append(
            "burst throughput is counted from the first due time; the claims (`scheduled`) and "
            "most commits (`running`, written 0.2 s ahead) happen before it, so only part of "
            "the 3 writes per task fall inside that window"
        )
    results["peer_ratios"] = report.peer_ratios(results)
    results["targets"] = report.targets(results)
    if quick:
        notes.append("quick run: sizes are reduced (see `sizes`); the full run is the reference")
    report.print_report(results, console)
    args.results.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.results / "latest.json")
    written = [str(args.results / "latest.json")]
    if not args.no_plots:
        try:
            written += report.plots(results, args.results)
        except ImportError as exc:
            notes.append(f"plots skipped: {exc}")
    if not args.no_docs:
        report.append_docs(results)
        written.append(str(report.DOCS))
    console.print(f"written: {', '.join(written)}; {results['elapsed_s']} s in all")
    if results["errors"]:
        console.print(f"[red]errors in: {', '.join(results['errors'])}[/]")
        return 1
    return 0
