"""`hermes-ort serve` against real server processes on 127.0.0.1, through the official `openai`
client where it can say it and raw HTTP where it cannot. What it pins:

- chat and completions, plain and streamed, give the same text (and the usage chunk when asked);
  greedy is deterministic, seeded sampling reproducible; `stop` cuts the text; max_tokens ends
  with "length"; each of 8 concurrent greedy requests equals itself sent alone. On both KV-cache
  layouts: tiny-llama in fp32 and in int4 (the fused GroupQueryAttention graph);
- every bad request is a 4xx with OpenAI's error body `{"error": {message, type, param, code}}`
  and no traceback (one table);
- security: the server listens on 127.0.0.1 unless told; another address needs --api-key, and
  then a request without the key gets 401;
- load: a full queue answers 503 with Retry-After; a client that leaves frees its row at once;
  SIGTERM stops taking connections, lets requests in flight finish (or cuts them at
  --shutdown-timeout) and exits 0; /metrics and /health answer;
- embeddings (all-MiniLM-L6-v2) are the library's vectors; a decoder refuses /v1/embeddings and an
  encoder chat, saying why;
- the real SmolLM2-135M-Instruct under a budget that streams its blocks: it knows Tokyo, 8
  concurrent requests equal each alone, and a bounded load (8 clients x 5 requests) has 0 errors;
  its latency, tokens/s and peak RSS against the budget are printed, never asserted.

The tiny models have random weights: their texts are compared with each other, never read.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import hermes_ort
from hermes_ort.core.manifest import load_manifest
from hermes_ort.tensors.prefill import uses_group_query_attention

openai = pytest.importorskip("openai", reason="the test extra (the official client)")
pytest.importorskip("starlette", reason="the serve extra")
pytest.importorskip("uvicorn", reason="the serve extra")
pytest.importorskip("prometheus_client", reason="the serve extra")

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
    import real_models
    from serve_fixtures import (
        RssSampler,
        ServerProcess,
        Servers,
        post,
        request,
        sse_events,
        status_bytes,
        wait_for,
        write_tokenizer,
    )
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx
    from tests import real_models
    from tests.serve_fixtures import (
        RssSampler,
        ServerProcess,
        Servers,
        post,
        request,
        sse_events,
        status_bytes,
        wait_for,
        write_tokenizer,
    )

TINY = "tiny"  # the tiny decoders' id in the API (--name)
CTX = 160  # the tiny servers' --ctx: a chat prompt of the template's system line is ~64 tokens
MAX_BODY_BYTES = 4096  # the tiny servers' --max-body
KINDS = {"fp32": (), "int4": ("--quantize", "int4")}  # the two KV-cache layouts
STOPPING = ("--shutdown-timeout", "2")  # so a finaliser's SIGTERM never waits 30 s
MESSAGES = [{"role": "user", "content": "Hello there, how are you today?"}]
PROMPTS = [  # different lengths, so a batch mixes rows of different lengths
    "Hi",
    "The capital of France is",
    "Hello there, how are you today? I am fine, thank you.",
    "word0 thing0 number 0 word1 thing7 number 1 word2",
    "Café crème, naïve façade, 東京 🙂.",
    "You are a helpful assistant. What is the capital of France? The capital of France is Paris.",
    "number",
    "thank you",
]


# -- servers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory):
    servers = Servers(lambda: tmp_path_factory.mktemp("server"), STOPPING)
    yield servers
    servers.stop_all()


@pytest.fixture
def servers(tmp_path):
    count = iter(range(1000))
    servers = Servers(lambda: tmp_path / f"server-{next(count)}", STOPPING)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, Path]:
    """tiny-llama (random weights) with a small BPE tokenizer and ChatML template, in fp32 and
    int4."""
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    pytest.importorskip("tokenizers", reason="the text extra")
    root = tmp_path_factory.mktemp("serve-tiny")
    exports = {}
    for kind, args in KINDS.items():
        out = root / f"tiny-llama-{kind}"
        assert fx.export_cli(out, "--preset", "tiny-llama", *args, full_model=False) == 0
        write_tokenizer(out)
        exports[kind] = out
    for kind, fused in (("fp32", False), ("int4", True)):  # both KV-cache layouts served
        assert uses_group_query_attention(exports[kind], load_manifest(exports[kind])) == fused
    return exports


def tiny_args(*more: str) -> tuple[str, ...]:
    return ("--name", TINY, "--ctx", str(CTX), "--max-body", str(MAX_BODY_BYTES), *more)


@pytest.fixture(scope="module")
def tiny_fp32(module_servers, tiny_exports) -> ServerProcess:
    return module_servers.start(tiny_exports["fp32"], *tiny_args())


@pytest.fixture(scope="module")
def tiny_int4(module_servers, tiny_exports) -> ServerProcess:
    return module_servers.start(tiny_exports["int4"], *tiny_args())


@pytest.fixture(params=list(KINDS))
def decoder(request) -> ServerProcess:
    """A tiny decoder's server, once per KV-cache layout."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="module")
