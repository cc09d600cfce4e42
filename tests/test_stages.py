"""A model cut into stages (no Ray): what each stage takes and hands on, a chain of stages equal
to the whole model, and the split over boards: every stage within its board's budget, the slowest
stage as fast as any split allows, and clear refusals."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

import hermes_ort
from hermes_ort.cluster.split import Board, _Costs, split_blocks
from hermes_ort.cluster.stage_runner import StageRunner
from hermes_ort.cluster.stage_spec import allowed_cuts, stage_specs
from hermes_ort.core.errors import BudgetError, OptionError
from hermes_ort.core.manifest import load_manifest

try:  # tests/ on sys.path (pytest's default import mode) or tests/ as a package
    import export_fixtures as fx
except ImportError:  # pragma: no cover
    from tests import export_fixtures as fx

MB = 1 << 20


def board(name: str, budget_mb: float, baseline_mb: float = 1) -> Board:
    """With file-size estimates the toy runs in ~32 MB (1 MB baseline, ONNX Runtime's warm-up and
    an activation reserve), and all of it stays resident in ~43 MB."""
    return Board(name, f"id-{name}", int(budget_mb * MB), 5 * MB, int(baseline_mb * MB), 1)


def chain(model_dir, cuts, feeds, budgets=None):
    """The stages of `cuts` run in order on `feeds`; the last stage's outputs."""
    specs = stage_specs(load_manifest(model_dir), cuts)
    runners = [StageRunner(model_dir, s, (budgets or {}).get(s.index)) for s in specs]
    try:
        x = feeds
        for r in runners:
            x = r.run(x)
        return x, runners
    finally:
        for r in runners:
            r.close()


def test_a_tensor_read_several_blocks_back_travels_through_the_stages(toy_dir):
    """The toy's `mask` is made in the prologue and read by every layer: each stage in between
    hands it on; the last stage hands on the model's outputs only."""
    m = load_manifest(toy_dir)
    specs = stage_specs(m, (2, 4))
    assert [(s.first, s.last) for s in specs] == [(0, 2), (2, 4), (4, len(m.blocks))]
    for s in specs[:-1]:
        assert "mask" in s.hands_on
    assert set(specs[-1].hands_on) == set(m.output_names)
    assert specs[0].takes == tuple(t for t in m.input_names if t in specs[0].takes)


@pytest.mark.parametrize("cuts", [c for k in (1, 2, 3) for c in combinations(range(1, 6), k)])
def test_every_split_of_the_toy_equals_the_whole_model(toy_dir, cuts):
    with hermes_ort.load(toy_dir, strategy="full") as full:
        feeds = full.sample_inputs(batch_size=3)
        want = full.run(feeds)
    got, _ = chain(toy_dir, cuts, feeds)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)


def test_a_stage_under_its_smallest_budget_streams_and_still_agrees(toy_dir):
    with hermes_ort.load(toy_dir, strategy="full") as full:
        feeds = full.sample_inputs(batch_size=2)
        want = full.run(feeds)
    specs = stage_specs(load_manifest(toy_dir), (3,))
    probe = StageRunner(toy_dir, specs[1], None)
    budget = probe.planner.min_budget() + MB  # this process's RSS may grow a little meanwhile
    probe.close()
    got, runners = chain(toy_dir, (3,), feeds, {1: budget})
    assert runners[1].plan.budget_bytes == budget
    assert len(runners[1].plan.resident) < runners[1].spec.last - runners[1].spec.first
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6)


def test_cuts_must_rise_within_the_blocks(toy_dir):
    m = load_manifest(toy_dir)
    for bad in [(0,), (3, 3), (4, 2), (len(m.blocks),)]:
        with pytest.raises(OptionError, match="must rise strictly"):
            stage_specs(m, bad)


def _all_splits(n: int, k: int):
    for cuts in combinations(range(1, n), k - 1):
        yield (0, *cuts, n)


