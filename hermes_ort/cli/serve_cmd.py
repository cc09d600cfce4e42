"""`hermes-ort serve MODEL_DIR`: an OpenAI-compatible HTTP server over one model (the `serve`
extra: Starlette and uvicorn), concurrent requests decoded together under the budget
(hermes_ort/serve/)."""

from __future__ import annotations

from pathlib import Path

from hermes_ort.cli.model_options import MODEL_DIR_HELP, add_budget_and_strategy
from hermes_ort.core.units import parse_bytes


def add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server (chat, completions, embeddings), requests batched",
    )
    p.add_argument("model_dir", type=Path, help=MODEL_DIR_HELP)
    add_budget_and_strategy(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="clients must send 'Authorization: Bearer KEY' (required off 127.0.0.1)",
    )
    p.add_argument("--name", default=None, help="the model's id in the API (default: its name)")
    p.add_argument(
        "--max-batch", type=int, default=8, metavar="N", help="requests decoded together (8)"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a row; more get 503 with Retry-After (64)",
    )
    p.add_argument(
        "--ctx",
        type=int,
        default=None,
        metavar="N",
        help="positions a request may reach, prompt and reply (default: the model's, at most 2048)",
    )
    p.add_argument(
        "--kv-cache",
        default=None,
        metavar="SIZE",
        help="the KV cache pool within --budget (default: what the blocks' smallest budget "
        "leaves, at most what --max-batch requests of --ctx positions use)",
    )
    p.add_argument(
        "--max-body", default="1MiB", metavar="SIZE", help="largest request body (1MiB); 413 above"
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, seconds requests in flight get to finish before they are cancelled",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from hermes_ort.serve.serve_options import ServeOptions
    from hermes_ort.serve.server import serve

    options = ServeOptions(
        model_dir=args.model_dir,
        budget=args.budget,
        strategy=args.strategy,
        paging=args.paging,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        name=args.name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        ctx=args.ctx,
        kv_cache_bytes=parse_bytes(args.kv_cache),
        max_body_bytes=parse_bytes(args.max_body),
        shutdown_timeout_s=args.shutdown_timeout,
    )
    return serve(options)
