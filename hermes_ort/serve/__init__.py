"""`hermes-ort serve`: an OpenAI-compatible HTTP server over one model, concurrent requests decoded
together in one stream of blocks (continuous batching) under the memory budget. Starlette,
uvicorn and prometheus_client come with the `serve` extra and are imported only by the modules
that speak HTTP (app.py, server.py, metrics.py); the rest is plain Python over the runtime.

May import: every layer below (core .. api); Starlette, uvicorn, prometheus_client.
"""
