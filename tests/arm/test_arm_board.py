"""On the (emulated) aarch64 board: models exported on x86-64 give the x86 `full` outputs under
every
strategy, budgets are refused alike, and the runtime needs nothing beyond its aarch64 wheels.

Run by arm/run_tests.sh (`make test-arm`) with HERMES_ARM_FIXTURES set to the directory that
arm/make_fixtures.py wrote on x86-64; skipped without it. Needs no conftest and no `onnx`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hermes_ort

FIXTURES = os.environ.get("HERMES_ARM_FIXTURES")
ON_BOARD = os.environ.get("HERMES_ARM_BOARD") == "1"  # set by arm/run_tests.sh on the board
TOL = 1e-4
MB = 1 << 20

pytestmark = pytest.mark.skipif(not FIXTURES, reason="needs HERMES_ARM_FIXTURES (make test-arm)")
INFO = json.loads((Path(FIXTURES) / "fixtures.json").read_text()) if FIXTURES else {"models": {}}
MODELS = sorted(INFO["models"])
# what the runtime may import: its own three dependencies and what onnxruntime itself imports
RUNTIME_IMPORTS = {
    "hermes_ort",
    "numpy",
    "onnxruntime",
    "psutil",
    "google",
    "flatbuffers",
    "packaging",
    "cython_runtime",
}  # the last: a module Cython-built extensions register
NEVER_IMPORTED = {"torch", "transformers", "optimum", "onnx", "onnxscript", "onnx_ir", "accelerate"}


def model_dir(name: str) -> Path:
    return Path(FIXTURES) / "models" / name


# quantized models: the board's kernels differ from x86-64's (MatMulNBits' int8 activations need
# dot-product instructions the Cortex-A72 lacks), so they are held to their mode's accuracy floor
# against x86-64's outputs (cosine, as the export holds them against PyTorch), not to 1e-4
QUANTIZED_FLOOR = {"int8": 0.999, "int4": 0.99}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(1e-30, np.linalg.norm(a) * np.linalg.norm(b)))


def assert_like_x86(name: str, outputs: dict, expected: dict, record: dict) -> None:
    """Outputs equal x86-64's within TOL (fp32), or within the mode's floor (quantized)."""
    assert sorted(outputs) == sorted(expected)
    diffs = {k: float(np.abs(outputs[k] - expected[k]).max()) for k in expected}
    mode = (hermes_ort.load_manifest(model_dir(name)).quantization or {}).get("mode")
    if mode is None:
        report({**record, "model": name, "max_abs_diff": diffs})
        assert max(diffs.values()) <= TOL, diffs
        return
    cosines = {
        k: cosine(outputs[k], expected[k]) for k in expected if expected[k].dtype.kind == "f"
    }
    report({**record, "model": name, "mode": mode, "max_abs_diff": diffs, "cosine": cosines})
    assert min(cosines.values()) >= QUANTIZED_FLOOR[mode], cosines


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return dict(npz)


def report(record: dict) -> None:
    """One JSON line per comparison, for arm/run_tests.sh's summary."""
    if os.environ.get("HERMES_ARM_REPORT"):
        with open(os.environ["HERMES_ARM_REPORT"], "a") as f:
            f.write(json.dumps({"machine": platform.machine(), **record}) + "\n")


@pytest.mark.skipif(not ON_BOARD, reason="only on the board")
def test_runs_on_the_emulated_board():
    assert platform.machine() == "aarch64"
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert "CPU part\t: 0xd08" in cpuinfo  # Cortex-A72, the Raspberry Pi 4's core
    assert sys.version_info[:2] == (3, 11)


@pytest.mark.parametrize("strategy", hermes_ort.STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_strategy_equals_x86_full(name, strategy):
    feeds = load_npz(model_dir(f"{name}.inputs.npz"))
    expected = load_npz(model_dir(f"{name}.full-x86.npz"))
    with hermes_ort.load(model_dir(name), strategy=strategy) as model:
        outputs = model.run(feeds)
    assert_like_x86(name, outputs, expected, {"strategy": strategy})


@pytest.mark.parametrize("strategy", hermes_ort.STRATEGIES)
@pytest.mark.parametrize("name", [m for m in MODELS if m.endswith(("-int4", "-int8"))])
def test_quantized_strategies_equal_the_boards_own_full(name, strategy):
    """Streaming adds no error of its own on the board either: every strategy equals the board's
    own `full` within 1e-5 (its kernels are the same in every session)."""
    feeds = load_npz(model_dir(f"{name}.inputs.npz"))
    with hermes_ort.load(model_dir(name), strategy="full") as model:
        want = model.run(feeds)
    with hermes_ort.load(model_dir(name), strategy=strategy) as model:
        got = model.run(feeds)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=1e-5 * max(1.0, float(np.abs(v).max())))


