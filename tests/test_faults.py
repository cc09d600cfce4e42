"""Faults during a run surface promptly as clear errors, leave nothing behind (threads, sessions,
cgroups), and the model works again once the cause is gone: a file removed or damaged, a loader
failing, Ctrl-C, concurrent and closing threads, and the process at its memory cap."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import numpy as np
import pytest
from onnxruntime.capi.onnxruntime_inference_collection import InferenceSession as Session
from toy_model import reference_logits

import hermes_ort
from bench import cgroups
from bench.device import Emulation, Launch, run_under
from bench.records import sample_from_child
from hermes_ort.streaming import loader as loader_module

MIB = 1 << 20


@pytest.fixture
def live_sessions(monkeypatch):
    """Counts the ONNX Runtime sessions created from now on that are still alive."""
    import onnxruntime

    refs: list[weakref.ref] = []
    real = onnxruntime.InferenceSession

    def tracked(*args, **kwargs):
        session = real(*args, **kwargs)
        refs.append(weakref.ref(session))
        return session

    monkeypatch.setattr(onnxruntime, "InferenceSession", tracked)

    def alive() -> int:
        gc.collect()
        return sum(r() is not None for r in refs)

    return alive


def _kept(model) -> int:
    """Sessions a model keeps between runs: its resident blocks, or the whole-model session."""
    engine = model._engine
    return len(engine.resident) if hasattr(engine, "resident") else int(engine.session is not None)


# -- files removed or damaged during the model's life --------------------------------------------
@pytest.mark.parametrize("strategy", ["pipeload", "ondemand", "pipeswitch"])
def test_block_file_removed_mid_run(toy_dir, strategy, no_thread_leak):
    victim = toy_dir / "blocks" / "layer_02.data"
    hidden = victim.with_suffix(".moved")
    with hermes_ort.load(
        toy_dir, strategy=strategy, window=2 if strategy == "pipeload" else None
    ) as model:
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
        if strategy == "pipeswitch":  # everything resident: a second run reads no file
            return
        os.rename(victim, hidden)
        with pytest.raises(hermes_ort.IntegrityError, match="layer_02.data"):
            model.run(feeds)
        os.rename(hidden, victim)
        np.testing.assert_array_equal(model.run(feeds)["logits"], expected)


def test_damaged_block_is_named(toy_dir):
    path = toy_dir / "blocks" / "layer_01.onnx"
    data = bytearray(path.read_bytes())
    data[10:60] = b"\xff" * 50  # same size, garbage inside
    path.write_bytes(bytes(data))
    with pytest.raises(hermes_ort.IntegrityError, match="layer_01.onnx' does not match its sha256"):
        hermes_ort.load(toy_dir)
    with pytest.raises(hermes_ort.IntegrityError, match="layer_01.onnx' is not an ONNX file"):
        hermes_ort.load(toy_dir, verify="size")  # without hashes: its external data is unreadable


def test_truncated_block_is_named(toy_dir):
    path = toy_dir / "blocks" / "epilogue.data"
    body = path.read_bytes()
    with hermes_ort.load(toy_dir, window=2) as model:
        path.write_bytes(body[:-100])  # after load: found before the block is opened
        with pytest.raises(hermes_ort.IntegrityError, match="epilogue.data.*bytes"):
            model.run(model.sample_inputs())
    with pytest.raises(hermes_ort.IntegrityError, match="epilogue.data.*bytes"):
        hermes_ort.load(toy_dir, verify="size")


# -- a loader failing, Ctrl-C --------------------------------------------------------------------
def test_loader_failure_is_raised_before_its_block_is_reached(
    toy_dir, monkeypatch, live_sessions, no_thread_leak
):
    """Block 4's load fails while block 2 is still loading: the failure is raised at the next
    block the inference agent takes, before it runs block 3 (it does not wait to reach block 4)."""
    from hermes_ort.streaming import block_engine as engine

    real, real_run = loader_module.load_block, engine.run_session
    failed = threading.Event()
    ran: list[str] = []

    def slow_or_failing(verifier, index, spec, settings, readahead):
        if index == 4:
            failed.set()
            raise hermes_ort.LoadError(f"block '{spec.name}': injected failure")
        if index == 2:
            assert failed.wait(30), "block 4 was never loaded"
        return real(verifier, index, spec, settings, readahead)

    def run_session(session, names, feeds, what, shrink=False):
        ran.append(what)
        return real_run(session, names, feeds, what, shrink)

    monkeypatch.setattr(loader_module, "load_block", slow_or_failing)
    monkeypatch.setattr(engine, "run_session", run_session)
    with hermes_ort.load(toy_dir, loaders=3, window=4) as model:
        with pytest.raises(hermes_ort.LoadError, match="layer_03.*injected") as caught:
            model.run(model.sample_inputs())
        order = [f"block '{b.name}'" for b in model.manifest.blocks]
        assert ran == order[: len(ran)] and len(ran) <= 3  # never block 3 ('layer_02')
        assert live_sessions() == _kept(model) and caught.traceback
        monkeypatch.setattr(loader_module, "load_block", real)
        assert model.run(model.sample_inputs())["logits"].shape[-1] == 50
    assert live_sessions() == 0


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt in the main thread, as in a terminal."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("strategy", ["pipeload", "ondemand", "pipeswitch"])
def test_ctrl_c_during_a_run(
    toy_dir, strategy, monkeypatch, live_sessions, sigint_raises, no_thread_leak
):
    """A real SIGINT, sent while a loader opens block 3 and the inference agent runs the blocks
    before it: the run stops, loads in flight are drained, no session of it stays alive."""
    real = loader_module.load_block
    armed = threading.Event()

    def ctrl_c_on_block_3(verifier, index, spec, settings, readahead):
        if index == 3 and armed.is_set():
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)
        return real(verifier, index, spec, settings, readahead)

    monkeypatch.setattr(loader_module, "load_block", ctrl_c_on_block_3)
    switch_interval = sys.getswitchinterval()
    window = 3 if strategy == "pipeload" else None
    with hermes_ort.load(
        toy_dir, strategy=strategy, loaders=2 if window else None, window=window
    ) as model:
        feeds = model.sample_inputs(batch_size=2)
        armed.set()
        with pytest.raises(KeyboardInterrupt) as caught:  # kept, as a REPL keeps the last one
            model.run(feeds)
        assert not armed.is_set() and caught.traceback
        assert live_sessions() == _kept(model)
        assert sys.getswitchinterval() == switch_interval
        for _ in range(2):  # usable again, right away
            np.testing.assert_allclose(
                model.run(feeds)["logits"], reference_logits(toy_dir, feeds), atol=1e-5
            )
    assert live_sessions() == 0


@pytest.mark.parametrize("strategy", ["pipeload", "ondemand", "pipeswitch", "full"])
def test_interrupt_inside_a_block(toy_dir, strategy, monkeypatch, live_sessions, no_thread_leak):
    """KeyboardInterrupt out of the inference agent's block run itself (the Ctrl-C that arrives
    while ONNX Runtime computes is raised when its run returns)."""
    real = Session.run

    def interrupted(self, output_names, input_feed, run_options=None):
        if "h_2" in input_feed or ("input_ids" in input_feed and "logits" in output_names):
            raise KeyboardInterrupt  # in ORT's frame, whose `self` is the session
        return real(self, output_names, input_feed, run_options)

    with hermes_ort.load(toy_dir, strategy=strategy) as model:
        feeds = model.sample_inputs()
        monkeypatch.setattr(Session, "run", interrupted)
        with pytest.raises(KeyboardInterrupt) as caught:  # kept, as a REPL keeps the last one
            model.run(feeds)
        assert live_sessions() == _kept(model) and caught.traceback
        monkeypatch.setattr(Session, "run", real)
        np.testing.assert_allclose(
            model.run(feeds)["logits"], reference_logits(toy_dir, feeds), atol=1e-5
        )
    assert live_sessions() == 0


def test_ctrl_c_ends_the_command_line_cleanly(toy_dir):
    """`hermes-ort run` interrupted while its blocks' data are mapped: exit 130, one line."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hermes_ort",
            "run",
            str(toy_dir),
            "--window",
            "2",
            "--repeat",
            "1000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        blocks = str(toy_dir / "blocks")
        while time.monotonic() < deadline:  # running: a block's data file is mapped
            with open(f"/proc/{proc.pid}/maps") as maps:
                if blocks in maps.read():
                    break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and err.strip().endswith("hermes-ort: interrupted")
    assert "Traceback" not in err


