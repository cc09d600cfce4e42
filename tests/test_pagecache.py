"""The page-cache policy under a budget: pages are dropped only where the memory cgroup or the
available memory has no room for the model's files beside the budget, and the plan says why."""

from __future__ import annotations

import pytest

from hermes_ort.core.machine import available_memory, cgroup_memory_limit
from hermes_ort.core.units import format_bytes
from hermes_ort.planning.page_cache import MemorySituation, page_cache_policy

GB = 1 << 30
MODEL = 2 * GB


def test_no_budget_keeps_pages():
    assert not page_cache_policy("auto", None, MODEL, MemorySituation(GB, GB)).drop


def test_room_beside_the_budget_keeps_pages():
    policy = page_cache_policy("auto", GB, MODEL, MemorySituation(None, 20 * GB))
    assert not policy.drop
    assert "kept" in policy.reason and f"{format_bytes(20 * GB)} available" in policy.reason


def test_a_cgroup_limit_too_small_for_the_files_drops_them():
    # 20 GB available on the machine, but the process's group is capped at 3 GiB
    policy = page_cache_policy("auto", GB, MODEL, MemorySituation(3 * GB, 20 * GB))
    assert policy.drop
    assert f"cgroup limit {format_bytes(3 * GB)}" in policy.reason


def test_short_available_memory_drops_them():
    policy = page_cache_policy("auto", GB, MODEL, MemorySituation(None, 2 * GB))
    assert policy.drop and "available" in policy.reason


def test_a_large_cgroup_limit_keeps_pages():
    assert not page_cache_policy("auto", GB, MODEL, MemorySituation(16 * GB, 20 * GB)).drop


def test_forced_policies_and_a_bad_one():
    situation = MemorySituation(None, 20 * GB)
    assert page_cache_policy("drop", GB, MODEL, situation).drop
    assert not page_cache_policy("keep", GB, MODEL, MemorySituation(GB, GB)).drop
    with pytest.raises(ValueError, match="'never' is not a valid PageCacheMode"):
        page_cache_policy("never", GB, MODEL, situation)  # users' values are checked by load


def _group(root, controller_dir, path, name, value):
    d = root.joinpath(controller_dir, *[p for p in path.split("/") if p])
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(value + "\n")


def test_cgroup_v1_limit_is_the_tightest_ancestor(tmp_path):
    proc = "4:memory:/slice/board\n3:cpuset:/\n0::/\n"
    _group(tmp_path, "memory", "/", "memory.limit_in_bytes", "9223372036854771712")
    _group(tmp_path, "memory", "/slice", "memory.limit_in_bytes", str(3 * GB))
    _group(tmp_path, "memory", "/slice/board", "memory.limit_in_bytes", str(5 * GB))
    assert cgroup_memory_limit(proc, str(tmp_path)) == 3 * GB


def test_cgroup_v2_limit_and_max(tmp_path):
    proc = "0::/user.slice/app\n"
    _group(tmp_path, "", "/user.slice", "memory.max", "max")
    _group(tmp_path, "", "/user.slice/app", "memory.max", str(GB))
    assert cgroup_memory_limit(proc, str(tmp_path)) == GB
    _group(tmp_path, "", "/user.slice/app", "memory.max", "max")
    assert cgroup_memory_limit(proc, str(tmp_path)) is None


def test_no_cgroup_files_means_no_limit(tmp_path):
    assert cgroup_memory_limit("4:memory:/x\n", str(tmp_path)) is None


def test_available_memory_reads_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000 kB\nMemAvailable:   1000 kB\n")
    assert available_memory(str(info)) == 1000 * 1024
    assert available_memory(str(tmp_path / "missing")) is None


def test_blocks_being_read_ahead_get_room_below_a_cgroup_limit():
    from hermes_ort.planning.page_cache import cgroup_headroom

    mb = 1 << 20
    # a 2 GiB cap, 2 loaders reading 130 MB blocks: planned in the cap minus their pages
    planned, note = cgroup_headroom(2 * GB, 2 * GB, 260 * mb, smallest=500 * mb)
    assert planned == 2 * GB - 260 * mb and "charged to the memory cgroup" in note
    assert cgroup_headroom(GB, 2 * GB, 260 * mb, 500 * mb) == (GB, "")  # room already
    assert cgroup_headroom(GB, None, 260 * mb, 500 * mb) == (GB, "")  # no cgroup limit
    planned, note = cgroup_headroom(600 * mb, 600 * mb, 260 * mb, smallest=500 * mb)
    assert planned == 600 * mb and "read twice" in note  # too little: the budget as given
