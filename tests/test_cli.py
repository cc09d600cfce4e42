"""The `hermes-ort` command line, run in a subprocess like a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def hermes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hermes_ort", *args], capture_output=True, text=True, timeout=120
    )


def test_run_prints_summary(toy_dir):
    r = hermes("run", str(toy_dir), "--budget", "1GB", "--repeat", "2")
    assert r.returncode == 0, r.stderr
    assert "output logits: shape (1, 16, 50)" in r.stdout
    assert "pass 2: latency" in r.stdout and "peak RSS" in r.stdout


def test_run_json_and_saved_outputs_match_full(toy_dir, tmp_path):
    outs = {}
    for strategy in ("full", "pipeload"):
        path = tmp_path / f"{strategy}.npz"
        r = hermes(
            "run", str(toy_dir), "--strategy", strategy, "--json", "--save-outputs", str(path)
        )
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        assert record["strategy"] == strategy and record["runs"][0]["latency_s"] > 0
        assert record["objective"] == "one-shot"  # one pass: the plan makes the first fastest
        outs[strategy] = np.load(path)["logits"]
    np.testing.assert_allclose(outs["pipeload"], outs["full"], atol=1e-5)


def test_plan_names_its_objective(toy_dir):
    for objective in ("repeated", "one-shot"):
        r = hermes(
            "plan", str(toy_dir), "--no-profile", "--budget", "1GB", "--objective", objective
        )
        assert r.returncode == 0, r.stderr
        assert f"fastest predicted {objective} pass" in r.stdout


def test_run_with_input_file(toy_dir, tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1, 1]]))
    r = hermes("run", str(toy_dir), "--input", str(path))
    assert r.returncode == 0, r.stderr
    assert "shape (1, 3, 50)" in r.stdout


def test_errors_are_one_line(toy_dir, tmp_path):
    r = hermes("run", str(toy_dir), "--budget", "1MB")
    assert (
        r.returncode == 1 and "smallest workable budget" in r.stderr and "Traceback" not in r.stderr
    )
    r = hermes("run", str(tmp_path / "missing"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = hermes("run", str(toy_dir), "--budget", "lots")
    assert r.returncode == 2 and "not a byte size" in r.stderr


def test_info_verifies_hashes(toy_dir):
    r = hermes("info", str(toy_dir), "--verify")
    assert r.returncode == 0, r.stderr
    assert "6 blocks" in r.stdout and "sha256 match" in r.stdout


# A command that caught an interrupt inside an `exec` of a string (a dataclass being defined
# during an import) and returned 130, run as `python -m` like the CLIs: it exits 130, not killed
# by SIGINT (-2 to its parent).
INTERRUPTED_IN_EXEC = """
import sys
from hermes_ort.core.errors import interrupted_status
try:
    exec("raise KeyboardInterrupt")
except KeyboardInterrupt:
    sys.exit(interrupted_status() if sys.argv[1] == "fixed" else 130)
"""


def test_an_interrupt_caught_inside_exec_exits_130(tmp_path):
    (tmp_path / "interrupted.py").write_text(INTERRUPTED_IN_EXEC)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def status(mode: str) -> int:
        cmd = [sys.executable, "-m", "interrupted", mode]
        return subprocess.run(cmd, cwd=tmp_path, env=env).returncode

    assert status("fixed") == 130
    if sys.version_info < (3, 12):  # the CPython behaviour the helper undoes
        assert status("plain") == -2
