"""Generation with a per-block KV cache: token-for-token equal to transformers' greedy generate on
the same weights (GPT-2 and Llama-style decoders), under every strategy and a tight budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort
from hermes_ort.tensors.batch import BatchShape
from hermes_ort.tensors.kv_cache import decoder_signature

PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]
NEW_TOKENS = 24
FAMILIES = ["tiny-gpt2", "tiny-llama", "tiny-qwen2"]


@pytest.fixture
def decoders(exported_decoders, private) -> dict[str, tuple[Path, object]]:
    """The exported decoders, each a private copy for this test."""
    return {name: (private(d), model) for name, (d, model) in exported_decoders.items()}


@pytest.fixture(scope="module")
def exported_decoders(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each tiny decoder exported once (with its KV cache): name -> (model dir, torch model)."""
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    root = tmp_path_factory.mktemp("decoders")
    made = {}
    for name in FAMILIES:
        assert fx.export_cli(root / name, "--preset", name) == 0
        made[name] = (root / name, fx.preset_model(name))
    return made


def hf_generate(model, prompt, max_new_tokens: int, **kwargs) -> np.ndarray:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0].numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_transformers(decoders, name):
    model_dir, torch_model = decoders[name]
    expected = hf_generate(torch_model, PROMPT, NEW_TOKENS)
    with hermes_ort.load(model_dir) as model:
        got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(got, expected)
    assert len(set(expected[len(PROMPT) :].tolist())) > 1, "a degenerate sequence proves little"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"memory_budget": "min"},
        {"strategy": "full"},
        {"strategy": "full-mmap"},
        {"strategy": "ondemand"},
        {"strategy": "pipeswitch"},
        {"loaders": 2, "window": 2},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_every_strategy_generates_the_same_tokens(decoders, kwargs):
    model_dir, torch_model = decoders["tiny-llama"]
    expected = hf_generate(torch_model, PROMPT, NEW_TOKENS)
    with hermes_ort.load(model_dir, **kwargs) as model:
        np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS), expected)


def test_kv_cache_shapes(decoders):
    """Each layer's present = its past with the new tokens appended: [1, kv_heads, T, head_dim]."""
    model_dir, _ = decoders["tiny-llama"]
    with hermes_ort.load(model_dir) as model:
        sig = decoder_signature(model.manifest)
        assert len(sig.slots) == 2 * 3  # 3 layers, key and value
        assert {(s.kv_heads, s.head_dim) for s in sig.slots} == {(2, 16)}  # GQA: 2 of 4 heads
        ids = np.array([PROMPT])
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(len(PROMPT))[None],
            **sig.empty_cache(),
        }
        out = model.run(feeds)
        for s in sig.slots:
            assert out[s.present].shape == (1, 2, len(PROMPT), 16)
        step = {
            "input_ids": np.array([[9]]),
            "attention_mask": np.ones((1, len(PROMPT) + 1), np.int64),
            "position_ids": np.array([[len(PROMPT)]]),
            **{s.past: out[s.present] for s in sig.slots},
        }
        out2 = model.run(step)
        for s in sig.slots:
            assert out2[s.present].shape == (1, 2, len(PROMPT) + 1, 16)
            np.testing.assert_array_equal(out2[s.present][:, :, :-1], out[s.present])
        model.generate(PROMPT, max_new_tokens=5)
        stats = model.generation_stats
        # The last token is chosen but never run: the cache holds prompt + 4 positions.
        assert stats.cache_bytes == sig.cache_bytes(len(PROMPT) + 4)
        assert stats.new_tokens == 5 and stats.prompt_tokens == len(PROMPT)


def test_stops_at_eos_like_transformers(decoders):
    model_dir, torch_model = decoders["tiny-gpt2"]
    free = hf_generate(torch_model, PROMPT, NEW_TOKENS)[len(PROMPT) :]
    eos = int(free[5])
    stop = int(np.argmax(free == eos))  # its first occurrence
    expected = hf_generate(torch_model, PROMPT, NEW_TOKENS, eos_token_id=eos)
    streamed = []
    with hermes_ort.load(model_dir) as model:
        got = model.generate(
            PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=eos, streamer=streamed.append
        )
        assert model.generation_stats.stopped_by == "eos"
    np.testing.assert_array_equal(got, expected[: len(PROMPT) + stop + 1])
    assert streamed == got[len(PROMPT) :].tolist()


def test_default_eos_comes_from_generation_config(decoders, tmp_path):
    model_dir, torch_model = decoders["tiny-llama"]
    with hermes_ort.load(model_dir) as model:
        free = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    eos = int(free[len(PROMPT) + 3])
    import shutil

    copy = Path(shutil.copytree(model_dir, tmp_path / "m"))
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [eos]}))
    with hermes_ort.load(copy) as model:
        got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert got[-1] == eos and len(got) <= len(PROMPT) + 4


