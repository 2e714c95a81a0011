"""`after metrics`: the database's state in the Prometheus text format, read back with
prometheus_client's own parser (what a scraper reads)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from conftest import after_cli
from prometheus_client.parser import text_string_to_metric_families
from test_security_cli import clean_env
from test_status import NOW, populated, record  # noqa: F401 (populated: a fixture)

from after import metrics
from after.couch import Database, Server
from after.tasks import STATUSES

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """The type of each family, and every sample by name and labels."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def db(one_copy_db: Database) -> Database:
    """What is checked here is how the views are summed up, not a cluster's
    consistency: on a cluster a view is read from one copy of each shard, which may
    lack the writes just made (docs/couchdb.md). One copy, as on a single node."""
    return one_copy_db


@pytest.fixture
def scraped(db: Database, request: pytest.FixtureRequest) -> tuple[dict[str, str], Samples]:
    request.getfixturevalue("populated")  # test_status's database, as of NOW
    db.put(record("gamma@host:3:cccc", NOW - timedelta(seconds=1), timedelta(seconds=30), done=5))
    db.put({**db.get("after-worker:gamma@host:3:cccc"), "failed": 2})
    return parse(metrics.render(metrics.collect(db, at=NOW)))


def test_the_families_follow_the_prometheus_conventions(scraped) -> None:
    types, _ = scraped
    assert types == {
        "after_tasks": "gauge",
        "after_tasks_late": "gauge",
        "after_task_oldest_lateness_seconds": "gauge",
        "after_run_duration_seconds": "summary",
        "after_run_start_delay_seconds": "summary",
        "after_instances": "gauge",
        "after_instance_heartbeat_age_seconds": "gauge",
        "after_runs": "counter",  # exposed as after_runs_total
    }


def test_tasks_by_worker_and_status_with_every_status_present(scraped) -> None:
    _, samples = scraped
    alpha = {s: value(samples, "after_tasks", worker="alpha", status=s) for s in STATUSES}
    assert alpha == {**dict.fromkeys(STATUSES, 0.0), "waiting": 2.0}
    beta = {s: value(samples, "after_tasks", worker="beta", status=s) for s in STATUSES}
    assert beta == {**dict.fromkeys(STATUSES, 0.0), "scheduled": 1.0, "running": 1.0, "err": 2.0}


def test_late_tasks_and_how_late_the_oldest_is(scraped) -> None:
    _, samples = scraped
    assert value(samples, "after_tasks_late", worker="alpha") == 1  # waiting since 11:00
    assert value(samples, "after_task_oldest_lateness_seconds", worker="alpha") == 3600.0
    assert value(samples, "after_tasks_late", worker="beta") == 1  # held, 30 s past its date
    assert value(samples, "after_task_oldest_lateness_seconds", worker="beta") == 30.0


def test_run_durations_and_start_delays_of_the_recent_runs(scraped) -> None:
    _, samples = scraped
    # Of the two failures, only the one that ended a minute ago is in the 300 s window:
    # it ran 1 s, and started 1 s after its date.
    for name in ("after_run_duration_seconds", "after_run_start_delay_seconds"):
        assert value(samples, f"{name}_count", worker="beta") == 1
        assert value(samples, f"{name}_sum", worker="beta") == 1.0
        assert value(samples, name, worker="beta", quantile="0.99") == 1.0


def test_instances_their_heartbeats_and_their_runs(scraped) -> None:
    _, samples = scraped
    assert value(samples, "after_instances", worker="beta", state="live") == 1
    assert value(samples, "after_instances", worker="beta", state="stale") == 1
    assert value(samples, "after_instances", worker="gamma", state="live") == 1
    age = "after_instance_heartbeat_age_seconds"
    assert value(samples, age, worker="beta", instance="beta@host:1:aaaa") == 3.0
    assert (age, (("instance", "beta@gone:2:bbbb"), ("worker", "beta"))) not in samples
    runs = "after_runs_total"
    assert value(samples, runs, worker="gamma", instance="gamma@host:3:cccc", outcome="done") == 5
    assert value(samples, runs, worker="gamma", instance="gamma@host:3:cccc", outcome="failed") == 2


def test_quantiles_of_several_runs() -> None:
    assert metrics.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert metrics.quantile([5.0], 0.99) == 5.0
    assert metrics.quantile([float(n) for n in range(1, 101)], 0.9) == pytest.approx(90.1)


def test_an_empty_database_has_no_samples_but_its_families(db: Database) -> None:
    types, samples = parse(metrics.render(metrics.collect(db)))
    assert "after_tasks" in types and samples == {}


# -- the command ------------------------------------------------------------------------


def cli_env(couch_url: str, db_name: str, tmp_path: Path) -> dict[str, str]:
    return clean_env(AFTER_COUCHDB_URL=couch_url, AFTER_DB=db_name, AFTER_HOME=str(tmp_path))


@pytest.mark.usefixtures("populated")
def test_after_metrics_prints_the_text_format(couch_url: str, db: Database, tmp_path: Path) -> None:
    result = after_cli(cli_env(couch_url, db.name, tmp_path), "metrics")
    assert result.returncode == 0, result.stderr
    _, samples = parse(result.stdout)
    assert value(samples, "after_tasks", worker="alpha", status="waiting") == 2


@pytest.mark.usefixtures("populated")
def test_after_metrics_writes_a_file_for_the_textfile_collector(
    couch_url: str, db: Database, tmp_path: Path
) -> None:
    output = tmp_path / "textfile" / "after.prom"
    result = after_cli(cli_env(couch_url, db.name, tmp_path), "metrics", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    _, samples = parse(output.read_text())
    assert value(samples, "after_tasks", worker="beta", status="err") == 2
    assert [p.name for p in output.parent.iterdir()] == ["after.prom"]  # no temporary left


def test_after_metrics_every_needs_a_file(couch_url: str, db: Database, tmp_path: Path) -> None:
    result = after_cli(cli_env(couch_url, db.name, tmp_path), "metrics", "--every", "5")
    assert result.returncode == 2
    assert "--every writes a file again and again: give it --output FILE" in result.stderr


def test_after_metrics_on_a_database_never_pushed_says_what_to_run(
    couch_url: str, server: Server, db_name: str, tmp_path: Path
) -> None:
    server.database(db_name).create()
    try:
        result = after_cli(cli_env(couch_url, db_name, tmp_path), "metrics")
    finally:
        server.database(db_name).delete()
    assert result.returncode == 1
    assert "has no _design/after" in result.stderr and "after push" in result.stderr
