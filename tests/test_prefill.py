"""The prompt pass of a decoder: its logits at the last position only (the head blocks fed that
position alone) and its positions in chunks, each reading the KV cache of the ones before; both
leave the greedy tokens as they were, streamed or resident, one prompt or a left-padded batch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

import hermes_ort
from hermes_ort.core.errors import OptionError
from hermes_ort.generation.token_loop import Sampling, generate_tokens, prompt_batch
from hermes_ort.streaming import block_engine
from hermes_ort.tensors.kv_cache import decoder_signature
from hermes_ort.tensors.last_position import position_wise_blocks
from hermes_ort.tensors.prefill import supports_chunked_prefill

PROMPT = [5, 17, 99, 3, 42, 7, 250, 11]
RAGGED = [[5, 17, 99, 3, 42, 7, 250, 11, 8], [64, 2, 9], [30, 31, 32, 33, 34]]  # left-padded
NEW = 12
GRAPHS = {  # name -> export arguments
    "tiny-gpt2": ("--preset", "tiny-gpt2"),
    "tiny-llama": ("--preset", "tiny-llama"),
    "tiny-llama-fused": ("--preset", "tiny-llama", "--graph", "fused"),
    # the head as vocabulary slices (HEAD blocks) after the final norm, joined by `head_concat`
    "tiny-gpt2-heads": ("--preset", "tiny-gpt2", "--head-slices", "3"),
    "tiny-llama-heads": ("--preset", "tiny-llama", "--head-slices", "3"),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """name -> its export, made the first time a test of this module asks for it."""
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    root = tmp_path_factory.mktemp("prefill")

    class Exports(dict):
        def __missing__(self, name: str) -> Path:
            assert fx.export_cli(root / name, *GRAPHS[name]) == 0
            self[name] = root / name
            return self[name]

    return Exports()


@pytest.fixture
def model_dir(exported, private):
    """`model_dir(name)`: a private copy of that export for this test."""
    return lambda name: private(exported[name])


def prompt_feeds(sig, prompts) -> dict[str, np.ndarray]:
    """The prompt pass of left-padded `prompts` (a list of lists), as generate feeds it."""
    from hermes_ort.generation.token_loop import prompt_positions, step_feeds

    batch = prompt_batch(prompts)
    positions = prompt_positions(batch.mask)
    return step_feeds(sig, batch.ids, batch.mask, positions, sig.empty_cache(batch.rows))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gpt2-heads", "tiny-llama-heads"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"memory_budget": "min"}, {"strategy": "full"}], ids=["resident", "min", "full"]
)
def test_last_logits_are_the_last_column(model_dir, name, kwargs, monkeypatch):
    came_out = []  # the logits the blocks made: the head was fed one position, not cut after
    cut_after = block_engine.last_logits_only

    def spy(outputs, name):
        came_out.append(outputs[name].shape)
        return cut_after(outputs, name)

    monkeypatch.setattr(block_engine, "last_logits_only", spy)
    with hermes_ort.load(model_dir(name), **kwargs) as model:
        sig = decoder_signature(model.manifest)
        # the epilogue; or, sliced, the final norm's epilogue, the HEAD blocks and head_concat
        head = {i for i, b in enumerate(model.manifest.blocks) if b.kind in ("epilogue", "head")}
        assert position_wise_blocks(model.manifest) == head
        if kwargs.get("memory_budget"):  # the head streamed, not kept
            assert not head & set(model.plan.resident)
        feeds = prompt_feeds(sig, RAGGED)
        every = model.run(feeds)
        last = model.run(feeds, last_logits=True)
    rows, width = feeds["input_ids"].shape
    assert every["logits"].shape[:2] == (rows, width)
    assert last["logits"].shape == (rows, 1, every["logits"].shape[2])
    scale = np.abs(every["logits"]).max()
    np.testing.assert_allclose(last["logits"], every["logits"][:, -1:], rtol=0, atol=1e-5 * scale)
    if "strategy" not in kwargs:  # the blocks engine (the whole engine cuts after)
        assert came_out == [(rows, 1, every["logits"].shape[2])]
    for s in sig.slots:  # the tensors other blocks read were not cut
        np.testing.assert_array_equal(last[s.present], every[s.present])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_generate_with_last_logits_chooses_the_same_tokens(model_dir, name):
    """generate (last-position logits) against the same loop fed every position's logits."""
    with hermes_ort.load(model_dir(name), memory_budget="min") as model:
        sig = decoder_signature(model.manifest)

        def every_position(feeds):
            return model.run(feeds), model.stats

        for prompts in (PROMPT, RAGGED):
            got = model.generate(prompts, NEW, eos_token_id=[])
            batch = prompt_batch(prompts)
            want, _ = generate_tokens(every_position, sig, batch, NEW, Sampling(), eos=[])
            np.testing.assert_array_equal([g[-NEW:] for g in rows_of(got)], want)