@pytest.mark.parametrize("strategy", hermes_ort.STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_too_small_budget_refused_as_on_x86(name, strategy):
    expected = INFO["models"][name]["budget_refusals"][strategy]
    try:
        hermes_ort.load(
            model_dir(name), memory_budget=INFO["too_small_budget"], strategy=strategy
        ).close()
        got = None
    except hermes_ort.BudgetError as e:
        got = re.sub(INFO["size_pattern"], "N", str(e))
    assert got == expected


@pytest.mark.parametrize("name", MODELS)
def test_smallest_workable_budget_runs(name):
    with pytest.raises(hermes_ort.BudgetError) as err:
        hermes_ort.load(model_dir(name), memory_budget=INFO["too_small_budget"])
    minimum = int(re.search(r"\((\d+) bytes\)", str(err.value)).group(1))
    report({"model": name, "smallest_budget_bytes": minimum})
    expected = load_npz(model_dir(f"{name}.full-x86.npz"))
    # plus slack: the baseline is the RSS at load time, which moves a little, and under qemu it
    # also holds the emulator's translated-code cache, which grows by a few MB from load to load
    with hermes_ort.load(model_dir(name), memory_budget=minimum + 8 * MB) as model:
        assert model.plan.window >= 1
        outputs = model.run(load_npz(model_dir(f"{name}.inputs.npz")))
    assert_like_x86(name, outputs, expected, {"strategy": "pipeload-min"})


IMPORT_PROBE = """
import json, sys
import numpy as np
import hermes_ort
for strategy in hermes_ort.STRATEGIES:
    with hermes_ort.load(sys.argv[1], strategy=strategy) as model:
        model.run(model.sample_inputs())
tops = {m.split(".")[0] for m in sys.modules}
tops -= set(sys.stdlib_module_names) | set(sys.builtin_module_names)
tops -= {"sitecustomize"}  # the interpreter's own (Debian ships one in /usr/lib/python3.11)
print(json.dumps(sorted(t for t in tops if not t.startswith("_"))))
"""


def test_runtime_imports_only_its_wheels():
    # a fresh interpreter: pytest's own imports must not hide or add anything
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(model_dir("toy"))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    imported = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    report({"imported_top_level": sorted(imported)})
    assert not imported & NEVER_IMPORTED
    assert imported <= RUNTIME_IMPORTS, imported - RUNTIME_IMPORTS


def requirement_closure(site: Path, roots: set[str]) -> set[str]:
    """Distribution names needed by `roots` as installed in `site` (markers evaluated here)."""
    from importlib.metadata import distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    dists = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[str(site)])}
    need, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in need:
            continue
        need.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return need


@pytest.mark.skipif(not os.environ.get("HERMES_ARM_SITE"), reason="needs HERMES_ARM_SITE")
def test_site_holds_only_the_runtime_and_pytest():
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    site = Path(os.environ["HERMES_ARM_SITE"])
    installed = {canonicalize_name(d.metadata["Name"]) for d in distributions(path=[str(site)])}
    runtime = requirement_closure(site, {"onnxruntime", "numpy", "psutil"})
    tests = requirement_closure(site, {"pytest"})
    report({"site_runtime": sorted(runtime), "site_pytest": sorted(tests - runtime)})
    assert installed == runtime | tests
    assert not installed & NEVER_IMPORTED


def test_block_ops_are_portable():
    # read on x86 with `onnx` by make_fixtures.py; the equality test above is the real proof
    assert INFO["x86_only_ops"] == []


def guest_rss_bytes() -> int:
    """Resident bytes of the mappings the program itself sees in /proc/self/maps. Under qemu-user
    the process's RSS also counts the emulator (its translated-code cache grows as new code runs);
    qemu shows the guest only its own mappings there. Natively this is the whole RSS."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = line.split()[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    total, start = 0, None
    with open(f"/proc/{os.getpid()}/smaps") as f:  # by pid: qemu passes it through
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head:
                start = int(head.split("-")[0], 16)
            elif head == "Rss:" and any(a <= start < b for a, b in ranges):
                total += int(line.split()[1]) * 1024
    return total


def test_streaming_gives_memory_back_in_guest_memory():
    # tests/test_budget.py::test_streaming_gives_memory_back, measured without the emulator's memory
    wide = Path(FIXTURES) / "toy" / "toy-L8-H1024-V64-S0"
    model_bytes = hermes_ort.load_manifest(wide).blocks_bytes
    with hermes_ort.load(wide, window=2, loaders=1) as model:
        feeds = model.sample_inputs(sequence_length=8)
        before = guest_rss_bytes()
        for _ in range(3):
            model.run(feeds)
        after = guest_rss_bytes()
    report(
        {"model": wide.name, "guest_rss_growth_bytes": after - before, "model_bytes": model_bytes}
    )
    assert after - before < 0.25 * model_bytes  # destroyed sessions really returned their memory
