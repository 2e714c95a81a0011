"""Targets, the table, latest.json, the plots and the docs/benchmarks.md summary."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stats import ratio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"


def _get(data: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets (issues 6 and 17), each PASS / FAIL (or n/a when a figure is missing).
    Latency targets are ratios to the peers in the same run: this machine's speed varies
    by 2x from day to day, so an absolute millisecond figure does not hold."""
    s = results["scenarios"]
    ceiling = _get(s, "ceiling", "ceiling_tasks_per_s")
    checks: list[dict[str, Any]] = []

    def check(name: str, value: Any, limit: Any, ok: bool | None, note: str = "") -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        checks.append(
            {"target": name, "value": value, "limit": limit, "status": status, "note": note}
        )

    def cmp(a: Any, b: Any, op: str) -> bool | None:
        if a is None or b is None:
            return None
        return a >= b if op == ">=" else a <= b if op == "<=" else a > b if op == ">" else a < b

    with_vdu = _get(s, "ceiling", "bulk_create_docs_per_s")
    without_vdu = _get(s, "ceiling", "bulk_create_without_validation_docs_per_s")
    cost = ratio(without_vdu, with_vdu)
    check(
        "validation costs at most 2x (`_bulk_docs` creates without / with)",
        cost,
        2.0,
        cmp(cost, 2.0, "<="),
        "the rate without the design doc divided by the rate with it",
    )
    single = _get(s, "ceiling", "single_post_1_client_per_s")
    single_raw = _get(s, "ceiling", "single_post_without_validation_per_s")
    floor = None if single_raw is None else round(0.8 * single_raw, 1)
    check(
        "single POSTs (1 client) ≥ 80 % of the rate without validation",
        single,
        floor,
        cmp(single, floor, ">="),
    )
    for key, label in (("burst_1", "1 instance"), ("burst_4", "4 instances")):
        tput = _get(s, key, "throughput_db_per_s")
        half = None if ceiling is None else round(ceiling / 2, 1)
        check(
            f"burst throughput ≥ 50 % of ceiling ({label})",
            tput,
            half,
            cmp(tput, half, ">="),
            "tasks/s from first due to the last `done` in the database; "
            "ceiling = bulk writes/s ÷ 3",
        )
        huey = _get(s, "huey_burst", "throughput_db_per_s")
        check(f"burst throughput above Huey's ({label})", tput, huey, cmp(tput, huey, ">"))
        p99 = _get(s, key, "lateness_ms", "p99")
        aps = _get(s, "aps_burst", "lateness_ms", "p99")
        check(f"burst lateness p99 below APScheduler's ({label}), ms", p99, aps, cmp(p99, aps, "<"))
    one, four = _get(s, "burst_1", "throughput_db_per_s"), _get(s, "burst_4", "throughput_db_per_s")
    most = None if one is None else round(0.9 * one, 1)
    check("burst throughput, 4 instances ≥ 90 % of 1 instance", four, most, cmp(four, most, ">="))
    trickle = s.get("trickle") or {}
    expected = None
    if trickle.get("rate_per_s") and trickle.get("seconds"):
        expected = round(trickle["rate_per_s"] * trickle["seconds"])
    check(
        "trickle completes: every task created on pace, all done",
        trickle.get("tasks"),
        expected,
        None if not trickle else bool(trickle.get("all_done")) and trickle.get("tasks") == expected,
    )
    p99 = _get(s, "trickle", "lateness_ms", "p99")
    memory_p99 = _get(s, "aps_mem_trickle", "lateness_ms", "p99")
    check(
        "trickle lateness p99 ≤ APScheduler's with its memory store, ms",
        p99,
        memory_p99,
        cmp(p99, memory_p99, "<="),
        "times in the documents have millisecond resolution",
    )
    pickup = _get(s, "trickle", "pickup_ms", "p50")
    huey_pickup = _get(s, "huey_trickle", "pickup_ms", "p50")
    fifth = None if huey_pickup is None else round(huey_pickup / 5, 2)
    check(
        "pick-up p50 ≤ a fifth of Huey's, ms",
        pickup,
        fifth,
        cmp(pickup, fifth, "<="),
        "created (bench sends the write) → claimed_at",
    )
    scale = s.get("scale") or {}
    future = scale.get("future_tasks")
    note = (
        ""
        if future in (None, 100_000)
        else f"measured with {future:,} future tasks, not 100,000 (quick)"
    )
    rss = scale.get("rss_peak_mb")
    check(
        "worker RSS ≤ 100 MB with 100,000 future tasks (peak)", rss, 100, cmp(rss, 100, "<="), note
    )
    first = scale.get("first_run_s")
    check(
        "start-up to first run ≤ 2 s",
        first,
        2.0,
        cmp(first, 2.0, "<="),
        (note + "; " if note else "")
        + "view warmed by the bench first: see view_warmed_by_bench_s",
    )
    return checks