def test_last_logits_is_refused_without_a_kv_cache(toy_dir):
    with hermes_ort.load(toy_dir) as model, pytest.raises(OptionError, match="not a decoder"):
        model.run(model.sample_inputs(), last_logits=True)


def rows_of(generated) -> list[np.ndarray]:
    """generate's result row by row (a list for prompts of different lengths, else an array)."""
    return list(generated) if isinstance(generated, list) else list(np.atleast_2d(generated))


def expect_chunks_equal(model, prompts, chunks) -> None:
    """Greedy tokens with each chunk equal those of the prompt in one pass, the cache too."""
    whole = model.generate(prompts, NEW, eos_token_id=[])
    one_pass = model.generation_stats
    width = prompt_batch(prompts).ids.shape[1]
    for chunk in chunks:
        got = model.generate(prompts, NEW, eos_token_id=[], prefill_chunk=chunk)
        stats = model.generation_stats
        for a, b in zip(rows_of(got), rows_of(whole), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"chunk {chunk}")
        assert stats.prefill_passes == -(-width // chunk)
        assert stats.cache_bytes == one_pass.cache_bytes
        assert stats.time_to_first_token_s <= stats.total_s


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gpt2-heads"])
@pytest.mark.parametrize("kwargs", [{}, {"memory_budget": "min"}], ids=["resident", "min"])
def test_chunked_prefill_generates_the_same_tokens(model_dir, name, kwargs):
    with hermes_ort.load(model_dir(name), **kwargs) as model:
        assert supports_chunked_prefill(model.model_dir, model.manifest, rows=3)
        for prompts in (PROMPT, RAGGED):  # the batch: rows whose first chunks are all padding
            expect_chunks_equal(model, prompts, (1, 3, 7, 50))


def test_the_fused_graph_takes_chunks_for_one_prompt_only(model_dir):
    """GroupQueryAttention (ORT CPU) refuses several new positions after a past for a batch."""
    with hermes_ort.load(model_dir("tiny-llama-fused")) as model:
        directory, manifest = model.model_dir, model.manifest
        assert supports_chunked_prefill(directory, manifest, rows=1)
        assert not supports_chunked_prefill(directory, manifest, rows=3)
        expect_chunks_equal(model, PROMPT, (1, 3, 7, 50))
        batch = [PROMPT, PROMPT[::-1], PROMPT[2:] + PROMPT[:2]]  # no ragged rows: no position_ids
        expect_chunks_equal(model, batch, (1, 50))  # one position a pass: the decode step's shape
        with pytest.raises(OptionError, match="prefill_chunk 3: .*GroupQueryAttention"):
            model.generate(batch, NEW, prefill_chunk=3)


def test_generate_prefills_in_the_plans_chunks_unless_told(model_dir):
    with hermes_ort.load(model_dir("tiny-llama")) as model:
        whole = model.generate(PROMPT, NEW, eos_token_id=[])
        model.plan = replace(model.plan, batch=replace(model.plan.batch, prefill_chunk=3))
        np.testing.assert_array_equal(model.generate(PROMPT, NEW, eos_token_id=[]), whole)
        assert model.generation_stats.prefill_passes == 3
        model.generate(PROMPT, NEW, eos_token_id=[], prefill_chunk=len(PROMPT))
        assert model.generation_stats.prefill_passes == 1


@pytest.mark.parametrize("bad", [0, -2, 2.5, "4"])
def test_a_bad_prefill_chunk_is_refused_by_generate(model_dir, bad):
    refused = pytest.raises(OptionError, match="prefill_chunk must be a whole number")
    with hermes_ort.load(model_dir("tiny-gpt2")) as model, refused:
        model.generate(PROMPT, NEW, prefill_chunk=bad)
