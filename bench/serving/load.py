"""A client-side load generator for an OpenAI-compatible server: `clients` threads, each with its
own `openai.OpenAI` client, each sending `requests_per_client` requests one after the other.

    report = run_load("http://127.0.0.1:8080", clients=8, requests_per_client=20,
                      request=lambda client, i: {"model": "m", "prompt": "Hi", "max_tokens": 64})

Tokens are the server's own count (`usage.completion_tokens` of each response; when a streamed
response carries no usage, its text chunks are counted instead). Every request's timing is kept
(`LoadReport.samples`); tokens/s is all completion tokens over the wall time from the moment every
client is ready to the last response."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

MAX_ERROR_MESSAGES = 5  # the first few kept in the report; all are counted

RequestBody = Callable[[int, int], dict[str, Any]]  # (client, i) -> a completion request's body


@dataclass(frozen=True)
class RequestSample:
    client: int
    index: int
    start_s: float  # since the load started
    latency_s: float  # request sent to full response
    completion_tokens: int
    ttft_s: float | None = None  # streamed: request sent to the first text chunk
    error: str | None = None


@dataclass(frozen=True)
class LoadReport:
    clients: int
    requests_per_client: int
    streamed: bool
    requests: int  # sent
    errors: int
    error_messages: tuple[str, ...]  # the first MAX_ERROR_MESSAGES
    completion_tokens: int  # of the successful requests
    wall_s: float
    tokens_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    ttft_p50_s: float | None  # streamed only
    ttft_p95_s: float | None
    samples: tuple[RequestSample, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarise(
    samples: list[RequestSample], clients: int, requests_per_client: int, streamed: bool, wall_s
) -> LoadReport:
    """The report of a load's samples (also what tests build from fake samples)."""
    ok = [s for s in samples if s.error is None]
    errors = [s.error for s in samples if s.error is not None]
    tokens = sum(s.completion_tokens for s in ok)
    latencies = [s.latency_s for s in ok]
    ttfts = [s.ttft_s for s in ok if s.ttft_s is not None]
    return LoadReport(
        clients=clients,
        requests_per_client=requests_per_client,
        streamed=streamed,
        requests=len(samples),
        errors=len(errors),
        error_messages=tuple(errors[:MAX_ERROR_MESSAGES]),
        completion_tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        latency_p50_s=percentile(latencies, 50),
        latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile(ttfts, 50) if streamed else None,
        ttft_p95_s=percentile(ttfts, 95) if streamed else None,
        samples=tuple(sorted(samples, key=lambda s: (s.client, s.index))),
    )


def make_client(base_url: str, api_key: str | None, timeout_s: float):
    """An `openai.OpenAI` client of the server at `base_url` (its root: /v1 is added), without
    retries (a retried request would hide an error and count its time twice)."""
    import openai

    return openai.OpenAI(
        base_url=base_url.rstrip("/") + "/v1",
        api_key=api_key or "none",  # the client insists on one; servers without a key ignore it
        timeout=timeout_s,
        max_retries=0,
    )


def send(client, body: dict[str, Any], stream: bool) -> tuple[int, float | None]:
    """One request: (completion tokens, time to the first text chunk if streamed)."""
    chat = "messages" in body
    api = client.chat.completions if chat else client.completions
    if not stream:
        response = api.create(**body)
        if response.usage is None:
            raise ValueError("the response has no usage")
        return response.usage.completion_tokens, None
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    options = {"stream": True, "stream_options": {"include_usage": True}}
    for chunk in api.create(**body, **options):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            text = choice.delta.content if chat else choice.text
            if text:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    return (usage if usage is not None else chunks), ttft


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def run_load(
    base_url: str,
    *,
    clients: int,
    requests_per_client: int,
    request: RequestBody,
    api_key: str | None = None,
    timeout_s: float = 600,
    stream: bool = False,
) -> LoadReport:
    """`clients` threads send `requests_per_client` requests each, back to back, to the server at
    `base_url` (e.g. http://127.0.0.1:8080). Errors are counted, never raised."""
    if clients < 1 or requests_per_client < 1:
        raise ValueError("clients and requests_per_client must be at least 1")
    t_start = [0.0]
    # every client built before the clock starts; the clock starts as they are released
    ready = threading.Barrier(
        clients + 1, action=lambda: t_start.__setitem__(0, time.perf_counter())
    )

    def one_client(c: int) -> list[RequestSample]:
        client, setup_error = None, None
        try:
            client = make_client(base_url, api_key, timeout_s)
        except Exception as e:
            setup_error = _error(e)
        finally:
            ready.wait()
        if client is None:
            return [
                RequestSample(c, i, 0.0, 0.0, 0, None, setup_error)
                for i in range(requests_per_client)
            ]
        out = []
        try:
            for i in range(requests_per_client):
                t0 = time.perf_counter()
                try:
                    tokens, ttft = send(client, request(c, i), stream)
                    error = None
                except Exception as e:  # the server's answer or the transport's: counted
                    tokens, ttft, error = 0, None, _error(e)
                t1 = time.perf_counter()
                out.append(RequestSample(c, i, t0 - t_start[0], t1 - t0, tokens, ttft, error))
        finally:
            client.close()
        return out

    with ThreadPoolExecutor(max_workers=clients, thread_name_prefix="load-client") as pool:
        futures = [pool.submit(one_client, c) for c in range(clients)]
        ready.wait()
        samples = [s for f in futures for s in f.result()]
        wall_s = time.perf_counter() - t_start[0]
    return summarise(samples, clients, requests_per_client, stream, wall_s)