def slow_tiny(module_servers, tiny_exports) -> ServerProcess:
    """tiny-llama at `--budget min` (every block read every pass: ~30 ms a token, so a request
    of 200 tokens lasts seconds), one request decoding and one waiting at most."""
    args = ("--name", TINY, "--budget", "min", "--max-batch", "1", "--max-queue", "1")
    return module_servers.start(tiny_exports["fp32"], *args)


def client_of(server: ServerProcess, api_key: str = "none", **options):
    """The official client, without retries (a retried 503 would hide it)."""
    options = {"max_retries": 0, "timeout": 120, **options}
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, **options)


def idle(server: ServerProcess) -> dict[str, float]:
    """Wait until nothing decodes or waits (a test before may have left a request ending)."""
    assert wait_for(lambda: _busy(server.metrics()) == 0, 10), server.metrics()
    return server.metrics()


def _busy(m: dict[str, float]) -> float:
    return m["hermes_requests_in_flight"] + m["hermes_queue_length"]


# -- the replies --------------------------------------------------------------------------------


def complete(client, prompt: str = PROMPTS[2], **params):
    """(text, finish_reason, usage) of a plain completion."""
    r = client.completions.create(model=TINY, prompt=prompt, **params)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage


def complete_streamed(client, prompt: str = PROMPTS[2], **params):
    """(text, the finish reasons sent, the chunks) of a streamed completion."""
    chunks = list(client.completions.create(model=TINY, prompt=prompt, stream=True, **params))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    return text, [f for f in finishes if f], chunks


def chat(client, messages=MESSAGES, model: str = TINY, **params):
    """(text, finish_reason, usage) of a plain chat completion."""
    r = client.chat.completions.create(model=model, messages=messages, **params)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


