"""Log the arguments and return them: the simplest job, for trying the scheduler out.

Arguments:
    any number of JSON values.

Result:
    the arguments, as a list (``[]`` when there are none).

Nothing is executed: the arguments are only logged, through the logger
``after.jobs.echo`` at INFO level.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("after.jobs.echo")


def run(*arguments: Any) -> list[Any]:
    """Log ``arguments`` and return them as a list."""
    logger.info("echo %r", list(arguments))
    return list(arguments)
