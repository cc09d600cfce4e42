"""The timeline: an event simulation of the engine's schedule, on synthetic block times."""

from __future__ import annotations

import pytest

from hermes_ort.planning.schedule import DESTROY_S, BlockTimes, simulate


def test_one_loader_and_window_one_is_serial():
    blocks = [BlockTimes(0.05, 0.011, 0.01)] * 10
    # load, run, free, load, ...: nothing overlaps
    assert simulate(blocks, 1, 1, frozenset(), True) == pytest.approx(
        10 * (0.05 + 0.011) + 9 * DESTROY_S, rel=1e-9
    )


def test_loaders_and_window_overlap_loads_with_runs():
    blocks = [BlockTimes(0.05, 0.011, 0.01)] * 10
    serial = simulate(blocks, 1, 1, frozenset(), True)
    one_ahead = simulate(blocks, 1, 2, frozenset(), True)
    two_agents = simulate(blocks, 2, 3, frozenset(), True)
    assert two_agents < one_ahead < serial
    assert two_agents >= 10 * 0.05 / 2  # two agents cannot load faster than half the loads


def test_resident_blocks_cost_no_load_on_a_repeated_pass():
    blocks = [BlockTimes(0.05, 0.011, 0.01)] * 10
    everything = frozenset(range(10))
    assert simulate(blocks, 2, 3, everything, False) == pytest.approx(10 * 0.01)
    # on the first pass they load like the others
    assert simulate(blocks, 2, 3, everything, True) > 10 * 0.05 / 2


def test_without_lag_a_block_runs_only_after_the_previous_is_destroyed():
    blocks = [BlockTimes(0.0, 0.01, 0.01)] * 5  # loads take no time: only the runs and frees
    lagged = simulate(blocks, 2, 2, frozenset(), True, lag=1)
    strict = simulate(blocks, 2, 2, frozenset(), True, lag=0)
    assert strict == pytest.approx(lagged + 4 * DESTROY_S)


def test_a_load_s_cpu_stalls_the_run_it_overlaps():
    quiet = [BlockTimes(0.02, 0.02, 0.02, load_cpu_s=0.0)] * 4
    busy = [BlockTimes(0.02, 0.02, 0.02, load_cpu_s=0.02)] * 4
    assert simulate(busy, 2, 3, frozenset(), True) > simulate(quiet, 2, 3, frozenset(), True)


def test_the_first_pass_loads_from_where_the_files_are_now():
    cold = [BlockTimes(0.1, 0.01, 0.01, first_load_s=0.001)] * 4  # later passes read storage
    assert simulate(cold, 1, 1, frozenset(), True) < simulate(cold, 1, 1, frozenset(), False)
