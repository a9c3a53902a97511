"""RunPod serverless entry point.

The worker is built once, at import, so its cost is paid in the cold start and not
by the first request; ``handler(job)`` only validates, generates and answers.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import runpod

from engine.metrics import ColdStart
from engine.startup import start

LOCAL_TEST = "--test_input" in sys.argv
ON_RUNPOD = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))

cold_start = ColdStart()
cold_start.mark("import")
startup = start(cold_start)
for check in startup.fitness_checks():
    runpod.serverless.register_fitness_check(check)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    if startup.worker is None:
        response = {"status": "error", "error": f"the worker failed to start: {startup.error}"}
    else:
        progress = (lambda update: runpod.serverless.progress_update(job, update)) if ON_RUNPOD else None
        response = startup.worker.handle(job, progress)
    if LOCAL_TEST:
        # The SDK cuts the result it logs to 4 KB; print it whole so its images can be decoded.
        print(json.dumps(response), flush=True)
    return response


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler})