def uneven_trickle_note(results: dict[str, Any]) -> str | None:
    """A note when the trickle did not run at its pace: its producer fell a whole tick or
    more behind (the bench or the server was held up), which its lateness figures show."""
    trickle = _get(results, "scenarios", "trickle") or {}
    late = trickle.get("producer_late_ticks") or 0
    if not late:
        return None
    ticks = round(trickle.get("seconds", 0) * 1000 / trickle.get("tick_ms", 1))
    return (
        f"the trickle's producer fell a tick or more behind {late} times (of {ticks:,} ticks): "
        "the bench or the server was held up, and the trickle's figures show it"
    )


def validation_floor_note(results: dict[str, Any]) -> str | None:
    """A note when validation costs more than 2x and a `validate_doc_update` that does
    nothing already does: no validation function can meet that target on this server,
    and what After's own function adds is its cost over that floor."""
    c = _get(results, "scenarios", "ceiling") or {}
    none = c.get("bulk_create_without_validation_docs_per_s")
    empty = c.get("bulk_create_with_empty_validation_docs_per_s")
    ours = c.get("bulk_create_docs_per_s")
    floor, own = ratio(none, empty), ratio(empty, ours)
    if floor is None or own is None or floor <= 2.0:
        return None
    return (
        f"a `validate_doc_update` that does nothing already makes `_bulk_docs` creates "
        f"{floor:g}x slower on this server: no validation function can cost at most 2x here; "
        f"After's costs {own:g}x that empty function"
    )


def peer_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each peer figure divided by After's (1 instance) for the same scenario."""
    s = results["scenarios"]
    out: dict[str, Any] = {}
    for peer in ("aps", "aps_mem", "huey"):
        for scenario, after_key in (("burst", "burst_1"), ("trickle", "trickle")):
            theirs, ours = s.get(f"{peer}_{scenario}"), s.get(after_key)
            if not theirs or not ours:
                continue
            entry = {
                f"lateness_{q}": ratio(_get(theirs, "lateness_ms", q), _get(ours, "lateness_ms", q))
                for q in ("p50", "p99", "max")
            }
            if scenario == "burst":
                entry["throughput"] = ratio(
                    theirs.get("throughput_db_per_s"), ours.get("throughput_db_per_s")
                )
                entry["all_done_in_db_s"] = ratio(
                    theirs.get("all_done_in_db_s"), ours.get("all_done_in_db_s")
                )
            else:
                entry["pickup_p50"] = ratio(
                    _get(theirs, "pickup_ms", "p50"), _get(ours, "pickup_ms", "p50")
                )
            out[f"{peer}_{scenario}"] = entry
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.3g}" if value else "0"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


