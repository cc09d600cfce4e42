"""Paged blocks in the engine and the planner (streaming/paged_blocks.py, planning/paging.py): at
`min` a tiny int4 decoder's streamed blocks are paged; its outputs and greedy tokens equal the
all-resident run's; a later pass opens no session of a paged block; a damaged saved copy, a full
disk or a cache that cannot be written falls back to re-created sessions (a warning naming the
block, the same outputs); paging off plans as before; the cost model counts what paged blocks
keep."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from cost_fixtures import block_costs

import hermes_ort
from hermes_ort.core.choices import BlockKind
from hermes_ort.core.manifest import load_manifest
from hermes_ort.planning.cost_model import CostModel, within_margin
from hermes_ort.planning.page_cache import PageCachePolicy
from hermes_ort.planning.paging import PagedCost, PagingPolicy
from hermes_ort.planning.pipeline_planner import plan_pipeload
from hermes_ort.planning.schedule import BlockTimes
from hermes_ort.streaming import packed_copies
from hermes_ort.streaming.paged_blocks import PagingFallback

try:
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

PROMPT = [3, 14, 15, 92, 65, 35]
TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def int4_source(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting needs torch")
    out = tmp_path_factory.mktemp("paged-engine") / "tiny-llama-int4"
    assert fx.export_cli(out, "--preset", "tiny-llama", "--quantize", "int4", full_model=False) == 0
    return out


@pytest.fixture
def int4_dir(int4_source, private) -> Path:
    return private(int4_source)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A packed-copy cache of this test alone."""
    path = tmp_path / "packed"
    monkeypatch.setenv(packed_copies.CACHE_ENV, str(path))
    return path


@pytest.fixture(scope="module")
def resident_run(int4_source, tmp_path_factory):
    """Every block resident and prepacked (no budget): outputs of a sample and greedy tokens."""
    import shutil

    model_dir = Path(shutil.copytree(int4_source, tmp_path_factory.mktemp("r") / "m"))
    with hermes_ort.load(model_dir) as model:
        assert not model.plan.paged and len(model.plan.resident) == len(model.manifest.blocks)
        feeds = model.sample_inputs(batch_size=1, sequence_length=7, seed=3)
        return feeds, model.run(feeds), model.generate(PROMPT, max_new_tokens=8)


def _pageable(model_dir: Path) -> tuple[int, ...]:
    """The blocks that run MatMulNBits (the prologue's table lookup does not)."""
    blocks = load_manifest(model_dir).blocks
    return tuple(i for i, b in enumerate(blocks) if b.kind != BlockKind.PROLOGUE)


def _same(outputs: dict, expected: dict) -> None:
    assert outputs.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(outputs[name], value, **TOL, err_msg=name)


class _Sessions:
    """Every ORT session created, by the stem of the file it opened."""

    def __init__(self, monkeypatch):
        self.opened: list[str] = []
        real = ort.InferenceSession.__init__

        def spy(session, path, *args, **kwargs):
            self.opened.append(Path(str(path)).stem)
            real(session, path, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, "__init__", spy)


def test_min_pages_the_streamed_int4_blocks_and_equals_the_resident_run(
    int4_dir, cache, resident_run, monkeypatch
):
    feeds, expected, tokens = resident_run
    sessions = _Sessions(monkeypatch)
    with hermes_ort.load(int4_dir, memory_budget="min") as model:
        plan = model.plan
        assert plan.paged == _pageable(int4_dir) and not plan.resident
        assert any("paged: sessions kept open on saved packed copies" in r for r in plan.reasons)
        assert plan.to_json()["paged"] == list(plan.paged)
        _same(model.run(feeds), expected)
        names = [model.manifest.blocks[i].name for i in model.plan.paged]
        assert set(names) <= set(sessions.opened)  # opened (and saved) once, before the pass
        sessions.opened.clear()
        _same(model.run(feeds), expected)
        # a later pass prefetches the paged blocks: only the mapped prologue is re-created
        assert not set(names) & set(sessions.opened), sessions.opened
        assert all(b.create_s == 0.0 for b in model.stats.blocks if b.name in names)
        np.testing.assert_array_equal(model.generate(PROMPT, max_new_tokens=8), tokens)
        assert not set(names) & set(sessions.opened), sessions.opened  # re-planned, kept open
    assert {p.name.split("-")[0] for p in cache.iterdir()} >= set(names)


