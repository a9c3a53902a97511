"""How the project's commands end: an expected failure is one line on stderr, not a traceback."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from engine.common.errors import ConfigError, WorkerError

log = logging.getLogger(__name__)


def run_command(main: Callable[[], int]) -> int:
    """Runs a command's main. A configuration or worker error prints ``error: <what and how to fix>``
    and exits 2 (configuration) or 1; the traceback is shown only with LOG_LEVEL=DEBUG."""
    try:
        return main()
    except WorkerError as error:
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            log.exception("command failed")
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
