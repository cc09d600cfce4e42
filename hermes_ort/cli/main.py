"""`hermes-ort`: one entry point, one subcommand per job. Every failure a user can cause is one
line on stderr (`hermes-ort: error: ...`), exit status 1 (2 for a bad option value, 130 when
interrupted), never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from hermes_ort.cli.cluster_cmd import (
    add_cluster_options,
    cmd_plan_cluster,
    cmd_run_cluster,
)
from hermes_ort.cli.info_cmd import add_info
from hermes_ort.cli.model_options import (
    MODEL_DIR_HELP,
    add_plan_options,
    load_model,
    profile_first,
    read_inputs,
)
from hermes_ort.core.choices import (
    LoadPath,
    VerifyMode,
    values,
)
from hermes_ort.core.errors import (
    HermesError,
    InputError,
    OptionError,
    interrupted_status,
)
from hermes_ort.core.units import format_bytes


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one pass of an exported model and print a summary")
    p.add_argument("model_dir", type=Path, help=MODEL_DIR_HELP)
    add_plan_options(p, None)
    p.add_argument(
        "--load-path",
        default="default",
        choices=values(LoadPath),
        help="how the per-block baselines open blocks: ONNX Runtime's default, or pipeload's "
        "stream (mmapped, read ahead) for ablations",
    )
    p.add_argument(
        "--input", default="random", help="an .npz of inputs, or 'random' (the manifest's sample)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="sequence length of random inputs")
    p.add_argument("--repeat", type=int, default=1, help="passes to run (stats of each printed)")
    p.add_argument("--save-outputs", type=Path, default=None, help="write the outputs to this .npz")
    p.add_argument("--json", action="store_true", help="print one JSON record instead of text")
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        metavar="FILE",
        help="write a Chrome trace-event JSON of the load and every pass (open it in Perfetto)",
    )
    p.add_argument(
        "--verify",
        default="once",
        choices=values(VerifyMode),
        help="check each file's sha256 once and cache it (default), or only sizes",
    )
    add_cluster_options(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    if args.repeat < 1:
        raise OptionError(f"--repeat must be at least 1, got {args.repeat}")
    feeds = None if args.input == "random" else read_inputs(args.input)
    _check_batch(args.batch)
    objective = args.objective or ("one-shot" if args.repeat <= 1 else "repeated")
    if args.cluster is not None:
        return cmd_run_cluster(args, feeds)
    if args.trace is not None and not args.trace.parent.is_dir():
        raise InputError(f"--trace '{args.trace}': directory '{args.trace.parent}' does not exist")
    if args.profile:
        profile_first(args.model_dir)
    model = load_model(
        args.model_dir,
        memory_budget=args.budget,
        strategy=args.strategy,
        loaders=args.loaders,
        window=args.window,
        load_path=args.load_path,
        verify=args.verify,
        objective=objective,
        page_cache=args.page_cache,
        paging=args.paging,
        profile=True if args.profile else None,
        trace=args.trace is not None,
    )
    with model:
        if feeds is None:
            feeds = model.sample_inputs(batch_size=args.batch or 1, sequence_length=args.seq_len)
        runs = []
        for _ in range(args.repeat):
            outputs = None  # not held through the next pass (gpt2-medium's logits: 26 MB)
            outputs = model.run(feeds)
            runs.append(model.stats)
        if args.save_outputs:
            try:
                np.savez(args.save_outputs, **outputs)
            except OSError as e:
                raise InputError(f"cannot write --save-outputs '{args.save_outputs}': {e}") from e
    if args.trace is not None:
        try:
            args.trace.write_text(json.dumps(model.take_trace()))
        except OSError as e:
            raise InputError(f"cannot write --trace '{args.trace}': {e}") from e
    if args.json:
        record = {
            "model_dir": str(args.model_dir),
            "strategy": args.strategy,
            "budget_bytes": model.plan.budget_bytes,
            "objective": objective,
            "plan": model.plan.to_json(),
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
            f"output {name}: shape {tuple(value.shape)} {value.dtype}, "
            f"mean {flat.mean():.6g}, first {flat[:4]}"
        )
    for k, s in enumerate(runs):
        print(
            f"pass {k + 1}: latency {s.latency_s * 1000:.1f} ms (load {s.load_s * 1000:.1f} ms, "
            f"compute {s.compute_s * 1000:.1f} ms, waited {s.wait_s * 1000:.1f} ms), peak RSS "
            f"{format_bytes(s.peak_rss_bytes)}, read {format_bytes(s.bytes_read)} from storage, "
            f"{s.max_live_sessions} session(s) live at most"
        )
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="cut a Hugging Face model into per-block ONNX files (needs the export extra)"
    )
    try:
        from hermes_ort.export.cli import (
            add_arguments,  # argparse only: torch is imported when it runs
        )
    except ImportError:
        p.add_argument("rest", nargs=argparse.REMAINDER, help="the exporter's options")
        p.set_defaults(func=lambda args: _missing_extra("the export package"))
        return
    add_arguments(p)
    p.set_defaults(func=_run_export)


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


def _run_export(args) -> int:
    try:
        from hermes_ort.export.cli import run

        return run(args)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in EXPORT_ONLY:
            return _missing_extra(e.name)
        raise


def _missing_extra(what: str) -> int:
    print(
        f"hermes-ort export needs the exporter's dependencies ({what} is missing): "
        "pip install 'hermes-ort[export]'   (or: pip install -e '.[export]' in a checkout)",
        file=sys.stderr,
    )
    return 2


def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="a real model (SmolLM2-135M-Instruct, fetched once) answers a question: "
        "pipeload under a budget beside full",
    )
    p.add_argument("--question", default=None, help="what to ask (default: a capital city)")
    p.add_argument("--budget", default=None, help="pipeload's budget (default: min)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from hermes_ort.cli.demo import main

    return main(args.question, args.budget)


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure every block on this machine (stored beside the manifest)"
    )
    p.add_argument("model_dir", type=Path, help=MODEL_DIR_HELP)
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: sample's)")
    p.add_argument("--force", action="store_true", help="measure again even if one matches")
    p.set_defaults(func=cmd_profile)


def cmd_profile(args) -> int:
    from hermes_ort.measure.calibrate import calibrate
    from hermes_ort.measure.profiler import profile_model
    from hermes_ort.planning.layer_profile import read_profile

    if args.seq_len is not None and args.seq_len < 1:
        raise OptionError(f"--seq-len must be at least 1, got {args.seq_len}")
    profile = None if args.force or args.seq_len else read_profile(args.model_dir)
    if profile is None:

        def progress(i, n, b):
            print(f"  {i}/{n} {b.name}", file=sys.stderr)

        t0 = time.perf_counter()
        profile = profile_model(args.model_dir, args.seq_len, progress=progress)
        try:
            profile = calibrate(args.model_dir, profile)  # stores it as it goes
            path = profile.save(args.model_dir)
        except OSError as e:  # a read-only model directory, a full disk
            raise InputError(f"cannot store the profile in '{args.model_dir}': {e}") from None
        took = time.perf_counter() - t0
        print(f"measured this machine's layer profile in {took:.1f} s (stored in {path})")
    else:
        print(f"stored profile matches this machine ({profile.created}); --force measures again")
    from hermes_ort.cli.profile_table import print_profile

    print_profile(profile)
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show the pipeline plan for a budget, its prediction, reasons")
    p.add_argument("model_dir", type=Path, help=MODEL_DIR_HELP)
    add_plan_options(p, "repeated")
    p.add_argument("--no-profile", action="store_true", help="plan from file sizes, do not measure")
    p.add_argument("--seq-len", type=int, default=None, help="positions of --batch's rows")
    p.add_argument("--json", action="store_true", help="print the plan (or the split) as JSON")
    add_cluster_options(p)
    p.set_defaults(func=cmd_plan)


def _check_batch(batch: int | None) -> None:
    if batch is not None and batch < 1:
        raise OptionError(f"--batch must be at least 1, got {batch}")


def cmd_plan(args) -> int:
    _check_batch(args.batch)
    if args.cluster is not None:
        return cmd_plan_cluster(args)
    if not args.no_profile:
        profile_first(args.model_dir)
    with load_model(
        args.model_dir,
        memory_budget=args.budget,
        strategy=args.strategy,
        loaders=args.loaders,
        window=args.window,
        profile=not args.no_profile,
        objective=args.objective,
        page_cache=args.page_cache,
        paging=args.paging,
        verify="size",  # a plan opens no file: hashing them is `run`'s (and left RSS behind)
    ) as model:
        generation = model.decoder is not None  # a decoder's plan is generate's
        if args.batch is not None or args.seq_len is not None or generation:
            model.plan_batch(args.batch or 1, args.seq_len, generation=generation)
        smallest = model.smallest_budget(generation=generation)  # for the shape planned
        everything = model.cost.peak(tuple(range(model.cost.count)), 1)
        if args.json:
            record = model.plan.to_json()
            record |= {"smallest_budget_bytes": smallest, "whole_model_resident_bytes": everything}
            print(json.dumps(record))
            return 0
        print(model.plan.describe())
        shape = model.plan.batch
        at = f" for {shape.rows} x {shape.positions}" if shape.rows else ""
        print(
            f"smallest workable budget{at}: {format_bytes(smallest)}; "
            f"whole model resident: {format_bytes(everything)}"
        )
    return 0


def version() -> str:
    """The installed distribution's version (what pip reports), else the package's own."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("hermes-ort")
    except PackageNotFoundError:  # run from a checkout that was never installed
        import hermes_ort

        return hermes_ort.__version__


def build_parser() -> argparse.ArgumentParser:
    from hermes_ort.cli.chat_cmd import add_chat
    from hermes_ort.cli.embed_cmd import add_embed
    from hermes_ort.cli.generate_cmd import add_generate
    from hermes_ort.cli.serve_cmd import add_serve

    parser = argparse.ArgumentParser(prog="hermes-ort", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"hermes-ort {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _add_demo,
        _add_export,
        _add_run,
        add_generate,
        add_chat,
        add_embed,
        add_serve,
        _add_profile,
        _add_plan,
        add_info,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except OptionError as e:  # bad option values (budget strings, ...)
        print(f"hermes-ort: error: {e}", file=sys.stderr)
        return 2
    except HermesError as e:
        print(f"hermes-ort: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hermes-ort: interrupted", file=sys.stderr)
        return interrupted_status()
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("HERMES_ORT_TRACEBACK"):
            raise
        print(
            f"hermes-ort: internal error: {type(e).__name__}: {e} "
            "(HERMES_ORT_TRACEBACK=1 shows where; please report it)",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