# -- concurrent callers --------------------------------------------------------------------------
def test_concurrent_runs_are_serialised(toy_dir, no_thread_leak):
    with hermes_ort.load(toy_dir, window=2) as model:
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
        results, errors = [], []

        def worker():
            try:
                for _ in range(5):
                    results.append(model.run(feeds)["logits"])
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert not errors and len(results) == 20
        assert all(np.array_equal(r, expected) for r in results)


def test_close_while_other_threads_run(toy_dir, live_sessions, no_thread_leak):
    """Runs already started finish; later ones are refused clearly; nothing hangs or leaks."""
    model = hermes_ort.load(toy_dir, window=2)
    feeds = model.sample_inputs()
    outcomes: list[str] = []
    started = threading.Event()

    def worker():
        while True:  # until refused
            try:
                model.run(feeds)
                outcomes.append("ok")
                started.set()
            except hermes_ort.HermesError as e:
                outcomes.append(str(e))
                return

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    assert started.wait(30)
    closers = [threading.Thread(target=model.close) for _ in range(2)]  # closing twice is fine
    for t in closers:
        t.start()
    for t in threads + closers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads + closers)
    refused = [o for o in outcomes if o != "ok"]
    assert len(refused) == 3 and all(o.endswith("is closed") for o in refused)
    assert live_sessions() == 0


