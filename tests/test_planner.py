"""The planner: respects the budget in its own prediction, uses more memory for speed as the budget
grows, keeps everything when the model fits, and refuses what cannot run."""

from __future__ import annotations

import pytest
from cost_fixtures import block_costs, column, with_columns

import hermes_ort
from hermes_ort.planning.cost_model import CostModel, within_margin
from hermes_ort.planning.pipeline_planner import check_budget, plan_pipeload, plan_strategy
from hermes_ort.planning.schedule import BlockTimes

MB = 1 << 20


def synthetic(
    blocks: int = 14, load_s: float = 0.02, run_s: float = 0.011, live: int = 28 * MB
) -> CostModel:
    """A BERT-base-like model: loading takes longer than running, every layer the same size."""
    return CostModel(
        baseline_bytes=80 * MB,
        blocks=block_costs(
            (live,) * blocks,
            100_000,
            BlockTimes(load_s, run_s * 1.1, run_s),
            BlockTimes(load_s, run_s, run_s),
        ),
        activation_bytes=8 * MB,
        source="test",
    )


def test_plan_respects_budget_and_grows_with_it():
    cost = synthetic()
    budgets = [cost.min_budget() + extra * MB for extra in (0, 1, 30, 60, 120, 250, 600)]
    plans = [plan_pipeload(cost, b, cores=2) for b in budgets]
    for budget, plan in zip(budgets, plans, strict=True):
        assert plan.prediction.peak_bytes <= budget
        assert plan.prediction.peak_bytes == cost.peak(plan.resident, plan.window, plan.lag)
    memory = [p.prediction.peak_bytes for p in plans]
    latency = [p.prediction.latency_s for p in plans]
    assert memory == sorted(memory) and memory[-1] > memory[0]
    assert latency == sorted(latency, reverse=True) and latency[-1] < latency[0]
    assert plans[-1].resident == tuple(range(14))  # the whole model fits: keep it all
    assert (
        plans[0].resident == () and plans[0].lag == 0
    )  # the tightest budget evicts before running


def test_window_grows_when_loading_is_the_bottleneck():
    cost = synthetic(load_s=0.05)
    small = plan_pipeload(cost, cost.min_budget(), cores=2)
    roomy = plan_pipeload(cost, within_margin(cost.peak((), 6, 1)), cores=2)
    assert small.window <= roomy.window and roomy.loaders == 2


def test_no_budget_keeps_everything():
    plan = plan_pipeload(synthetic(), None, cores=2)
    assert plan.resident == tuple(range(14)) and not any(b.drop_pages for b in plan.blocks)


def test_infeasible_budget_names_the_smallest():
    cost = synthetic()
    names = tuple(f"b{i}" for i in range(14))
    with pytest.raises(
        hermes_ort.BudgetError,
        match=rf"smallest workable budget is .* \({cost.min_budget()} bytes\)",
    ):
        check_budget(cost, cost.min_budget() - 1, names)
    check_budget(cost, cost.min_budget(), names)


def test_overrides_are_obeyed():
    cost = synthetic()
    plan = plan_pipeload(cost, cost.peak((), 3, 1) + 5 * MB, cores=2, loaders=1, window=3)
    assert (plan.loaders, plan.window) == (1, 3)
    with pytest.raises(hermes_ort.BudgetError, match="window 8 needs"):
        plan_pipeload(cost, cost.min_budget(), cores=2, window=8)


def test_baselines_are_fixed_mechanisms():
    """Each plan states its mechanism block by block: the baselines' are fixed by the strategy
    table, the load path decides how their sessions open."""
    from hermes_ort.core.settings import ORT_DEFAULT, STREAMING

    cost = synthetic()
    pipeswitch = plan_strategy("pipeswitch", cost, None)
    assert pipeswitch.resident == tuple(range(14)) and pipeswitch.engine == "blocks"
    assert {b.settings for b in pipeswitch.blocks} == {ORT_DEFAULT}
    ondemand = plan_strategy("ondemand", cost, None)
    assert (ondemand.loaders, ondemand.window, ondemand.resident) == (1, 1, ())
    assert all(b.settings == ORT_DEFAULT and not b.readahead for b in ondemand.blocks)
    stream = plan_strategy("ondemand", cost, None, load_path="stream")
    assert all(b.settings == STREAMING and b.readahead for b in stream.blocks)
    assert not any(b.drop_pages for p in (pipeswitch, ondemand, stream) for b in p.blocks)
    with pytest.raises(hermes_ort.OptionError, match="unknown strategy 'fast'"):
        plan_strategy("fast", cost, None)
    with pytest.raises(hermes_ort.OptionError, match="unknown load_path 'disk'"):
        plan_strategy("ondemand", cost, None, load_path="disk")
    with pytest.raises(hermes_ort.OptionError, match=r"unknown load_path 'disk' \(choose from"):
        hermes_ort.load("nowhere", strategy="ondemand", load_path="disk")  # before any file


def test_pipeload_plans_say_what_each_block_does():
    """Under a budget: kept blocks stay, prepacked where the plan says so, the sparse prologue is
    neither read ahead nor dropped, every other streamed block's pages go back after its run."""

    cost = with_columns(synthetic(), sparse=(True,) + (False,) * 13)
    plan = plan_pipeload(cost, cost.peak(tuple(range(4)), 2) + 10 * MB, cores=2)
    assert 0 < len(plan.resident) < 14
    for i, b in enumerate(plan.blocks):
        assert b.readahead == (i != 0)
        assert b.drop_pages == ((not b.resident and i != 0) or (b.resident and b.settings.prepack))
    unbudgeted = plan_pipeload(cost, None, cores=2)
    assert not any(b.drop_pages for b in unbudgeted.blocks)