def test_a_damaged_saved_copy_falls_back_with_a_warning(int4_dir, cache, resident_run):
    feeds, expected, _ = resident_run
    with hermes_ort.load(int4_dir, memory_budget="min") as model:
        model.run(feeds)  # saves every copy
    (saved,) = cache.glob("layer_01-*/layer_01.data")
    raw = bytearray(saved.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    saved.write_bytes(bytes(raw))
    with hermes_ort.load(int4_dir, memory_budget="min") as model:
        with pytest.warns(PagingFallback, match="block 'layer_01' cannot be paged.*damaged"):
            _same(model.run(feeds), expected)
        _same(model.run(feeds), expected)  # re-created every pass, without a warning again


def test_a_full_disk_while_saving_falls_back_and_leaves_no_copy(
    int4_dir, cache, resident_run, monkeypatch
):
    feeds, expected, _ = resident_run

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packed_copies.os, "rename", full)
    with (
        hermes_ort.load(int4_dir, memory_budget="min") as model,
        pytest.warns(PagingFallback, match="No space left") as caught,
    ):
        _same(model.run(feeds), expected)
    assert len(caught) == len(_pageable(int4_dir))
    assert not [p for p in cache.iterdir() if not p.name.startswith(".probe")]


def test_no_writable_cache_means_no_paging_and_the_plan_says_why(
    int4_dir, tmp_path, monkeypatch, resident_run
):
    feeds, expected, _ = resident_run
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(packed_copies.CACHE_ENV, str(blocker / "packed"))
    with hermes_ort.load(int4_dir, memory_budget="min") as model:
        assert model.plan.paged == ()
        assert any("no paging: the packed-copy cache" in r for r in model.plan.reasons)
        _same(model.run(feeds), expected)


def test_paging_off_plans_as_before(int4_dir, cache):
    with hermes_ort.load(int4_dir, memory_budget="min", paging="off") as model:
        plan, cost = model.plan, model.cost
        assert plan.paged == () and "paging off as asked" in " ".join(plan.reasons)
        assert all(plan.blocks[i].settings.prepack for i in _pageable(int4_dir))
    assert not cache.exists()  # nothing saved, the cache not even made
    dropped = PageCachePolicy(any(b.drop_pages for b in plan.blocks), "")
    unpaged = plan_pipeload(cost.without_paging(), plan.budget_bytes, page_cache=dropped)
    assert plan.mechanism == unpaged.mechanism
    with pytest.raises(hermes_ort.OptionError, match="paging"):
        hermes_ort.load(int4_dir, paging="sometimes")


def test_the_profiler_measures_paged_blocks(int4_dir, cache):
    from hermes_ort.measure.profiler import profile_model

    manifest = load_manifest(int4_dir)
    profile = profile_model(int4_dir)
    paged = [b for b in profile.blocks if b.paged_bytes > 0]
    assert paged, "no block measured paged"  # the MatMulNBits blocks stream prepacked
    for b in paged:
        assert b.paged_open_bytes > 0 and b.paged_open_s > 0 and b.prefetch_warm_s > 0
        assert b.paged_anon_bytes < b.live_prepack_bytes + (1 << 20)
    cost = CostModel.from_profile(manifest, profile, 0, cold=False)
    for b, c in zip(profile.blocks, cost.blocks, strict=True):
        assert (c.paging is not None) == (c.stream_prepack and b.paged_bytes > 0)
        if c.paging is not None:
            assert c.paging.packed_bytes == b.paged_bytes
            assert c.paging.times.load_s == b.prefetch_warm_s
    bandwidth = profile.read_bandwidth_bytes_per_s  # 0: nothing read long enough to time
    cold = CostModel.from_profile(manifest, profile, 0, cold=True)
    for c in (c for c in cold.blocks if c.paging is not None and bandwidth > 0):
        assert c.paging.times.load_s == c.paging.packed_bytes / bandwidth  # from storage


