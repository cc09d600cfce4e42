"""Calibration: real pipelined passes after profiling, to measure what the per-block sums miss.

The cost model adds up per-block measurements; a pipelined pass in a fresh process also holds
loader threads and their buffers, sessions opened ahead, lazily imported modules and the inference
agent's tensors. The difference between the measured peak of real passes, in a fresh process as
users run them, and the model's prediction for the same plans is stored in the profile
(`engine_overhead_bytes`) and added to every later prediction."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from hermes_ort.profiler import Profile

CALIBRATION_PASSES = 2


def measure_overhead(model_dir: Path) -> int:
    """In this (fresh) process: run the model streamed (2 loaders, window 3, nothing resident;
    with and without daemon lag) and return the largest measured-minus-predicted peak."""
    import hermes_ort
    from hermes_ort.engine import BlockEngine

    model = hermes_ort.load(model_dir, loaders=2, window=3)  # plans with the stored profile
    feeds = model.sample_inputs()
    model.close()
    overhead = -(1 << 62)
    for lag in (1, 0):
        plan = dataclasses.replace(model.plan, lag=lag, drop_cache=False)
        engine = BlockEngine(model.model_dir, model.manifest, plan)
        try:
            for _ in range(CALIBRATION_PASSES):
                _, stats = engine.run(feeds)
                predicted = model.cost.peak((), plan.window, lag)
                overhead = max(overhead, stats.peak_rss_bytes - predicted)
        finally:
            engine.close()
    return overhead


def calibrate(model_dir: str | Path, profile: Profile) -> Profile:
    """Store `profile`, measure the overhead in a fresh process, store the calibrated profile."""
    model_dir = Path(model_dir)
    profile = dataclasses.replace(profile, engine_overhead_bytes=0)
    profile.save(model_dir)
    cmd = [sys.executable, "-m", "hermes_ort.calibrate", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"calibration of '{model_dir}' failed: {tail}")
    overhead = int(json.loads(done.stdout.strip().splitlines()[-1])["overhead_bytes"])
    return dataclasses.replace(profile, engine_overhead_bytes=max(0, overhead))


if __name__ == "__main__":
    print(json.dumps({"overhead_bytes": measure_overhead(Path(sys.argv[1]))}))