def stop_from(text: str) -> str:
    """Three characters from the middle of `text` (no replacement character): a stop string
    the text must meet."""
    for i in range(len(text) // 3, len(text) - 3):
        candidate = text[i : i + 3]
        if "\ufffd" not in candidate and candidate.strip():
            return candidate
    pytest.fail(f"no stop string to take from {text!r}")


# -- chat and completions -------------------------------------------------------------------------


def test_health_and_models_name_the_served_model(tiny_fp32):
    health = tiny_fp32.request("GET", "/health")
    assert health.status == 200 and health.json() == {"status": "ok", "model": TINY}
    models = client_of(tiny_fp32).models.list()
    assert [m.id for m in models.data] == [TINY]
    assert models.data[0].owned_by == "hermes-ort"


def test_chat_streamed_is_the_plain_reply_with_its_usage(decoder):
    client = client_of(decoder)
    text, finish, usage = chat(client, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=TINY,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text and streamed == text
    assert [f for f in finishes if f] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage == usage  # the usage chunk, last
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_streamed_is_the_plain_text(decoder):
    client = client_of(decoder)
    text, finish, _ = complete(client, max_tokens=24, temperature=0)
    streamed, finishes, chunks = complete_streamed(client, max_tokens=24, temperature=0)
    assert text and streamed == text
    assert finishes == [finish]
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


def test_greedy_replies_are_deterministic(decoder):
    client = client_of(decoder)
    first = [complete(client, p, max_tokens=16, temperature=0)[0] for p in PROMPTS[:3]]
    again = [complete(client, p, max_tokens=16, temperature=0)[0] for p in PROMPTS[:3]]
    assert first == again


def test_seeded_sampling_is_reproducible(decoder):
    client = client_of(decoder)
    params = {"max_tokens": 24, "temperature": 1.0, "top_p": 0.9}
    by_seed = {seed: complete(client, seed=seed, **params)[0] for seed in (1, 2, 3)}
    assert complete(client, seed=1, **params)[0] == by_seed[1]
    assert len(set(by_seed.values())) > 1, by_seed  # the seed matters


def test_a_stop_string_cuts_the_text(decoder):
    client = client_of(decoder)
    text, _, _ = complete(client, max_tokens=32, temperature=0)
    stop = stop_from(text)
    expected = text[: text.index(stop)]
    stops = ["@@never@@", stop]
    cut, finish, _ = complete(client, max_tokens=32, temperature=0, stop=stops)
    streamed, finishes, _ = complete_streamed(client, max_tokens=32, temperature=0, stop=stops)
    assert (cut, finish) == (expected, "stop")
    assert (streamed, finishes) == (expected, ["stop"])


def test_max_tokens_ends_with_length(decoder):
    client = client_of(decoder)
    text, finish, usage = complete(client, max_tokens=5, temperature=0)
    assert (finish, usage.completion_tokens) == ("length", 5), text
    text, finish, usage = chat(client, max_tokens=5, temperature=0)
    assert (finish, usage.completion_tokens) == ("length", 5), text
    assert usage.total_tokens == usage.prompt_tokens + 5


def test_concurrent_greedy_requests_equal_each_alone(decoder):
    def send(client, prompt):
        return complete(client, prompt, max_tokens=32, temperature=0)[0]

    alone = [send(client_of(decoder), p) for p in PROMPTS]
    assert len(set(alone)) > 1
    before = idle(decoder)
    assert together(decoder, send) == alone
    after = decoder.metrics()
    passes, tokens = (
        after[f"hermes_{name}_total"] - before[f"hermes_{name}_total"]
        for name in ("passes", "generated_tokens")
    )
    assert passes < tokens - len(PROMPTS)  # rows decoded together (alone: a pass a token)


def together(server: ServerProcess, send, prompts=PROMPTS) -> list:
    """`send(client, prompt)` for every prompt at once (a thread and a client each)."""
    start = threading.Barrier(len(prompts))

    def one(prompt):
        client = client_of(server)
        start.wait()
        return send(client, prompt)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


# -- bad requests -------------------------------------------------------------------------------

CHAT = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": TINY, "prompt": "hi", "max_tokens": 4}
LONG = "word " * 400  # ~400 tokens, over --ctx; 2000 bytes, under --max-body
CHAT_PATH, COMPLETION_PATH = "/v1/chat/completions", "/v1/completions"


def bad(name, path, body=None, status=400, param=None, code=None, method="POST"):
    """A row of the table: the request (`body` JSON, or bytes as sent, or a list of chunks),
    then the status and the error's `param` and `code` it must get."""
    return pytest.param(method, path, body, status, param, code, id=name)


CONTEXT = "context_length_exceeded"
BAD_REQUESTS = [
    bad("malformed-json", CHAT_PATH, b'{"model": "tiny", "messages": ['),
    bad("json-array", CHAT_PATH, b'[{"model": "tiny"}]'),
    bad("empty-body", CHAT_PATH, b""),
    bad("not-utf8", COMPLETION_PATH, b'{"model": "tiny", "prompt": "\xff\xfe"}'),
    bad("nan", COMPLETION_PATH, b'{"model": "tiny", "prompt": "hi", "top_p": NaN}'),
    bad("unknown-field", CHAT_PATH, {**CHAT, "temprature": 0}, param="temprature"),
    bad("unknown-model", CHAT_PATH, {**CHAT, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    bad("no-messages", CHAT_PATH, {"model": TINY}, param="messages"),
    bad(
        "chat-over-ctx",
        CHAT_PATH,
        {**CHAT, "messages": [{"role": "user", "content": LONG}]},
        param="messages",
        code=CONTEXT,
    ),
    bad(
        "prompt-over-ctx",
        COMPLETION_PATH,
        {**COMPLETION, "prompt": LONG},
        param="prompt",
        code=CONTEXT,
    ),
    bad(
        "max-tokens-past-ctx",
        CHAT_PATH,
        {**CHAT, "max_tokens": CTX},
        param="max_tokens",
        code=CONTEXT,
    ),
    bad("max-tokens-negative", CHAT_PATH, {**CHAT, "max_tokens": -1}, param="max_tokens"),
    bad("max-tokens-zero", COMPLETION_PATH, {**COMPLETION, "max_tokens": 0}, param="max_tokens"),
    bad("max-tokens-huge", CHAT_PATH, {**CHAT, "max_tokens": 10**12}, param="max_tokens"),
    bad("max-tokens-string", CHAT_PATH, {**CHAT, "max_tokens": "8"}, param="max_tokens"),
    bad("max-tokens-float", COMPLETION_PATH, {**COMPLETION, "max_tokens": 8.5}, param="max_tokens"),
    bad("temperature-string", CHAT_PATH, {**CHAT, "temperature": "hot"}, param="temperature"),
    bad("temperature-5", CHAT_PATH, {**CHAT, "temperature": 5}, param="temperature"),
    bad("messages-string", CHAT_PATH, {**CHAT, "messages": "hi"}, param="messages"),
    bad("stream-string", CHAT_PATH, {**CHAT, "stream": "yes"}, param="stream"),
    bad("model-number", CHAT_PATH, {**CHAT, "model": 5}, param="model"),
    bad("five-stops", COMPLETION_PATH, {**COMPLETION, "stop": list("abcde")}, param="stop"),
    bad("n-2", CHAT_PATH, {**CHAT, "n": 2}, param="n"),
    bad("stream-options-alone", CHAT_PATH, {**CHAT, "stream_options": {}}, param="stream_options"),
    bad(
        "tool-role",
        CHAT_PATH,
        {**CHAT, "messages": [{"role": "tool", "content": "x"}]},
        param="messages[0].role",
    ),
    bad(
        "embeddings-of-a-decoder",
        "/v1/embeddings",
        {"model": TINY, "input": "hi"},
        param="model",
        code="unsupported_endpoint",
    ),
    bad("body-over-max-body", COMPLETION_PATH, {**COMPLETION, "prompt": "x" * 8000}, 413),
    bad("chunked-over-max-body", COMPLETION_PATH, [b"{" + b" " * 1000] * 8, 413),
    bad("unknown-route", "/v1/nothing", None, 404, code="not_found", method="GET"),
    bad("unknown-post-route", "/v1/engines/tiny/completions", COMPLETION, 404, code="not_found"),
    bad("get-on-a-post-route", CHAT_PATH, None, 405, method="GET"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "param", "code"), BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_with_an_openai_error_body(
    tiny_fp32, method, path, body, status, param, code
):
    reply = request(tiny_fp32.port, method, path, body)
    print(f"{method} {path} -> {reply.status} {reply.text}")
    assert reply.status == status, reply.text
    error = reply.json()["error"]
    assert set(reply.json()) == {"error"}
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and isinstance(error["type"], str)
    assert (error["param"], error["code"]) == (param, code)
    assert "Traceback" not in reply.text and 'File "' not in reply.text
    if status == 405:
        assert reply.headers.get("allow") == "POST"  # RFC 9110: a 405 names the methods


def test_the_official_client_raises_the_servers_error(tiny_fp32):
    with pytest.raises(openai.NotFoundError) as e:
        client_of(tiny_fp32).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found" and "gpt-4o" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client_of(tiny_fp32).completions.create(model=TINY, prompt="hi", max_tokens=-1)
    assert e.value.param == "max_tokens"


# -- security -----------------------------------------------------------------------------------


def test_it_listens_on_127_0_0_1_by_default(tiny_exports, servers):
    psutil = pytest.importorskip("psutil")
    server = servers.start(tiny_exports["fp32"])  # no --host
    process = psutil.Process(server.pid)
    connections = getattr(process, "net_connections", process.connections)(kind="inet")
    listening = {c.laddr.ip for c in connections if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}


def test_another_address_needs_an_api_key(tiny_exports):
    args = [str(tiny_exports["fp32"]), "--host", "0.0.0.0", "--port", "0"]
    r = subprocess.run(
        [sys.executable, "-m", "hermes_ort", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--api-key" in lines[0], r.stderr


def test_with_an_api_key_a_request_without_it_gets_401(tiny_exports, servers):
    key = "sekret-key"
    args = ("--name", TINY, "--host", "0.0.0.0", "--api-key", key)
    server = servers.start(tiny_exports["fp32"], *args)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
        for method, path, body in (
            ("GET", "/v1/models", None),
            ("GET", "/metrics", None),
            ("POST", CHAT_PATH, b"{not json"),  # the key is checked first
        ):
            reply = server.request(method, path, body, headers)
            assert reply.status == 401, (method, path, headers, reply.text)
            assert reply.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_of(server, api_key="wrong").models.list()
    assert [m.id for m in client_of(server, api_key=key).models.list().data] == [TINY]
    assert server.request("GET", "/health").status == 200  # liveness needs no key


# -- load: the queue, clients that leave, SIGTERM -------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after(slow_tiny):
    idle(slow_tiny)
    body = {"model": TINY, "prompt": "Hi", "max_tokens": 60, "temperature": 0, "stream": True}
    running = post(slow_tiny.port, COMPLETION_PATH, body)
    assert wait_for(lambda: slow_tiny.metrics()["hermes_requests_in_flight"] == 1, 10)
    waiting = post(slow_tiny.port, COMPLETION_PATH, body)
    assert wait_for(lambda: slow_tiny.metrics()["hermes_queue_length"] == 1, 10)
    refused = slow_tiny.request("POST", COMPLETION_PATH, {**body, "stream": False})
    assert refused.status == 503, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "overloaded")
    for conn in (running, waiting):  # both served in turn
        events = sse_events(conn.getresponse())
        conn.close()
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert _busy(idle(slow_tiny)) == 0


def test_a_request_runs_at_once_with_no_queue(tiny_exports, servers):
    """--max-queue 0: no request waits, but one that finds a row free runs."""
    args = ("--name", TINY, "--max-batch", "1", "--max-queue", "0")
    server = servers.start(tiny_exports["fp32"], *args)
    reply = server.request("POST", COMPLETION_PATH, COMPLETION)
    assert reply.status == 200, reply.text


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_client_that_leaves_frees_its_row(slow_tiny, stream):
    before = idle(slow_tiny)
    asked = 200  # ~6 s at --budget min
    body = {"model": TINY, "prompt": "Hi", "max_tokens": asked, "temperature": 0}
    conn = post(slow_tiny.port, COMPLETION_PATH, {**body, "stream": stream})
    if stream:
        assert conn.getresponse().readline().startswith(b"data: ")  # it is decoding
    else:
        assert wait_for(lambda: slow_tiny.metrics()["hermes_requests_in_flight"] == 1, 10)
    conn.close()
    assert wait_for(lambda: slow_tiny.metrics()["hermes_requests_in_flight"] == 0, 3)
    after = slow_tiny.metrics()
    assert after["hermes_kv_cache_bytes"] == 0  # its cache left with it
    made = after["hermes_generated_tokens_total"] - before["hermes_generated_tokens_total"]
    assert made < asked / 2, made


def stream_then_sigterm(server: ServerProcess, max_tokens: int):
    """A streamed completion decoding, then SIGTERM: (its events to the end, seconds from the
    signal to the process's exit, whether a new connection was refused meanwhile)."""
    body = {"model": TINY, "prompt": "Hi", "max_tokens": max_tokens, "temperature": 0}
    conn = post(server.port, COMPLETION_PATH, {**body, "stream": True})
    response = conn.getresponse()
    first = response.readline()
    assert first.startswith(b"data: "), first
    t0 = time.monotonic()
    server.process.terminate()

    def refused() -> bool:
        try:
            request(server.port, "GET", "/health", timeout_s=1)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
        return False

    was_refused = wait_for(refused, 2)
    events = sse_events(response)
    conn.close()
    server.process.wait(60)
    return events, time.monotonic() - t0, was_refused


def test_sigterm_lets_a_request_in_flight_finish(tiny_exports, servers):
    args = ("--name", TINY, "--budget", "min")
    server = servers.make(tiny_exports["fp32"], *args, "--shutdown-timeout", "20").start()
    events, exit_s, refused = stream_then_sigterm(server, max_tokens=40)  # ~1.5 s
    assert refused  # no new connection once the signal came
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert server.process.returncode == 0, server.stderr()
    assert exit_s < 20 + 10
    assert "Traceback" not in server.stderr()


def test_sigterm_cuts_a_long_request_at_the_shutdown_timeout(tiny_exports, servers):
    args = ("--name", TINY, "--budget", "min")
    server = servers.make(tiny_exports["fp32"], *args, "--shutdown-timeout", "1").start()
    asked = 250  # ~8 s at --budget min
    events, exit_s, refused = stream_then_sigterm(server, max_tokens=asked)
    assert refused
    assert server.process.returncode == 0, server.stderr()
    assert exit_s < 1 + 5, server.stderr()
    texts = [e for e in events if e != "[DONE]" and e["choices"] and e["choices"][0]["text"]]
    assert len(texts) < asked  # cut, not finished
    # cancelled before uvicorn's timeout: the reply ends as at max_tokens, the stream properly
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert "Traceback" not in server.stderr()


def test_metrics_name_the_servers_state(tiny_fp32):
    client_of(tiny_fp32).completions.create(model=TINY, prompt="Hi", max_tokens=4)
    reply = tiny_fp32.request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain")
    m = tiny_fp32.metrics()
    for name in (
        "hermes_tokens_per_second",
        "hermes_queue_length",
        "hermes_requests_in_flight",
        "hermes_resident_bytes",
        "hermes_kv_cache_bytes",
        "hermes_generated_tokens_total",
        "hermes_prompt_tokens_total",
        "hermes_passes_total",
        "hermes_read_bytes_total",
    ):
        assert name in m, reply.text
    assert m["hermes_resident_bytes"] > 0 and m["hermes_generated_tokens_total"] >= 4
    assert "# TYPE hermes_generated_tokens_total counter" in reply.text
    assert 'hermes_requests_total{endpoint="/v1/completions",status="200"}' in reply.text


# -- embeddings ---------------------------------------------------------------------------------

SENTENCES = [
    "The cat sits on the mat.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "東京は日本の首都です。",
]
EMBEDDING_ATOL = 1e-5  # the server runs the library's embed on the same inputs


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    pytest.importorskip("tokenizers", reason="the text extra")
    checkpoint = real_models.all_minilm_l6_v2()
    out = tmp_path_factory.mktemp("serve-minilm") / "all-MiniLM-L6-v2"
    from hermes_ort.export import cli

    assert cli.main(["--model", str(checkpoint), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def minilm(module_servers, minilm_export) -> ServerProcess:
    return module_servers.start(minilm_export, "--name", "minilm")


def test_embeddings_are_the_librarys_vectors(minilm, minilm_export, tmp_path):
    with hermes_ort.load(shutil.copytree(minilm_export, tmp_path / "minilm")) as model:
        expected = np.asarray(model.embed(SENTENCES), np.float32)
    by_client = client_of(minilm).embeddings.create(model="minilm", input=SENTENCES)  # base64
    floats = embed_raw(minilm, SENTENCES, "float")
    one = embed_raw(minilm, SENTENCES[0], "base64")
    for vectors in (np.array([d.embedding for d in by_client.data], np.float32), floats):
        assert vectors.shape == expected.shape
        np.testing.assert_allclose(vectors, expected, atol=EMBEDDING_ATOL)
        assert (cosines(vectors, expected) >= 0.9999).all()
    np.testing.assert_allclose(one, expected[:1], atol=EMBEDDING_ATOL)
    assert by_client.usage.prompt_tokens > len(SENTENCES)


def embed_raw(server: ServerProcess, texts, encoding: str) -> np.ndarray:
    """/v1/embeddings by plain JSON: the vectors [n, dim] as sent in `encoding`."""
    body = {"model": "minilm", "input": texts, "encoding_format": encoding}
    reply = server.request("POST", "/v1/embeddings", body)
    assert reply.status == 200, reply.text
    data = [d["embedding"] for d in reply.json()["data"]]
    if encoding == "base64":
        return np.stack([np.frombuffer(base64.b64decode(d), "<f4") for d in data])
    return np.array(data, np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(
    ("path", "body"),
    [(CHAT_PATH, {"messages": MESSAGES}), (COMPLETION_PATH, {"prompt": "hi"})],
    ids=["chat", "completion"],
)
def test_an_encoder_refuses_text_generation(minilm, path, body):
    # max_tokens as the client sends it: the reason given is the encoder, not the context
    reply = minilm.request("POST", path, {"model": "minilm", "max_tokens": 8, **body})
    print(f"POST {path} -> {reply.status} {reply.text}")
    assert reply.status == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "unsupported_endpoint" and "encoder" in error["message"]


# -- the real SmolLM2-135M-Instruct -------------------------------------------------------------

SMOL = "smollm2"
SMOL_CTX = 256
SMOL_KV_BYTES = 64 << 20  # --kv-cache: 8 rows of ~60 positions, past and present
QUESTIONS = [
    "What is the capital of Japan?",
    "Name a color.",
    "Why is the sky blue? Answer in one sentence.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "List three fruits that are red, and say which one you like best and why.",
    "Who wrote Hamlet?",
    "Translate 'good morning' into French.",
]


@pytest.fixture(scope="module")
def smollm2_budget(tmp_path_factory) -> tuple[Path, int]:
    """SmolLM2-135M-Instruct exported from its GGUF (its 4-bit blocks kept: ~20 s), and a budget
    that streams its blocks: the smallest for a prompt of SMOL_CTX positions, as
    `hermes-ort plan --budget min --json` prints it (measuring the layer profile the server then
    plans with: ~20 s), plus the KV cache pool."""
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    if not (Path(hermes_ort.__file__).parent / "export" / "gguf").is_dir():
        pytest.skip("GGUF import is not in the exporter yet")
    gguf = real_models.smollm2_135m_instruct_gguf()
    out = tmp_path_factory.mktemp("serve-smollm2") / "smollm2"
    assert fx.export_cli(out, "--model", str(gguf), full_model=False) == 0
    args = ["plan", str(out), "--budget", "min", "--json", "--seq-len", str(SMOL_CTX)]
    r = subprocess.run(
        [sys.executable, "-m", "hermes_ort", *args], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)["smallest_budget_bytes"] + SMOL_KV_BYTES


@pytest.fixture(scope="module")
def smollm2(module_servers, smollm2_budget) -> ServerProcess:
    model_dir, budget = smollm2_budget
    args = ("--name", SMOL, "--budget", str(budget), "--ctx", str(SMOL_CTX))
    server = module_servers.start(model_dir, *args, "--kv-cache", str(SMOL_KV_BYTES))
    print(server.stderr())
    return server


def test_smollm2_knows_the_capital_of_japan(smollm2):
    question = [{"role": "user", "content": "What is the capital of Japan?"}]
    text, finish, _ = chat(client_of(smollm2), question, SMOL, max_tokens=32, temperature=0)
    assert "Tokyo" in text and finish == "stop", (text, finish)


def test_smollm2_concurrent_greedy_requests_equal_each_alone(smollm2):
    def ask(client, question):
        messages = [{"role": "user", "content": question}]
        return chat(client, messages, SMOL, max_tokens=20, temperature=0)[0]

    alone = [ask(client_of(smollm2), q) for q in QUESTIONS]
    assert together(smollm2, ask, QUESTIONS) == alone


def test_smollm2_bounded_load_has_no_errors(smollm2, smollm2_budget):
    load = pytest.importorskip("bench.serving.load", reason="bench/serving/load.py")

    def body(client: int, i: int) -> dict:
        question = QUESTIONS[(client + i) % len(QUESTIONS)]
        messages = [{"role": "user", "content": question}]
        return {"model": SMOL, "messages": messages, "max_tokens": 16, "temperature": 0}

    budget = smollm2_budget[1]
    sampler = RssSampler(smollm2.pid)
    sampler.start()
    report = load.run_load(
        smollm2.url, clients=8, requests_per_client=5, request=body, stream=True, timeout_s=300
    )
    peak = max(sampler.stop(), status_bytes(smollm2.pid, "VmHWM") or 0)
    seconds = [report.latency_p50_s, report.latency_p95_s, report.ttft_p50_s]
    p50, p95, ttft = (f"{s:.2f} s" if s is not None else "-" for s in seconds)
    print(
        f"\nSmolLM2 load, 8 clients x 5 requests (streamed, 16 tokens): {report.errors} errors, "
        f"latency p50 {p50} p95 {p95}, first token p50 {ttft}, {report.tokens_per_s:.1f} "
        f"tokens/s; peak RSS {peak / 1e6:.1f} MB against the budget {budget / 1e6:.1f} MB "
        f"({peak / budget:.2f})"
    )
    assert (report.requests, report.errors) == (40, 0), report.error_messages
    assert report.completion_tokens > 0
    assert peak > 0
