"""The layer profiler: measures every block, is stored beside the manifest, reused while the
machine, ONNX Runtime and model are the same, and feeds the planner."""

from __future__ import annotations

import json

import numpy as np
from toy_model import write_toy_model

import hermes_ort
from hermes_ort.costmodel import CostModel
from hermes_ort.profiler import PROFILE_NAME, ensure_profile, load_profile, profile_model


def test_profile_measures_every_block(toy_copy):
    profile = profile_model(toy_copy)
    manifest = hermes_ort.load_manifest(toy_copy)
    assert [b.name for b in profile.blocks] == [b.name for b in manifest.blocks]
    for measured, spec in zip(profile.blocks, manifest.blocks, strict=True):
        assert measured.file_bytes == spec.bytes
        assert measured.create_s > 0 and measured.run_s > 0 and measured.first_run_s > 0
        assert measured.output_bytes > 0
    assert profile.sequence_length == manifest.sample["sequence_length"]
    assert (
        profile.read_bandwidth_bytes_per_s >= 0 and profile.baseline_bytes > 0
    )  # 0: nothing to time


def test_weights_show_up_as_live_bytes(tmp_path):
    wide = write_toy_model(tmp_path / "wide", layers=3, hidden=1024, vocab=64)  # 4 MiB a layer
    profile = profile_model(wide)
    layers = [b for b in profile.blocks if b.name.startswith("layer")]
    assert all(b.live_bytes > 0.7 * b.file_bytes for b in layers)
    assert all(b.open_bytes < 0.3 * b.file_bytes for b in layers)  # mmapped, untouched until run


def test_stored_and_reused_until_the_model_changes(toy_copy):
    first = ensure_profile(toy_copy)
    assert (toy_copy / PROFILE_NAME).is_file()
    assert load_profile(toy_copy) == first
    assert ensure_profile(toy_copy) == first  # reused, not measured again
    data = json.loads((toy_copy / PROFILE_NAME).read_text())
    data["fingerprint"]["onnxruntime"] = "0.0.1"
    (toy_copy / PROFILE_NAME).write_text(json.dumps(data))
    assert load_profile(toy_copy) is None  # another ONNX Runtime: measure again
    ensure_profile(toy_copy)
    manifest = json.loads((toy_copy / "manifest.json").read_text())
    manifest["name"] = "renamed"
    (toy_copy / "manifest.json").write_text(json.dumps(manifest))
    assert load_profile(toy_copy) is None  # another model


def test_load_plans_with_the_profile(toy_copy):
    with hermes_ort.load(toy_copy, memory_budget="1GB") as model:
        assert model.plan.cost_source == "estimate"
    with hermes_ort.load(toy_copy, memory_budget="1GB", strategy="auto") as model:
        assert model.plan.cost_source == "profile" and model.plan.strategy == "pipeload"
        assert model.plan.predicted_peak_bytes <= 10**9
        out = model.run(model.sample_inputs())
    with hermes_ort.load(toy_copy, strategy="full") as full:
        np.testing.assert_allclose(
            out["logits"], full.run(full.sample_inputs())["logits"], atol=1e-5
        )
    with hermes_ort.load(toy_copy, memory_budget="1GB") as model:  # now stored: used by default
        assert model.plan.cost_source == "profile"


def test_the_first_pass_is_predicted_from_what_is_cached_now(tmp_path):
    """Under a budget later passes re-read streamed blocks from storage; the first pass reads
    what the page cache holds at load time: cached files predict a faster first pass."""
    from hermes_ort.memory import drop_file_cache
    from hermes_ort.model import cached_now
    from hermes_ort.readahead import warm_files

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


def test_the_prologue_is_read_in_small_folios_and_layers_sequentially(toy_copy, monkeypatch):
    """An embedding table is looked up a few rows at a time: read in large folios, a lookup maps
    whole folios (bert-base's prologue: 59 MB resident instead of 10)."""
    from hermes_ort import loader

    calls = []
    monkeypatch.setattr(
        loader, "read_ahead", lambda path, sequential: calls.append((path, sequential)) or 0
    )
    manifest = hermes_ort.load_manifest(toy_copy)
    for spec in manifest.blocks:
        calls.clear()
        loader.read_ahead_block(spec, [toy_copy / f.path for f in spec.files])
        for (path, sequential), f in zip(calls, spec.files, strict=True):
            assert sequential == (spec.kind != "prologue" and spec.is_own(f)), (spec.name, path)
