"""`python -m bench.child MODE ...`: what runs inside each fresh benchmark process, on the
runtime's child protocol (hermes_ort/measure/fresh_process.py: one JSON line on stdout,
{"ok": false, "error": ...} and exit status 1 on failure).

run MODEL_DIR       load one strategy (under a budget), sample its own RSS over time, run
                    `--passes` passes: the first gives the one-shot latency (process start, passed
                    as --t0, to outputs, loading included), the others the steady per-pass latency.
generate MODEL_DIR  a prompt, then `--new-tokens` greedy tokens: time to first token, each token's.
describe MODEL_DIR  sizes and the planner's smallest workable budget, as a fresh process sees them.
read FILE...        read files sequentially: bytes and seconds (the storage bandwidth probe).
verify MODEL_DIR    `load` with a verify mode, then one pass: what the integrity checks cost.
"""

from __future__ import annotations

import time

T_IMPORT = time.time()  # noqa: E402  (before anything heavy is imported)

import argparse  # noqa: E402
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


def costs_at_load(model_dir: Path):
    """The cost model `load` plans a budgeted pass with in this process (stored profile or
    estimates), and the manifest."""
    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.measure.profiler import costs_now
    from hermes_ort.planning.layer_profile import read_profile

    manifest = load_manifest(model_dir)
    return costs_now(model_dir, manifest, read_profile(model_dir), cold=True), manifest


def _budget(args, model_dir: Path) -> int | str | None:
    """Bytes of the budget; `--budget-min-factor` is resolved here, against the smallest workable
    budget as this very process sees it (matrix.min_budget_at); factor 1 is `load`'s own "min",
    resolved as the model is planned."""
    if args.budget_min_factor is None:
        return args.budget
    if args.budget_min_factor == 1:
        return "min"
    from bench.matrix import min_budget_at

    cost, _ = costs_at_load(model_dir)
    return min_budget_at(args.budget_min_factor, cost.min_budget())


def cmd_run(args) -> dict[str, Any]:
    from hermes_ort.streaming.memory import (  # imports the runtime (ORT)
        RssSampler,
        storage_read_bytes,
    )

    t0 = args.t0 or T_IMPORT
    t_sampler = time.time()
    with RssSampler(args.sample_interval) as sampler:
        import hermes_ort

        hermes_ort.load  # noqa: B018  (the runtime itself, ONNX Runtime: its start is import_s)
        t_imported = time.time()
        model = hermes_ort.load(
            args.model_dir,
            memory_budget=_budget(args, args.model_dir),
            strategy=args.strategy,
            load_path=args.load_path,
            objective=args.objective,
            loaders=args.loaders,
            window=args.window,
        )
        t_loaded = time.time()
        with model:
            feeds = model.sample_inputs(batch_size=args.batch, sequence_length=args.seq_len)
            outputs = model.run(feeds)
            t_outputs = time.time()
            digest = {k: _digest(v) for k, v in outputs.items()}
            del outputs  # not held through the later passes (a caller's, not the plan's)
            passes = [model.stats]
            for _ in range(args.passes - 1):
                model.run(feeds)
                passes.append(model.stats)
        t_closed = time.time()
    plan, first, steady = model.plan, passes[0], passes[1:]
    curve = [(t_sampler - t0 + s.t_s, s.rss_bytes) for s in sampler.samples]
    return {
        "strategy": plan.strategy,
        "budget_bytes": plan.budget_bytes,
        "plan": plan.to_json(),
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
        "pass_peak_rss_bytes": [p.peak_rss_bytes for p in passes],
        "baseline_rss_bytes": first.rss_before_bytes,
        "peak_rss_bytes": max([p.peak_rss_bytes for p in passes] + [v for _, v in curve]),
        "read_bytes": storage_read_bytes(),
        "rss_curve": downsample(curve),
        "output_digest": digest,
        "process_peak_rss_bytes": _process_peak(),
    }


def _process_peak() -> int:
    """This process's peak resident set since exec, across the engine's VmHWM resets."""
    from hermes_ort.streaming.memory import process_peak_rss_bytes

    return process_peak_rss_bytes()


def _digest(value) -> list[float]:
    """A few numbers that tell two outputs apart: sum, sum of squares, max abs (no copies of a
    large output: the bench must not add to the peak it measures)."""
    import numpy as np

    flat = np.asarray(value).ravel()
    if flat.size == 0:
        return [0.0, 0.0, 0.0]
    if not np.issubdtype(flat.dtype, np.floating):
        flat = flat.astype(np.float64)
    top = max(abs(float(flat.max())), abs(float(flat.min())))
    return [float(flat.sum(dtype=np.float64)), float(np.dot(flat, flat)), top]


