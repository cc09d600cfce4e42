"""The runtime's wheel holds the runtime (and the exporter the `export` subcommand runs), never
the benchmarks, and says it needs only onnxruntime, numpy and psutil."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    os.environ.get("HERMES_ARM_BOARD") == "1", reason="the emulated board has no pip or network"
)
def test_the_wheel_has_no_benchmark_module(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0 and "No matching distribution" in r.stderr:
        pytest.skip(f"no build backend reachable: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("hermes_ort-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(z.read(n).decode() for n in names if n.endswith("METADATA"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {"hermes_ort", "export", next(t for t in tops if t.endswith(".dist-info"))}
    assert not [n for n in names if "bench" in n.split("/")[0] or "/bench" in n]
    required = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in required) == [
        "numpy",
        "onnxruntime",
        "psutil",
    ]
