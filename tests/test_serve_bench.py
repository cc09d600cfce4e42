"""The serving benchmark's harness (bench/serving): argument parsing, caps, percentiles, the load
generator's accounting (on a fake client), the servers' command lines and the Markdown tables from
a fake run. No server and no network; the peers' own flags are checked where they are installed."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bench.serving import load as load_mod
from bench.serving.load import RequestSample, percentile, run_load, summarise
from bench.serving.report import render_bench, render_load
from bench.serving.run import (
    Cap,
    budget_for,
    extra_body,
    parse_cap,
    parse_counts,
    parse_servers,
    request_maker,
    resolve_defaults,
)
from bench.serving.servers import (
    LLAMA_CPP_SERVER_DEPS,
    LLAMA_SERVER_BIN,
    ServerKind,
    ServerSpec,
    is_ready,
    ready_path,
    server_command,
)
from hermes_ort.core.errors import OptionError

GGUF = Path("/models/m.gguf")


# --- arguments -----------------------------------------------------------------------------------


def test_caps_auto_is_half_the_gguf_and_shares_and_sizes_parse():
    assert parse_cap("auto", 98_000_001) == Cap("auto", 49_000_000)
    assert parse_cap("25%", 100_000_000) == Cap("25%", 25_000_000)
    assert parse_cap("200MB", 1) == Cap("200MB", 200_000_000)
    assert parse_cap("1GiB", 1).bytes == 1 << 30
    assert parse_cap("none", 1) == Cap("none", None)
    with pytest.raises(ValueError):
        parse_cap("0%", 100)
    with pytest.raises(OptionError):
        parse_cap("lots", 100)


def test_budget_is_the_cap_less_the_margin():
    assert budget_for(Cap("x", 110_000_000), 0.0) == 110_000_000
    assert budget_for(Cap("x", 110_000_000), 0.1) == 100_000_000
    assert budget_for(Cap("none", None), 0.1) is None


def test_client_counts_and_servers_parse():
    assert parse_counts("1,2, 4,8") == (1, 2, 4, 8)
    with pytest.raises(ValueError):
        parse_counts("0,2")
    assert parse_servers("hermes, llama-server") == (ServerKind.HERMES, ServerKind.LLAMA_SERVER)
    with pytest.raises(OptionError, match="llama-cpp-python"):
        parse_servers("vllm")


def test_the_cli_wires_serve_and_load_takes_the_issues_defaults():
    from bench.cli import build_parser

    args = build_parser().parse_args(["serve", "--cap", "auto,200MB", "--clients", "1,8"])
    assert (args.cap, args.load, args.max_tokens) == ("auto,200MB", False, 64)
    resolve_defaults(args)
    assert args.client_counts == (1, 8) and args.requests == 4 and args.cap == "auto,200MB"
    assert args.servers == "hermes,llama-server,llama-cpp-python"
    args = build_parser().parse_args(["serve", "--load"])
    resolve_defaults(args)
    assert (args.servers, args.client_counts, args.requests) == ("hermes", (8,), 20)
    assert args.cap == "200MB"
    args = build_parser().parse_args(["serve"])
    resolve_defaults(args)
    assert (args.cap, args.client_counts) == ("auto", (1, 2, 4, 8))


def test_requests_take_prompts_in_turn_and_each_server_its_own_extras():
    body = request_maker("m", 64, {"ignore_eos": True})
    a, b = body(0, 0), body(1, 0)
    assert a["prompt"] != b["prompt"] and body(0, 1)["prompt"] == b["prompt"]
    assert (a["model"], a["max_tokens"], a["temperature"]) == ("m", 64, 0)
    assert a["extra_body"] == {"ignore_eos": True}
    assert extra_body(ServerKind.LLAMA_SERVER, 64, True) == {"ignore_eos": True}
    assert extra_body(ServerKind.LLAMA_SERVER, 64, False) == {}
    assert extra_body(ServerKind.LLAMA_CPP_PYTHON, 64, True) == {"min_tokens": 64}
    assert extra_body(ServerKind.HERMES, 64, True) == {"ignore_eos": True}  # vLLM's extension


# --- percentiles and the load's accounting -------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 20, 101):
        values = list(rng.random(n))
        for q in (0, 50, 95, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summarise_counts_errors_apart_and_tokens_of_successes_only():
    samples = [
        RequestSample(0, 0, 0.0, 1.0, 10),
        RequestSample(0, 1, 1.0, 3.0, 10),
        RequestSample(1, 0, 0.0, 2.0, 0, error="APIError: boom"),
    ]
    r = summarise(samples, clients=2, requests_per_client=2, streamed=False, wall_s=4.0)
    assert (r.requests, r.errors, r.completion_tokens) == (3, 1, 20)
    assert r.error_messages == ("APIError: boom",)
    assert r.tokens_per_s == 5.0
    assert r.latency_p50_s == 2.0 and r.latency_p95_s == pytest.approx(2.9)
    assert r.ttft_p50_s is None
    assert r.to_json()["samples"][0]["completion_tokens"] == 10


def test_run_load_sends_clients_x_requests_concurrently_and_counts_errors(monkeypatch):
    class FakeClient:
        def close(self):
            pass

    lock, live, most = threading.Lock(), [0], [0]

    def fake_send(client, body, stream):
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        time.sleep(0.02)
        with lock:
            live[0] -= 1
        if body["prompt"] == "bad":
            raise RuntimeError("server said no")
        return 7, (0.01 if stream else None)

    monkeypatch.setattr(load_mod, "make_client", lambda *a: FakeClient())
    monkeypatch.setattr(load_mod, "send", fake_send)

    def body(c, i):
        return {"prompt": "bad" if (c, i) == (2, 1) else "ok"}

    r = run_load("http://x", clients=4, requests_per_client=3, request=body, stream=True)
    assert (r.requests, r.errors, r.completion_tokens) == (12, 1, 77)
    assert r.error_messages == ("RuntimeError: server said no",)
    assert most[0] == 4  # the clients ran at once
    assert r.ttft_p50_s == 0.01 and r.wall_s >= 3 * 0.02
    assert [(s.client, s.index) for s in r.samples][:3] == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(ValueError):
        run_load("http://x", clients=0, requests_per_client=1, request=body)


# --- the servers' command lines and readiness ---------------------------------------------------


def test_llama_server_gets_slots_and_their_total_context():
    spec = ServerSpec(ServerKind.LLAMA_SERVER, GGUF, 8123, max_batch=4, ctx=256, threads=2)
    cmd = server_command(spec)
    assert cmd[0] == str(LLAMA_SERVER_BIN)

    def value(flag):
        return cmd[cmd.index(flag) + 1]

    assert (value("-m"), value("--parallel"), value("-c")) == (str(GGUF), "4", "1024")
    assert (value("-t"), value("-tb"), value("--port"), value("--host")) == (
        "2",
        "2",
        "8123",
        "127.0.0.1",
    )
    assert "--cont-batching" in cmd and "--no-cache-prompt" in cmd and "--api-key" not in cmd
    keyed = server_command(ServerSpec(ServerKind.LLAMA_SERVER, GGUF, 1, api_key="k"))
    assert keyed[keyed.index("--api-key") + 1] == "k"


def test_llama_cpp_python_is_not_interrupted_and_hermes_gets_its_budget():
    cmd = server_command(ServerSpec(ServerKind.LLAMA_CPP_PYTHON, GGUF, 9000, ctx=512), "py")
    assert cmd[:3] == ["py", "-m", "llama_cpp.server"]
    assert cmd[cmd.index("--interrupt_requests") + 1] == "False"
    assert cmd[cmd.index("--n_ctx") + 1] == "512" and cmd[cmd.index("--n_threads") + 1] == "2"
    spec = ServerSpec(ServerKind.HERMES, Path("/m"), 9001, max_batch=8, budget_bytes=49_000_000)
    cmd = server_command(spec, "py")
    assert cmd[:5] == ["py", "-m", "hermes_ort", "serve", "/m"]
    assert cmd[cmd.index("--budget") + 1] == "49000000"
    assert cmd[cmd.index("--max-batch") + 1] == "8" and cmd[cmd.index("--ctx") + 1] == "256"


def test_readiness():
    assert ready_path(ServerKind.HERMES) == ready_path(ServerKind.LLAMA_SERVER) == "/health"
    assert ready_path(ServerKind.LLAMA_CPP_PYTHON) == "/v1/models"
    assert is_ready(ServerKind.HERMES, 200, '{"status": "ok"}')
    assert not is_ready(ServerKind.LLAMA_SERVER, 503, '{"error": {"message": "Loading model"}}')
    assert not is_ready(ServerKind.HERMES, 200, "not json")
    assert is_ready(ServerKind.LLAMA_CPP_PYTHON, 200, '{"data": []}')


def test_llama_server_takes_the_flags_we_pass():
    if not LLAMA_SERVER_BIN.is_file():
        pytest.skip(f"no llama-server at {LLAMA_SERVER_BIN} (bench/serving/build_llama_server.sh)")
    text = subprocess.run(
        [str(LLAMA_SERVER_BIN), "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for flag in ("--parallel", "--cont-batching", "--ctx-size", "--threads", "--threads-batch"):
        assert flag in text
    for flag in ("--host", "--port", "--api-key", "--cache-ram", "--no-webui", "--fit"):
        assert flag in text
    assert "--no-cache-prompt" in text


def test_llama_cpp_server_would_interrupt_a_stream_by_default():
    code = (
        "from llama_cpp.server.settings import ServerSettings; "
        "print(ServerSettings.model_fields['interrupt_requests'].default)"
    )
    import os
    import sys

    from bench import child_env

    env = child_env()
    env["PYTHONPATH"] += os.pathsep + str(LLAMA_CPP_SERVER_DEPS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"llama_cpp.server does not import here ({last}): make bench-peers")
    assert done.stdout.strip() == "True"  # why servers.py passes --interrupt_requests False


# --- Markdown from a fake run --------------------------------------------------------------------


def _record(kind, clients, tps, *, rss=100e6, errors=0, killed=False):
    server = {
        "peak_rss_bytes": None if killed else int(rss),
        "vmhwm_at_stop_bytes": None,
        "cgroup_peak_bytes": None,
        "startup_s": 1.5,
        "stopped_by": "exited" if killed else "SIGTERM",
        "exit_code": -9 if killed else 0,
        "stopped_cleanly": not killed,
        "killed_for_memory": killed,
        "budget_bytes": 49_000_000 if kind == "hermes" else None,
        "log_path": f"logs/{kind}-{clients}.log",
    }
    record = {"kind": kind, "cap": "auto", "clients": clients, "server": server}
    if killed:
        return {**record, "ok": False, "error": "killed for memory"}
    load = {
        "requests": clients * 2,
        "errors": errors,
        "error_messages": ["APIError: x"] * errors,
        "completion_tokens": int(tps * 10),
        "wall_s": 10.0,
        "tokens_per_s": tps,
        "latency_p50_s": 0.5,
        "latency_p95_s": 2.0,
        "ttft_p50_s": None,
        "ttft_p95_s": None,
    }
    return {**record, "load": load, "ok": errors == 0, "error": None}


def _doc(records, mode="bench", clients=(1, 2, 4, 8)):
    return {
        "mode": mode,
        "model": "smollm2-135m",
        "gguf_bytes": 98_000_000,
        "hermes_weights_bytes": 130_000_000,
        "hermes_plan_min": {
            "smallest_budget_bytes": 115_000_000,
            "whole_model_resident_bytes": 200_000_000,
        },
        "caps": [{"text": "auto", "bytes": 49_000_000}],
        "cap_margin": 0.0,
        "clients": list(clients),
        "requests_per_client": 2,
        "max_tokens": 64,
        "ctx": 256,
        "max_batch": "auto",
        "threads": 2,
        "stream": False,
        "ignore_eos": True,
        "prompts": ["a", "b"],
        "servers": ["hermes", "llama-server", "llama-cpp-python"],
        "skipped": {},
        "machine": {"cpu": "AMD EPYC"},
        "versions": {"git_commit": "abc1234", "onnxruntime": "1.32.0"},
        "emulation": {"memory_cgroup": "/sys/fs/cgroup/memory/x"},
        "records": records,
    }


def test_the_table_has_speedups_killed_cells_and_the_targets():
    records = [_record("hermes", n, 10.0 * n) for n in (1, 2, 4, 8)]
    records += [_record("llama-server", n, 20.0 + n) for n in (1, 2, 4, 8)]
    records += [_record("llama-cpp-python", 1, 30.0), _record("llama-cpp-python", 2, 0, errors=1)]
    records += [_record("llama-cpp-python", n, 0, killed=True) for n in (4, 8)]
    text = render_bench(_doc(records))
    assert "| clients | hermes tokens/s | vs 1 client | peak RSS | llama-server tokens/s |" in text
    assert "| 8 | 80.0 | 8.00x | 100.0 MB | 28.0 | 1.33x | 100.0 MB | **killed** | - | - |" in text
    assert "| hermes, 8 clients vs 1 | >= 5x | 8.00x | **met** |" in text
    assert (
        "| hermes vs llama-server, 8 clients | ahead | 2.86x (80.0 vs 28.0 tokens/s) | **met** |"
        in text
    )
    assert (
        "hermes vs llama_cpp.server, 8 clients | ahead | - (80.0 vs - tokens/s) | **met** |" in text
    )
    assert "49.0 MB (50% of the GGUF file)" in text
    assert "smallest workable budget" in text and "115.0 MB" in text
    assert "auto llama-cpp-python 4 clients: killed for memory (log: logs/" in text
    assert "auto llama-cpp-python 2 clients: APIError: x" in text


def test_the_targets_are_missed_when_hermes_scales_less_or_trails():
    records = [_record("hermes", n, 10.0 + n) for n in (1, 8)]
    records += [_record("llama-server", n, 50.0) for n in (1, 8)]
    text = render_bench(_doc(records, clients=(1, 8)))
    assert "| hermes, 8 clients vs 1 | >= 5x | 1.64x | **missed** |" in text
    assert (
        "| hermes vs llama-server, 8 clients | ahead | 0.36x (18.0 vs 50.0 tokens/s) | **missed** |"
        in text
    )


def test_the_load_table_puts_peak_rss_against_the_budget():
    doc = _doc([_record("hermes", 8, 40.0, rss=45e6)], mode="load", clients=(8,))
    text = render_load(doc)
    assert (
        "| auto | 49.0 MB | 8 x 2 | 16 | 0 | 40.0 | 500 ms | 2.00 s | - | 45.0 MB | 0.92 |" in text
    )
    assert text.rstrip().endswith("| 0.92 | - | **met** | **met** |")
    failed = render_load(_doc([_record("hermes", 8, 0, killed=True)], mode="load", clients=(8,)))
    assert "**killed**" in failed and "**missed**" in failed


def test_a_refused_budget_shows_what_hermes_needs():
    refused = _record("hermes", 1, 0, killed=True)
    refused["server"]["killed_for_memory"] = False
    refused["error"] = (
        "exited before it was ready (status 1): hermes-ort: error: a batch of 1 x 1 positions "
        "needs at least 110.6 MB (110588106 bytes), over the budget 49.2 MB"
    )
    text = render_bench(_doc([refused], clients=(1,)))
    assert "| 1 | refused (needs 110.6 MB) | - |" in text