def test_sampling_is_reproducible_with_a_seed(decoders):
    model_dir, _ = decoders["tiny-llama"]
    with hermes_ort.load(model_dir) as model:
        greedy = model.generate(PROMPT, max_new_tokens=12, eos_token_id=[])
        kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
        a = model.generate(PROMPT, seed=7, **kw)
        b = model.generate(PROMPT, seed=7, **kw)
        others = [model.generate(PROMPT, seed=s, **kw) for s in (1, 2, 3)]
        top1 = model.generate(PROMPT, seed=3, top_k=1, **kw)
        nucleus = model.generate(PROMPT, seed=3, top_p=1e-6, **kw)
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, o) for o in others)
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 and a tiny top-p leave only the argmax
    np.testing.assert_array_equal(nucleus, greedy)


def test_prompt_forms(decoders):
    model_dir, _ = decoders["tiny-gpt2"]
    with hermes_ort.load(model_dir) as model:
        flat = model.generate(np.array(PROMPT), max_new_tokens=3)
        batched = model.generate(np.array([PROMPT]), max_new_tokens=3)
    assert flat.shape == (len(PROMPT) + 3,)
    np.testing.assert_array_equal(batched, flat[None])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.generate([], max_new_tokens=3), hermes_ort.InputError, "empty"),
        (
            lambda m: m.generate(np.zeros((1, 2, 3), np.int64), 3),
            hermes_ort.InputError,
            "a list, \\[T\\] or \\[B, T\\] array, or a list of prompts",
        ),
        (lambda m: m.generate([1.5, 2.0], 3), hermes_ort.InputError, "integer token ids"),
        (lambda m: m.generate(PROMPT, max_new_tokens=0), hermes_ort.InputError, "max_new_tokens"),
        (lambda m: m.generate(PROMPT, 200), hermes_ort.InputError, r"208 positions.*\(128\)"),
        (
            lambda m: m.generate(PROMPT, 3, do_sample=True, temperature=0),
            hermes_ort.InputError,
            "temperature",
        ),
        (
            lambda m: m.generate(PROMPT, 3, do_sample=True, top_p=1.5),
            hermes_ort.InputError,
            "top_p",
        ),
    ],
)
def test_bad_generate_calls_are_named(decoders, call, error, message):
    model_dir, _ = decoders["tiny-gpt2"]
    with hermes_ort.load(model_dir) as model:
        with pytest.raises(error, match=message):
            call(model)
        assert len(model.generate(PROMPT, max_new_tokens=2)) == len(PROMPT) + 2  # still usable


def test_a_model_without_kv_cache_cannot_generate(toy_dir):
    with hermes_ort.load(toy_dir) as model, pytest.raises(hermes_ort.HermesError, match="KV cache"):
        model.generate(PROMPT, max_new_tokens=2)


def test_the_kv_cache_is_reserved_in_the_budget(decoders, monkeypatch):
    """The cache of prompt + max_new_tokens comes out of the budget before the blocks are planned;
    a budget with no room left for it is refused, naming the cache."""
    import hermes_ort.measure.profiler as profiler

    monkeypatch.setattr(profiler, "rss_bytes", lambda: 100 << 20)  # a fixed process baseline
    model_dir, _ = decoders["tiny-gpt2"]
    prompt = BatchShape(1, len(PROMPT))
    with hermes_ort.load(model_dir, memory_budget="min") as model:
        # past and present side by side while a pass runs: the cache counted twice
        cache = 2 * model.decoder.cache_bytes(len(PROMPT) + 100)
        # "min" for this prompt: the blocks' smallest (without the prompt's own cache)
        smallest = model.smallest_budget(prompt, generation=True)
        smallest -= 2 * model.decoder.cache_bytes(len(PROMPT))
        model.generate(PROMPT, max_new_tokens=100, eos_token_id=[])
        assert model.plan.budget_bytes == smallest + cache  # "min" grows by the cache
    # The estimate of the process baseline changes once ORT's environment exists: measure again.
    with hermes_ort.load(model_dir, memory_budget="min") as model:
        smallest = model.smallest_budget(prompt, generation=True)
        smallest -= 2 * model.decoder.cache_bytes(len(PROMPT))
    with hermes_ort.load(model_dir, memory_budget=smallest) as model:
        with pytest.raises(hermes_ort.BudgetError, match="KV cache"):
            model.generate(PROMPT, max_new_tokens=100)
        assert model.run(model.sample_inputs(sequence_length=8))["logits"].shape == (1, 8, 1000)
    with hermes_ort.load(model_dir, memory_budget=smallest + cache) as model:
        assert len(model.generate(PROMPT, max_new_tokens=100, eos_token_id=[])) == len(PROMPT) + 100
        assert model.plan.budget_bytes == smallest + cache


