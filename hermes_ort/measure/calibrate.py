"""Calibration: real pipelined passes after profiling, to measure what the per-block sums miss.

The cost model adds up per-block measurements; a pipelined pass in a fresh process also holds
loader threads and their buffers, sessions opened ahead, lazily imported modules and the inference
agent's tensors. The difference between the measured peak of real passes, in a fresh process as
users run them, and the model's prediction for the same plans is stored in the profile
(`engine_overhead_bytes`) and added to every later prediction. A second fresh process runs plans
that keep half and all of the model and stores what those miss: the kept blocks' overhead share,
the first pass's start-up time and the slowdown of repeated passes that stream.

`ensure_profile` is the whole job: the stored profile, or the blocks measured now (profiler.py),
calibrated and stored beside the manifest."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from pathlib import Path

from hermes_ort.core.errors import BudgetError, ChildFailed, ProfileError
from hermes_ort.core.manifest import load_manifest
from hermes_ort.measure.fresh_process import child_main, require, run_child
from hermes_ort.measure.profiler import costs_now, profile_model
from hermes_ort.planning.layer_profile import Profile, read_profile
from hermes_ort.planning.pipeline_planner import check_budget, plan_pipeload
from hermes_ort.streaming.block_engine import BlockEngine
from hermes_ort.streaming.integrity import Verifier
from hermes_ort.streaming.readahead import warm_files
from hermes_ort.tensors.inputs import sample_inputs

CALIBRATION_PASSES = 2
MIN_KEPT_BYTES = 32 << 20  # below this, RSS jitter (~1 MB) is a large share of the kept bytes


def ensure_profile(model_dir: str | Path, progress=None) -> Profile:
    """The stored profile, or a new one measured now, calibrated and saved beside the manifest
    (unsaved, and uncalibrated, when the model directory is read-only)."""
    model_dir = Path(model_dir)
    profile = read_profile(model_dir)
    if profile is None:
        profile = profile_model(model_dir, progress=progress)
        try:
            profile = calibrate(model_dir, profile)  # stores it, measures in fresh processes
            profile.save(model_dir)
        except OSError:  # a read-only model directory: use it uncalibrated and unsaved
            pass
    return profile


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
    overhead = max(0, int(_fresh(model_dir, "streamed")["overhead_bytes"]))
    profile = dataclasses.replace(profile, engine_overhead_bytes=overhead)
    profile.save(model_dir)  # the kept blocks' share is measured on top of it
    return dataclasses.replace(profile, **_fresh(model_dir, "kept"))


def _fresh(model_dir: Path, what: str) -> dict:
    cmd = [sys.executable, "-m", "hermes_ort.measure.calibrate", what, str(model_dir)]
    try:
        record = require(run_child(cmd, timeout_s=1800), f"calibration of '{model_dir}' ({what})")
    except ChildFailed as e:
        raise ProfileError(str(e)) from None
    record.pop("ok", None)
    return record


class _Opened:
    """A profiled model in this process, as `load` would plan it (the stored profile's costs)."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.manifest = load_manifest(model_dir)
        self.profile = read_profile(model_dir)
        if self.profile is None:
            raise ProfileError(f"'{model_dir}' has no profile to calibrate")
        self.verifier = Verifier(model_dir, "size")
        self.names = tuple(b.name for b in self.manifest.blocks)

    def costs(self):
        return costs_now(self.model_dir, self.manifest, self.profile, cold=True)

    def engine(self, plan) -> BlockEngine:
        return BlockEngine(self.manifest, plan, self.verifier)


def measure_overhead(model_dir: Path) -> dict:
    """In this (fresh) process: run the model streamed (2 loaders, window 3, nothing resident;
    with and without daemon lag) and return the largest measured-minus-predicted peak."""
    m = _Opened(model_dir)
    cost = m.costs().without_paging()  # the profile's streamed blocks, as they were measured
    plan = plan_pipeload(cost, None, loaders=2, window=3)
    feeds = sample_inputs(m.manifest)
    overhead = -(1 << 62)
    for lag in (1, 0):
        blocks = tuple(dataclasses.replace(b, drop_pages=False) for b in plan.blocks)
        lagged = dataclasses.replace(
            plan, mechanism=dataclasses.replace(plan.mechanism, lag=lag, blocks=blocks)
        )
        engine = m.engine(lagged)
        try:
            for _ in range(CALIBRATION_PASSES):
                _, stats = engine.run(feeds)
                predicted = cost.peak((), plan.window, lag)
                overhead = max(overhead, stats.peak_rss_bytes - predicted)
        finally:
            engine.close()
    return {"overhead_bytes": overhead}


def measure_kept_overhead(model_dir: Path) -> dict:
    """In this (fresh) process: run as planned under budgets that keep half and all of the
    model, first and repeated passes. Returns the largest measured-minus-predicted peak as a
    share of the kept blocks' bytes (never below 0; models smaller than the RSS jitter are
    skipped), how much longer the process's first pass took than predicted (ONNX Runtime's
    one-time start: thread pools, code paged in), and the ratio of measured to predicted repeated
    passes that stream (loads from storage contend with inference for the cores)."""
    m = _Opened(model_dir)
    feeds = sample_inputs(m.manifest)
    warm_files(model_dir / p for p in m.manifest.block_files())  # a known page-cache state
    worst, first_extra, ratios = 0.0, None, []
    for share in (0.5, 1.0):
        cost = m.costs()  # as load() would see it now
        low, high = cost.min_budget(), cost.peak(tuple(range(cost.count)), 1)
        budget = int(low + share * (high - low))
        try:
            check_budget(cost, budget, m.names)
        except BudgetError:  # the baseline moved by more than the model's size
            continue
        plan = plan_pipeload(cost, budget)
        packed = cost.with_prepack(frozenset(plan.prepack_resident))
        kept = sum(packed.blocks[i].resident_bytes for i in plan.resident)
        engine = m.engine(plan)
        try:
            for _ in range(CALIBRATION_PASSES + 1):  # the first pass, then repeated ones
                _, stats = engine.run(feeds)
                if first_extra is None:
                    first_extra = stats.latency_s - plan.prediction.first_latency_s
                elif len(plan.resident) < cost.count:
                    ratios.append(stats.latency_s / plan.prediction.latency_s)
                if kept >= MIN_KEPT_BYTES:
                    over = stats.peak_rss_bytes - plan.prediction.peak_bytes
                    worst = max(worst, over / kept)
        finally:
            engine.close()
    scale = statistics.median(ratios) if ratios else 1.0
    return {
        "kept_overhead": worst,
        "first_pass_extra_s": max(0.0, first_extra or 0.0),
        "stream_pass_scale": min(3.0, max(1.0, scale)),
    }


def _child(argv: list[str]) -> dict:
    what, model_dir = argv[0], Path(argv[1])
    return measure_overhead(model_dir) if what == "streamed" else measure_kept_overhead(model_dir)


if __name__ == "__main__":
    sys.exit(child_main(_child))
