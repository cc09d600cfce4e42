"""The cost model's arithmetic on synthetic numbers (no ONNX Runtime): the peak formula, the
safety margin, prepacking swaps, estimates from file sizes and measured costs from a profile."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cost_fixtures import block_costs, column, with_columns

from hermes_ort.core.manifest import BlockSpec, FileSpec, Manifest, TensorSpec
from hermes_ort.planning.cost_model import (
    ACTIVATION_RESERVE_BYTES,
    ESTIMATE_WARMUP_BYTES,
    CostModel,
    activation_peak,
    output_bytes,
    room,
    within_margin,
)
from hermes_ort.planning.layer_profile import BlockProfile, Profile
from hermes_ort.planning.schedule import BlockTimes

T = BlockTimes(0.01, 0.01, 0.01)


def cost(live=(10, 20, 30, 40), open_=1, baseline=1000, activations=5, **kw) -> CostModel:
    return CostModel(
        baseline_bytes=baseline,
        blocks=block_costs(live, open_, T),
        activation_bytes=activations,
        **kw,
    )


def test_peak_is_the_baseline_the_kept_blocks_and_the_worst_window():
    c = cost()
    # window 1, no lag: one streamed block at a time, the largest
    assert c.peak((), 1, 0) == 1000 + 40 + 5
    # window 2 with lag: a block, the one before it (still being destroyed): 30 + 40
    assert c.peak((), 2, 1) == 1000 + 70 + 5
    # window 3 without lag: a block and the next two opened ahead (1 byte each, untouched)
    assert c.peak((), 3, 0) == 1000 + max(10 + 2, 20 + 2, 30 + 1, 40) + 5
    # keeping blocks 1 and 3: they count once, the window streams 0 and 2
    assert c.peak((1, 3), 2, 1) == 1000 + 60 + (10 + 30) + 5
    assert c.peak((0, 1, 2, 3), 1) == 1000 + 100 + 5  # everything kept: no window


def test_kept_overhead_and_prepack_transients_add_to_the_peak():
    c = with_columns(
        replace(cost(), kept_overhead=0.5),
        resident_prepack=(True,) * 4,
        prepack_transient_bytes=(7, 8, 9, 100),
    )
    assert c.peak((0, 1), 1, 0) == 1000 + int(30 * 1.5) + 40 + 5 + 8  # one agent: the larger
    assert c.peak((0, 1), 1, 0, loaders=2) == 1000 + int(30 * 1.5) + 40 + 5 + 8 + 7


def test_the_safety_margin_is_the_least_budget_that_holds_a_peak():
    for peak in (1, 999, 10**6, 123_456_789):
        budget = within_margin(peak)
        assert room(budget) >= peak > room(budget - 1)
    assert cost().min_budget() == within_margin(cost().peak((), 1, 0))


def test_with_prepack_swaps_bytes_and_times_of_the_chosen_blocks_only():
    fast = BlockTimes(0.02, 0.001, 0.001)
    c = with_columns(
        cost(),
        resident_prepack=(True, True, False, False),
        resident_bytes=(11, 22, 30, 40),
        resident_times=(fast,) * 4,
        plain_resident_times=(T,) * 4,
    )
    chosen = c.with_prepack(frozenset({0, 2}))
    assert column(chosen, "resident_prepack") == (
        True,
        False,
        False,
        False,
    )  # 2 cannot be prepacked
    assert column(chosen, "resident_bytes") == (11, 20, 30, 40)
    assert column(chosen, "resident_times") == (fast, T, T, T)


def _manifest(sizes=(1000, 4000, 4000, 50), outputs=(("h", ["batch_size", 8, 2]),)) -> Manifest:
    kinds = ["prologue"] + ["layers"] * (len(sizes) - 2) + ["epilogue"]
    blocks = []
    for i, (size, kind) in enumerate(zip(sizes, kinds, strict=True)):
        name = f"b{i}"
        blocks.append(
            BlockSpec(
                name,
                kind,
                (),
                f"{name}.onnx",
                (f"t{i}",),
                (f"t{i + 1}",),
                (FileSpec(f"{name}.onnx", size, "x"),),
            )
        )
    outs = tuple(TensorSpec(n, "float32", tuple(s)) for n, s in outputs)
    return Manifest(
        "m",
        "toy",
        "t",
        {},
        (TensorSpec("t0", "int64", (1,)),),
        outs,
        tuple(blocks),
        None,
        sample={"batch_size": 3},
    )


def test_estimates_from_file_sizes():
    m = _manifest()
    assert output_bytes(m) == 3 * 8 * 2 * 4
    c = CostModel.estimate(m, 50_000)
    assert c.source == "estimate" and column(c, "sparse") == (
        True,
        False,
        False,
        False,
    )  # the prologue
    assert c.baseline_bytes == 50_000
    assert c.activation_bytes == 4 * output_bytes(m) + ACTIVATION_RESERVE_BYTES
    assert c.blocks[1].live_bytes > 4000 and c.blocks[1].live_bytes == c.blocks[2].live_bytes
    warm = CostModel.estimate(m, 50_000, warmup_pending=True)
    assert warm.baseline_bytes == 50_000 + ESTIMATE_WARMUP_BYTES


def _profile(n=4, **block) -> Profile:
    base = dict(
        file_bytes=4000,
        cold_read_bytes=4000,
        readahead_cold_s=0.5,
        readahead_cold_cpu_s=0.1,
        readahead_warm_s=0.01,
        create_s=0.002,
        create_prepack_s=0.05,
        first_run_s=0.02,
        run_s=0.01,
        run_prepack_s=0.005,
        live_bytes=3000,
        live_anon_bytes=100,
        live_file_bytes=2900,
        live_prepack_bytes=3500,
        prepack_transient_bytes=400,
        open_bytes=10,
        transient_bytes=77,
        output_bytes=64,
    )
    blocks = tuple(BlockProfile(name=f"b{i}", **{**base, **block}) for i in range(n))
    return Profile({}, 1, 8, 60_000, 9_000, 11, 1e9, blocks, first_pass_extra_s=0.3)


def test_measured_costs_from_a_profile():
    m, p = _manifest(), _profile()
    c = CostModel.from_profile(m, p, 50_000, cold=True)
    assert (
        c.source == "profile" and column(c, "resident_prepack") == (True,) * 4
    )  # 0.005 < 0.97 x 0.01
    assert c.blocks[1].stream_times.load_s == pytest.approx(
        0.5 + 0.002
    )  # read from storage + create
    assert c.blocks[1].resident_times.steady_run_s == 0.005 and c.blocks[1].resident_bytes == 3500
    # the worst block's transient plus what is in flight while it runs: its inputs (the block
    # before's outputs) and its own outputs; then the calibrated engine overhead
    assert c.activation_bytes == activation_peak(m, p) + 11 == 77 + 2 * 64 + 11
    warm = CostModel.from_profile(m, p, 50_000, cold=False)
    assert warm.blocks[1].stream_times.load_s == pytest.approx(0.01 + 0.002)  # from the page cache
    cached = CostModel.from_profile(m, p, 50_000, cold=True, cached=(True,) * 4)
    assert cached.blocks[1].stream_times.first_load_s == pytest.approx(0.01 + 0.002)
    first = CostModel.from_profile(m, p, 50_000, cold=True, warmup_pending=True)
    assert first.baseline_bytes == 50_000 + 9_000 and first.first_pass_extra_s == 0.3
    assert c.first_pass_extra_s == 0.0  # a process that has opened sessions already


def test_a_block_that_touches_little_of_its_files_is_sparse():
    c = CostModel.from_profile(_manifest(), _profile(live_bytes=1000), 0, cold=True)
    assert column(c, "sparse") == (True,) * 4 and c.blocks[0].stream_times.load_s == pytest.approx(
        0.002
    )


def test_a_block_that_runs_only_prepacked_is_streamed_prepacked():
    """int4 MatMulNBits unpacked dequantizes its weight every run: measured slower to run than
    to pack, such a block is streamed prepacked, with the packed bytes live and opened ahead."""
    slow_unpacked = dict(
        create_s=0.008,
        first_run_s=0.25,
        run_s=0.25,
        create_prepack_s=0.07,
        run_prepack_s=0.003,
        live_bytes=27_000,
        open_bytes=10,
        live_prepack_bytes=41_000,
        prepack_transient_bytes=30_000,
    )
    m, p = _manifest(), _profile(**slow_unpacked)
    c = CostModel.from_profile(m, p, 50_000, cold=True)
    assert column(c, "stream_prepack") == (True,) * 4
    assert c.blocks[1].stream_times.load_s == pytest.approx(0.5 + 0.07)
    assert c.blocks[1].stream_times.first_run_s == 0.003
    assert c.blocks[1].live_bytes == c.blocks[1].open_bytes == 41_000
    # streaming one at a time still pays one packing transient
    assert c.peak((), 1, 0) == 50_000 + 41_000 + c.activation_bytes + 30_000
    # kept unpacked, it is the mapped session's size (and its slow runs)
    assert c.with_prepack(frozenset()).blocks[1].resident_bytes == 27_000
    fp32 = CostModel.from_profile(m, _profile(), 50_000, cold=True)
    assert column(fp32, "stream_prepack") == (False,) * 4  # mapped: 2 ms + 20 ms beats 50 ms + 5 ms


def test_estimates_stream_nbits_blocks_prepacked():
    from dataclasses import replace

    m = replace(_manifest(), quantization={"mode": "int4", "method": "nbits"})
    c = CostModel.estimate(m, 50_000)
    assert column(c, "stream_prepack") == (
        False,
        True,
        True,
        True,
    )  # the prologue is a sparse lookup
    assert (
        c.blocks[1].stream_times.load_cpu_s > 0 and c.blocks[1].open_bytes == c.blocks[1].live_bytes
    )
    dynamic = replace(m, quantization={"mode": "int8", "method": "dynamic"})
    assert column(CostModel.estimate(dynamic, 50_000), "stream_prepack") == (False,) * 4