def test_whole_model_plans_name_their_file():
    from hermes_ort.core.manifest import FullModelSpec
    from hermes_ort.core.settings import ORT_DEFAULT, WHOLE_MMAP

    class Manifest:  # the fields a whole-model plan reads
        name = "m"
        full_model = FullModelSpec("full/model_inline.onnx", ())
        full_model_mmap = FullModelSpec("full/model.onnx", ())
        packed_weights = False  # fp32: full-mmap keeps its weights mapped

    cost = synthetic()
    full = plan_strategy("full", cost, None, manifest=Manifest)
    mmap = plan_strategy("full-mmap", cost, None, manifest=Manifest)
    assert (full.engine, full.whole.path, full.whole_settings) == (
        "whole",
        "full/model_inline.onnx",
        ORT_DEFAULT,
    )
    assert (mmap.whole.path, mmap.whole_settings) == ("full/model.onnx", WHOLE_MMAP)
    Manifest.packed_weights = True  # MatMulNBits: mapped, it would dequantize on every run
    assert plan_strategy("full-mmap", cost, None, manifest=Manifest).whole_settings.prepack
    Manifest.packed_weights = False
    Manifest.full_model_mmap = None  # an older export: full-mmap opens what there is
    assert plan_strategy("full-mmap", cost, None, manifest=Manifest).whole.path.endswith(
        "inline.onnx"
    )
    Manifest.full_model = None  # a streaming export has no whole-model file
    with pytest.raises(hermes_ort.ManifestError, match="no whole-model file"):
        plan_strategy("full", cost, None, manifest=Manifest)


def test_the_calibrated_kept_overhead_is_planned_for():
    """Kept blocks hold a calibrated share more than their profiles add up to: the plan makes
    room for it, keeping fewer blocks under the same budget, and its prediction includes it."""
    from dataclasses import replace

    cost = synthetic()
    padded = replace(cost, kept_overhead=0.05)
    keep = tuple(range(6))
    assert padded.peak(keep, 2) - cost.peak(keep, 2) == int(6 * 28 * MB * 1.05) - 6 * 28 * MB
    assert padded.min_budget() == cost.min_budget()  # nothing kept: nothing added
    budget = within_margin(cost.peak(keep, 2, 0) + MB)
    plain, careful = plan_pipeload(cost, budget, cores=2), plan_pipeload(padded, budget, cores=2)
    assert len(careful.resident) < len(plain.resident)
    assert (
        careful.prediction.peak_bytes
        == padded.peak(careful.resident, careful.window, careful.lag)
        <= budget
    )


def test_prepacking_a_kept_block_counts_its_creation_transient():
    """While a prepacked session is created it holds its mapped weights beside the packed copies
    (gpt2-medium's tied lm_head: +206 MB for a moment): each loading agent may be creating one."""

    cost = with_columns(
        synthetic(),
        resident_prepack=(True,) * 14,
        prepack_transient_bytes=tuple(i * MB for i in range(14)),
    )
    keep = (3, 5, 9)
    base = with_columns(cost, prepack_transient_bytes=(0,) * 14).peak(keep, 2)
    assert cost.peak(keep, 2, loaders=1) - base == 9 * MB
    assert cost.peak(keep, 2, loaders=2) - base == (9 + 5) * MB
    assert cost.with_prepack(frozenset()).peak(keep, 2, loaders=2) == base  # none prepacked
    plan = plan_pipeload(cost, cost.peak(keep, 2) + 20 * MB, cores=2)
    assert plan.prediction.peak_bytes == cost.with_prepack(frozenset(plan.prepack_resident)).peak(
        plan.resident, plan.window, plan.lag, plan.loaders
    )


def test_one_shot_objective_skips_prepacking_that_slows_the_first_pass():
    """Prepacked kept blocks run 2x faster but take 3x as long to create: the repeated objective
    prepacks them all, the one-shot objective none (its first pass is the faster one)."""

    plain = synthetic()
    cost = with_columns(
        plain,
        resident_prepack=(True,) * 14,
        resident_bytes=(32 * MB,) * 14,
        resident_times=(BlockTimes(0.06, 0.0055, 0.0055),) * 14,
        plain_resident_times=column(plain, "resident_times"),
    )
    repeated = plan_pipeload(cost, None, cores=2)
    one_shot = plan_pipeload(cost, None, cores=2, objective="one-shot")
    assert repeated.prepack_resident == tuple(range(14)) and one_shot.prepack_resident == ()
    assert one_shot.prediction.first_latency_s < repeated.prediction.first_latency_s
    assert repeated.prediction.latency_s < one_shot.prediction.latency_s
    assert any("prepacking would slow the first pass" in r for r in one_shot.reasons)
    # under a budget too: the same resident blocks, and within it
    budget = cost.peak(tuple(range(6)), 2) + 30 * MB
    assert plan_pipeload(cost, budget, cores=2).prepack_resident  # repeated prepacks some here
    capped = plan_pipeload(cost, budget, cores=2, objective="one-shot")
    assert capped.prepack_resident == () and capped.prediction.peak_bytes <= budget
    with pytest.raises(ValueError, match="'fast' is not a valid Objective"):
        plan_pipeload(cost, None, objective="fast")  # users' values are checked by load
    with pytest.raises(hermes_ort.OptionError, match="unknown objective 'fast'"):
        hermes_ort.load("nowhere", objective="fast")