ROWS = [
    ("burst_1", "After burst, 1 instance"),
    ("burst_4", "After burst, 4 instances"),
    ("burst_4_same_name", "After burst, 4 same-name (misbehaved)"),
    ("burst_4_distinct", "After burst, 4 worker names"),
    ("aps_burst", "APScheduler 3 burst"),
    ("aps_mem_burst", "APScheduler 3 burst, memory store"),
    ("huey_burst", "Huey burst"),
    ("trickle", "After trickle"),
    ("trickle_now", "After run-now (due when created)"),
    ("aps_trickle", "APScheduler 3 trickle"),
    ("aps_mem_trickle", "APScheduler 3 trickle, memory store"),
    ("huey_trickle", "Huey trickle"),
]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    s = results["scenarios"]
    rows = []
    for key, label in ROWS:
        r = s.get(key)
        if not r:
            continue
        if key == "burst_4":
            label += " of one name" if r.get("names") == "same" else ", 4 names"
        rows.append([
            label,
            _fmt(r.get("tasks")),
            _fmt(r.get("throughput_db_per_s")) if "burst" in key else "",
            _fmt(r.get("all_done_in_db_s")) if "burst" in key else "",
            _fmt(_get(r, "lateness_ms", "p50")),
            _fmt(_get(r, "lateness_ms", "p99")),
            _fmt(_get(r, "lateness_ms", "max")),
            _fmt(_get(r, "pickup_ms", "p50")),
            _fmt(_get(r, "pickup_ms", "p99")),
        ])  # fmt: skip
    return rows


HEADERS = ["scenario", "tasks", "tasks/s", "all done s", "late p50 ms", "late p99 ms",
           "late max ms", "pick-up p50 ms", "pick-up p99 ms"]  # fmt: skip


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    s = results["scenarios"]
    c = s.get("ceiling")
    if c:
        t = Table(title=f"ceiling: {results['server']['kind']}")
        for h in ("1 client POST/s", "8 clients POST/s", "bulk create docs/s",
                  "bulk create, no validation", "bulk create, empty validation",
                  "bulk update docs/s", "ceiling tasks/s (÷3)"):  # fmt: skip
            t.add_column(h, justify="right")
        t.add_row(*(_fmt(c.get(k)) for k in (
            "single_post_1_client_per_s", "single_post_8_clients_per_s",
            "bulk_create_docs_per_s", "bulk_create_without_validation_docs_per_s",
            "bulk_create_with_empty_validation_docs_per_s",
            "bulk_update_docs_per_s", "ceiling_tasks_per_s")))  # fmt: skip
        console.print(t)
    t = Table(title="burst and trickle (lateness = job start - due)")
    for i, h in enumerate(HEADERS):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(results):
        t.add_row(*row)
    console.print(t)
    sc = s.get("scale")
    if sc:
        t = Table(title=f"scale: {sc['future_tasks']:,} future + {sc['due_now']:,} due now")
        keys = ["insert_s", "view_warmed_by_bench_s", "ready_s", "first_run_s", "due_all_done_s",
                "rss_after_due_done_mb", "rss_peak_mb", "held_when_settled"]  # fmt: skip
        for k in keys:
            t.add_column(k, justify="right")
        t.add_row(*(_fmt(sc.get(k)) for k in keys))
        console.print(t)
    ratios = results.get("peer_ratios") or {}
    if ratios:
        t = Table(title="peers ÷ After (same run; > 1 means the peer's figure is larger)")
        cols = sorted({k for v in ratios.values() for k in v})
        t.add_column("peer scenario")
        for col in cols:
            t.add_column(col, justify="right")
        for name, entry in ratios.items():
            t.add_row(name, *(_fmt(entry.get(col)) for col in cols))
        console.print(t)
    t = Table(title="targets (issues 6 and 17)")
    for h in ("target", "value", "limit", "status", "note"):
        t.add_column(h)
    for chk in results["targets"]:
        style = {"PASS": "green", "FAIL": "red"}.get(chk["status"], "yellow")
        t.add_row(chk["target"], _fmt(chk["value"]), _fmt(chk["limit"]),
                  f"[{style}]{chk['status']}[/]", chk["note"])  # fmt: skip
    console.print(t)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(strip_raw(results), indent=2, sort_keys=False) + "\n")


