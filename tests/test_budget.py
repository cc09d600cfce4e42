"""Memory budgets: refused when too small, obeyed by the plan, and memory really given back."""

from __future__ import annotations

import re

import numpy as np
import pytest
from toy_model import write_toy_model

import hermes_ort
from hermes_ort.planning.cost_model import CostModel
from hermes_ort.planning.pipeline_planner import check_budget, plan_pipeload
from hermes_ort.streaming.memory import rss_bytes

MB = 1 << 20


@pytest.fixture(scope="module")
def wide_source(tmp_path_factory):
    # 8 layers of 1024x1024 fp32 = 4 MiB each: large enough to see in RSS
    return write_toy_model(
        tmp_path_factory.mktemp("wide") / "model", layers=8, hidden=1024, vocab=64
    )


@pytest.fixture
def wide_toy(wide_source, private):
    return private(wide_source)


def test_too_small_budget_names_block_and_minimum(toy_dir):
    with pytest.raises(hermes_ort.BudgetError) as err:
        hermes_ort.load(toy_dir, memory_budget="10MB")
    message = str(err.value)
    assert "10.0 MB" in message and "block '" in message
    minimum = int(re.search(r"\((\d+) bytes\)", message).group(1))
    # the minimum works (plus slack: the baseline is the RSS at load time, which moves a little)
    with hermes_ort.load(toy_dir, memory_budget=minimum + MB) as model:
        assert model.plan.window == 1
        model.run(model.sample_inputs())


def test_bad_budget_strings_are_refused(toy_dir):
    for bad in ("lots", "-5MB", "12 parsecs", 0):
        with pytest.raises(ValueError, match="byte size"):
            hermes_ort.load(toy_dir, memory_budget=bad)


def test_plan_grows_with_budget_and_keeps_all_when_it_fits(wide_toy):
    manifest = hermes_ort.load_manifest(wide_toy)
    cost = CostModel.estimate(manifest, baseline_bytes=100 * MB)
    minimum = cost.min_budget()
    plans = [
        plan_pipeload(cost, minimum + extra, cores=2)
        for extra in (0, 5 * MB, 10 * MB, 20 * MB, 1000 * MB)
    ]
    for plan in plans:
        assert plan.prediction.peak_bytes <= plan.budget_bytes
    live = [p.window + len(p.resident) for p in plans]
    assert live == sorted(live) and live[0] == 1 and live[-1] > live[1]
    assert plans[-1].resident == tuple(range(10))  # the whole model fits: everything stays
    with pytest.raises(hermes_ort.BudgetError, match="smallest workable budget"):
        check_budget(cost, minimum - 1, tuple(b.name for b in manifest.blocks))


def test_streaming_gives_memory_back(wide_toy):
    model_bytes = hermes_ort.load_manifest(wide_toy).blocks_bytes
    with hermes_ort.load(wide_toy, strategy="full") as model:
        feeds = model.sample_inputs(sequence_length=8)
        expected = model.run(feeds)["logits"]
    with hermes_ort.load(wide_toy, window=2, loaders=1) as model:
        before = rss_bytes()
        np.testing.assert_allclose(
            model.run(feeds)["logits"], expected, atol=1e-5 * np.abs(expected).max()
        )
        s = model.stats
        after = rss_bytes()
    # at most ~2 live layers (plus the embedding block) at once, never the whole model
    assert s.peak_rss_bytes - s.rss_before_bytes < 0.6 * model_bytes
    assert after - before < 0.25 * model_bytes  # destroyed sessions really returned their memory


def test_resident_blocks_stay_mapped(wide_toy):
    with hermes_ort.load(wide_toy, strategy="pipeswitch", load_path="stream") as model:
        before = rss_bytes()
        model.run(model.sample_inputs(sequence_length=8))
        kept = rss_bytes() - before
    assert kept > 0.5 * hermes_ort.load_manifest(wide_toy).blocks_bytes


def test_the_page_cache_policy_is_planned_and_explained(wide_toy, monkeypatch):
    """Under a budget that streams, "drop" has the daemon drop streamed blocks' pages, "keep"
    leaves them to the kernel, and the plan's reasons say which; "auto" drops them under a
    memory cgroup limit with no room for the model's files, and keeps them with room to spare."""
    import hermes_ort.runtime.model_planner as planning

    minimum = hermes_ort.load(wide_toy, memory_budget="min").plan.budget_bytes + 4 * MB
    plans = {}
    for policy in ("drop", "keep"):
        with hermes_ort.load(wide_toy, memory_budget=minimum, page_cache=policy) as model:
            plans[policy] = model.plan
    streamed = [i for i, b in enumerate(plans["drop"].blocks) if not b.resident]
    assert streamed and any(plans["drop"].blocks[i].drop_pages for i in streamed)  # not sparse
    assert not any(b.drop_pages for b in plans["keep"].blocks)
    assert any("page cache: 'drop' as asked" in r for r in plans["drop"].reasons)
    monkeypatch.setattr(planning, "available_memory", lambda: 64 << 30)
    for limit, drops in ((minimum + MB, True), (None, False)):  # a cgroup with no room; none
        monkeypatch.setattr(planning, "cgroup_memory_limit", lambda limit=limit: limit)
        with hermes_ort.load(wide_toy, memory_budget=minimum) as model:
            assert any(b.drop_pages for b in model.plan.blocks) == drops
            why = [r for r in model.plan.reasons if r.startswith("page cache:")]
            assert why and ("cgroup limit" in why[0]) == drops and ("kept" in why[0]) != drops
    with pytest.raises(hermes_ort.OptionError, match="unknown page_cache 'sometimes'"):
        hermes_ort.load(wide_toy, memory_budget=minimum, page_cache="sometimes")
