"""The engine: every strategy computes the same outputs; windows, routing and memory behave."""

from __future__ import annotations

import os

import numpy as np
import pytest
from toy_model import reference_logits

import hermes_ort

STRATEGIES = hermes_ort.STRATEGIES
TOL = 1e-5


@pytest.fixture
def full_logits(toy_dir):
    with hermes_ort.load(toy_dir, strategy="full") as model:
        feeds = model.sample_inputs(batch_size=2, sequence_length=12, seed=1)
        feeds["attention_mask"][1, 7:] = 0  # padding: the mask routed from the prologue matters
        return feeds, model.run(feeds)["logits"]


def test_full_matches_numpy_reference(toy_dir, full_logits):
    feeds, logits = full_logits
    np.testing.assert_allclose(logits, reference_logits(toy_dir, feeds), atol=1e-4)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("load_path", ["default", "stream"])
def test_every_strategy_equals_full(toy_dir, full_logits, strategy, load_path, no_thread_leak):
    feeds, expected = full_logits
    with hermes_ort.load(toy_dir, strategy=strategy, load_path=load_path) as model:
        for _ in range(2):  # the second pass reuses whatever the plan keeps resident
            logits = model.run(feeds)["logits"]
            assert np.abs(logits - expected).max() <= TOL
            assert model.stats.strategy == strategy


@pytest.mark.parametrize("loaders,window", [(1, 1), (1, 2), (2, 2), (2, 3), (3, 6)])
def test_window_bounds_live_sessions(toy_dir, full_logits, loaders, window):
    feeds, expected = full_logits
    with hermes_ort.load(toy_dir, loaders=loaders, window=window) as model:
        assert (model.plan.loaders, model.plan.window, model.plan.resident) == (
            min(loaders, 6),
            window,
            (),
        )
        np.testing.assert_allclose(model.run(feeds)["logits"], expected, atol=TOL)
        assert 1 <= model.stats.max_live_sessions <= window
        assert [b.name for b in model.stats.blocks] == [b.name for b in model.manifest.blocks]
        assert not any(b.resident for b in model.stats.blocks)


def test_tensor_read_several_blocks_later_is_routed(toy_dir):
    # 'mask' is made by the prologue and read by every layer: the manifest says so, and the
    # engine keeps it alive exactly until its last consumer.
    from hermes_ort.core.manifest import last_consumers, load_manifest

    manifest = load_manifest(toy_dir)
    readers = [b.name for b in manifest.blocks if "mask" in b.inputs]
    assert len(readers) == manifest.num_layers >= 3
    assert last_consumers(manifest)["mask"] == len(manifest.blocks) - 2


def test_masked_positions_change_output(toy_dir, full_logits):
    feeds, expected = full_logits
    unmasked = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
    with hermes_ort.load(toy_dir, window=2) as model:
        logits = model.run(unmasked)["logits"]
    assert (
        np.abs(logits[1, 7:] - expected[1, 7:]).max() > 1e-3
    )  # the mask really reached the layers
    np.testing.assert_allclose(logits[0], expected[0], atol=TOL)


def test_resident_blocks_are_not_reloaded(toy_dir, full_logits):
    feeds, _ = full_logits
    with hermes_ort.load(toy_dir, strategy="pipeswitch") as model:
        model.run(feeds)
        assert not any(b.resident for b in model.stats.blocks)
        model.run(feeds)
        assert all(b.resident and b.create_s == 0 for b in model.stats.blocks)
    with hermes_ort.load(toy_dir, strategy="ondemand") as model:
        model.run(feeds)
        model.run(feeds)
        assert not any(b.resident for b in model.stats.blocks)
        assert all(b.create_s > 0 for b in model.stats.blocks)


def test_stats_are_consistent(toy_dir, full_logits):
    feeds, _ = full_logits
    with hermes_ort.load(toy_dir, window=2) as model:
        model.run(feeds)
        s = model.stats
    assert s.latency_s >= s.compute_s > 0
    assert s.peak_rss_bytes >= s.rss_before_bytes > 0
    assert all(b.create_s > 0 and b.run_s > 0 for b in s.blocks)
    record = s.to_json()
    assert record["blocks"][0]["name"] == "prologue" and record["compute_s"] == pytest.approx(
        s.compute_s
    )


def test_closed_model_refuses_to_run(toy_dir, full_logits):
    feeds, _ = full_logits
    model = hermes_ort.load(toy_dir)
    model.close()
    with pytest.raises(hermes_ort.HermesError, match="closed"):
        model.run(feeds)


def test_under_a_budget_streamed_pages_are_dropped_and_sparse_ones_kept(toy_dir, full_logits):
    """The daemon drops a streamed block's file pages, except a sparse block's (an embedding
    looked up a few rows at a time): those would fault in from storage on every run."""
    from dataclasses import replace

    from hermes_ort.streaming.block_engine import BlockEngine
    from hermes_ort.streaming.readahead import is_cached

    feeds, expected = full_logits
    os.sync()  # the copy's pages are dirty: the kernel drops only clean ones
    with hermes_ort.load(toy_dir, window=2) as model:
        manifest = model.manifest
        verifier = model.verifier
        streamed = tuple(
            replace(b, resident=False, readahead=i != 0, drop_pages=i != 0)
            for i, b in enumerate(model.plan.blocks)
        )  # block 0, the prologue, is sparse: not read ahead, its pages kept
        plan = replace(model.plan, mechanism=replace(model.plan.mechanism, blocks=streamed))
    engine = BlockEngine(manifest, plan, verifier)
    try:
        outputs, _ = engine.run(feeds)
    finally:
        engine.close()
    np.testing.assert_allclose(outputs["logits"], expected, atol=1e-5)
    sparse = {f.path for f in manifest.blocks[0].files}
    streamed = {f.path for b in manifest.blocks[1:] for f in b.files if b.is_own(f)} - sparse
    assert streamed and all(is_cached(str(toy_dir / p)) for p in sparse)
    assert not [p for p in streamed if is_cached(str(toy_dir / p))]
