"""Running the app: the model opened first (so /health answers only once it can serve), then
uvicorn on the address asked. SIGTERM (or Ctrl-C) stops taking connections; requests in flight
get `shutdown_timeout_s` to finish, then are cancelled (their replies ended as at max_tokens);
the decoding thread stops, the model closes, and SIGTERM's exit status is 0."""

from __future__ import annotations

import signal
import sys
import threading
import time

from hermes_ort.core.errors import OptionError
from hermes_ort.serve.serve_options import ServeOptions

DRAIN_MARGIN_S = 1.0  # before the shutdown timeout, what requests in flight are cancelled


def _serving_stack():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise OptionError(
            f"hermes-ort serve needs the serve extra ({e.name} is missing): "
            f"pip install 'hermes-ort[serve]'"
        ) from None
    return uvicorn


def serve(options: ServeOptions) -> int:
    """Serve until SIGTERM or Ctrl-C; 0 after SIGTERM (KeyboardInterrupt after Ctrl-C)."""
    options.check()
    uvicorn = _serving_stack()  # imported before the model is planned: its memory counted

    def log(line: str) -> None:
        print(f"hermes-ort serve: {line}", file=sys.stderr, flush=True)

    from hermes_ort.serve.app import make_app
    from hermes_ort.serve.served_model import open_served
    from hermes_ort.streaming.memory import map_large_allocations

    map_large_allocations()  # the batch's KV arrays, made every step, given back when freed

    served = open_served(options, log)
    try:
        app = make_app(served, options)
        config = uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=options.shutdown_timeout_s,
        )
        server = uvicorn.Server(config)
        threading.Thread(target=_drain, args=(server, served, options), daemon=True).start()
        terminated: list[int] = []
        # uvicorn raises the signal it stopped on again once it has stopped: SIGTERM then
        # comes here (a clean exit), not to the default handler (killed, status 143)
        previous = signal.signal(signal.SIGTERM, lambda sig, frame: terminated.append(sig))
        log(f"listening on http://{_url_host(options.host)}:{options.port}/v1")
        try:
            server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        served.close()
    if not server.started:
        raise OptionError(f"could not listen on {options.host}:{options.port} (in use?)")
    log("stopped")
    return 0


def _drain(server, served, options: ServeOptions) -> None:
    """Once the server is stopping: requests still decoding when its timeout is nearly over are
    cancelled, so their replies end properly (finish_reason "length", a stream's [DONE])
    before uvicorn cuts the connections."""
    while not server.should_exit:
        time.sleep(0.1)
    timeout = options.shutdown_timeout_s
    time.sleep(max(0.0, timeout - min(DRAIN_MARGIN_S, timeout / 2)))
    if served.scheduler is not None:
        served.scheduler.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
