"""Batches under a budget: the plan counts the batch it is given, each block runs over the whole
batch (in micro-batches when its intermediates would not fit), outputs equal unbatched runs, and a
batch the budget cannot hold is refused with the budget it needs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from toy_model import write_toy_model

import hermes_ort
from hermes_ort.planning.cost_model import CostModel
from hermes_ort.tensors.batch import BatchShape, micro_batches, run_in_micro_batches

MB = 1 << 20


@pytest.fixture(scope="module")
def wide_source(tmp_path_factory):
    # 6 layers of 512x512 fp32 (1 MiB each); hidden states 8 rows x 64 positions x 512 = 1 MiB
    return write_toy_model(tmp_path_factory.mktemp("b") / "model", layers=6, hidden=512, vocab=64)


@pytest.fixture
def wide(wide_source, private):
    return private(wide_source)


def batch_of(model, rows: int, positions: int) -> dict[str, np.ndarray]:
    return model.sample_inputs(batch_size=rows, sequence_length=positions, seed=3)


def test_shapes_scale_and_micro_batches():
    sample = BatchShape(1, 128)
    assert BatchShape(8, 128).scale(sample) == 8.0
    assert BatchShape(1, 256).scale(sample) == 4.0  # attention scores: positions squared
    assert BatchShape(2, 64).scale(sample) == 1.0
    assert micro_batches(10) == [10, 5, 3, 2, 1] and micro_batches(1) == [1]


def test_run_in_micro_batches_joins_rows():
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    const = np.ones((1, 4), np.float32)  # not per row: every chunk gets it whole
    seen = []

    def run(feeds):
        seen.append(feeds["x"].shape[0])
        assert feeds["c"].shape == (1, 4)
        return [feeds["x"] * 2, np.float32(7) * np.ones((1,), np.float32)]

    out = run_in_micro_batches(run, {"x": x, "c": const}, rows=6, micro=4)
    assert seen == [4, 2]
    np.testing.assert_array_equal(out[0], x * 2)
    assert out[1].shape == (1,)


def test_cost_model_at_a_batch(wide):
    cost = CostModel.estimate(hermes_ort.load_manifest(wide), baseline_bytes=100 * MB)
    big = cost.at_batch(8.0, 2.0)
    fixed = cost.fixed_activation_bytes
    own = cost.activation_bytes - cost.inflight_bytes - fixed
    assert big.inflight_bytes == int(8 * cost.inflight_bytes)
    assert big.activation_bytes == int(fixed + own * 2 + cost.inflight_bytes * 8)
    assert big.blocks[1].stream_times.steady_run_s == pytest.approx(
        8 * cost.blocks[1].stream_times.steady_run_s
    )
    assert (
        big.blocks[1].stream_times.load_s == cost.blocks[1].stream_times.load_s
    )  # loads do not grow


def test_a_batch_under_a_budget_equals_unbatched_runs(wide):
    with hermes_ort.load(wide, strategy="full") as full:
        feeds = batch_of(full, 16, 64)
        want = [full.run({k: v[i : i + 1] for k, v in feeds.items()})["logits"] for i in range(16)]
    with hermes_ort.load(wide, memory_budget="min") as model:
        sample_plan = model.plan
        got = model.run(feeds)["logits"]
        plan = model.plan
    assert plan is not sample_plan and plan.batch.rows == 16 and plan.batch.positions == 64
    assert (
        plan.batch.micro_batch is not None and plan.batch.micro_batch < 16
    )  # "min" runs rows in chunks
    assert any(r.startswith("batch 16 x 64") for r in plan.reasons)
    scale = max(np.abs(w).max() for w in want)  # 1e-5 of the outputs' scale: GEMMs of other
    for i in range(16):  # row counts sum in another order
        np.testing.assert_allclose(got[i : i + 1], want[i], atol=1e-5 * scale, rtol=0)


def test_a_batch_the_budget_cannot_hold_is_refused(wide):
    with hermes_ort.load(wide, memory_budget="min") as model:
        budget = model.plan.budget_bytes
    with hermes_ort.load(wide, memory_budget=budget) as model:
        huge = batch_of(model, 512, 64)  # its tensors between blocks alone outgrow the budget
        with pytest.raises(hermes_ort.BudgetError, match="a batch of 512 x 64 positions"):
            model.run(huge)
        model.run(model.sample_inputs())  # the model still runs what fits


def test_cli_plans_and_runs_a_batch(wide):
    import subprocess
    import sys

    def hermes(*args):
        cmd = [sys.executable, "-m", "hermes_ort", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    r = hermes("plan", str(wide), "--budget", "min", "--batch", "64", "--no-profile")
    assert r.returncode == 0, r.stderr
    assert "batch 64 x 16 positions, each block run 1 row at a time" in r.stdout
    r = hermes("run", str(wide), "--budget", "min", "--batch", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["logits"]["shape"][0] == 8
    r = hermes("run", str(wide), "--batch", "0")
    assert r.returncode == 2 and "--batch must be at least 1, got 0" in r.stderr


def test_a_whole_batch_shape_vector_keeps_the_block_whole():
    x = np.ones((6, 4), np.float32)
    seen = []

    def run(feeds):
        seen.append(feeds["x"].shape[0])
        return [feeds["x"]]

    run_in_micro_batches(run, {"x": x, "shape": np.array([6, 4])}, rows=6, micro=4)
    assert seen == [6]  # its chunks would not match a shape computed for 6 rows
    seen.clear()
    out = run_in_micro_batches(run, {"x": x, "shape": np.array([-1, 6])}, rows=6, micro=4)
    assert seen == [4, 2] and out[0].shape == (6, 4)  # -1 (and a 6 elsewhere) fit any chunk


def test_the_engine_is_kept_across_batch_shapes(wide):
    with hermes_ort.load(wide, memory_budget="1GB") as model:  # everything resident
        engine = model._engine
        for rows, positions in ((4, 16), (4, 32), (2, 16), (4, 16)):
            model.run(batch_of(model, rows, positions))
            assert model.plan.batch.rows == rows and model.plan.batch.positions == positions
        assert model._engine is engine  # resident sessions not opened again
    model = hermes_ort.load(wide, memory_budget="min")
    with model, pytest.raises(hermes_ort.OptionError, match="rows must be a whole number"):
        model.plan_batch(0)
