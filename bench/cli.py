"""`python -m bench COMMAND ...`: the one command of the benchmarks (run from the repository).

    python -m bench matrix --matrix smoke        # CI: tiny presets, a couple of minutes
    python -m bench matrix --matrix full         # everything, into bench/results/
    python -m bench matrix --models bert-base --strategies full,pipeswitch,pipeload \\
        --budgets min,300MB --profiles warm,sd:1c:512MB --repeats 5
    python -m bench matrix --render bench/results/RUN/bench.json.gz   # tables and plots again
    python -m bench generation models/tinyllama-1.1b --budgets 1,0.5,0.25 --profiles warm,sd
    python -m bench sweep models/bert-base --points 5 --repeats 3
    python -m bench objectives models/bert-base --budgets 461MB,none --rounds 5
    python -m bench verify-cost models/bert-base
    python -m bench export-memory --layers 4,8,16
    python -m bench facts models/bert-base
    python -m bench peers --model tinyllama-1.1b
    python -m bench quality --reference models/smol-fp32 models/smol-int4 models/smol-int8
    python -m bench paged ~/.cache/hermes-ort/models/smollm2-135m-instruct --repeat 3
    python -m bench serve --model smollm2-135m --cap auto --clients 1,2,4,8
    python -m bench serve --load

`matrix`: models x strategies x budgets x device profiles, each configuration in fresh processes;
JSON (raw samples, gzip), a Markdown table and PNG plots.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.matrix import MATRICES, STORAGE, build_matrix, expand
from hermes_ort.core.errors import HermesError, interrupted_status

DOCUMENT = "bench.json.gz"  # the run's document: every record and raw sample
# the other commands: their modules give add_arguments(parser) and run(args)
COMMANDS = {
    "generation": ("bench.generation", "a decoder's tokens/s and memory per strategy and budget"),
    "sweep": ("bench.sweep", "the planner against fixed (loaders, window) across budgets"),
    "objectives": ("bench.objectives", "the planner's two objectives side by side"),
    "verify-cost": ("bench.verify_cost", "what load()'s integrity checks cost"),
    "export-memory": ("bench.export_memory", "the exporter's peak memory, regular vs streaming"),
    "facts": ("bench.facts", "the measured facts docs/design.md cites"),
    "peers": ("bench.peers.run", "the peers side by side on the same weights and boards"),
    "batches": ("bench.batches", "a batch under a budget against full; batched generation"),
    "cluster": ("bench.cluster", "one model over 2-4 emulated boards on Ray, against one board"),
    "budget": ("bench.budget_grid", "the budget at every batch and length: rows x positions"),
    "quality": ("bench.quality", "quantized exports against fp32 on real text: perplexity, top-1"),
    "paged": ("bench.paged_sessions", "paged blocks against resident and streamed ones: s/token"),
    "serve": ("bench.serving.run", "OpenAI-compatible servers under a cap: 1-8 clients, load"),
}


def _split(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for chunk in values for v in chunk.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--matrix", default="smoke", choices=tuple(MATRICES), help="named matrix (default smoke)"
    )
    p.add_argument(
        "--models",
        action="append",
        metavar="LIST",
        help="presets or exported model directories, comma-separated",
    )
    p.add_argument(
        "--strategies",
        action="append",
        metavar="LIST",
        help="e.g. full,pipeswitch,pipeswitch+stream,pipeload",
    )
    p.add_argument(
        "--budgets",
        action="append",
        metavar="LIST",
        help="pipeload's: none, 150MB, 25%%, min, x1.5min, cap",
    )
    p.add_argument(
        "--profiles",
        action="append",
        metavar="LIST",
        help=f"STORAGE[:Nc][:CAP] with STORAGE in {'/'.join(STORAGE)}, e.g. warm,sd:1c:512MB",
    )
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per configuration")
    p.add_argument("--passes", type=int, default=None, help="passes per process (first + steady)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results"),
        help="results directory (a subdirectory per run)",
    )
    p.add_argument(
        "--models-dir",
        type=Path,
        default=Path("models"),
        help="where presets are exported (default models/)",
    )
    p.add_argument(
        "--timeout", type=float, default=900, help="seconds per process before it is killed"
    )
    p.add_argument(
        "--no-profile", action="store_true", help="do not run `hermes-ort profile` first"
    )
    p.add_argument(
        "--no-cgroups", action="store_true", help="no memory caps or throttling even where possible"
    )
    p.add_argument(
        "--cap-at-budget",
        nargs="?",
        const="10%",
        default=None,
        metavar="MARGIN",
        help="cap each configuration with a budget at that budget plus MARGIN "
        "(default 10%%; or bytes, e.g. 16MB)",
    )
    p.add_argument(
        "--objective",
        default="repeated",
        choices=("repeated", "one-shot"),
        help="what pipeload's plans make fastest: the steady passes (default) or the one-shot",
    )
    p.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or lines")
    p.add_argument(
        "--fail-on-error",
        action="store_true",
        help="exit 1 if a process failed for another reason than the memory cap or a refused "
        "budget",
    )
    p.add_argument("--dry-run", action="store_true", help="list the configurations and stop")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="render an existing bench JSON again and stop"
    )


def write_outputs(doc: dict[str, Any], run_dir: Path, plots: bool = True) -> list[Path]:
    """bench.json, bench.md and the plots into `run_dir`."""
    from bench.records import write_document
    from bench.render import render_markdown

    paths = [write_document(doc, run_dir / DOCUMENT)]
    md = run_dir / "bench.md"
    md.write_text(render_markdown(doc))
    paths.append(md)
    if plots:
        from bench.plots import write_plots

        try:
            paths += write_plots(doc, run_dir)
        except ImportError as e:  # matplotlib is the `bench` extra, not a runtime dependency
            print(
                f"bench: plots skipped: {e.name or e} is not installed "
                "(pip install 'hermes-ort[bench]')",
                file=sys.stderr,
            )
    return paths


def _unexpected_failures(doc: dict[str, Any]) -> list[str]:
    out = []
    for r in doc["records"]:
        for s in r["samples"]:
            if (
                not s["ok"]
                and not s["oom_killed"]
                and not (s["error"] or "").startswith("BudgetError")
            ):
                out.append(
                    f"{r['model']} {r['label']} {r['budget'] or '-'} {r['profile']}: {s['error']}"
                )
    return out


def cmd_bench(args) -> int:
    from bench.records import load_document, to_json

    if args.render:
        doc = load_document(args.render)
        paths = write_outputs(doc, args.render.parent, not args.no_plots)
        print(paths[1].read_text())
        print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
        return 0
    matrix = build_matrix(
        args.matrix,
        _split(args.models),
        _split(args.strategies),
        _split(args.budgets),
        _split(args.profiles),
        args.repeats,
        args.passes,
    )
    configs = expand(matrix)
    if args.dry_run:
        for c in configs:
            print(" ".join(c.key))
        print(f"{len(configs)} configurations x {matrix.repeats} repeats", file=sys.stderr)
        return 0
    from bench.runner import RunOptions, run_matrix

    if args.cap_at_budget is not None:
        from bench.matrix import margin_bytes

        margin_bytes(args.cap_at_budget, 1 << 30)  # a bad spelling fails now, not after the exports
    options = RunOptions(
        models_dir=args.models_dir,
        timeout_s=args.timeout,
        profile=not args.no_profile,
        cgroups=not args.no_cgroups,
        progress=not args.no_progress,
        budget_cap_margin=args.cap_at_budget,
        objective=args.objective,
    )
    try:
        doc = run_matrix(matrix, options)
    except (HermesError, ValueError, OSError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    run_dir = args.out / f"{matrix.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write_outputs(to_json(doc), run_dir, not args.no_plots)
    print(paths[1].read_text())
    print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    from bench.render import killed_lines

    for line in killed_lines(to_json(doc)):
        print(f"bench: {line.replace('**', '')}", file=sys.stderr)
    if doc["interrupted"]:
        return interrupted_status()
    failures = _unexpected_failures(to_json(doc))
    for f in failures:
        print(f"bench: failed: {f}", file=sys.stderr)
    return 1 if failures and args.fail_on_error else 0


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    matrix = sub.add_parser("matrix", help="models x strategies x budgets x device profiles")
    add_arguments(matrix)
    matrix.set_defaults(func=cmd_bench)
    for name, (module, about) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=about,
            description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, HermesError) as e:  # bad axis values, a child that failed
        print(f"bench: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return interrupted_status()