def cmd_generate(args) -> dict[str, Any]:
    t0 = args.t0 or T_IMPORT
    import numpy as np

    import hermes_ort
    from hermes_ort.streaming.memory import rss_bytes, storage_read_bytes

    if args.warm:  # inside this process's cgroup, so the cap bounds what stays cached
        from bench.models import model_files
        from hermes_ort.streaming.readahead import warm_files

        manifest = hermes_ort.load_manifest(args.model_dir)
        warm_files(model_files(manifest, args.model_dir, args.strategy))
        t0 = time.time()  # the one-shot starts after the warm-up
    read0, baseline = storage_read_bytes(), rss_bytes()
    model = hermes_ort.load(args.model_dir, memory_budget=args.budget, strategy=args.strategy)
    t_loaded = time.time()
    with model:
        vocab = next(t.sample["high"] for t in model.manifest.inputs if t.name == "input_ids")
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, vocab, args.prompt_tokens)
        if args.prompts > 1:  # a batch: rows of the same length, each its own ids
            prompt = rng.integers(0, vocab, (args.prompts, args.prompt_tokens))
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(_token: int) -> None:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        out = model.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[], streamer=tick)
        s, plan = model.generation_stats, model.plan
    streamed = sum(b.bytes for i, b in enumerate(model.manifest.blocks) if i not in plan.resident)
    return {
        "one_shot_s": time.time() - t0,  # process start to the last token, loading included
        "load_s": t_loaded - t0,
        "time_to_first_token_s": s.time_to_first_token_s,
        "token_s": times[1:],  # each decode pass (the first entry is the prompt pass)
        "decode_tokens_per_s": s.decode_tokens_per_s,
        "new_ids": np.asarray(out)[..., args.prompt_tokens :].tolist(),
        "new_tokens": s.new_tokens,
        "prompts": args.prompts,
        "peak_rss_bytes": s.peak_rss_bytes,
        "bytes_read": storage_read_bytes() - read0,
        "cache_bytes": s.cache_bytes,
        "baseline_bytes": baseline,  # RSS with Python, numpy and ORT imported, before the model
        "budget_bytes": plan.budget_bytes,
        "plan": {**plan.to_json(), "streamed_bytes": streamed},
        "process_peak_rss_bytes": _process_peak(),
    }


def cmd_describe(args) -> dict[str, Any]:
    from hermes_ort.planning.layer_profile import read_profile
    from hermes_ort.streaming.memory import RssSampler

    with RssSampler(1.0):  # as in `run`: the same threads, so the same baseline
        cost, manifest = costs_at_load(args.model_dir)
    profile = read_profile(args.model_dir)
    # the other compute floor: the profile's per-block steady runs, the faster way of each
    compute = sum(min(b.run_s, b.run_prepack_s) for b in profile.blocks) if profile else None
    return {
        "name": manifest.name,
        "family": manifest.family,
        "task": manifest.task,
        "blocks": len(manifest.blocks),
        "layers": manifest.num_layers,
        "model_bytes": manifest.blocks_bytes,
        "full_bytes": manifest.full_model.bytes if manifest.full_model else None,
        "min_budget_bytes": cost.min_budget(),
        "baseline_bytes": cost.baseline_bytes,
        "resident_peak_bytes": cost.peak(tuple(range(cost.count)), 1),
        "cost_source": cost.source,
        "profile_compute_s": compute,
    }


def cmd_read(args) -> dict[str, Any]:
    buf = bytearray(1 << 20)
    total = 0
    t = time.perf_counter()
    for path in args.files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return {"bytes": total, "seconds": time.perf_counter() - t}


def cmd_verify(args) -> dict[str, Any]:
    t0 = time.perf_counter()
    import hermes_ort

    t1 = time.perf_counter()
    model = hermes_ort.load(args.model_dir, strategy=args.strategy, verify=args.verify)
    t2 = time.perf_counter()
    model.run(model.sample_inputs())
    t3 = time.perf_counter()
    model.close()
    return {"import_s": t1 - t0, "load_s": t2 - t1, "first_pass_s": t3 - t2}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.child", description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run")
    run.add_argument("model_dir", type=Path)
    run.add_argument("--strategy", default="pipeload")
    run.add_argument("--load-path", default="default")
    run.add_argument("--budget", default=None, help="bytes, or a spelling load() takes")
    run.add_argument("--budget-min-factor", type=float, default=None, help="F x min budget")
    run.add_argument("--passes", type=int, default=3)
    run.add_argument("--objective", default="repeated", help="pipeload's plan objective")
    run.add_argument("--loaders", type=int, default=None)
    run.add_argument("--window", type=int, default=None)
    run.add_argument("--sample-interval", type=float, default=0.01, help="RSS sampling, seconds")
    run.add_argument("--batch", type=int, default=1, help="rows of the sample inputs")
    run.add_argument("--seq-len", type=int, default=None, help="positions of the sample inputs")
    run.set_defaults(func=cmd_run)
    gen = sub.add_parser("generate")
    gen.add_argument("model_dir", type=Path)
    gen.add_argument("--strategy", default="pipeload")
    gen.add_argument("--budget", default=None, help="bytes, or a spelling load() takes")
    gen.add_argument("--prompt-tokens", type=int, default=32)
    gen.add_argument("--new-tokens", type=int, default=16)
    gen.add_argument("--prompts", type=int, default=1, help="prompts generated at once (a batch)")
    gen.add_argument("--warm", action="store_true", help="read the model files first")
    gen.set_defaults(func=cmd_generate)
    describe = sub.add_parser("describe")
    describe.add_argument("model_dir", type=Path)
    describe.set_defaults(func=cmd_describe)
    read = sub.add_parser("read")
    read.add_argument("files", nargs="+")
    read.set_defaults(func=cmd_read)
    verify = sub.add_parser("verify")
    verify.add_argument("model_dir", type=Path)
    verify.add_argument("--strategy", default="pipeload")
    verify.add_argument("--verify", default="once")
    verify.set_defaults(func=cmd_verify)
    for s in (run, gen, describe, read, verify):
        s.add_argument("--t0", type=float, default=None, help="time.time() at the parent's spawn")
    return p


def main(argv: list[str] | None = None) -> int:
    from hermes_ort.measure.fresh_process import child_main

    def run(argv: list[str]) -> dict[str, Any]:
        args = build_parser().parse_args(argv)
        return args.func(args)

    return child_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
