"""HTTP mode: the worker behind an ASGI app, for RunPod's load-balancing endpoints."""
