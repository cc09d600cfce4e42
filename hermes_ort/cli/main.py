"""`hermes-ort`: one entry point, one subcommand per job. Every failure a user can cause is one
line on stderr (`hermes-ort: error: ...`), exit status 1 (2 for a bad option value, 130 when
interrupted), never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from hermes_ort.cli.cluster_cmd import (
    add_cluster_options,
    cmd_plan_cluster,
    cmd_run_cluster,
)
from hermes_ort.core.errors import HermesError, InputError, OptionError, interrupted_status
from hermes_ort.core.units import format_bytes


def _add_plan_options(p, objective_default: str | None) -> None:
    from hermes_ort.planning.pipeline_planner import OBJECTIVES
    from hermes_ort.planning.strategies import STRATEGIES

    p.add_argument("--budget", default=None, help="memory budget, e.g. 200MB, 1.5GiB, min")
    p.add_argument("--strategy", default="pipeload", choices=tuple(STRATEGIES))
    p.add_argument("--loaders", type=int, default=None, help="override the plan's loading agents")
    p.add_argument("--window", type=int, default=None, help="override the plan's window")
    p.add_argument(
        "--objective",
        default=objective_default,
        choices=OBJECTIVES,
        help="what pipeload's plan makes fastest: later passes or the first",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help="rows of the batch to plan for / run (default: the manifest's sample)",
    )
    p.add_argument(
        "--page-cache",
        default="auto",
        choices=("auto", "keep", "drop"),
        help="under a budget, drop streamed blocks' file pages after their run (auto: only where "
        "the memory cgroup or available memory has no room for the model's files)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="measure a layer profile first if none is stored (measured costs for the planner)",
    )


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="run one pass of an exported model and print a summary")
    p.add_argument("model_dir", type=Path)
    _add_plan_options(p, None)
    p.add_argument(
        "--load-path", default="default", choices=("default", "stream"), help="baselines' load path"
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
        choices=("once", "size"),
        help="check each file's sha256 once and cache it (default), or only sizes",
    )
    add_cluster_options(p)
    p.set_defaults(func=cmd_run)


def read_inputs(path: str) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (what `np.savez` writes), or InputError naming the file."""
    try:
        data = np.load(path)  # object arrays are refused (numpy's default)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise InputError(f"--input '{path}' holds one array, expected an .npz of named arrays")
        with data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise InputError(f"--input '{path}' does not exist") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(
            f"--input '{path}' is not an .npz of named arrays (np.savez): {e}"
        ) from None


def cmd_run(args) -> int:
    import hermes_ort

    if args.repeat < 1:
        raise OptionError(f"--repeat must be at least 1, got {args.repeat}")
    feeds = None if args.input == "random" else read_inputs(args.input)
    _check_batch(args.batch)
    objective = args.objective or ("one-shot" if args.repeat <= 1 else "repeated")
    if args.cluster is not None:
        return cmd_run_cluster(args, feeds)
    if args.trace is not None and not args.trace.parent.is_dir():
        raise InputError(f"--trace '{args.trace}': directory '{args.trace.parent}' does not exist")
    model = hermes_ort.load(
        args.model_dir,
        memory_budget=args.budget,
        strategy=args.strategy,
        loaders=args.loaders,
        window=args.window,
        load_path=args.load_path,
        verify=args.verify,
        objective=objective,
        page_cache=args.page_cache,
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


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe an exported model directory")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--verify", action="store_true", help="also hash every file now (sha256)")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.streaming.integrity import Verifier

    m = load_manifest(args.model_dir)
    print(
        f"{m.name}: {m.family} / {m.task}, {m.num_layers} layers in {len(m.blocks)} blocks, "
        f"{format_bytes(m.blocks_bytes)} of blocks"
    )
    print("inputs: " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs))
    print("outputs: " + ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.outputs))
    for b in m.blocks:
        size = format_bytes(b.bytes)
        print(f"  {b.name:<14} {b.kind:<9} {size:>10}  in {len(b.inputs)}, out {len(b.outputs)}")
    verifier = Verifier(args.model_dir, "size")
    files = list(m.all_files().values())
    for f in files:
        if args.verify:
            verifier.hash_now(f)
        else:
            verifier.check(f)
    checked = "and their sha256 match" if args.verify else "with the right sizes"
    print(f"{len(files)} files present {checked}")
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
        p.add_argument("rest", nargs=argparse.REMAINDER)
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
    p = sub.add_parser("demo", help="export bert-base (random weights), compare pipeload, full")
    p.add_argument("--preset", default="bert-base")
    p.add_argument("--out", type=Path, default=None, help="model directory (default models/PRESET)")
    p.add_argument("--budget", default=None, help="pipeload's budget (default: min)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from hermes_ort.cli.demo import main

    return main(args.preset, args.out, args.budget)


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure every block on this machine (stored beside the manifest)"
    )
    p.add_argument("model_dir", type=Path)
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

        profile = profile_model(args.model_dir, args.seq_len, progress=progress)
        profile = calibrate(args.model_dir, profile)
        path = profile.save(args.model_dir)
        print(f"profile written to {path}")
    else:
        print(f"stored profile matches this machine ({profile.created}); --force measures again")
    from hermes_ort.cli.profile_table import print_profile

    print_profile(profile)
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="show the pipeline plan for a budget, its prediction, reasons")
    p.add_argument("model_dir", type=Path)
    _add_plan_options(p, "repeated")
    p.add_argument("--no-profile", action="store_true", help="plan from file sizes, do not measure")
    p.add_argument("--seq-len", type=int, default=None, help="positions of --batch's rows")
    p.add_argument("--json", action="store_true", help="with --cluster: the split as JSON")
    add_cluster_options(p)
    p.set_defaults(func=cmd_plan)


def _check_batch(batch: int | None) -> None:
    if batch is not None and batch < 1:
        raise OptionError(f"--batch must be at least 1, got {batch}")


def cmd_plan(args) -> int:
    import hermes_ort

    _check_batch(args.batch)
    if args.cluster is not None:
        return cmd_plan_cluster(args)
    with hermes_ort.load(
        args.model_dir,
        memory_budget=args.budget,
        strategy=args.strategy,
        loaders=args.loaders,
        window=args.window,
        profile=not args.no_profile,
        objective=args.objective,
        page_cache=args.page_cache,
    ) as model:
        if args.batch is not None or args.seq_len is not None:
            model.plan_batch(args.batch or 1, args.seq_len)
        print(model.plan.describe())
        everything = model.cost.peak(tuple(range(model.cost.blocks)), 1)
        print(
            f"smallest workable budget: {format_bytes(model.cost.min_budget())}; "
            f"whole model resident: {format_bytes(everything)}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hermes_ort.cli.generate_cmd import add_generate

    parser = argparse.ArgumentParser(prog="hermes-ort", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_demo, _add_export, _add_run, add_generate, _add_profile, _add_plan, _add_info):
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
