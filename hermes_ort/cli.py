"""`hermes-ort`: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from hermes_ort.errors import HermesError, interrupted_status
from hermes_ort.units import format_bytes


def _add_run(sub) -> None:
    from hermes_ort.planner import OBJECTIVES, STRATEGIES

    p = sub.add_parser("run", help="run one pass of an exported model and print a summary")
    p.add_argument("model_dir", type=Path)
    p.add_argument(
        "--budget", default=None, help="memory budget, e.g. 200MB, 1.5GiB (default: none)"
    )
    p.add_argument("--strategy", default="pipeload", choices=(*STRATEGIES, "auto"))
    p.add_argument("--loaders", type=int, default=None, help="override the plan's loading agents")
    p.add_argument("--window", type=int, default=None, help="override the plan's window")
    p.add_argument(
        "--load-path", default="default", choices=("default", "stream"), help="baselines' load path"
    )
    p.add_argument(
        "--input", default="random", help="an .npz of inputs, or 'random' (the manifest's sample)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of random inputs")
    p.add_argument(
        "--repeat", type=int, default=1, help="passes to run (stats of each are printed)"
    )
    p.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVES,
        help="what pipeload's plan makes fastest (default: one-shot for one pass, else repeated)",
    )
    p.add_argument("--save-outputs", type=Path, default=None, help="write the outputs to this .npz")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    p.add_argument(
        "--verify",
        default="once",
        choices=("once", "size"),
        help="check each file's sha256 once and cache it (default), or only sizes",
    )
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    import hermes_ort

    objective = args.objective or ("one-shot" if args.repeat <= 1 else "repeated")
    model = hermes_ort.load(
        args.model_dir,
        memory_budget=args.budget,
        strategy=args.strategy,
        loaders=args.loaders,
        window=args.window,
        load_path=args.load_path,
        verify=args.verify,
        objective=objective,
    )
    with model:
        if args.input == "random":
            feeds = model.sample_inputs(sequence_length=args.seq_len)
        else:
            with np.load(args.input) as data:
                feeds = {k: data[k] for k in data.files}
        runs = []
        for _ in range(max(1, args.repeat)):
            outputs = None  # not held through the next pass (gpt2-medium's logits: 26 MB)
            outputs = model.run(feeds)
            runs.append(model.stats)
        if args.save_outputs:
            np.savez(args.save_outputs, **outputs)
    if args.json:
        record = {
            "model_dir": str(args.model_dir),
            "strategy": args.strategy,
            "budget_bytes": model.plan.budget_bytes,
            "objective": objective,
            "plan": {
                "loaders": model.plan.loaders,
                "window": model.plan.window,
                "lag": model.plan.lag,
                "resident": list(model.plan.resident),
                "cost_source": model.plan.cost_source,
                "predicted_peak_bytes": model.plan.predicted_peak_bytes,
                "predicted_first_latency_s": model.plan.predicted_first_latency_s,
                "predicted_latency_s": model.plan.predicted_latency_s,
            },
            "runs": [s.to_json() for s in runs],
            "outputs": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in outputs.items()
            },
        }
        print(json.dumps(record))
        return 0
    print(model.plan.describe())
    for name, value in outputs.items():
        flat = value.reshape(-1)
        print(
            f"output {name}: shape {tuple(value.shape)} {value.dtype}, mean {flat.mean():.6g}, first {flat[:4]}"
        )
    for k, s in enumerate(runs):
        print(
            f"pass {k + 1}: latency {s.latency_s * 1000:.1f} ms (load {s.load_s * 1000:.1f} ms, compute "
            f"{s.compute_s * 1000:.1f} ms, waited {s.wait_s * 1000:.1f} ms), peak RSS {format_bytes(s.peak_rss_bytes)}, "
            f"read {format_bytes(s.bytes_read)} from storage, {s.max_live_sessions} session(s) live at most"
        )
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an exported model directory")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--verify", action="store_true", help="also hash every file now (sha256)")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from hermes_ort.integrity import check_hash, check_size
    from hermes_ort.manifest import load_manifest

    m = load_manifest(args.model_dir)
    print(
        f"{m.name}: {m.family} / {m.task}, {m.num_layers} layers in {len(m.blocks)} blocks, "
        f"{format_bytes(m.blocks_bytes)} of blocks"
    )
    print("inputs: " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs))
    print("outputs: " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.outputs))
    for b in m.blocks:
        print(
            f"  {b.name:<14} {b.kind:<9} {format_bytes(b.bytes):>10}  in {len(b.inputs)}, out {len(b.outputs)}"
        )
    check = check_hash if args.verify else check_size
    files = list(m.block_files().values()) + (list(m.full_model.files) if m.full_model else [])
    for f in files:
        check(args.model_dir, f)
    print(
        f"{len(files)} files present{' and their sha256 match' if args.verify else ' with the right sizes'}"
    )
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="cut a Hugging Face model into per-block ONNX files (needs the export extra)"
    )
    try:
        from export.cli import add_arguments  # argparse only: torch is imported when it runs
    except ImportError:
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args: _missing_extra("the export package"))
        return
    add_arguments(p)
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    try:
        from export.cli import run

        return run(args)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in EXPORT_ONLY:
            return _missing_extra(e.name)
        raise


EXPORT_ONLY = (
    "torch",
    "transformers",
    "optimum",
    "onnx",
    "onnxscript",
    "accelerate",
    "safetensors",
    "tqdm",
)


def _missing_extra(what: str) -> int:
    print(
        f"hermes-ort export needs the exporter's dependencies ({what} is missing): "
        "pip install 'hermes-ort[export]'   (or: pip install -e '.[export]' in a checkout)",
        file=sys.stderr,
    )
    return 2


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo", help="export bert-base (random weights) and compare pipeload with full"
    )
    p.add_argument("--preset", default="bert-base")
    p.add_argument(
        "--out", type=Path, default=None, help="model directory (default: models/PRESET)"
    )
    p.add_argument(
        "--budget",
        default=None,
        help="pipeload's memory budget (default: min, the smallest workable)",
    )
    p.set_defaults(
        func=lambda args: __import__("hermes_ort.demo").demo.main(
            args.preset, args.out, args.budget
        )
    )


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure every block on this machine (stored beside the manifest)"
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="sequence length to profile at (default: the manifest's)",
    )
    p.add_argument(
        "--force", action="store_true", help="measure again even if a matching profile is stored"
    )
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from hermes_ort.calibrate import calibrate
    from hermes_ort.profiler import load_profile, profile_model

    profile = None if args.force or args.seq_len else load_profile(args.model_dir)
    if profile is None:
        profile = profile_model(
            args.model_dir,
            args.seq_len,
            progress=lambda i, n, b: print(f"  {i}/{n} {b.name}", file=sys.stderr),
        )
        profile = calibrate(args.model_dir, profile)
        path = profile.save(args.model_dir)
        print(f"profile written to {path}")
    else:
        print(f"stored profile matches this machine ({profile.created}); --force measures again")
    print(
        f"baseline RSS {format_bytes(profile.baseline_bytes)} (+{format_bytes(profile.warmup_bytes)} at the first session), "
        f"pipelining +{format_bytes(profile.engine_overhead_bytes)}, kept blocks +{profile.kept_overhead:.1%}, first pass +{profile.first_pass_extra_s * 1000:.0f} ms, streaming passes x{profile.stream_pass_scale:.2f}, storage read {profile.read_bandwidth_bytes_per_s / 1e6:.0f} MB/s, batch 1, sequence {profile.sequence_length}"
    )
    print(
        "| block | file | read cold / warm | create / prepacked | 1st run | run / prepacked | live | open | transient |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    for b in profile.blocks:
        print(
            f"| {b.name} | {format_bytes(b.file_bytes)} | {ms(b.readahead_cold_s)} / {ms(b.readahead_warm_s)} ms | "
            f"{ms(b.create_s)} / {ms(b.create_prepack_s)} ms | {ms(b.first_run_s)} ms | {ms(b.run_s)} / {ms(b.run_prepack_s)} ms | "
            f"{format_bytes(b.live_bytes)} | {format_bytes(b.open_bytes)} | {format_bytes(b.transient_bytes)} |"
        )
    return 0


def _add_plan(sub) -> None:
    from hermes_ort.planner import OBJECTIVES

    p = sub.add_parser(
        "plan", help="show the pipeline plan for a budget, its prediction and reasons"
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--budget", default=None, help="memory budget, e.g. 300MB")
    p.add_argument("--loaders", type=int, default=None)
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--no-profile", action="store_true", help="plan from file sizes, do not measure")
    p.add_argument(
        "--objective",
        default="repeated",
        choices=OBJECTIVES,
        help="what the plan makes fastest: later passes (default, as `run --repeat N`) or the first (as `run` of one pass)",
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    import hermes_ort

    with hermes_ort.load(
        args.model_dir,
        memory_budget=args.budget,
        loaders=args.loaders,
        window=args.window,
        profile=not args.no_profile,
        objective=args.objective,
    ) as model:
        print(model.plan.describe())
        print(
            f"smallest workable budget: {format_bytes(model.cost.min_budget())}; whole model resident: "
            f"{format_bytes(model.cost.peak(tuple(range(model.cost.blocks)), 1))}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hermes-ort", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from hermes_ort.cli_generate import add_generate

    for add in (_add_demo, _add_export, _add_run, add_generate, _add_profile, _add_plan, _add_info):
        add(sub)
    from hermes_ort.bench.cli import add_parser as add_bench

    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except HermesError as e:
        print(f"hermes-ort: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # bad option values (budget strings, strategies)
        print(f"hermes-ort: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hermes-ort: interrupted", file=sys.stderr)
        return interrupted_status()


if __name__ == "__main__":
    sys.exit(main())
