"""After's scenarios: ceiling, burst, trickle, scale. Each uses fresh databases and real
worker processes (`python -m after start NAME --foreground`)."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from typing import Any

from after.couch import Database
from after.tasks import claim_update, outcome_fields, outcome_update, running_update
from bench.env import Bench, WorkerProcess, workers
from bench.feed import DoneWatcher
from bench.stats import iso, parse_ts, rate, summary_ms

WORKER = "bench"
BATCH = 1000


def task(worker: str, due: float, job: str = "noop") -> dict[str, Any]:
    return {
        "_id": uuid.uuid4().hex,
        "worker": worker,
        "date": iso(due),
        "job": {"name": job, "arguments": []},
        "status": "waiting",
    }


def bulk(bench: Bench, session: Any, db: Database, docs: list[dict[str, Any]]) -> list[dict]:
    response = session.post(
        f"{bench.bare_url}{db.path}/_bulk_docs", json={"docs": docs}, timeout=120
    )
    response.raise_for_status()
    rows = response.json()
    errors = [row for row in rows if row.get("error")]
    if errors:
        raise RuntimeError(f"_bulk_docs refused {len(errors)} document(s): {errors[0]}")
    return rows


def insert(bench: Bench, db: Database, docs: list[dict[str, Any]]) -> float:
    """Insert through `_bulk_docs` in batches; the seconds it took."""
    session = bench.session()
    began = time.perf_counter()
    for i in range(0, len(docs), BATCH):
        bulk(bench, session, db, docs[i : i + BATCH])
    return time.perf_counter() - began


# -- ceiling ---------------------------------------------------------------------------------


def ceiling(
    bench: Bench, quick: bool, n_docs: int | None = None, seconds: float | None = None
) -> dict[str, Any]:
    """The database's own write rates, with After's design doc (validation) in place."""
    db = bench.fresh_db("ceiling")
    try:
        single_s = seconds or (0.75 if quick else 3.0)
        # 1 client, single-document POSTs
        session = bench.session()
        url = f"{bench.bare_url}{db.path}"

        def posts_per_s(url: str) -> float:
            count, began = 0, time.perf_counter()
            while time.perf_counter() - began < single_s and count < 100_000:
                session.post(url, json=task("ceiling", time.time() + 3600), timeout=30)
                count += 1
            return rate(count, time.perf_counter() - began)

        single_1 = posts_per_s(url)

        # 8 clients (threads), each its own session
        counts = [0] * 8
        stop = threading.Event()

        def client(k: int) -> None:
            own = bench.session()
            while not stop.is_set() and counts[k] < 100_000:
                own.post(url, json=task("ceiling", time.time() + 3600), timeout=30)
                counts[k] += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
        began = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(single_s)
        stop.set()
        for t in threads:
            t.join(30)
        single_8 = rate(sum(counts), time.perf_counter() - began)
        # 1 client again, on a database without the design doc: what validation costs a POST
        raw_db = bench.fresh_db("ceiling-raw-posts", design=False)
        try:
            single_raw = posts_per_s(f"{bench.bare_url}{raw_db.path}")
        finally:
            bench.drop(raw_db)

        # _bulk_docs: create, then the three updates a task costs After
        n = n_docs or (1000 if quick else 10_000)
        docs = [task("ceiling", time.time() + 3600) for _ in range(n)]
        create_s = _bulk_timed(bench, session, db, docs)
        # the same creates without a design doc: what validate_doc_update costs
        raw_db = bench.fresh_db("ceiling-raw", design=False)
        try:
            raw_s = _bulk_timed(
                bench, session, raw_db, [task("ceiling", time.time() + 3600) for _ in range(n)]
            )
        finally:
            bench.drop(raw_db)
        # ... and with a validate_doc_update that does nothing: what any validation costs
        # on this server, before the function's own work (Apache CouchDB hands every
        # document to a JavaScript process, resetting it first: docs/benchmarks.md)
        floor_db = bench.fresh_db("ceiling-floor", design=False)
        try:
            floor_db.put({"_id": "_design/floor", "validate_doc_update": DOES_NOTHING})
            floor_s = _bulk_timed(
                bench, session, floor_db, [task("ceiling", time.time() + 3600) for _ in range(n)]
            )
        finally:
            bench.drop(floor_db)
        me = "ceiling@bench:1:00000000"
        steps = [
            ("scheduled", lambda d: claim_update(d, me, _now())),
            ("running", lambda d: running_update(d, me)),
            (
                "done",
                lambda d: outcome_update(d, outcome_fields(_now(), _now(), result=None)),
            ),
        ]
        update_s: dict[str, float] = {}
        for status, make in steps:
            docs = [make(d) for d in docs]
            update_s[status] = _bulk_timed(bench, session, db, docs)
        updates_total = sum(update_s.values())
        bulk_create = rate(n, create_s)
        bulk_update = rate(3 * n, updates_total)
        return {
            "single_post_1_client_per_s": single_1,
            "single_post_8_clients_per_s": single_8,
            "single_post_without_validation_per_s": single_raw,
            "bulk_create_docs_per_s": bulk_create,
            "bulk_create_without_validation_docs_per_s": rate(n, raw_s),
            "bulk_create_with_empty_validation_docs_per_s": rate(n, floor_s),
            "bulk_update_docs_per_s": bulk_update,
            "bulk_update_by_status_per_s": {k: rate(n, v) for k, v in update_s.items()},
            "bulk_batch": BATCH,
            "bulk_docs": n,
            "writes_per_task": 3,
            # After writes scheduled, running, done for every task, all through _bulk_docs:
            "ceiling_tasks_per_s": rate(n, updates_total),
            "note": "ceiling = tasks whose 3 writes (claim, commit, outcome) the database "
            "takes per second through _bulk_docs batches of 1000, validate_doc_update in place",
        }
    finally:
        bench.drop(db)


DOES_NOTHING = "function (newDoc, oldDoc, userCtx, secObj) {}"


def _now():
    from after.tasks import now

    return now()


def _bulk_timed(bench: Bench, session: Any, db: Database, docs: list[dict[str, Any]]) -> float:
    began = time.perf_counter()
    for i in range(0, len(docs), BATCH):
        rows = bulk(bench, session, db, docs[i : i + BATCH])
        revs = {row["id"]: row["rev"] for row in rows}
        for doc in docs[i : i + BATCH]:
            doc["_rev"] = revs[doc["_id"]]
    return time.perf_counter() - began


# -- analysis ----------------------------------------------------------------------------------


def analyse(docs: list[dict[str, Any]], created: dict[str, float] | None = None) -> dict[str, Any]:
    """Lateness, pick-up, statuses and throughput from the final task documents."""
    statuses = Counter(d.get("status") for d in docs)
    ran = [d for d in docs if d.get("started_at")]
    due = [parse_ts(d["date"]) for d in docs]
    lateness = [parse_ts(d["started_at"]) - parse_ts(d["date"]) for d in ran]
    claimed_before_due = sum(
        1 for d in docs if d.get("claimed_at") and parse_ts(d["claimed_at"]) <= parse_ts(d["date"])
    )
    result: dict[str, Any] = {
        "tasks": len(docs),
        "statuses": dict(statuses),
        "attempts_over_1": sum(1 for d in docs if int(d.get("attempt", 1)) > 1),
        "lateness_ms": summary_ms(lateness),
        "claimed_before_due": claimed_before_due,
        "owners": len({d.get("owner") for d in docs if d.get("owner")}),
    }
    errors = Counter(
        f"{d['error'].get('type')}: {str(d['error'].get('message'))[:160]}"
        for d in docs
        if isinstance(d.get("error"), dict)
    )
    if errors:
        result["errors"] = dict(errors.most_common(5))
    if ran:
        first_due = min(due)
        last_finished = max(parse_ts(d["finished_at"]) for d in ran)
        result["first_due"] = first_due
        result["due_spread_ms"] = round((max(due) - first_due) * 1000, 1)
        result["last_finished_after_first_due_s"] = round(last_finished - first_due, 3)
        result["throughput_jobs_per_s"] = rate(len(ran), last_finished - first_due)
    if created:
        pickup = [
            parse_ts(d["claimed_at"]) - created[d["_id"]]
            for d in docs
            if d.get("claimed_at") and d["_id"] in created
        ]
        result["pickup_ms"] = summary_ms(pickup)
    result["_lateness_s"] = lateness  # raw, for the plots (dropped from the JSON)
    return result


def fetch_all(bench: Bench, db: Database, ids: list[str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i in range(0, len(ids), 5000):
        answer = db.all_docs(keys=ids[i : i + 5000], include_docs=True)
        docs.extend(row["doc"] for row in answer["rows"] if row.get("doc"))
    return docs


def by_status(db: Database, timeout: float) -> tuple[dict[str, int] | None, float | None]:
    """The counts from `_design/after/_view/by_status?group_level=1` and how long it took."""
    began = time.perf_counter()
    try:
        rows = db.server.json(
            "GET",
            f"{db.path}/_design/after/_view/by_status",
            params={"group_level": 1},
            timeout=timeout,
        )["rows"]
    except Exception:
        return None, None
    return {row["key"][0]: row["value"] for row in rows}, round(time.perf_counter() - began, 3)


# -- burst -------------------------------------------------------------------------------------


def burst(
    bench: Bench,
    n: int,
    instances: int,
    same_name: bool,
    rates: dict[str, Any],
    check_view: bool = True,
) -> dict[str, Any]:
    """N no-op tasks due within the same 100 ms, inserted while the workers run."""
    db = bench.fresh_db(f"burst{instances}")
    names = [WORKER] * instances if same_name else [f"{WORKER}{i}" for i in range(instances)]
    try:
        with workers(bench, db, names, tags=[f"-{i}" for i in range(instances)]) as procs:
            for proc in procs:
                proc.wait_ready()
            ready = time.time()
            create = rates.get("bulk_create_docs_per_s") or 5000
            update = rates.get("bulk_update_docs_per_s") or 5000
            # Insert, then let the workers claim every task before the first one is due:
            # the burst measures the due instant, not the claiming.
            margin = 1.0 + n / create + 2.0 * n / update
            watcher = DoneWatcher(bench, db, n, timeout=margin + 60 + n / 50)
            watcher.start()
            cpu0 = [bench.server_cpu(), *(p.cpu() for p in procs), _self_cpu()]
            first_due = time.time() + margin
            docs = [task(names[i % len(names)], first_due + 0.1 * i / n) for i in range(n)]
            insert_s = insert(bench, db, docs)
            finished = watcher.wait(margin + 60 + n / 50)
            all_done_at = watcher.all_final_at
            cpu1 = [bench.server_cpu(), *(p.cpu() for p in procs), _self_cpu()]
            wall = time.time() - (first_due - margin)
            rss = [p.rss() for p in procs]
            watcher.stop()
            logs_errors = sum(p.log_text().count(" ERROR ") for p in procs)
            alive = [p.process.poll() is None for p in procs]
        ids = [d["_id"] for d in docs]
        final = fetch_all(bench, db, ids)
        result = analyse(final)
        result.update(
            instances=instances,
            names="same" if same_name else "distinct",
            margin_s=round(margin, 2),
            insert_s=round(insert_s, 3),
            ready_before_insert_s=round(first_due - margin - ready, 3),
            all_done=bool(finished),
            watcher_error=watcher.error,
            worker_rss_mb=[round(r / 2**20, 1) if r else None for r in rss],
            worker_error_lines=logs_errors,
            workers_alive=alive,
            cpu_s=_cpu_split(cpu0, cpu1, wall),
        )
        if all_done_at is not None:
            first = result.get("first_due", first_due)
            result["all_done_in_db_s"] = round(all_done_at - first, 3)
            result["throughput_db_per_s"] = rate(n, all_done_at - first)
        if check_view:
            if bench.profiler is not None:  # the profile is the burst's, not the view build's
                bench.profiler.stop()
            counts, took = by_status(db, timeout=max(30.0, n / 200))
            result["by_status_view"] = counts
            result["by_status_view_s"] = took
        return result
    finally:
        bench.drop(db)


def _self_cpu() -> float:
    import os

    times = os.times()
    return times.user + times.system


def _cpu_split(before: list, after: list, wall: float) -> dict[str, Any]:
    """CPU seconds used from insertion to the last `done` by the server, each worker and the
    bench itself (its changes-feed watcher), beside the wall time: on 2 cores, who is busy."""
    used = [
        round(b - a, 2) if a is not None and b is not None else None
        for a, b in zip(before, after, strict=True)
    ]
    return {
        "wall_s": round(wall, 2),
        "server": used[0],
        "workers": used[1:-1],
        "bench": used[-1],
    }


# -- trickle -----------------------------------------------------------------------------------


def trickle(
    bench: Bench, per_s: int, seconds: float, lead: float = 1.0, tick: float = 0.02
) -> dict[str, Any]:
    """per_s tasks a second for `seconds`, each created `lead` seconds before its date."""
    db = bench.fresh_db("trickle")
    try:
        with workers(bench, db, [WORKER]) as (proc,):
            proc.wait_ready()
            total = int(per_s * seconds)
            per_tick = max(1, round(per_s * tick))
            watcher = DoneWatcher(bench, db, total, timeout=seconds + lead + 60)
            watcher.start()
            session = bench.session()
            created: dict[str, float] = {}
            acked: dict[str, float] = {}
            ids: list[str] = []
            began = time.time()
            k = 0
            late_ticks = 0
            while len(ids) < total and time.time() - began < seconds + 10:
                target = began + k * tick
                pause = target - time.time()
                if pause > 0:
                    time.sleep(pause)
                elif pause < -tick:
                    late_ticks += 1
                at = time.time()
                batch = []
                for j in range(min(per_tick, total - len(ids))):
                    doc = task(WORKER, at + lead + j * tick / per_tick)
                    batch.append(doc)
                    created[doc["_id"]] = at
                    ids.append(doc["_id"])
                bulk(bench, session, db, batch)
                acked_at = time.time()
                for doc in batch:
                    acked[doc["_id"]] = acked_at
                k += 1
            produced_s = time.time() - began
            finished = watcher.wait(lead + 60)
            rss = proc.rss()
            watcher.stop()
        final = fetch_all(bench, db, ids)
        result = analyse(final, created)
        # the same from the moment the server acknowledged the creating write
        result["pickup_from_ack_ms"] = analyse(final, acked)["pickup_ms"]
        result.update(
            rate_per_s=per_s,
            seconds=seconds,
            lead_s=lead,
            tick_ms=tick * 1000,
            per_tick=per_tick,
            produced_s=round(produced_s, 3),
            producer_late_ticks=late_ticks,
            all_done=bool(finished),
            watcher_error=watcher.error,
            worker_rss_mb=round(rss / 2**20, 1) if rss else None,
        )
        return result
    finally:
        bench.drop(db)


# -- scale -------------------------------------------------------------------------------------


def scale(bench: Bench, future: int, due_now: int, warm_view: bool = True) -> dict[str, Any]:
    """`future` tasks due tomorrow and `due_now` due now: start-up to first run, RSS."""
    db = bench.fresh_db("scale")
    try:
        now = time.time()
        docs = [task(WORKER, now + 86_400 + i * 0.001) for i in range(future)]
        due_docs = [task(WORKER, now + i * 0.0001) for i in range(due_now)]
        insert_s = insert(bench, db, due_docs + docs)
        view_s = None
        if warm_view:
            began = time.perf_counter()
            db.view("after", "by_worker", limit=1, reduce=False)
            view_s = round(time.perf_counter() - began, 3)
        due_ids = [d["_id"] for d in due_docs]
        watcher = DoneWatcher(bench, db, due_now, timeout=300, doc_ids=due_ids)
        watcher.since = 0 if isinstance(watcher.since, int) else "0"
        watcher.start()
        peak = [0]
        stop = threading.Event()
        proc = WorkerProcess(bench, db, WORKER)
        spawned = proc.spawned

        def sample() -> None:
            while not stop.wait(0.1):
                peak[0] = max(peak[0], proc.rss() or 0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.wait_ready(timeout=600)
            finished = watcher.wait(300)
            rss_due_done = proc.rss()
            # then a few seconds more: the steady RSS with every future task in the database
            settle = 1.0 if future <= 1000 else 3.0 if future <= 10_000 else 10.0
            deadline = time.monotonic() + settle
            held = None
            while time.monotonic() < deadline:
                held = (proc.state() or {}).get("held", held)
                time.sleep(0.25)
            settled_s = round(time.time() - spawned, 3)
            rss_settled = proc.rss()
        finally:
            stop.set()
            sampler.join(1)
            watcher.stop()
            proc.stop(graceful=False)
        final = list(watcher.docs.values())
        ran = [parse_ts(d["started_at"]) for d in final if d.get("started_at")]
        phases = _log_phases(proc.log_text(), spawned)
        return {
            "future_tasks": future,
            "due_now": due_now,
            "insert_s": round(insert_s, 3),
            "view_warmed_by_bench_s": view_s,
            "ready_s": round(proc.ready_at - spawned, 3) if proc.ready_at else None,
            "first_run_s": round(min(ran) - spawned, 3) if ran else None,
            "due_all_done_s": (
                round(watcher.all_final_at - spawned, 3) if watcher.all_final_at else None
            ),
            "start_up_phases_s": phases,
            "due_done": sum(1 for d in final if d.get("status") == "done"),
            "all_due_done": bool(finished),
            "rss_after_due_done_mb": round(rss_due_done / 2**20, 1) if rss_due_done else None,
            "held_when_settled": held,
            "settled_after_s": settled_s,
            "rss_settled_mb": round(rss_settled / 2**20, 1) if rss_settled else None,
            "rss_peak_mb": round(peak[0] / 2**20, 1) if peak[0] else None,
            "server_rss_mb": (round(bench.server_rss() / 2**20, 1) if bench.server_rss() else None),
        }
    finally:
        bench.drop(db)


def _log_phases(text: str, spawned: float) -> dict[str, float]:
    """Seconds from spawn to the worker's own start-up log lines: where start-up goes."""
    marks = {"started": " started as ", "state_read": "start-up:"}
    phases: dict[str, float] = {}
    for line in text.splitlines():
        for key, needle in marks.items():
            if key not in phases and needle in line:
                with contextlib.suppress(ValueError, IndexError):
                    phases[key] = round(parse_ts(line.split(" ", 1)[0]) - spawned, 3)
    return phases
