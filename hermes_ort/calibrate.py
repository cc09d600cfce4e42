"""Calibration: real pipelined passes after profiling, to measure what the per-block sums miss.

The cost model adds up per-block measurements; a pipelined pass in a fresh process also holds
loader threads and their buffers, sessions opened ahead, lazily imported modules and the inference
agent's tensors. The difference between the measured peak of real passes, in a fresh process as
users run them, and the model's prediction for the same plans is stored in the profile
(`engine_overhead_bytes`) and added to every later prediction. A second fresh process runs plans
that keep half and all of the model and stores what those miss: the kept blocks' overhead share,
the first pass's start-up time and the slowdown of repeated passes that stream."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from hermes_ort.profiler import Profile

CALIBRATION_PASSES = 2
MIN_KEPT_BYTES = 32 << 20  # below this, RSS jitter (~1 MB) is a large share of the kept bytes


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


def measure_kept_overhead(model_dir: Path) -> dict[str, float]:
    """In this (fresh) process: run as planned under budgets that keep half and all of the
    model, first and repeated passes. Returns the largest measured-minus-predicted peak as a
    share of the kept blocks' bytes (never below 0; models smaller than the RSS jitter are
    skipped), how much longer the process's first pass took than predicted (ONNX Runtime's
    one-time start: thread pools, code paged in), and the ratio of measured to predicted repeated
    passes that stream (loads from storage contend with inference for the cores)."""
    import hermes_ort
    from hermes_ort.errors import BudgetError
    from hermes_ort.manifest import load_manifest
    from hermes_ort.model import cost_model
    from hermes_ort.readahead import warm_files

    manifest = load_manifest(model_dir)
    hermes_ort.load(model_dir).close()  # what a load imports and verifies is in the baseline now
    warm_files(model_dir / p for p in manifest.block_files())  # a known page-cache state
    worst, first_extra, ratios = 0.0, None, []
    for share in (0.5, 1.0):
        cost = cost_model(model_dir, manifest, None, cold=True)  # as load() will see it now
        low, high = cost.min_budget(), cost.peak(tuple(range(cost.blocks)), 1)
        budget = int(low + share * (high - low))
        try:
            model = hermes_ort.load(model_dir, memory_budget=budget)
        except BudgetError:  # the baseline moved by more than the model's size
            continue
        with model:
            plan = model.plan
            kept = sum(
                model.cost.with_prepack(frozenset(plan.prepack_resident)).resident_bytes[i]
                for i in plan.resident
            )
            for _ in range(CALIBRATION_PASSES + 1):  # the first pass, then repeated ones
                model.run(model.sample_inputs())
                if first_extra is None:
                    first_extra = model.stats.latency_s - plan.predicted_first_latency_s
                elif len(plan.resident) < cost.blocks:
                    ratios.append(model.stats.latency_s / plan.predicted_latency_s)
                if kept >= MIN_KEPT_BYTES:
                    over = model.stats.peak_rss_bytes - plan.predicted_peak_bytes
                    worst = max(worst, over / kept)
    scale = statistics.median(ratios) if ratios else 1.0
    return {
        "kept_overhead": worst,
        "first_pass_extra_s": max(0.0, first_extra or 0.0),
        "stream_pass_scale": min(3.0, max(1.0, scale)),
    }


def calibrate(model_dir: str | Path, profile: Profile) -> Profile:
    """Store `profile`, measure the overhead in a fresh process, store the calibrated profile."""
    model_dir = Path(model_dir)
    profile = dataclasses.replace(
        profile,
        engine_overhead_bytes=0,
        kept_overhead=0.0,
        first_pass_extra_s=0.0,
        stream_pass_scale=1.0,
    )
    profile.save(model_dir)
    overhead = max(0, int(_fresh(model_dir, "streamed")))
    profile = dataclasses.replace(profile, engine_overhead_bytes=overhead)
    profile.save(model_dir)  # the kept blocks' share is measured on top of it
    return dataclasses.replace(profile, **_fresh(model_dir, "kept"))


def _fresh(model_dir: Path, what: str) -> Any:
    cmd = [sys.executable, "-m", "hermes_ort.calibrate", str(model_dir), what]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"calibration of '{model_dir}' failed: {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])["value"]


if __name__ == "__main__":
    where, what = Path(sys.argv[1]), sys.argv[2]
    value = measure_overhead(where) if what == "streamed" else measure_kept_overhead(where)
    print(json.dumps({"value": value}))