# -- the arithmetic, on synthetic costs -------------------------------------------------------
def _pageable_costs(live=(100, 200, 300), anon=10, packed=80, opening=250) -> CostModel:
    """Three prepacked streamed blocks that can be paged: each keeps `anon` bytes, maps
    `packed` (None: its live size less 50, its session's structures) and holds `opening` once."""
    slow = BlockTimes(0.05, 0.01, 0.01, 0.05)
    fast = BlockTimes(0.001, 0.01, 0.01, 0.001)
    blocks = tuple(
        replace(
            b,
            stream_prepack=True,
            paging=PagedCost(anon, x - 50 if packed is None else packed, opening, 0.04, fast),
        )
        for b, x in zip(block_costs(live, 1, slow), live, strict=True)
    )
    return CostModel(baseline_bytes=1000, blocks=blocks, activation_bytes=5)


def test_the_peak_counts_what_paged_blocks_keep_and_their_opening():
    c = _pageable_costs(packed=None)
    paged = c.with_paged(frozenset({0, 1, 2}))
    # window 1: the largest packed copies mapped, and every block's anonymous remainder
    assert paged.peak((), 1, 0) == 1000 + 250 + 3 * 10 + 5
    # one paged block kept resident: its remainder is not counted twice
    assert paged.peak((2,), 1, 0) == 1000 + 300 + 150 + 2 * 10 + 5
    # opening, one at a time before the first pass: the others' remainders and one opening
    big = replace(c, blocks=tuple(_opening(b, 2000) for b in c.blocks))
    assert big.with_paged(frozenset({0, 1, 2})).peak((), 1, 0) == 1000 + 3 * 10 + (2000 - 10)
    # min: the smallest of paging (the three, the two smallest openings, ...) and re-creating
    assert c.min_budget() == within_margin(1000 + 250 + 30 + 5)
    assert c.with_paged(frozenset()).peak((), 1, 0) == 1000 + 300 + 5  # re-created: larger
    assert big.min_budget() == within_margin(1000 + 300 + 5)  # opening too large: re-created


def _opening(b, open_bytes=None, open_s=None):
    p = b.paging
    return replace(
        b,
        paging=replace(
            p,
            open_bytes=p.open_bytes if open_bytes is None else open_bytes,
            open_s=p.open_s if open_s is None else open_s,
        ),
    )


def test_min_pays_no_paging_that_does_not_fit_and_the_planner_says_so():
    heavy = _pageable_costs(anon=150)  # 3 x 150 kept: more than re-creating saves
    assert heavy.min_peak()[1] == frozenset()
    plan = plan_pipeload(heavy, heavy.min_budget())
    assert plan.paged == () and any("does not fit the budget" in r for r in plan.reasons)
    roomy = plan_pipeload(heavy, 10_000)  # everything resident
    assert roomy.paged == () and len(roomy.resident) == 3
    light = _pageable_costs()
    plan = plan_pipeload(light, light.min_budget())
    assert plan.paged == (0, 1, 2) and plan.prediction.peak_bytes <= light.min_budget()
    unpaged = light.without_paging().min_budget()
    off = plan_pipeload(light, unpaged, paging=PagingPolicy(False, "paging off"))
    assert off.paged == () and "paging off" in off.reasons


def test_one_shot_plans_leave_paging_out_when_opening_costs_the_first_pass():
    c = _pageable_costs()
    c = replace(c, blocks=tuple(_opening(b, open_s=1.0) for b in c.blocks))
    both_fit = c.without_paging().min_budget()
    plan = plan_pipeload(c, both_fit, objective="one-shot")
    assert plan.paged == () and any("slow the first pass" in r for r in plan.reasons)
    assert plan_pipeload(c, both_fit).paged  # later passes: paged
    assert plan_pipeload(c, c.min_budget(), objective="one-shot").paged  # the only way to fit


def test_blocks_kept_first_leave_room_to_page_the_others():
    """Keeping a block whose creation holds a transient (a prepacked head) can free more than
    it takes: the planner then pages the other blocks beside it, though paging them with
    nothing kept does not fit."""
    c = _pageable_costs(live=(300, 300, 500), anon=5)
    head = replace(c.blocks[2], paging=None, prepack_transient_bytes=300)
    c = replace(c, blocks=(*c.blocks[:2], head))
    assert c.min_peak() == (1000 + 500 + 300 + 5, frozenset())  # min: nothing paged
    plan = plan_pipeload(c, c.min_budget())
    assert plan.resident == (2,) and plan.paged == (0, 1)
    assert plan.prediction.peak_bytes == 1000 + 500 + 2 * 5 + 80 + 5
