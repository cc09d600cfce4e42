"""`python -m bench`: the matrix, budgets and profiles, aggregation, ratios, floors, Markdown from a
canned document, one real tiny run end to end, and the cgroup emulation (root + cgroup v1 only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import cgroups, child_env
from bench.child import downsample
from bench.device import Emulation, Launch, run_under
from bench.matrix import (
    MATRICES,
    Budget,
    build_matrix,
    expand,
    parse_budget,
    parse_profile,
    parse_strategy,
)
from bench.records import (
    SCHEMA_VERSION,
    Sample,
    add_ratios,
    aggregate,
    io_floors,
    load_document,
    median,
    ratios,
    sample_from_child,
    seconds,
    to_json,
    write_document,
)
from bench.render import goals_table, render_markdown
from hermes_ort.measure.fresh_process import ChildResult
from hermes_ort.streaming.memory import drop_file_cache
from hermes_ort.streaming.readahead import missing_pages

MB = 10**6

# -- matrix, budgets, profiles --------------------------------------------------------------------


def test_parse_budget_spellings():
    assert parse_budget("none") == Budget("none", "none")
    assert parse_budget("150MB") == Budget("150MB", "bytes", 150e6)
    assert parse_budget("1.5GiB").value == 1.5 * 2**30
    assert parse_budget("25%") == Budget("25%", "model", 0.25)
    assert parse_budget("min") == Budget("min", "min", 1.0)
    assert parse_budget("x1.2min") == Budget("x1.2min", "min", 1.2)
    assert parse_budget("2xmin").value == 2.0
    assert parse_budget("cap").kind == "cap"
    for bad in ("lots", "-5%", "x0min", "0MB"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_budget_resolves_against_the_model():
    model, smallest, cap = 400 * MB, 150 * MB, 300 * MB
    assert parse_budget("none").resolve(model, smallest, cap) is None
    assert parse_budget("200MB").resolve(model, smallest, cap) == 200 * MB
    assert parse_budget("25%").resolve(model, smallest, cap) == 100 * MB
    assert parse_budget("min").resolve(model, smallest, cap) == 150 * MB
    assert parse_budget("x1.2min").resolve(model, smallest, cap) == 180 * MB
    assert parse_budget("cap").resolve(model, smallest, cap) == 300 * MB
    assert parse_budget("cap").resolve(model, smallest, None) is None


def test_parse_strategy_and_ablation():
    assert parse_strategy("pipeload").label == "pipeload"
    s = parse_strategy("pipeswitch+stream")
    assert (s.name, s.load_path, s.label) == ("pipeswitch", "stream", "pipeswitch+stream")
    for bad in ("fastest", "pipeload+stream", "full+stream", "ondemand+disk"):
        with pytest.raises(ValueError):
            parse_strategy(bad)


def test_parse_profile():
    p = parse_profile("sd:1c:512MB")
    assert (p.storage.name, p.storage.cache, p.storage.read_bytes_per_s) == ("sd", "cold", 50 * MB)
    assert p.cores == 1 and p.memory_cap.value == 512 * MB and p.text == "sd:1c:512MB"
    assert (
        parse_profile("warm").storage.cache == "warm" and parse_profile("warm").memory_cap is None
    )
    assert parse_profile("emmc:x1.5min").memory_cap.kind == "min"
    for bad in ("floppy", "sd:0c", "sd:cap", "sd:none", "warm:lots"):
        with pytest.raises(ValueError):
            parse_profile(bad)


def test_expand_runs_baselines_once_and_pipeload_per_budget():
    m = build_matrix(
        "smoke",
        models=["a"],
        strategies=["full", "pipeswitch+stream", "pipeload"],
        budgets=["min", "cap", "none"],
        profiles=["warm", "sd:1c:200MB"],
    )
    keys = [c.key for c in expand(m)]
    assert ("a", "full", "-", "warm") in keys and (
        "a",
        "pipeswitch+stream",
        "-",
        "sd:1c:200MB",
    ) in keys
    assert ("a", "pipeload", "cap", "warm") not in keys  # no cap there: would repeat "none"
    assert ("a", "pipeload", "cap", "sd:1c:200MB") in keys
    assert len(keys) == len(set(keys)) == 2 * 2 + 2 + 3  # baselines x profiles + pipeload budgets


def test_named_matrices_and_overrides():
    assert {"smoke", "paper", "full"} <= set(MATRICES)
    paper = MATRICES["paper"]
    assert {"bert-base", "bert-large", "vit-base", "vit-large", "gpt2", "gpt2-large"} <= set(
        paper.models
    )
    assert {s.label for s in paper.strategies} == {"full", "pipeswitch", "pipeload"}
    full = MATRICES["full"]
    assert {"pipeswitch+stream", "ondemand+stream", "full-mmap"} <= {
        s.label for s in full.strategies
    }
    m = build_matrix("paper", models=["tiny-bert"], repeats=1, passes=2)
    assert m.models == ("tiny-bert",) and m.repeats == 1 and m.passes == 2
    assert m.strategies == paper.strategies
    with pytest.raises(ValueError):
        build_matrix("huge")


# -- records -------------------------------------------------------------------------------------


def _sample(repeat, one_shot, steady, peak, ok=True, oom=False, error=None):
    return Sample(
        repeat=repeat,
        ok=ok,
        returncode=0 if ok else -9,
        error=error,
        oom_killed=oom,
        wall_s=one_shot or 1.0,
        one_shot_s=one_shot,
        first_pass_s=one_shot and one_shot / 2,
        steady_s=steady,
        peak_rss_bytes=peak,
        cgroup_peak_bytes=peak,
        read_bytes=0,
        baseline_rss_bytes=50 * MB,
    )


def _fields(label, profile="warm", model="m", budget=None):
    name, _, path = label.partition("+")
    return dict(
        model=model,
        label=label,
        strategy=name,
        load_path=path or "default",
        budget=budget,
        profile=profile,
        storage="warm",
        cache="warm",
        cores=2,
        memory_cap_bytes=None,
        read_limit_bytes_per_s=None,
        cap_enforced=False,
        throttle_enforced=False,
    )


def _floors():
    from bench.records import Floors

    return Floors(0.1, 0, 0.0, 0, 0.0)


def test_aggregate_keeps_medians_and_raw_samples():
    samples = [
        _sample(0, 1.0, (0.3, 0.5), 100),
        _sample(1, 3.0, (0.2, 0.2), 300),
        _sample(2, 2.0, (0.4,), 200),
        _sample(3, None, (), None, ok=False, oom=True, error="killed"),
    ]
    r = aggregate(_fields("full"), samples, _floors())
    assert r.one_shot_s == 2.0 and r.peak_rss_bytes == 200
    assert r.steady_s == 0.4  # median of each process's median steady pass: 0.4, 0.2, 0.4
    assert (r.repeats, r.ok_repeats, r.killed_repeats, r.error) == (4, 3, 1, "killed")
    assert len(r.samples) == 4 and r.samples[0].steady_s == (0.3, 0.5)
    assert median([]) is None and median([3, None, 1]) == 2


def _result(returncode: int, record: dict, stderr: str = "") -> ChildResult:
    return ChildResult(returncode, record, stderr, 1.0, 0, 0.0)


def test_sample_from_child_marks_oom_kills():
    from bench.cgroups import MemoryStats

    killed = sample_from_child(0, _result(-9, {}), MemoryStats(64 * MB, 3, 1), None, True)
    assert not killed.ok and killed.oom_killed and "memory cap" in killed.error
    child = {
        "ok": True,
        "one_shot_s": 1.5,
        "steady_s": [0.1],
        "rss_curve": [[0.1, 5]],
        "plan": {"window": 2},
    }
    ok = sample_from_child(1, _result(0, child))
    assert (
        ok.ok
        and ok.one_shot_s == 1.5
        and ok.detail["plan"] == {"window": 2}
        and ok.rss_curve == ((0.1, 5),)
    )
    refused = sample_from_child(2, _result(1, {"ok": False, "error": "BudgetError: too small"}))
    assert not refused.ok and not refused.oom_killed and refused.error.startswith("BudgetError")
    crashed = sample_from_child(3, _result(1, {}, "Traceback ...\nSegfault-ish: the last line"))
    assert not crashed.ok and crashed.error == "Segfault-ish: the last line"


def test_ratios_against_full_and_pipeswitch():
    full = aggregate(_fields("full"), [_sample(0, 4.0, (1.0,), 800)], _floors())
    ps = aggregate(_fields("pipeswitch"), [_sample(0, 2.0, (0.5,), 600)], _floors())
    pl = aggregate(_fields("pipeload", budget="min"), [_sample(0, 1.0, (0.5,), 200)], _floors())
    r = ratios(pl, full)
    assert r["one_shot_speedup"] == 4.0 and r["steady_speedup"] == 2.0
    assert r["peak_rss_ratio"] == 0.25 and r["memory_reduction"] == 0.75
    killed = aggregate(_fields("full"), [_sample(0, None, (), None, ok=False, oom=True)], _floors())
    assert ratios(pl, killed) is None
    out = {x.label: x for x in add_ratios([full, ps, pl])}
    assert out["pipeload"].vs_pipeswitch["one_shot_speedup"] == 2.0
    assert out["pipeload"].vs_pipeswitch["memory_reduction"] == pytest.approx(2 / 3)
    assert out["full"].vs_full["one_shot_speedup"] == 1.0


def test_io_floors():
    # warm: the page cache holds the model, nothing must be read
    assert io_floors(False, 400 * MB, 400 * MB, 200 * MB, 50 * MB) == (0, 0)
    # cold, no limit: read once, then it stays cached
    assert io_floors(True, 400 * MB, 400 * MB, None, 50 * MB) == (400 * MB, 0)
    # cold under 200 MB with a 50 MB baseline: 150 MB can stay, 250 MB is read every pass
    assert io_floors(True, 400 * MB, 400 * MB, 200 * MB, 50 * MB) == (400 * MB, 250 * MB)
    assert seconds(250 * MB, 50e6) == 5.0 and seconds(0, None) == 0.0 and seconds(1, None) is None


def test_downsample_keeps_first_last_and_peak():
    points = [(i * 0.01, 100 + (5000 if i == 1234 else i % 7)) for i in range(3000)]
    out = downsample(points, 100)
    assert len(out) <= 102 and out[0][0] == 0.0 and out[-1][0] == pytest.approx(29.99)
    assert max(v for _, v in out) == 5100


# -- rendering from a canned document ------------------------------------------------------------


def _canned_document() -> dict:
    def rec(
        label, one_shot, peak, budget=None, profile="sd:1c:300MB", model="bert-base", killed=False
    ):
        s = _sample(
            0,
            None if killed else one_shot,
            () if killed else (one_shot / 4,),
            None if killed else peak,
            ok=not killed,
            oom=killed,
            error="killed by the memory cap (OOM)" if killed else None,
        )
        fields = {
            **_fields(label, profile, model, budget),
            "storage": "sd",
            "cache": "cold",
            "memory_cap_bytes": 300 * MB,
            "read_limit_bytes_per_s": 50 * MB,
            "cap_enforced": True,
            "throttle_enforced": True,
        }
        return aggregate(fields, [s], _floors())

    records = add_ratios(
        [
            rec("full", 8.0, 700 * MB),
            rec("pipeswitch", 6.0, 650 * MB),
            rec("pipeswitch+stream", 3.0, 500 * MB),
            rec("pipeload", 1.5, 100 * MB, budget="min"),
            rec("ondemand", 9.0, 0, killed=True),
        ]
    )
    return to_json(
        {
            "kind": "hermes-ort-bench",
            "schema_version": SCHEMA_VERSION,
            "created": "2026-01-01T00:00:00",
            "interrupted": False,
            "matrix": {
                "name": "canned",
                "models": ["bert-base"],
                "strategies": [],
                "budgets": [],
                "profiles": [],
                "repeats": 1,
                "passes": 2,
            },
            "machine": {
                "cpu": "Test CPU",
                "machine": "aarch64",
                "cores": 4,
                "memory_bytes": 4 * 10**9,
                "os": "Linux",
                "python": "3.11",
            },
            "versions": {"onnxruntime": "1.32.0"},
            "emulation": {
                "memory_cgroup": "/sys/fs/cgroup/memory/x",
                "blkio_cgroup": "/sys/fs/cgroup/blkio",
            },
            "warnings": [],
            "storage": {"sd": {"about": "SD card", "read_bytes_per_s": 51e6}},
            "models": [{"name": "bert-base", "family": "bert", "cores": 1}],
            "records": records,
        }
    )


def test_markdown_from_canned_document(tmp_path):
    path = write_document(_canned_document(), tmp_path / "bench.json")
    doc = load_document(path)
    md = render_markdown(doc)
    assert (
        "### Profile `sd:1c:300MB`" in md
        and "measured 51 MB/s" in md
        and "memory cap 300.0 MB" in md
    )
    assert "| bert-base | pipeload | min | 1.50 s | 375 ms | 100.0 MB |" in md
    assert "**killed** 1/1 (cap)" in md
    paper = md.split("## The paper's comparison")[1].split("## Ablation")[0]
    # pipeload against pipeswitch: 6.0 / 1.5 = 4x faster, 1 - 100/650 less memory; against full:
    # 8/1.5
    assert "| 4.00x | 84.6% | 5.33x | 85.7% | 4.24x / 86.7% |" in paper
    ablation = md.split("## Ablation")[1]
    # storage gain 6.0 / 3.0; mechanism gain 3.0 / 1.5 (pipeload's only budget)
    assert (
        "| pipeswitch | 6.00 s / 650.0 MB | 3.00 s / 500.0 MB | 2.00x "
        "| min: 1.50 s / 100.0 MB | 2.00x |" in ablation
    )


def test_plots_from_canned_document(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plots import write_plots

    written = {p.name for p in write_plots(_canned_document(), tmp_path)}
    # memory over time needs RSS curves (the canned samples have none); latency and the paper's
    # comparison do not
    assert written == {"latency-bert-base.png", "paper-sd_1c_300MB.png"}
    assert (tmp_path / "paper-sd_1c_300MB.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_goals_are_judged_from_the_records():
    """Warm: met only where one budget reaches both of the paper's ratios. Capped: met where full is
    killed and a pipeload budget finishes; a model whose full fits under the cap says so."""

    def rec(label, one_shot, peak, model, budget=None, cap=None, killed=False):
        s = _sample(
            0,
            None if killed else one_shot,
            () if killed else (one_shot / 4,),
            None if killed else peak,
            ok=not killed,
            oom=killed,
            error="killed by the memory cap (OOM)" if killed else None,
        )
        fields = _fields(label, "emmc:2c:50%" if cap else "warm", model, budget)
        if cap:
            fields.update(storage="emmc", cache="cold", memory_cap_bytes=cap, cap_enforced=True)
        return aggregate(fields, [s], _floors())

    records = add_ratios(
        [
            # bert-base, warm: min is lean but slow (2.5x), x2min fast but fat (55%): not met
            rec("full", 9.0, 800 * MB, "bert-base"),
            rec("pipeswitch", 5.0, 600 * MB, "bert-base"),
            rec("pipeload", 2.0, 60 * MB, "bert-base", "min"),
            rec("pipeload", 1.0, 270 * MB, "bert-base", "x2min"),
            # gpt2, warm: 3.0x and 91.7% at min: met
            rec("full", 9.0, 900 * MB, "gpt2"),
            rec("pipeswitch", 6.0, 600 * MB, "gpt2"),
            rec("pipeload", 2.0, 50 * MB, "gpt2", "min"),
            # capped: bert-base's full killed, pipeload finishes; gpt2's full fits
            rec("full", 0, 0, "bert-base", cap=300 * MB, killed=True),
            rec("pipeswitch", 0, 0, "bert-base", cap=300 * MB, killed=True),
            rec("pipeload", 3.0, 100 * MB, "bert-base", "min", cap=300 * MB),
            rec("pipeload", 0, 0, "bert-base", "x2min", cap=300 * MB, killed=True),
            rec("full", 9.0, 290 * MB, "gpt2", cap=300 * MB),
        ]
    )
    doc = {
        "records": [to_json(r) for r in records],
        "models": [{"name": "bert-base", "family": "bert"}, {"name": "gpt2", "family": "gpt2"}],
    }
    md = "\n".join(goals_table(doc))
    assert (
        "| bert-base | 4.24x / 86.7% | min: 2.50x / 90.0%, x2min: 5.00x / 55.0% | not met |" in md
    )
    assert "| gpt2 | 2.58x / 90.3% | min: 3.00x / 91.7% | **met** |" in md
    assert "| bert-base | emmc:2c:50% | killed | killed | min 3.00 s | **met** |" in md
    assert (
        "| gpt2 | emmc:2c:50% | finished (290.0 MB) | not run | none finished | full fits |" in md
    )


def test_load_document_refuses_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"kind": "hermes-ort-bench", "schema_version": 999}))
    with pytest.raises(ValueError, match="schema"):
        load_document(path)


# -- cgroups: parsing everywhere, the real thing as root with cgroup v1 --------------------------


def test_own_cgroup_and_mount_parsing():
    text = "9:name=systemd:/\n7:blkio:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/x\n0::/\n"
    assert cgroups.own_cgroup("memory", text) == "/process_api/abc"
    assert cgroups.own_cgroup("cpuacct", text) == "/x" and cgroups.own_cgroup("pids", text) is None
    mounts = (
        "cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert cgroups.mount_point("memory", mounts) == Path("/sys/fs/cgroup/memory")
    assert cgroups.mount_point("blkio", mounts) is None


def test_without_root_or_cgroups_it_says_so_and_runs_unemulated(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cgroups.controller_base("memory") == (None, "not root")
    emulation = Emulation.detect()
    assert emulation.memory_base is None and emulation.blkio_base is None
    warnings = emulation.warnings((parse_profile("sd:1c:200MB"),), (254, 0))
    assert any("memory caps not emulated (not root)" in w for w in warnings)
    assert any("throttling not emulated (not root)" in w for w in warnings)
    launch = Launch(emulation, cores=1, cap_bytes=32 << 20, read_bytes_per_s=50 * MB, disk=(254, 0))
    script = (
        "import json, os; b = b'x' * (64 << 20); "
        "print(json.dumps({'cores': len(os.sched_getaffinity(0))}))"
    )
    result = run_under(launch, [sys.executable, "-c", script], 60)
    assert result.ok and result.record == {"cores": 1}  # cores still pinned; no cap, so it lives
    assert result.peak_rss_bytes > 64 << 20  # the kernel's own count of the child's peak
    assert not launch.cap_enforced and not launch.throttle_enforced and launch.memory is None


_MEMORY, _WHY_MEMORY = cgroups.controller_base("memory")
_BLKIO, _WHY_BLKIO = cgroups.controller_base("blkio")
needs_memory = pytest.mark.skipif(
    _MEMORY is None, reason=f"memory cgroup v1 unusable: {_WHY_MEMORY}"
)
needs_blkio = pytest.mark.skipif(_BLKIO is None, reason=f"blkio cgroup v1 unusable: {_WHY_BLKIO}")


def _leftovers(pid: int) -> list[Path]:
    """Groups that process `pid` made and did not remove."""
    return [
        p for base in (_MEMORY, _BLKIO) if base for p in base.glob(f"{cgroups.PREFIX}*-{pid}-*")
    ]


@needs_memory
def test_memory_cap_kills_an_over_allocating_child_and_the_group_goes():
    launch = Launch(Emulation.detect(), cap_bytes=64 << 20, tag="test")
    result = run_under(
        launch, [sys.executable, "-c", "b = b'x' * (256 << 20); print('survived')"], 60
    )
    assert result.returncode == -signal.SIGKILL and launch.cap_enforced
    assert launch.memory.oom_kills >= 1 and launch.memory.peak_bytes <= 64 << 20
    assert not _leftovers(os.getpid())
    # under the cap, the same child lives and its peak is measured
    launch = Launch(Emulation.detect(), cap_bytes=512 << 20, tag="test")
    result = run_under(
        launch,
        [sys.executable, "-c", "b = b'x' * (128 << 20); print('{\"survived\": 1}')"],
        60,
    )
    assert result.ok and result.record == {"survived": 1}
    assert launch.memory.peak_bytes >= 128 << 20
    assert launch.memory.oom_kills == 0 and not _leftovers(os.getpid())


def _drop_until_cold(path: Path, tries: int = 5) -> int:
    """Drop the file's pages; a few tries, as pages still in another core's LRU batch survive
    one. Returns the bytes still cached."""
    for _ in range(tries):
        drop_file_cache(str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            missing = missing_pages(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        cached = 0 if missing is None else int((~missing).sum()) * os.sysconf("SC_PAGE_SIZE")
        if cached == 0:
            break
        time.sleep(0.05)
    return cached


@needs_blkio
def test_a_throttled_group_reads_its_child_s_bytes_from_the_disk(tmp_path):
    """The child's group carries the throttle for the model's disk, and the child's cold read
    is accounted to that group (so the throttle applies to it). How fast the throttle lets it
    read is a measurement: `python -m bench matrix` prints it for every storage profile."""
    disk = cgroups.disk_of(tmp_path)
    if disk is None:
        pytest.skip(f"'{tmp_path}' is on no block device")
    path = tmp_path / "probe.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(30 << 20))
        f.flush()
        os.fsync(f.fileno())
    cached = _drop_until_cold(path)
    assert cached == 0, f"{cached} bytes of the probe stay in the page cache after dropping it"
    launch = Launch(Emulation.detect(), disk=disk, read_bytes_per_s=50 * MB, tag="test")
    cmd = [sys.executable, "-m", "bench.child", "read", str(path)]
    seen: list[str] = []
    real_write = cgroups.Group.write

    def spy(group, name, value):
        seen.append(f"{name}={value}")
        real_write(group, name, value)

    cgroups.Group.write = spy
    try:
        result = run_under(launch, cmd, 60)
    finally:
        cgroups.Group.write = real_write
    assert result.ok, result.error and result.record["bytes"] == 30 << 20
    assert f"blkio.throttle.read_bps_device={disk[0]}:{disk[1]} {50 * MB}" in seen
    read = launch.blkio_read_bytes
    assert launch.throttle_enforced and read >= 30 << 20, f"{read} bytes read from the disk"
    assert not _leftovers(os.getpid())


@needs_memory
def test_sigterm_kills_the_child_and_removes_the_groups(tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys\n"
        "from bench import cgroups\n"
        "from bench.device import Emulation, Launch, run_under\n"
        "try:\n"
        "    with cgroups.signals_raise():\n"
        "        run_under(Launch(Emulation.detect(), cap_bytes=1 << 30, tag='hold'),\n"
        "                  [sys.executable, '-c', 'import time; time.sleep(120)'], 300)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], env=child_env())
    deadline = time.monotonic() + 30
    while not _leftovers(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    groups = _leftovers(proc.pid)
    assert groups, "the group never appeared"
    time.sleep(0.3)  # the sleeping child has joined it
    assert (groups[0] / "cgroup.procs").read_text().split()  # the sleeping child is inside
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 130
    assert not _leftovers(proc.pid) and not groups[0].exists()


# -- end to end ----------------------------------------------------------------------------------


def test_bench_end_to_end_on_the_toy_model(toy_dir, tmp_path):
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "matrix",
        "--models",
        str(toy_dir),
        "--strategies",
        "full,pipeload",
        "--budgets",
        "none",
        "--profiles",
        "warm",
        "--repeats",
        "1",
        "--passes",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    )
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    (run_dir,) = out.iterdir()
    doc = load_document(run_dir / "bench.json.gz")
    assert doc["machine"]["cores"] and doc["versions"]["onnxruntime"] and not doc["interrupted"]
    records = {r["label"]: r for r in doc["records"]}
    assert set(records) == {"full", "pipeload"}
    for r in records.values():
        assert (
            r["ok_repeats"] == 1 and r["one_shot_s"] > r["first_pass_s"] > 0 and r["steady_s"] > 0
        )
        assert r["peak_rss_bytes"] > 0 and r["compute_floor_s"] > 0 and r["io_floor_bytes"] == 0
        (s,) = r["samples"]
        plan = s["detail"]["plan"]
        assert len(s["steady_s"]) == 1 and len(s["rss_curve"]) >= 2
        whole = r["label"] == "full"
        assert (plan["engine"], plan["blocks"]) == (("whole", 0) if whole else ("blocks", 6))
    assert records["pipeload"]["vs_full"]["one_shot_speedup"] > 0
    assert doc["floors"] and doc["models"][0]["cost_source"] == "profile"
    md = (run_dir / "bench.md").read_text()
    assert (
        md in stdout
        and "### Profile `warm`" in md
        and f"| {toy_dir.name} | pipeload | none |" in md
    )
    try:
        import matplotlib  # noqa: F401  (the `bench` extra: without it the plots are skipped)
    except ImportError:
        assert "plots skipped: matplotlib is not installed" in stderr
    else:
        for png in ("memory-model-warm.png", "latency-model.png"):
            assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not _leftovers(proc.pid)
    # rendering again from the JSON alone gives the same table
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "matrix",
            "--render",
            str(run_dir / "bench.json.gz"),
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert again.returncode == 0 and (run_dir / "bench.md").read_text() == md


def test_objectives_table_from_canned_records():
    from bench.objectives import render
    from bench.sweep import summarise

    def record(loaders, first, later, peak):  # a bench.child run record, 2 passes
        plan = {
            "loaders": loaders,
            "window": 2,
            "resident": [0, 1],
            "predicted_first_latency_s": 0.5,
            "predicted_latency_s": 0.2,
        }
        return {
            "ok": True,
            "plan": plan,
            "first_pass_s": first,
            "steady_s": [later],
            "pass_peak_rss_bytes": [peak, peak - 1],
        }

    result = {
        "model": "models/bert-base",
        "rounds": 2,
        "rows": [
            {
                "budget": "461MB",
                "plans": {
                    "repeated": summarise(
                        [record(1, 0.6, 0.19, 440 * MB), record(1, 0.4, 0.21, 445 * MB)]
                    ),
                    "one-shot": summarise(
                        [record(2, 0.3, 0.25, 438 * MB), record(2, 0.3, 0.25, 438 * MB)]
                    ),
                    "failed": {"error": "BudgetError: too small"},
                },
            }
        ],
    }
    md = render(result)
    # medians of the first and the later passes, the largest peak of any pass
    assert "| 461MB | repeated | 1x2, 2 resident | 500 ms (500) | 200 ms (200) | 445.0 MB |" in md
    assert "| 461MB | one-shot | 2x2, 2 resident | 300 ms (500) | 250 ms (200) | 438.0 MB |" in md
    assert "| 461MB | failed | error: BudgetError: too small |" in md


def test_the_cluster_report_puts_the_boards_beside_one_board():
    """bench/cluster.py's table: each board count's per-token latency against the compute
    floor, its throughput in flight against one prompt at a time, Ray's bytes per board."""
    from bench.cluster import render

    stage = {"ray_bytes": 215e6}
    decoder = {
        "per_token_s": 0.5,
        "stages_sum_s": 0.45,
        "tokens_per_s_one": 2.0,
        "tokens_per_s_in_flight": 3.4,
        "budget_bytes": 2_640_000_000,
        "split": {"stages": [stage, stage]},
        "cgroup_peak_bytes": [2.5e9, 2.4e9],
    }
    doc = {
        "created": "now",
        "machine": "x",
        "storage": "sd",
        "command": "python -m bench cluster",
        "prompts": 4,
        "one_board": {
            "decoder": {
                "compute_floor_per_token_s": 0.4,
                "stream_budget_bytes": 2.2e9,
                "stream_per_token_s": 48.0,
            }
        },
        "runs": [{"boards": 2, "shared_cores": False, "decoder": decoder}],
    }
    text = render(doc)
    row = next(line for line in text.splitlines() if line.startswith("| 2 boards"))
    assert "| 0.500 s | 1.25x | 0.450 s | 2.00 | 3.40 | 1.70x | 215/215 MB |" in row
    assert "| 48.00 s | 120.0x |" in text
