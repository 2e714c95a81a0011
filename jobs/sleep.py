"""Sleep, then return: for demos, and for tests of long-running tasks.

Arguments:
    seconds: how long to sleep, a number from 0 to 86400 (one day).

Result:
    ``seconds``, as given.
"""

from __future__ import annotations

import math
import time

MAX_SECONDS = 86400


def run(seconds: float) -> float:
    """Sleep ``seconds`` seconds and return ``seconds``."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"seconds must be a number, got {seconds!r}")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be between 0 and {MAX_SECONDS}, got {seconds!r}")
    time.sleep(seconds)
    return seconds
