"""The peers' runners, each on a tiny checkpoint in a fresh process: a decoder's greedy tokens
equal transformers' on the same weights (fp32 and f16 formats; quantized ones report how far they
agree), an encoder's outputs match transformers'. A peer that is not installed is skipped with
the command that installs it (`make bench-peers`)."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("torch", reason="the peers' checkpoints are built with torch")

from bench import child_env  # noqa: E402
from bench.peers import ENGINES, installed  # noqa: E402
from bench.peers.run import parse_config, summarise  # noqa: E402
from hermes_ort.measure.fresh_process import run_child  # noqa: E402

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bench.peers.weights import PeerModel, checkpoint, reference

    root = tmp_path_factory.mktemp("peers")
    models = {name: PeerModel.named(name, root) for name in ("tiny-llama", "tiny-bert")}
    for m in models.values():
        checkpoint(m)
        reference(m)
    return models


def _run(model, config: str, *extra: str) -> dict:
    from bench.peers.weights import prepare

    c = parse_config(config)
    why = installed(ENGINES[c.engine])
    if why:
        pytest.skip(why)
    try:
        weights = prepare(model, c.engine, c.format)
    except Exception as e:  # a builder or converter that needs what `make bench-peers` makes
        if "make bench-peers" in str(e) or "download" in str(e):
            pytest.skip(str(e))
        raise
    scratch = model.root / "scratch"
    scratch.mkdir(exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.child",
        c.engine,
        str(weights),
        "--reference",
        str(model.reference),
        "--kind",
        model.kind,
        "--new-tokens",
        str(NEW_TOKENS),
    ]
    if c.variant == "no-repack":
        cmd.append("--no-repack")
    if c.engine in ("accelerate", "airllm"):
        cmd += ["--scratch", str(model.root / "airllm" if c.engine == "airllm" else scratch)]
    result = run_child([*cmd, *extra], 600, env=child_env())
    assert result.ok, result.error
    return summarise(dict(result.record), json.loads(model.reference.read_text()))


@pytest.mark.parametrize(
    "config",
    [
        "hermes-ort:fp32",
        "llama.cpp:f32",
        "llama.cpp:f16",
        "onnxruntime-genai:fp32",
        "transformers:fp32",
        "accelerate:fp32",
        "airllm:fp32",
    ],
)
def test_a_decoder_peer_generates_transformers_tokens(tiny, config):
    r = _run(tiny["tiny-llama"], config)
    want = json.loads(tiny["tiny-llama"].reference.read_text())["transformers"][:NEW_TOKENS]
    assert r["new_ids"] == want and r["tokens_equal"]
    assert len(r["token_s"]) == NEW_TOKENS - 1 and r["time_to_first_token_s"] > 0


@pytest.mark.parametrize(
    "config",
    [
        "hermes-ort:int8",
        "hermes-ort:int4",
        "llama.cpp:q8_0",
        "llama.cpp:q4_0",
        "llama.cpp:q4_0:no-repack",
        "onnxruntime-genai:int4",
    ],
)
def test_a_quantized_peer_reports_its_agreement(tiny, config):
    r = _run(tiny["tiny-llama"], config)
    assert len(r["new_ids"]) == NEW_TOKENS and 0 <= r["agreement"] <= 1
    assert r["equal_prefix"] == next(
        (
            i
            for i, (a, b) in enumerate(
                zip(
                    r["new_ids"],
                    json.loads(tiny["tiny-llama"].reference.read_text())["transformers"],
                    strict=False,
                )
            )
            if a != b
        ),
        NEW_TOKENS,
    )


# relative difference of the outputs' checksums from transformers': fp32 engines to rounding;
# int8 weights (tiny-bert's last hidden state: cosine 0.99999 with fp32) within 1%
@pytest.mark.parametrize(
    "config, tolerance",
    [
        ("hermes-ort:fp32", 1e-4),
        ("hermes-ort:fp32:full", 1e-4),
        ("optimum:fp32", 1e-4),
        ("hermes-ort:int8", 1e-2),
    ],
)
def test_an_encoder_peer_matches_transformers(tiny, config, tolerance):
    extra = ("--strategy", "full") if config.endswith(":full") else ()
    r = _run(tiny["tiny-bert"], config, *extra)
    assert r["checksum_rel_diff"] < tolerance and len(r["pass_s"]) == 2


def test_configurations_are_checked():
    assert parse_config("llama.cpp:q4_0:no-repack").label == "llama.cpp:q4_0:no-repack"
    assert parse_config("transformers").format == "fp32"
    for bad, message in (
        ("vllm:fp32", "unknown engine"),
        ("llama.cpp:q2_k", "runs f32"),
        ("airllm:fp32:fast", "no variant"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_config(bad)


def test_the_report_from_canned_records(tmp_path):
    from bench.peers.report import render

    def rec(label, profile, s, ok=True, killed=False):
        engine, fmt, *variant = label.split(":")
        return {
            "label": label,
            "engine": engine,
            "format": fmt,
            "variant": "".join(variant),
            "profile": profile,
            "ok": ok,
            "killed_for_memory": killed,
            "error": "killed for memory" if killed else None,
            "cap_bytes": 1_100_000_000 if profile != "warm" else None,
            "s_per_token": s,
            "s_per_token_range": [s, s * 1.5] if s else None,
            "tokens_per_s": 1 / s if s else None,
            "time_to_first_token_s": 1.0,
            "load_s": 0.5,
            "peak_rss_bytes": 10**9,
            "cgroup_peak_bytes": 10**9,
            "read_bytes": 2 * 10**9,
            "weights_bytes": 4.4e9,
            "tokens_equal": True,
        }

    doc = {
        "model": "tinyllama-1.1b",
        "model_kind": "decoder",
        "fp32_bytes": 4.4e9,
        "prompt_tokens": 32,
        "new_tokens": {"warm": 8, "cold": 4},
        "threads": 2,
        "cap_margin": 0.1,
        "profiles": ["warm", "cold:25%"],
        "machine": {"cpu": "Test CPU", "cores": 2},
        "versions": {"onnxruntime": "1.32.0"},
        "skipped": {"airllm:fp32": "not installed"},
        "records": [
            rec("hermes-ort:fp32", "warm", 0.17),
            rec("llama.cpp:q4_0", "warm", 0.025),
            rec("hermes-ort:fp32", "cold:25%", 2.4),
            rec("llama.cpp:q4_0", "cold:25%", None, ok=False, killed=True),
        ],
    }
    md = render(doc)
    assert "| hermes-ort:fp32 | 4.40 GB | 0.170 (0.170-0.255) | 2.400 (2.400-3.600) |" in md
    assert "| llama.cpp:q4_0 | 4.40 GB | 0.025 (0.025-0.038) | **killed** (1/1) |" in md
    assert "skipped airllm:fp32: not installed" in md


def test_a_rerun_replaces_only_its_own_records():
    from bench.peers.run import merge_runs

    def rec(label, profile, s):
        return {"label": label, "profile": profile, "repeat": 0, "s_per_token": s}

    old = {
        "created": "t0",
        "profiles": ["warm", "sd:50%"],
        "records": [rec("a", "warm", 1), rec("b", "warm", 2), rec("a", "sd:50%", None)],
    }
    new = {
        "created": "t1",
        "profiles": ["sd:50%"],
        "records": [rec("a", "sd:50%", 3)],
        "versions": {"git_commit": "abc"},
    }
    merged = merge_runs(old, new)
    assert [r["s_per_token"] for r in merged["records"]] == [1, 2, 3]
    assert merged["merged"] == [{"created": "t1", "git_commit": "abc", "rerun": [("a", "sd:50%")]}]
