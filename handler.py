"""RunPod serverless entry point.

The worker is built once, at import, so its cost is paid in the cold start and not
by the first request; ``handler(job)`` only validates, generates and answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

LOCAL_TEST = "--test_input" in sys.argv
RESPONSE_OUT = sys.stdout
if LOCAL_TEST:
    # The SDK logs to stdout and echoes each result three times; keep stdout to the one response line.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "WARN")

from engine.serving.heap import freeze_imports, pause_collector  # noqa: E402 - imports only gc
from engine.serving.sdk import start_import  # noqa: E402 - imports neither torch nor the SDK

# Until start() has loaded the worker (and settled the collector), see engine/serving/heap.py.
pause_collector()

# The SDK's import runs in the background while the worker's own imports and loading run.
runpod_import = start_import()

from engine.common.metrics import ColdStart  # noqa: E402
from engine.serving.startup import start  # noqa: E402

ON_RUNPOD = bool(os.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT"))

cold_start = ColdStart()
cold_start.mark("import")
freeze_imports()
startup = start(cold_start)
runpod_import.join()
import runpod  # noqa: E402 - imported by the thread above; this only binds the name (or raises its error)

for check in startup.fitness_checks():
    runpod.serverless.register_fitness_check(check)


def handler(job: dict[str, Any]) -> dict[str, Any]:
    if startup.worker is None:
        response = {"status": "error", "error": f"the worker failed to start: {startup.error}"}
    else:
        progress = (lambda update: runpod.serverless.progress_update(job, update)) if ON_RUNPOD else None
        response = startup.worker.handle(job, progress)
    if LOCAL_TEST:
        # The response, whole and once, as one JSON line on stdout (logs go to stderr), ready for jq.
        print(json.dumps(response), file=RESPONSE_OUT, flush=True)
    return response


if __name__ == "__main__":
    # Locally, whatever the SDK prints goes to stderr with the logs; stdout carries only the response.
    with contextlib.redirect_stdout(sys.stderr) if LOCAL_TEST else contextlib.nullcontext():
        runpod.serverless.start({"handler": handler})