def strip_raw(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_raw(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [strip_raw(v) for v in value]
    return value


def plots(results: dict[str, Any], folder: Path) -> list[str]:
    """lateness.png (distribution per scenario) and throughput.png (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["scenarios"]
    written: list[str] = []
    groups = [
        ("burst", [("burst_1", "After x1"), ("burst_4", "After x4"), ("aps_burst", "APScheduler 3"),
                   ("aps_mem_burst", "APScheduler 3, memory"), ("huey_burst", "Huey")]),
        ("trickle", [("trickle", "After"), ("aps_trickle", "APScheduler 3"),
                     ("aps_mem_trickle", "APScheduler 3, memory"), ("huey_trickle", "Huey")]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (title, series) in zip(axes, groups, strict=True):
        for key, label in series:
            raw = (s.get(key) or {}).get("_lateness_s")
            if not raw:
                continue
            values = sorted(max(v * 1000, 0.01) for v in raw)
            ys = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(
                values,
                ys,
                where="post",
                label=f"{label} (p99 {_fmt(s[key]['lateness_ms']['p99'])} ms)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("lateness: job start - due (ms, log scale; 0 shown at 0.01)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title(f"{title}: lateness distribution")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"After benchmark — {results['server']['kind']} — {results['date']}", fontsize=10)
    fig.tight_layout()
    path = folder / "lateness.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    bars = [
        ("ceiling (bulk ÷ 3)", _get(s, "ceiling", "ceiling_tasks_per_s")),
        ("After x1", _get(s, "burst_1", "throughput_db_per_s")),
        ("After x4", _get(s, "burst_4", "throughput_db_per_s")),
        ("APScheduler 3", _get(s, "aps_burst", "throughput_db_per_s")),
        ("APScheduler 3, memory", _get(s, "aps_mem_burst", "throughput_db_per_s")),
        ("Huey", _get(s, "huey_burst", "throughput_db_per_s")),
    ]
    bars = [(label, value) for label, value in bars if value]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = ["#888888", "#1f77b4", "#4a9ad4", "#ff7f0e", "#ffbb78", "#2ca02c"][: len(bars)]
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=colours)
    for i, (_, value) in enumerate(bars):
        ax.text(i, value, f"{value:,.0f}", ha="center", va="bottom", fontsize=9)
    n = _get(s, "burst_1", "tasks")
    ax.set_ylabel("tasks/s (first due → last done)")
    ax.set_title(f"burst of {n:,} no-op tasks — {results['server']['kind']}" if n else "burst")
    fig.tight_layout()
    path = folder / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))
    return written


DOCS_HEADER = """\
# Benchmarks

Each run of `python -m bench` (`make bench`, `make bench QUICK=1`) appends a dated summary
here; all numbers of the latest run are in `bench/results/latest.json`. Lateness = job
start - due; pick-up = task created -> claimed. Throughput is tasks/s from the first due
time to the last task `done` in the database. The ceiling is the database's own
`_bulk_docs` update rate in the same run divided by the 3 writes After makes per task
(claim, commit, outcome).

How it measures (see `bench/` for the code):

- Every scenario runs real worker processes (`python -m after start NAME --foreground`,
  each with its own `AFTER_HOME`) against fresh databases with the design docs pushed.
- burst: the workers start first; the bench then inserts N `noop` tasks through
  `_bulk_docs`, due within 100 ms after a margin long enough for the workers to claim
  them all (`claimed_before_due` in the JSON says whether they did), so the burst
  measures the due instant, not the claiming. Lateness = `started_at` - `date`. Done in
  the database: the bench follows `_changes` (include_docs) and notes when the last task
  became `done`, then confirms with `by_status?group_level=1` (polling that view during
  the burst would make PouchDB Server index every intermediate version).
- trickle: 4 tasks every 20 ms (200/s) through `_bulk_docs`, each due 1 s after it is
  sent; pick-up = `claimed_at` - the moment the bench sent it (`pickup_from_ack_ms`: from
  the server's acknowledgement).
- run-now: 50 tasks/s for 10 s, each due the moment the bench sends it, so its lateness
  is the time from creation to the job's start (what a "run this now" request waits).
- scale: future tasks due tomorrow plus tasks due now; the bench queries `by_worker` once
  before starting the worker (view build time reported), then measures spawn -> first
  `started_at` and the worker's RSS (psutil, sampled every 100 ms).
- peers: APScheduler 3 (BackgroundScheduler, SQLite SQLAlchemy job store, 10 threads,
  `misfire_grace_time=3600`) in its own process, again with its MemoryJobStore (the
  in-process limit: nothing persisted, nothing shared), and Huey (SqliteHuey, `huey_consumer -w 4
  -k thread`, defaults otherwise) run the same no-op jobs, which record their start and
  end. Huey's pick-up is its `SIGNAL_SCHEDULED` (the consumer took the task into its
  schedule).
- Times in After's documents have millisecond resolution.
- `make bench PROFILE=1` (`--profile-server`) also runs V8's CPU profiler in the embedded
  server during each scenario: a summary (self time by package and function, inclusive
  time) in `bench/results/profile-<scenario>.txt`, the profile for Chrome DevTools beside it.
"""


def append_docs(results: dict[str, Any], path: Path = DOCS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    m = results["machine"]
    lines: list[str] = []
    if new:
        lines += [*DOCS_HEADER.splitlines(), ""]
    lines += [
        f"## {results['date']} — {'quick' if results['quick'] else 'full'} run",
        "",
        f"Command: `{results['command']}`  ",
        f"Server: {results['server']['kind']}; machine: {m.get('cpus')} CPUs "
        f"({m.get('cpu_model', '?')}), {m.get('memory_gb')} GB, Python {m.get('python')}, "
        f"commit {m.get('commit', '?')}.",
        "",
    ]
    c = results["scenarios"].get("ceiling")
    if c:
        lines += [
            f"Ceiling: single POSTs {_fmt(c['single_post_1_client_per_s'])}/s (1 client; "
            f"{_fmt(c.get('single_post_without_validation_per_s'))} without the design doc), "
            f"{_fmt(c['single_post_8_clients_per_s'])}/s (8 clients); `_bulk_docs` creates "
            f"{_fmt(c['bulk_create_docs_per_s'])} docs/s "
            f"({_fmt(c.get('bulk_create_without_validation_docs_per_s'))} without the design doc, "
            f"{_fmt(c.get('bulk_create_with_empty_validation_docs_per_s'))} with a "
            "`validate_doc_update` that does nothing), "
            f"updates {_fmt(c['bulk_update_docs_per_s'])} docs/s → ceiling "
            f"{_fmt(c['ceiling_tasks_per_s'])} tasks/s.",
            "",
        ]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    sc = results["scenarios"].get("scale")
    if sc:
        lines += [
            "",
            f"Scale ({sc['future_tasks']:,} future + {sc['due_now']:,} due): start-up to first run "
            f"{_fmt(sc.get('first_run_s'))} s (ready {_fmt(sc.get('ready_s'))} s; the bench warmed "
            f"the view first in {_fmt(sc.get('view_warmed_by_bench_s'))} s), worker RSS "
            f"{_fmt(sc.get('rss_after_due_done_mb'))} MB after the due ones, peak "
            f"{_fmt(sc.get('rss_peak_mb'))} MB.",
        ]
    lines += profile_lines(results)
    lines += ["", "| target | value | limit | status |", "|---|---|---|---|"]
    for chk in results["targets"]:
        value, limit = _fmt(chk["value"]), _fmt(chk["limit"])
        lines.append(f"| {chk['target']} | {value} | {limit} | **{chk['status']}** |")
    notes = results.get("notes") or []
    if notes:
        lines += [""] + [f"- {note}" for note in notes]
    lines.append("")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def profile_lines(results: dict[str, Any], top: int = 5) -> list[str]:
    """One line per profiled scenario: where the server's main thread spent its time."""
    lines = []
    for key, scenario in results["scenarios"].items():
        summary = scenario.get("server_profile")
        if not summary:
            continue
        by_package = summary["self_by_package"][:top]
        packages = ", ".join(f"{name} {share} %" for name, share in by_package)
        lines.append(
            f"- Server profile, {key}: main thread busy {summary['busy_pct']} % of "
            f"{summary['sampled_s']} s; self time {packages} "
            f"(more in bench/results/profile-{key}.txt)."
        )
    return ["", *lines] if lines else []


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
