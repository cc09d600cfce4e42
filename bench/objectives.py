"""The planner's two objectives side by side: at each budget, the plan for repeated passes and the
plan for the first pass, in alternating fresh processes (warm page cache), `--rounds` of each.

    python -m bench objectives models/bert-base --budgets 461MB,none --rounds 5

Prints a Markdown table (plan, first pass, repeated pass, largest peak RSS; medians, predictions
beside them) and writes objectives-MODEL.json and .md into --out."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.sweep import sample_plan, summarise
from hermes_ort.core.manifest import load_manifest
from hermes_ort.planning.pipeline_planner import OBJECTIVES


def measure(model_dir: Path, budgets: list[str], rounds: int) -> dict:
    files = [model_dir / f.path for f in load_manifest(model_dir).block_files().values()]
    rows = []
    for budget in budgets:
        samples: dict[str, list[dict]] = {o: [] for o in OBJECTIVES}
        for _ in range(rounds):  # alternating: drift hits both alike
            for objective in OBJECTIVES:
                bytes_or_none = None if budget == "none" else budget
                samples[objective].append(
                    sample_plan(model_dir, bytes_or_none, None, None, files, objective)
                )
        rows.append({"budget": budget, "plans": {o: summarise(s) for o, s in samples.items()}})
    return {
        "model": str(model_dir),
        "rounds": rounds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": rows,
    }


def render(result: dict) -> str:
    lines = [
        f"### Plan objectives: {Path(result['model']).name} (warm cache, fresh processes, "
        f"medians of {result['rounds']})",
        "",
        "| budget | objective | plan | first pass (predicted) | repeated pass (predicted) "
        "| largest peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        for objective, s in row["plans"].items():
            if "error" in s:
                lines.append(f"| {row['budget']} | {objective} | error: {s['error']} | | | |")
                continue
            plan = s["plan"]
            lines.append(
                f"| {row['budget']} | {objective} | {plan['loaders']}x{plan['window']}, "
                f"{len(plan['resident'])} resident "
                f"| {s['latency_s'] * 1000:.0f} ms "
                f"({plan['predicted_first_latency_s'] * 1000:.0f}) "
                f"| {s['repeated_latency_s'] * 1000:.0f} ms "
                f"({plan['predicted_latency_s'] * 1000:.0f}) "
                f"| {s['max_peak_rss_bytes'] / 1e6:.1f} MB |"
            )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--budgets", default="none", help="comma-separated, e.g. 461MB,none")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/latest"))


def run(args) -> int:
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    result = measure(args.model_dir, budgets, args.rounds)
    table = render(result)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.model_dir.name
    (args.out / f"objectives-{name}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"objectives-{name}.md").write_text(table)
    print(table)
    return 0