def test_the_split_fits_every_board_and_its_slowest_stage_is_the_best(toy_dir):
    """Against every contiguous split and every order of the boards: none has a faster slowest
    stage; each stage's predicted peak is within its board's budget."""
    from itertools import permutations

    m = load_manifest(toy_dir)
    boards = (board("a", 33), board("b", 38), board("c", 34))
    plan = split_blocks(m, None, boards)
    for s in plan.stages:
        assert s.predicted_peak_bytes <= s.board.budget_bytes
    assert [s.first for s in plan.stages] == [0, *plan.cuts]
    assert plan.stages[-1].last == len(m.blocks)
    costs = _Costs(m, {b.node_id: None for b in boards})
    best = None
    for order in permutations(boards):
        for bounds in _all_splits(len(m.blocks), len(boards)):
            cs = [costs(a, b, bd) for a, b, bd in zip(bounds, bounds[1:], order, strict=False)]
            if None not in cs:
                slowest = max(c[0] for c in cs)
                best = slowest if best is None else min(best, slowest)
    assert best is not None and plan.slowest_s <= best * 1.02 + 1e-12


def test_a_larger_board_takes_more_blocks(toy_dir):
    m = load_manifest(toy_dir)
    small, large = board("small", 33), board("large", 60)
    plan = split_blocks(m, None, (small, large))
    by_board = {s.board.name: s for s in plan.stages}
    assert by_board["large"].blocks > by_board["small"].blocks
    assert "board 'small'" in plan.describe() and "Ray's own processes there" in plan.describe()


def test_boards_that_cannot_hold_a_block_are_refused_by_name(toy_dir):
    m = load_manifest(toy_dir)
    with pytest.raises(BudgetError, match=r"block '.*' does not run alone.*'tiny'"):
        split_blocks(m, None, (board("tiny", 30), board("tiny2", 29)))
    with pytest.raises(OptionError, match="at most 6 boards"):
        split_blocks(m, None, tuple(board(f"b{i}", 100) for i in range(7)))
    with pytest.raises(OptionError, match="no boards"):
        split_blocks(m, None, ())


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory) -> Path:
    pytest.importorskip("torch", reason="exporting needs torch")
    out = tmp_path_factory.mktemp("stage-decoder") / "tiny-llama"
    assert fx.export_cli(out, "--preset", "tiny-llama") == 0
    return out


def _greedy_over(model_dir, cuts, prompt, new_tokens):
    """Greedy decoding through a chain of stages, each keeping its own cache for request 'r'."""
    specs = stage_specs(load_manifest(model_dir), cuts)
    runners = [StageRunner(model_dir, s, None) for s in specs]
    ids, out = list(prompt), []
    mask = np.ones((1, len(ids)), np.int64)
    step = np.array([ids], np.int64)
    positions = np.arange(len(ids), dtype=np.int64)[None]
    try:
        for _ in range(new_tokens):
            x = {"input_ids": step, "attention_mask": mask, "position_ids": positions}
            for r in runners:
                x = r.run(x, request="r")
            token = int(np.argmax(x["logits"][0, -1]))
            out.append(token)
            step = np.array([[token]], np.int64)
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
        return out
    finally:
        for r in runners:
            r.close()


def test_every_allowed_split_of_a_decoder_generates_full_s_tokens(tiny_decoder):
    """The prologue reads layer 0's past (for the past length): no cut between them; every other
    cut keeps each cache slot on one stage and gives the same greedy tokens as one board."""
    m = load_manifest(tiny_decoder)
    allowed = allowed_cuts(m)
    assert 1 not in allowed and allowed == frozenset(range(2, len(m.blocks)))
    prompt = [5, 17, 99, 3]
    with hermes_ort.load(tiny_decoder, strategy="full") as full:
        want = [int(t) for t in full.generate(prompt, 6, eos_token_id=[])[len(prompt) :]]
    for k in (1, 2):
        for cuts in combinations(sorted(allowed), k):
            assert _greedy_over(tiny_decoder, cuts, prompt, 6) == want, cuts
    with pytest.raises(OptionError, match="cannot start at block 'layer_00'"):
        stage_specs(m, (1,))
    boards = tuple(board(f"b{i}", 100) for i in range(len(m.blocks)))
    with pytest.raises(OptionError, match="can be cut at 3 place"):
        split_blocks(m, None, boards)
