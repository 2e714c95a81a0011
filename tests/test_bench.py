"""The benchmark harness (bench/, `make bench`) end to end on a tiny scenario, so it keeps
working: real worker processes, the server of the test session, every scenario at a few
dozen tasks, the peers when the bench extra is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from bench.cli import main

HAVE_PEERS = all(importlib.util.find_spec(name) for name in ("apscheduler", "sqlalchemy", "huey"))
HAVE_PLOTS = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.timeout(90)
def test_bench_tiny_run_end_to_end(couch_url: str, tmp_path: Path) -> None:
    only = "ceiling,burst,trickle,scale" + (",peers" if HAVE_PEERS else "")
    argv = [
        "--quick",
        "--url",
        couch_url,
        "--only",
        only,
        "--results",
        str(tmp_path),
        "--no-docs",
        "--burst",
        "50",
        "--trickle-rate",
        "40",
        "--trickle-seconds",
        "1",
        "--scale-future",
        "200",
        "--scale-due",
        "20",
        "--ceiling-docs",
        "200",
        "--ceiling-seconds",
        "0.2",
    ]
    if not HAVE_PLOTS:
        argv.append("--no-plots")
    assert main(argv) == 0

    results = json.loads((tmp_path / "latest.json").read_text())
    s = results["scenarios"]
    assert s["ceiling"]["ceiling_tasks_per_s"] > 0
    for key in ("burst_1", "burst_4"):
        assert s[key]["statuses"] == {"done": 50}, s[key]
        assert s[key]["lateness_ms"]["n"] == 50
        assert s[key]["throughput_db_per_s"] > 0
    assert s["trickle"]["statuses"] == {"done": 40}
    assert s["trickle"]["pickup_ms"]["n"] == 40
    assert s["scale"]["due_done"] == 20 and s["scale"]["first_run_s"] is not None
    assert {t["status"] for t in results["targets"]} <= {"PASS", "FAIL", "n/a"}
    assert len(results["targets"]) >= 8
    if HAVE_PEERS:
        for key in ("aps_burst", "huey_burst", "aps_trickle", "huey_trickle"):
            assert s[key]["ran"] == s[key]["tasks"], (key, s[key])
        assert "aps_burst" in results["peer_ratios"]
    if HAVE_PLOTS:
        assert (tmp_path / "lateness.png").stat().st_size > 0
        assert (tmp_path / "throughput.png").stat().st_size > 0
