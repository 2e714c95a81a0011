"""Fail on purpose: for demos and tests of the error path (the task ends in ``err``).

Arguments:
    message: the error message, default ``"failed on purpose"``.

Result:
    none: it always raises ``RuntimeError(message)``.
"""

from __future__ import annotations


def run(message: str = "failed on purpose") -> None:
    """Raise ``RuntimeError(message)``."""
    raise RuntimeError(message)
