"""Small statistics helpers (no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p99/max/min/mean of durations given in seconds, reported in milliseconds."""
    values = [s * 1000.0 for s in seconds]
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None, "min": None, "mean": None}
    return {
        "n": len(values),
        "p50": _r(percentile(values, 50)),
        "p99": _r(percentile(values, 99)),
        "max": _r(max(values)),
        "min": _r(min(values)),
        "mean": _r(sum(values) / len(values)),
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def iso(ts: float) -> str:
    """A UTC timestamp with milliseconds, as After writes its own times."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ts(value: str) -> float:
    """Seconds since the epoch from an ISO 8601 string (no offset means UTC)."""
    parsed = datetime.fromisoformat(value.replace("z", "Z"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def rate(count: int, seconds: float) -> float | None:
    return round(count / seconds, 1) if seconds > 0 else None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference in (None, 0):
        return None
    return round(value / reference, 3)
