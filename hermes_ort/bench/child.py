"""`python -m hermes_ort.bench.child MODE ...`: what runs inside each fresh benchmark process.
It prints one JSON line on stdout (on failure: {"ok": false, "error": ...} and exit status 1).

run MODEL_DIR      load one strategy (under a budget), sample its own RSS over time, run `--passes`
                   passes: the first gives the one-shot latency (process start, passed as --t0,
                   to outputs, loading included), the others the steady per-pass latency.
describe MODEL_DIR sizes and the planner's smallest workable budget, as a fresh process sees them.
read FILE...       read files sequentially: bytes and seconds (the storage bandwidth probe).
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # noqa: E402  (before anything heavy is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

MAX_CURVE_POINTS = 800


def downsample(points: list[tuple[float, int]], limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    """At most `limit` points of a (t_s, bytes) curve, always keeping its first, last and peak."""
    if len(points) <= limit:
        return [[round(t, 4), int(v)] for t, v in points]
    step = math.ceil(len(points) / limit)
    keep = set(range(0, len(points), step)) | {len(points) - 1}
    keep.add(max(range(len(points)), key=lambda i: points[i][1]))
    return [[round(points[i][0], 4), int(points[i][1])] for i in sorted(keep)]


def _budget(args, model_dir: Path) -> int | str | None:
    """Bytes of the budget; `--budget-min-factor` is resolved here, against the smallest workable
    budget as this very process sees it (matrix.min_budget_at); factor 1 is `load`'s own "min",
    resolved as the model is planned."""
    if args.budget_min_factor is None:
        return args.budget
    if args.budget_min_factor == 1:
        return "min"
    from hermes_ort.bench.matrix import min_budget_at
    from hermes_ort.manifest import load_manifest
    from hermes_ort.model import cost_model

    cost = cost_model(model_dir, load_manifest(model_dir), None, cold=True)
    return min_budget_at(args.budget_min_factor, cost.min_budget())


def cmd_run(args) -> dict[str, Any]:
    from hermes_ort.memory import RssSampler, storage_read_bytes  # imports the runtime (ORT)

    t0 = args.t0 or T_IMPORT
    t_sampler = time.time()
    with RssSampler(args.sample_interval) as sampler:
        import hermes_ort

        t_imported = time.time()
        model = hermes_ort.load(
            args.model_dir,
            memory_budget=_budget(args, args.model_dir),
            strategy=args.strategy,
            load_path=args.load_path,
            objective=args.objective,
        )
        t_loaded = time.time()
        with model:
            feeds = model.sample_inputs()
            model.run(feeds)
            t_outputs = time.time()
            passes = [model.stats]
            for _ in range(args.passes - 1):
                model.run(feeds)
                passes.append(model.stats)
        t_closed = time.time()
    plan, first, steady = model.plan, passes[0], passes[1:]
    curve = [(t_sampler - t0 + s.t_s, s.rss_bytes) for s in sampler.samples]
    return {
        "ok": True,
        "strategy": plan.strategy,
        "budget_bytes": plan.budget_bytes,
        "plan": {
            "loaders": plan.loaders,
            "window": plan.window,
            "resident_blocks": len(plan.resident),
            "blocks": len(model.manifest.blocks),
            "lag": plan.lag,
            "prepack": plan.prepack,
            "readahead": plan.readahead,
            "cost_source": plan.cost_source,
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            "predicted_first_latency_s": plan.predicted_first_latency_s,
            "predicted_latency_s": plan.predicted_latency_s,
        },
        "import_s": t_imported - t0,
        "load_s": t_loaded - t_imported,
        "one_shot_s": t_outputs - t0,
        "process_s": t_closed - t0,
        "first_pass_s": first.latency_s,
        "first_pass_load_s": first.load_s,
        "first_pass_compute_s": first.compute_s,
        "first_pass_read_bytes": first.bytes_read,
        "steady_s": [s.latency_s for s in steady],
        "steady_compute_s": [s.compute_s for s in steady],
        "steady_read_bytes": [s.bytes_read for s in steady],
        "baseline_rss_bytes": first.rss_before_bytes,
        "peak_rss_bytes": max([p.peak_rss_bytes for p in passes] + [v for _, v in curve]),
        "read_bytes": storage_read_bytes(),
        "rss_curve": downsample(curve),
    }


def cmd_describe(args) -> dict[str, Any]:
    from hermes_ort.manifest import load_manifest
    from hermes_ort.memory import RssSampler
    from hermes_ort.model import cost_model
    from hermes_ort.profiler import load_profile

    with RssSampler(1.0):  # as in `run`: the same threads, so the same baseline
        manifest = load_manifest(args.model_dir)
        cost = cost_model(args.model_dir, manifest, None, cold=True)
    profile = load_profile(args.model_dir)
    return {
        "ok": True,
        "name": manifest.name,
        "family": manifest.family,
        "task": manifest.task,
        "blocks": len(manifest.blocks),
        "layers": manifest.num_layers,
        "model_bytes": manifest.blocks_bytes,
        "full_bytes": manifest.full_model.bytes if manifest.full_model else None,
        "min_budget_bytes": cost.min_budget(),
        "resident_peak_bytes": cost.peak(tuple(range(cost.blocks)), 1),
        "cost_source": cost.source,
        # the other compute floor: the profile's per-block steady runs, the faster way of each
        "profile_compute_s": sum(min(b.run_s, b.run_prepack_s) for b in profile.blocks)
        if profile
        else None,
    }


def cmd_read(args) -> dict[str, Any]:
    buf = bytearray(1 << 20)
    total = 0
    t = time.perf_counter()
    for path in args.files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return {"ok": True, "bytes": total, "seconds": time.perf_counter() - t}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hermes_ort.bench.child", description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run")
    run.add_argument("model_dir", type=Path)
    run.add_argument("--strategy", default="pipeload")
    run.add_argument("--load-path", default="default")
    run.add_argument("--budget", type=int, default=None, help="bytes")
    run.add_argument("--budget-min-factor", type=float, default=None, help="F x min budget")
    run.add_argument("--passes", type=int, default=3)
    run.add_argument("--objective", default="repeated", help="pipeload's plan objective")
    run.add_argument("--sample-interval", type=float, default=0.01, help="RSS sampling, seconds")
    run.set_defaults(func=cmd_run)
    describe = sub.add_parser("describe")
    describe.add_argument("model_dir", type=Path)
    describe.set_defaults(func=cmd_describe)
    read = sub.add_parser("read")
    read.add_argument("files", nargs="+")
    read.set_defaults(func=cmd_read)
    for s in (run, describe, read):
        s.add_argument(
            "--t0", type=float, default=None, help="time.time() when the parent spawned us"
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        record = args.func(args)
    except Exception as e:  # one line for the parent's record, never a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {first}"}), flush=True)
        return 1
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
