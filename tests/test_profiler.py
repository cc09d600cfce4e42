"""The layer profiler: measures every block, is stored beside the manifest, reused while the
machine, ONNX Runtime and model are the same, and feeds the planner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_model import write_toy_model

import hermes_ort
from hermes_ort.measure.calibrate import ensure_profile
from hermes_ort.measure.profiler import profile_model
from hermes_ort.planning.cost_model import CostModel
from hermes_ort.planning.layer_profile import PROFILE_NAME
from hermes_ort.planning.layer_profile import read_profile as load_profile


def test_profile_measures_every_block(toy_dir):
    profile = profile_model(toy_dir)
    manifest = hermes_ort.load_manifest(toy_dir)
    assert [b.name for b in profile.blocks] == [b.name for b in manifest.blocks]
    for measured, spec in zip(profile.blocks, manifest.blocks, strict=True):
        assert measured.file_bytes == spec.bytes
        assert measured.create_s > 0 and measured.run_s > 0 and measured.first_run_s > 0
        assert measured.output_bytes > 0
    assert profile.sequence_length == manifest.sample["sequence_length"]
    # the profiling process had Python, numpy and ONNX Runtime in memory before any block
    assert profile.baseline_bytes > 20 << 20


def test_cold_reads_come_from_storage(tmp_path):
    """The cold read-ahead drops the block's pages first: it reads every byte from storage, and
    the bandwidth is what those bytes took."""
    import os

    wide = write_toy_model(tmp_path / "wide", layers=2, hidden=1024, vocab=64)  # 4 MiB a layer
    os.sync()  # written pages are dirty: the kernel drops only clean ones
    profile = profile_model(wide)
    layers = [b for b in profile.blocks if b.name.startswith("layer")]
    assert all(b.cold_read_bytes >= 0.9 * b.file_bytes for b in layers)
    read = sum(b.cold_read_bytes for b in layers)
    seconds = sum(b.readahead_cold_s for b in layers)
    assert profile.read_bandwidth_bytes_per_s == pytest.approx(read / seconds, rel=1e-9)


def test_weights_show_up_as_live_bytes(tmp_path):
    wide = write_toy_model(tmp_path / "wide", layers=3, hidden=1024, vocab=64)  # 4 MiB a layer
    profile = profile_model(wide)
    layers = [b for b in profile.blocks if b.name.startswith("layer")]
    assert all(b.live_bytes > 0.7 * b.file_bytes for b in layers)
    assert all(b.open_bytes < 0.3 * b.file_bytes for b in layers)  # mmapped, untouched until run


def test_stored_and_reused_until_the_model_changes(toy_dir):
    first = ensure_profile(toy_dir)
    assert (toy_dir / PROFILE_NAME).is_file()
    assert load_profile(toy_dir) == first
    assert ensure_profile(toy_dir) == first  # reused, not measured again
    data = json.loads((toy_dir / PROFILE_NAME).read_text())
    data["fingerprint"]["onnxruntime"] = "0.0.1"
    (toy_dir / PROFILE_NAME).write_text(json.dumps(data))
    assert load_profile(toy_dir) is None  # another ONNX Runtime: measure again
    ensure_profile(toy_dir)
    manifest = json.loads((toy_dir / "manifest.json").read_text())
    manifest["name"] = "renamed"
    (toy_dir / "manifest.json").write_text(json.dumps(manifest))
    assert load_profile(toy_dir) is None  # another model


def test_load_plans_with_the_profile(toy_dir):
    from hermes_ort.streaming.memory import rss_bytes

    budget = rss_bytes() + 10**9  # this process's own size depends on the tests before it
    with hermes_ort.load(toy_dir, memory_budget=budget) as model:
        assert model.plan.prediction.cost_source == "estimate"
    with hermes_ort.load(toy_dir, memory_budget=budget, profile=True) as model:
        assert model.plan.prediction.cost_source == "profile" and model.plan.strategy == "pipeload"
        assert model.plan.prediction.peak_bytes <= budget
        out = model.run(model.sample_inputs())
    with hermes_ort.load(toy_dir, strategy="full") as full:
        np.testing.assert_allclose(
            out["logits"], full.run(full.sample_inputs())["logits"], atol=1e-5
        )
    with hermes_ort.load(toy_dir, memory_budget=budget) as model:  # now stored: used by default
        assert model.plan.prediction.cost_source == "profile"


def test_the_first_pass_is_predicted_from_what_is_cached_now(tmp_path):
    """Under a budget later passes re-read streamed blocks from storage; the first pass reads
    what the page cache holds at load time: cached files predict a faster first pass."""
    from hermes_ort.measure.profiler import cached_now
    from hermes_ort.streaming.memory import drop_file_cache
    from hermes_ort.streaming.readahead import warm_files

    wide = write_toy_model(tmp_path / "wide", layers=3, hidden=1024, vocab=64)
    profile = ensure_profile(wide)
    manifest = hermes_ort.load_manifest(wide)
    files = [wide / f.path for f in manifest.block_files().values()]
    for f in files:
        drop_file_cache(str(f))
    assert cached_now(wide, manifest) == (False,) * len(manifest.blocks)
    warm_files(files)
    assert cached_now(wide, manifest) == (True,) * len(manifest.blocks)

    def first_pass(cached: bool) -> float:
        cost = CostModel.from_profile(
            manifest, profile, 50 << 20, cold=True, cached=(cached,) * len(manifest.blocks)
        )
        return cost.latency(1, 1, (), first_pass=True)

    cold = CostModel.from_profile(manifest, profile, 50 << 20, cold=True)
    assert first_pass(False) == cold.latency(1, 1, (), first_pass=True)
    assert first_pass(True) < first_pass(False)
    assert sum(b.readahead_cold_cpu_s for b in profile.blocks) > 0


def test_the_prologue_is_read_in_small_folios_and_layers_sequentially(toy_dir, monkeypatch):
    """An embedding table is looked up a few rows at a time: read in large folios, a lookup maps
    whole folios (bert-base's prologue: 59 MB resident instead of 10)."""
    from hermes_ort.streaming import loader

    calls = []
    monkeypatch.setattr(
        loader, "read_ahead", lambda path, sequential: calls.append((path, sequential)) or 0
    )
    manifest = hermes_ort.load_manifest(toy_dir)
    for spec in manifest.blocks:
        calls.clear()
        loader.read_ahead_block(spec, [toy_dir / f.path for f in spec.files])
        for (path, sequential), f in zip(calls, spec.files, strict=True):
            assert sequential == (spec.kind != "prologue" and spec.is_own(f)), (spec.name, path)