def test_generation_bench_child_and_table(decoders, capsys):
    """The generation bench's fresh-process child reports what the table shows."""
    from bench import child, generation

    model_dir, _ = decoders["tiny-gpt2"]
    assert (
        child.main(["generate", str(model_dir), "--prompt-tokens", "6", "--new-tokens", "5"]) == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["ok"] and len(r["token_s"]) == 4 and r["decode_tokens_per_s"] > 0
    assert r["cache_bytes"] == decoder_signature_of(model_dir).cache_bytes(6 + 4)
    r.update(
        strategy="pipeload",
        profile="warm",
        share=0.5,
        cap_bytes=None,
        killed_for_memory=False,
        cgroup_peak_bytes=None,
        blkio_read_bytes=None,
        io_floor_per_token_s=0.0,
    )
    killed = {**r, "ok": False, "strategy": "full", "killed_for_memory": True}
    data = {
        "model": "tiny-gpt2",
        "model_bytes": 10 << 20,
        "baseline_bytes": 50 << 20,
        "prompt_tokens": 6,
        "new_tokens": {"warm": 5, "cold": 2},
        "cap_margin": 0.1,
        "machine": {"cpu": "x", "cores": 2},
        "records": [r, killed],
    }
    table = generation.render(data)
    assert "| warm | 50% " in table and "| pipeload |" in table and "killed for memory" in table


def decoder_signature_of(model_dir):
    from hermes_ort.core.manifest import load_manifest

    return decoder_signature(load_manifest(model_dir))


PROMPTS = [[5, 17, 99, 3, 42, 7, 250, 11], [9, 8, 7], [100, 3, 5, 61, 2]]


@pytest.mark.parametrize("budget", [None, "min"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_batch_of_prompts_equals_each_prompt_alone(decoders, name, budget):
    """Prompts of different lengths, left-padded in one batch: each row's greedy tokens are
    transformers' on that prompt alone; every pass streams each block once for all rows."""
    model_dir, torch_model = decoders[name]
    with hermes_ort.load(model_dir, memory_budget=budget) as model:
        if not model.decoder.takes_position_ids:
            with pytest.raises(hermes_ort.InputError, match="give prompts of equal length"):
                model.generate(PROMPTS, max_new_tokens=4, eos_token_id=[])
            return
        got = model.generate(PROMPTS, max_new_tokens=12, eos_token_id=[])
        stats = model.generation_stats
        passes = model.stats
    assert stats.batch_size == 3 and stats.new_tokens == 36
    assert len(passes.blocks) == len(hermes_ort.load_manifest(model_dir).blocks)  # once each
    for prompt, row in zip(PROMPTS, got, strict=True):
        np.testing.assert_array_equal(row, hf_generate(torch_model, prompt, 12))


@pytest.mark.parametrize("name", FAMILIES)
def test_each_row_stops_at_its_own_eos(decoders, name):
    model_dir, torch_model = decoders[name]
    prompts = np.array([PROMPTS[0], PROMPTS[0][::-1]])  # equal lengths: a [2, T] array
    alone = [hf_generate(torch_model, list(p), 10)[len(p) :] for p in prompts]
    eos = int(alone[0][2])  # row 0 meets it at its third token
    with hermes_ort.load(model_dir) as model:
        got = model.generate(prompts, max_new_tokens=10, eos_token_id=eos)
    assert got.shape[0] == 2
    first = list(alone[0]).index(eos)
    np.testing.assert_array_equal(got[0, 8 : 8 + first + 1], alone[0][: first + 1])
    assert (got[0, 8 + first + 1 :] == eos).all()  # padded with the EOS id after it stopped
    stop = list(alone[1]).index(eos) + 1 if eos in alone[1] else 10
    np.testing.assert_array_equal(got[1, 8 : 8 + stop], alone[1][:stop])


def test_a_batch_longer_than_the_sample_at_min(decoders):
    """'min' for a batch is the smallest budget of the blocks at that batch, plus its cache."""
    model_dir, torch_model = decoders["tiny-gpt2"]
    prompts = [[(7 * i + j) % 900 + 3 for j in range(99)] for i in range(4)]
    with hermes_ort.load(model_dir, memory_budget="min") as model:
        got = model.generate(prompts, max_new_tokens=2, eos_token_id=[])
        assert model.plan.batch.rows == 4
    for prompt, row in zip(prompts, got, strict=True):
        np.testing.assert_array_equal(row, hf_generate(torch_model, prompt, 2))
