"""RunPod serverless entry point.

The worker is built once, at import, so its cost is paid in the cold start and not
by the first request; ``handler(job)`` only validates, generates and answers.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import runpod

from engine.logs import configure_logging
from engine.metrics import ColdStart
from engine.settings import Settings
from engine.worker import Worker

LOCAL_TEST = "--test_input" in sys.argv

cold_start = ColdStart()
cold_start.mark("import")
settings = Settings()
configure_logging(settings.log_level)
worker = Worker(settings, cold_start)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    response = worker.handle(job)
    if LOCAL_TEST:
        # The SDK cuts the result it logs to 4 KB; print it whole so its images can be decoded.
        print(json.dumps(response), flush=True)
    return response


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
