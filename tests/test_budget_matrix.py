"""The budget holds at every batch and length (issue #27): tiny presets, a profile measured first,
then each shape at `min` for that shape in a fresh process; the process's peak resident set (its
own VmHWM across the engine's resets: imports, plan and passes) must not exceed the budget the
plan ran under by more than the issue's 5%, and the outputs (greedy tokens) must equal the
unbudgeted run's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hermes_ort.measure.fresh_process import run_child

ROWS = (1, 8, 64)
# the target: the measured peak within 5% of the budget the plan ran under (the fits of
# a tiny model's sub-MB activations are the noisiest; real models hold with room: see
# bench/results/latest/budget)
TARGET = 1.05
POSITIONS = (16, 128)  # 128: the tiny presets' longest

# A child: load at a budget, run (or generate from) a rows x positions batch, print one JSON line.
CHILD = r"""
import json, sys
import numpy as np
import hermes_ort
from hermes_ort.streaming.memory import process_peak_rss_bytes
model_dir, mode, rows, positions, budget = sys.argv[1:6]
rows, positions = int(rows), int(positions)
budget = None if budget == "none" else budget
with hermes_ort.load(model_dir, memory_budget=budget) as model:
    if mode == "run":
        out = model.run(model.sample_inputs(batch_size=rows, sequence_length=positions))
        first = next(iter(out.values()))
        digest = [float(first.astype(np.float64).sum()), float(np.abs(first).max())]
        del out, first
    else:
        rng = np.random.default_rng(0)
        ids = rng.integers(3, 1000, (rows, positions - 4))  # the prompt and 4 new: `positions`
        new = model.generate(ids, max_new_tokens=4, eos_token_id=[])
        digest = np.asarray(new)[:, positions - 4:].tolist()
    print(json.dumps({"budget": model.plan.budget_bytes, "digest": digest,
                      "peak": process_peak_rss_bytes(),
                      "micro": model.plan.batch.micro_batch,
                      "chunk": model.plan.batch.prefill_chunk}))
"""


def _child(model_dir: Path, mode: str, rows: int, positions: int, budget: str) -> tuple[dict, int]:
    cmd = [sys.executable, "-c", CHILD, str(model_dir), mode, str(rows), str(positions), budget]
    r = run_child(cmd, 300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.record, r.record["peak"]  # its own: wait4's maxrss includes the forking parent's


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch", reason="exporting needs torch (not on the aarch64 board)")
    from export_fixtures import export_cli

    out = {}
    for name in ("tiny-bert", "tiny-gpt2"):
        d = tmp_path_factory.mktemp("budget") / name
        assert export_cli(d, "--preset", name, full_model=False) == 0
        cmd = [sys.executable, "-m", "hermes_ort", "profile", str(d)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        out[name] = d
    return out


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(("name", "mode"), [("tiny-bert", "run"), ("tiny-gpt2", "generate")])
def test_peak_within_the_budget_at_every_shape(profiled, name, mode, rows, positions):
    model_dir = profiled[name]
    free, _ = _child(model_dir, mode, rows, positions, "none")
    held, peak = _child(model_dir, mode, rows, positions, "min")
    assert held["budget"] is not None
    assert peak <= TARGET * held["budget"], (
        f"{name} {mode} {rows} x {positions}: peak {peak / 1e6:.1f} MB over the budget "
        f"{held['budget'] / 1e6:.1f} MB (micro-batch {held['micro']}, chunk {held['chunk']})"
    )
    if mode == "generate":
        assert held["digest"] == free["digest"]
    else:
        (s1, m1), (s2, m2) = free["digest"], held["digest"]
        assert abs(m1 - m2) <= 1e-5 * m1 and abs(s1 - s2) <= 1e-5 * max(m1, 1.0) * rows * positions


def test_plan_json_and_one_smallest(profiled):
    cmd = [sys.executable, "-m", "hermes_ort", "plan", str(profiled["tiny-bert"])]
    cmd += ["--budget", "min", "--batch", "8", "--seq-len", "64", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["batch_rows"] == 8 and plan["batch_positions"] == 64
    assert plan["smallest_budget_bytes"] == plan["budget_bytes"]
    text = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=120).stdout
    assert text.count("smallest workable budget") == 1
