"""HTTP mode, ``python -m engine.serve``: the worker behind an ASGI server, for RunPod's load-balancing endpoints.

The server listens at once, so RunPod's health check sees 204 (initializing) while the worker
loads on its job thread, then 200. ``PORT`` serves every route; a ``PORT_HEALTH`` of its own
gets a second server with ``/ping`` alone. The garbage collector is handled as in handler.py
(see engine/serving/heap.py): paused from the first line, the imports frozen, settled once the
worker has loaded.
"""

from __future__ import annotations

from engine.serving.heap import freeze_imports, pause_collector

pause_collector()

import asyncio  # noqa: E402
import sys  # noqa: E402

import uvicorn  # noqa: E402

from engine.common.errors import ConfigError  # noqa: E402
from engine.common.logs import configure_logging  # noqa: E402
from engine.common.metrics import ColdStart  # noqa: E402
from engine.http.app import create_app, health_app  # noqa: E402
from engine.http.service import Service  # noqa: E402
from engine.settings import Settings, load_settings  # noqa: E402


async def serve(service: Service, settings: Settings) -> None:
    """Every server until one stops (a signal stops them all)."""
    apps = [(create_app(service), settings.port)]
    if settings.port_health is not None and settings.port_health != settings.port:
        apps.append((health_app(service), settings.port_health))
    servers = [
        uvicorn.Server(uvicorn.Config(app, host=settings.http_host, port=port, log_config=None, lifespan="off"))
        for app, port in apps
    ]
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


def main() -> int:
    cold_start = ColdStart()
    cold_start.mark("import")
    freeze_imports()
    try:
        settings = load_settings()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    service = Service(settings)
    service.load(cold_start)
    asyncio.run(serve(service, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