# -- the process at its memory cap ---------------------------------------------------------------
ON_BOARD = os.environ.get("HERMES_ARM_BOARD") == "1"  # arm/run_tests.sh: the emulated board
not_under_qemu = pytest.mark.skipif(
    ON_BOARD, reason="under qemu-user the address space and resident memory are qemu's own"
)


def _child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@not_under_qemu
def test_allocation_failure_at_the_address_space_limit_is_clear_and_recoverable(toy_dir):
    """With RLIMIT_AS just above what the process maps, ORT's allocations fail instead of the
    kernel killing the process: a RunFailed that says so, and the model runs again after."""
    r = _child(
        """
        import resource, sys, threading
        import numpy as np
        import hermes_ort
        model = hermes_ort.load(sys.argv[1], window=2)
        feeds = model.sample_inputs()
        expected = model.run(feeds)["logits"]
        big = model.sample_inputs(batch_size=4096, sequence_length=64)  # 32 MiB a hidden state
        status = open("/proc/self/status").read().splitlines()
        vm = int(next(l for l in status if l.startswith("VmSize")).split()[1]) * 1024
        limits = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm + (16 << 20), limits[1]))
        try:
            model.run(big)
            print("ran")
        except hermes_ort.HermesError as e:
            print(type(e).__name__, e)
        resource.setrlimit(resource.RLIMIT_AS, limits)
        print("recovered", np.array_equal(model.run(feeds)["logits"], expected))
        model.close()
        print("threads", threading.active_count())
        """,
        str(toy_dir),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("RunFailed block '") and "ran out of memory" in lines[0]
    assert lines[1:] == ["recovered True", "threads 1"]


_MEMORY, _WHY_MEMORY = cgroups.controller_base("memory")
needs_memory_cgroup = pytest.mark.skipif(
    _MEMORY is None, reason=f"needs a cgroup v1 memory controller to cap a child: {_WHY_MEMORY}"
)


def _groups_left(pid: int) -> list:
    return list(_MEMORY.glob(f"{cgroups.PREFIX}*-{pid}-*"))


def _fresh_min_budget(model_dir) -> int:
    r = _child(
        """
        import sys
        from bench.child import main
        main(["describe", sys.argv[1]])
        """,
        str(model_dir),
    )
    return json.loads(r.stdout)["min_budget_bytes"]


@needs_memory_cgroup
@not_under_qemu
def test_a_run_under_a_hard_cap_at_its_budget_is_not_killed(toy_dir):
    """The budget bounds the process for real: a cgroup cap at the smallest budget plus 10%
    lets every pass finish (the bench's --cap-at-budget in small)."""
    smallest = _fresh_min_budget(toy_dir)
    cap = int(smallest * 1.1)
    launch = Launch(Emulation.detect(), cap_bytes=cap, tag="test-faults")
    cmd = [
        sys.executable,
        "-m",
        "bench.child",
        "run",
        str(toy_dir),
        "--budget-min-factor",
        "1.0",
        "--passes",
        "5",
    ]
    result = run_under(launch, cmd, 120)
    assert result.ok, result.error
    assert launch.cap_enforced and launch.memory.oom_kills == 0
    assert launch.memory.peak_bytes <= cap and not _groups_left(os.getpid())


@needs_memory_cgroup
@not_under_qemu
def test_a_process_past_its_cap_is_killed_and_its_group_removed(toy_dir):
    """A budget the device cannot give (the cap is lower): the kernel kills the child, the
    parent records it as killed by the cap, and the group is gone."""
    smallest = _fresh_min_budget(toy_dir)
    script = textwrap.dedent(
        """
        import sys
        import hermes_ort
        with hermes_ort.load(sys.argv[1], memory_budget="2GB", window=2) as model:
            model.run(model.sample_inputs(batch_size=8192, sequence_length=64))  # ~64 MiB a tensor
        print('{"ok": true}')
        """
    )
    launch = Launch(Emulation.detect(), cap_bytes=smallest + 32 * MIB, tag="test-faults")
    result = run_under(launch, [sys.executable, "-c", script, str(toy_dir)], 120)
    sample = sample_from_child(0, result, launch.memory, None, launch.cap_enforced)
    assert result.returncode == -signal.SIGKILL and launch.memory.oom_kills >= 1
    assert sample.oom_killed and sample.error == "killed by the memory cap (OOM)"
    assert not _groups_left(os.getpid())


def test_the_bench_caps_each_budgeted_configuration_at_its_budget_plus_a_margin():
    """`hermes-ort bench --cap-at-budget 10%`: configurations with a budget run under a cap of the
    budget (as the child resolves it) + 10%, or their profile's cap if lower; the killed count."""
    from bench.matrix import build_matrix, expand
    from bench.models import ModelFacts
    from bench.records import killed_count
    from bench.render import killed_lines
    from bench.runner import Runner, RunOptions, margin_bytes

    mb = 10**6
    matrix = build_matrix(
        "smoke",
        models=["m"],
        strategies=["full", "pipeload"],
        budgets=["min", "x2min", "150MB", "none"],
        profiles=["warm", "sd:1c:200MB"],
    )
    runner = Runner(matrix, RunOptions(cgroups=False, budget_cap_margin="10%"))
    facts = ModelFacts("m", "m", "bert", 400 * mb, None, 100 * MIB + 1, 0, "estimate", None, 3, 1)
    for config in expand(matrix):
        runner.facts[(config.model, runner.cores_of(config))] = facts
    caps = {" ".join(c.key[1:]): runner.cap_bytes(c) for c in expand(matrix)}
    assert caps["full - warm"] is None and caps["pipeload none warm"] is None
    assert caps["pipeload min warm"] == 101 * MIB + int(0.1 * 101 * MIB)  # min rounded up to a MiB
    assert caps["pipeload 150MB warm"] == caps["pipeload 150MB sd:1c:200MB"] == 165 * mb
    assert caps["pipeload x2min sd:1c:200MB"] == caps["full - sd:1c:200MB"] == 200 * mb
    assert margin_bytes("16MB", 10**9) == 16 * mb

    def record(cap, killed, from_budget=False):
        return dict(
            memory_cap_bytes=cap,
            cap_enforced=True,
            killed_repeats=killed,
            repeats=2,
            cap_from_budget=from_budget,
        )

    records = [
        record(None, 0),
        record(165 * mb, 0, True),
        record(200 * mb, 2),
        record(101 * MIB, 1, True),
    ]
    assert killed_count(records) == {
        "configurations": 2,
        "capped_configurations": 3,
        "processes": 3,
        "capped_processes": 6,
        "budget_capped_killed": 1,
        "budget_capped_configurations": 2,
    }
    (line,) = killed_lines({"records": records, "budget_cap_margin": "10%"})
    assert (
        "capped at its budget + 10% (or its profile's cap, if lower): 1 of 2 capped so were killed"
        in line
    )
    assert "Killed for memory: 2 of 3 capped configurations** (3 of 6 processes)" in line
