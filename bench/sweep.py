"""The planner's sweep: across budgets from the smallest workable one to the whole model, does the
plan keep its promises, and is it as fast as the best fixed (loaders, window)?

    python -m bench sweep models/bert-base --points 6 --repeats 3 --out bench/results/latest

For each budget, in fresh processes (warm page cache): the planner's choice and every (loaders,
window) of a small grid, `--repeats` rounds of all of them (so drift hits every configuration
alike); medians of the first and the repeated passes' latency, the first pass's peak RSS and the
largest of any pass, beside the planner's own predictions. Writes sweep-MODEL.json and .md."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench import child_env
from hermes_ort.core.errors import ChildFailed
from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.measure.fresh_process import run_child
from hermes_ort.planning.pipeline_planner import OBJECTIVES
from hermes_ort.streaming.readahead import warm_files

GRID = [(k, w) for k in (1, 2) for w in (1, 2, 3, 4)]
REPEATED_PASSES = 2  # after the first, in the same process


def sample_plan(
    model_dir: Path,
    budget: int | str | None,
    loaders: int | None,
    window: int | None,
    files: list[Path],
    objective: str,
    passes: int = REPEATED_PASSES + 1,
) -> dict:
    """One fresh process (bench.child run): a first pass and the repeated ones, from a warm page
    cache. Its record, with "ok" and "error"."""
    cmd = [sys.executable, "-m", "bench.child", "run", str(model_dir), "--passes", str(passes)]
    cmd += ["--objective", objective]
    cmd += ["--loaders", str(loaders), "--window", str(window)] if loaders else []
    cmd += ["--budget", str(budget)] if budget is not None else []
    warm_files(files)
    result = run_child(cmd, env=child_env())
    return {**result.record, "ok": result.ok, "error": None if result.ok else result.error}


def summarise(samples: list[dict]) -> dict:
    """Medians of the first and the repeated passes, the first pass's peak RSS (median) and the
    largest of any pass."""
    failed = [s for s in samples if not s["ok"]]
    if failed:
        return {"error": failed[0]["error"]}
    later = [t for s in samples for t in s["steady_s"]]
    firsts = [(s["first_pass_s"], s["pass_peak_rss_bytes"][0]) for s in samples]
    return {
        "plan": samples[0]["plan"],
        "latency_s": statistics.median(t for t, _ in firsts),
        "repeated_latency_s": statistics.median(later),
        "peak_rss_bytes": statistics.median(p for _, p in firsts),
        "max_peak_rss_bytes": max(max(s["pass_peak_rss_bytes"]) for s in samples),
        "samples": [{"latency_s": t, "peak_rss_bytes": p} for t, p in firsts],
    }


def sweep(model_dir: Path, points: int, repeats: int, objective: str = "repeated") -> dict:
    manifest = load_manifest(model_dir)
    files = [model_dir / f.path for f in manifest.block_files().values()]
    smallest = sample_plan(model_dir, "min", None, None, files, objective, passes=1)
    everything = sample_plan(model_dir, None, None, None, files, objective, passes=1)
    for s in (smallest, everything):
        if not s["ok"]:
            raise ChildFailed(f"planning '{model_dir}' failed: {s['error']}")
    low = smallest["budget_bytes"] + (1 << 20)  # + RSS jitter
    high = int(everything["plan"]["predicted_peak_bytes"] * 1.02)  # all kept
    budgets = [int(low + (high - low) * i / (points - 1)) for i in range(points)]
    rows = []
    for budget in budgets:
        configs = {
            "planner": (None, None, objective),
            **{f"{k}x{w}": (k, w, objective) for k, w in GRID},
        }
        if objective != "repeated":  # the default objective's plan beside it, in the same rounds
            configs["planner (repeated)"] = (None, None, "repeated")
        samples: dict[str, list[dict]] = {name: [] for name in configs}
        for _ in range(repeats):  # in rounds: every configuration sees the same machine drift
            for name, (k, w, goal) in configs.items():
                samples[name].append(sample_plan(model_dir, budget, k, w, files, goal))
        summaries = {name: summarise(s) for name, s in samples.items()}
        row = {
            "budget_bytes": budget,
            "planner": summaries.pop("planner"),
            "repeated_planner": summaries.pop("planner (repeated)", None),
            "grid": summaries,
        }
        rows.append(row)
        print(render_row(row), file=sys.stderr, flush=True)
    return {
        "model": str(model_dir),
        "repeats": repeats,
        "objective": objective,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }


def _best(ok: dict, key: str):
    return min(ok.items(), key=lambda kv: kv[1][key]) if ok else None


def render_row(row: dict) -> str:
    p = row["planner"]
    if "error" in p:
        return f"| {format_bytes(row['budget_bytes'])} | error: {p['error']} |"
    plan = p["plan"]
    ok = {
        g: r
        for g, r in row["grid"].items()
        if "error" not in r and r["max_peak_rss_bytes"] <= row["budget_bytes"]
    }
    first_lat, pred_peak = plan["predicted_first_latency_s"], plan["predicted_peak_bytes"]
    rep_lat = plan["predicted_latency_s"]
    cells = [
        format_bytes(row["budget_bytes"]),
        f"{plan['loaders']}x{plan['window']} lag {plan['lag']}, {len(plan['resident'])} resident",
        f"{format_bytes(p['max_peak_rss_bytes'])} "
        f"({'yes' if p['max_peak_rss_bytes'] <= row['budget_bytes'] else 'NO'})",
        f"{format_bytes(pred_peak)} ({pred_peak / p['max_peak_rss_bytes'] - 1:+.0%})",
    ]
    for measured, predicted, key in (
        (p["latency_s"], first_lat, "latency_s"),
        (p.get("repeated_latency_s"), rep_lat, "repeated_latency_s"),
    ):
        best = _best({g: r for g, r in ok.items() if r.get(key)}, key)
        if measured is None:
            cells += ["-", "-"]
            continue
        cells.append(
            f"{measured * 1000:.0f} ms, predicted {predicted * 1000:.0f} "
            f"({predicted / measured - 1:+.0%})"
        )
        cells.append(
            f"{best[0]}: {best[1][key] * 1000:.0f} ms, planner {measured / best[1][key] - 1:+.0%}"
            if best
            else "none fits"
        )
    other = row.get("repeated_planner")
    if other and "error" not in other:
        cells.append(
            f"{other['latency_s'] * 1000:.0f} / {other['repeated_latency_s'] * 1000:.0f} ms"
        )
    return "| " + " | ".join(cells) + " |"


def header(objective: str) -> str:
    cells = [
        "budget",
        "planner's plan",
        "max peak RSS (within)",
        "predicted peak (error vs max)",
        "first pass (prediction error)",
        "best fixed grid, first pass",
        "repeated pass (prediction error)",
        "best fixed grid, repeated pass",
    ]
    if objective != "repeated":
        cells.append("plan for repeated passes: first / repeated pass")
    return "| " + " | ".join(cells) + " |\n" + "|---" * len(cells) + "|"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--points", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    parser.add_argument(
        "--objective",
        default="repeated",
        choices=OBJECTIVES,
        help="the plans' objective (every configuration's; the grid fixes only loaders x window)",
    )
    parser.add_argument("--render", action="store_true", help="render OUT/sweep-MODEL.json again")


def run(args) -> int:
    name = args.model_dir.name + ("" if args.objective == "repeated" else f"-{args.objective}")
    if args.render:
        result = json.loads((args.out / f"sweep-{name}.json").read_text())
    else:
        print(header(args.objective), file=sys.stderr)
        result = sweep(args.model_dir, args.points, args.repeats, args.objective)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"sweep-{name}.json").write_text(json.dumps(result, indent=1))
    title = f"{args.model_dir.name}, objective {result.get('objective', 'repeated')}"
    medians = f"medians of {result['repeats']}"
    table = "\n".join(
        [
            f"### Planner sweep: {title} (warm cache, fresh processes, {medians})",
            "",
            header(result.get("objective", "repeated")),
            *[render_row(r) for r in result["rows"]],
        ]
    )
    (args.out / f"sweep-{name}.md").write_text(table + "\n")
    print(table)
    return 0
