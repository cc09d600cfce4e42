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


# -- a real model: the GGUF as a package ships it (bench/peers/real.py) ---------------------------
def test_a_real_model_enumerates_its_configurations_and_caps(tmp_path):
    from bench.matrix import parse_profile
    from bench.peers.run import REAL_CONFIGS, REAL_PROFILES, check_model_runs, default_configs
    from bench.peers.weights import PeerModel

    model = PeerModel.named("smollm2-135m", tmp_path)
    assert model.real is not None and model.kind == "decoder"
    configs = [parse_config(c) for c in default_configs(model)]
    assert tuple(c.label for c in configs) == REAL_CONFIGS
    for fmt in ("q4_1", "q4_0", "q8_0"):  # the file as shipped and llama.cpp's requantizations
        assert {f"llama.cpp:{fmt}", f"llama.cpp:{fmt}:no-repack"} <= set(REAL_CONFIGS)
    assert "hermes-ort:gguf" in REAL_CONFIGS
    check_model_runs(model, configs)
    with pytest.raises(ValueError, match="runs gguf of smollm2-135m"):
        check_model_runs(model, [parse_config("hermes-ort:int4")])
    with pytest.raises(ValueError, match="hermes-ort runs fp32, int4, int8 of tiny-llama"):
        check_model_runs(PeerModel.named("tiny-llama", tmp_path), [parse_config("hermes-ort:gguf")])
    caps = [f"{s}:{p}%" for s in ("cold", "emmc", "sd") for p in (100, 75, 50, 25)]
    assert ("warm", *caps) == REAL_PROFILES
    # a real model's share caps are of its GGUF file's bytes
    shipped = model.weights("llama.cpp", "q4_1")
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"\0" * 4000)
    assert model.share_base_bytes == 4000
    assert parse_profile("sd:25%").memory_cap.resolve(model.share_base_bytes, 0) == 1000


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real model under a fresh root: the shipped file copied, its prompt and reference."""
    try:
        import real_models
    except ImportError:
        from tests import real_models
    from bench.peers.weights import PeerModel

    real_models.smollm2_135m_instruct_gguf()  # skips, saying why, where it cannot be fetched
    return PeerModel.named("smollm2-135m", tmp_path_factory.mktemp("real"))


@pytest.mark.parametrize("config", ["llama.cpp:q4_0", "llama.cpp:q8_0"])
def test_llama_cpp_requantizes_the_real_gguf_and_runs_it(smollm2, config):
    # prepared here: llama_model_quantize from the shipped q4_1; one thread, a few tokens (fast)
    r = _run(smollm2, config, "--threads", "1", "--new-tokens", "4")
    assert smollm2.weights("llama.cpp", parse_config(config).format).is_file()
    assert len(r["new_ids"]) == 4 and 0 <= r["agreement"] <= 1
    reference = json.loads(smollm2.reference.read_text())
    assert reference["tokens_of"] == "llama.cpp:q4_1" and len(reference["prompt_ids"]) == 32


def test_the_targets_from_canned_records():
    from bench.peers.report import render
    from bench.peers.targets import check

    def rec(label, profile, s, rss=10**8, ok=True, killed=False):
        engine, fmt, *variant = label.split(":")
        return {
            "label": label,
            "engine": engine,
            "format": fmt,
            "variant": "".join(variant),
            "profile": profile,
            "ok": ok,
            "killed_for_memory": killed,
            "error": None if ok else ("killed for memory" if killed else "BudgetError: no"),
            "s_per_token": s,
            "tokens_per_s": 1 / s if s else None,
            "peak_rss_bytes": rss,
            "weights_bytes": 10**8,
        }

    doc = {
        "model": "smollm2-135m",
        "model_kind": "decoder",
        "share_base": "GGUF file (q4_1)",
        "share_base_bytes": 10**8,
        "tokens_of": "llama.cpp:q4_1",
        "smallest_budget_bytes": {"hermes-ort:gguf": {"smallest_budget_bytes": 1.2 * 10**8}},
        "prompt_tokens": 32,
        "new_tokens": {"warm": 8, "cold": 4},
        "threads": 2,
        "cap_margin": 0.0,
        "profiles": ["warm", "cold:100%", "cold:50%", "sd:25%"],
        "machine": {"cpu": "Test CPU", "cores": 2},
        "versions": {},
        "records": [
            rec("hermes-ort:gguf", "warm", 0.021, rss=1.4 * 10**8),
            rec("llama.cpp:q4_1", "warm", 0.02, rss=1.1 * 10**8),
            rec("llama.cpp:q4_1:no-repack", "warm", 0.03, rss=10**8),
            rec("hermes-ort:gguf", "cold:100%", 0.5),
            rec("llama.cpp:q4_0", "cold:100%", 0.1),
            rec("hermes-ort:gguf", "cold:50%", 0.5),
            rec("llama.cpp:q4_0", "cold:50%", 0.9),
            rec("llama.cpp:q4_1", "cold:50%", None, ok=False, killed=True),
            rec("hermes-ort:gguf", "sd:25%", None, ok=False),
            rec("llama.cpp:q4_0", "sd:25%", None, ok=False, killed=True),
        ],
    }
    verdicts = {t.what: (t.verdict, t.ratio) for t in check(doc)}
    # tokens/s: 1/0.021 against the faster q4_1 setting's 1/0.02; RSS against the smaller one
    assert verdicts["warm decoding, tokens/s"] == ("met", "0.95x")
    assert verdicts["warm peak RSS"] == ("missed", "1.40x")
    assert verdicts["smallest workable budget (`plan --budget min`)"] == ("met", "1.20x")
    assert "s/token under `cold:100%`" not in verdicts  # a cap at the file's size is no target
    assert verdicts["s/token under `cold:50%`"] == ("met", "1.80x")  # q4_1 killed: q4_0's 0.9 s
    assert verdicts["s/token under `sd:25%`"] == ("missed", "-")  # hermes-ort did not run
    md = render(doc)
    assert "| warm peak RSS | <= 1.3x llama.cpp:q4_1's | 140 MB | 100 MB " in md
    assert "| hermes-ort:gguf | 100 MB | 21 ms | 47.6 | 140 MB | 120 MB | failed: `sd:25%` |" in md
