"""Does the budget hold at every batch and length? A rows x positions grid, each configuration in
a fresh process (warm files): the unbudgeted run, `min` for that shape, and a budget of 35% of
the unbudgeted peak; per run the budget, the plan's predicted peak, the process's measured peak
(VmHWM: imports, plan and passes), throughput against the unbudgeted run and whether the outputs
(or greedy tokens) equal it.

    python -m bench budget --model bert-base --rows 1,8,64 --positions 16,128,512
    python -m bench budget --model gpt2 --generate --rows 1,8 --positions 16,128,512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

SHARE = 0.35  # the "35% of the unbudgeted peak"
RELATIVE_TOLERANCE = 1e-4  # outputs' digests against the unbudgeted run's, of their scale


def _child(cmd: list[str], timeout: float) -> dict[str, Any]:
    from bench import child_env
    from hermes_ort.measure.fresh_process import run_child

    r = run_child(cmd, timeout, env=child_env())
    if not r.ok:
        return {"error": r.error}
    # its own VmHWM across resets: wait4's maxrss includes the forking parent's resident set
    return {**r.record, "vmhwm_bytes": r.record["process_peak_rss_bytes"]}


def _one(model_dir: Path, args, rows: int, positions: int, budget) -> dict[str, Any]:
    if args.generate:
        cmd = [sys.executable, "-m", "bench.child", "generate", str(model_dir), "--warm"]
        cmd += ["--prompts", str(rows), "--prompt-tokens", str(positions)]
        cmd += ["--new-tokens", str(args.new_tokens)]
    else:
        cmd = [sys.executable, "-m", "bench.child", "run", str(model_dir)]
        cmd += ["--batch", str(rows), "--seq-len", str(positions), "--passes", str(args.passes)]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    return _child(cmd, args.timeout)


def _throughput(r: dict[str, Any], rows: int, generate: bool) -> float:
    if generate:
        return r["decode_tokens_per_s"]
    steady = r["steady_s"] or [r["first_pass_s"]]
    return rows / statistics.median(steady)


def _same(a: dict[str, Any], b: dict[str, Any], generate: bool) -> bool:
    if generate:
        return a["new_ids"] == b["new_ids"]
    for name, (_, q, m) in a["output_digest"].items():
        _, q2, m2 = b["output_digest"][name]
        if abs(m - m2) > RELATIVE_TOLERANCE * max(m, 1e-30) or abs(q - q2) > RELATIVE_TOLERANCE * q:
            return False
    return True


def grid(model_dir: Path, args) -> list[dict[str, Any]]:
    rows_out = []
    for rows in [int(x) for x in args.rows.split(",")]:
        for positions in [int(x) for x in args.positions.split(",")]:
            free = _one(model_dir, args, rows, positions, None)
            if "error" in free:
                print(f"{rows} x {positions}: unbudgeted failed: {free['error']}", file=sys.stderr)
                continue
            base = free["vmhwm_bytes"]
            budgets = [("none", None), ("min", "min"), ("35%", int(SHARE * base))]
            for label, budget in budgets:
                r = free if budget is None else _one(model_dir, args, rows, positions, budget)
                row = {"rows": rows, "positions": positions, "budget": label}
                if "error" in r:
                    row["error"] = r["error"].splitlines()[-1][:300]
                    print(f"{rows} x {positions} {label}: {row['error']}", file=sys.stderr)
                    rows_out.append(row)
                    continue
                plan = r["plan"]
                row |= {
                    "budget_bytes": r["budget_bytes"],
                    "predicted_peak_bytes": plan.get("predicted_peak_bytes"),
                    "measured_peak_bytes": r["vmhwm_bytes"],
                    "throughput": _throughput(r, rows, args.generate),
                    "vs_unbudgeted": _throughput(r, rows, args.generate)
                    / _throughput(free, rows, args.generate),
                    "micro_batch": plan.get("micro_batch"),
                    "prefill_chunk": plan.get("prefill_chunk"),
                    "resident": len(plan.get("resident", [])),
                    "blocks": plan.get("blocks"),
                    "same_outputs": _same(free, r, args.generate),
                    "unbudgeted_peak_bytes": base,
                }
                if r["budget_bytes"]:
                    row["peak_over_budget"] = r["vmhwm_bytes"] / r["budget_bytes"]
                rows_out.append(row)
                print(_line(row), file=sys.stderr)
    return rows_out


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.0f} MB"


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {r['rows']} | {r['positions']} | {r['budget']} | refused: {r['error']} |"
    over = r.get("peak_over_budget")
    how = []
    if r["micro_batch"]:
        how.append(f"{r['micro_batch']} row(s) at a time")
    if r["prefill_chunk"]:
        how.append(f"prefill {r['prefill_chunk']} a pass")
    return (
        f"| {r['rows']} | {r['positions']} | {r['budget']} | {_mb(r['budget_bytes'])} | "
        f"{_mb(r['predicted_peak_bytes'])} | {_mb(r['measured_peak_bytes'])} | "
        f"{'-' if over is None else f'{over:.3f}'} | {r['throughput']:.2f} | "
        f"{r['vs_unbudgeted']:.2f}x | {', '.join(how) or '-'} | "
        f"{r['resident']}/{r['blocks']} | {'yes' if r['same_outputs'] else 'NO'} |"
    )


def render(data: dict[str, Any]) -> str:
    unit = "tokens/s (decode)" if data["generate"] else "sequences/s"
    out = [
        f"# The budget at every batch and length: `{data['model']}`",
        "",
        f"{'generate' if data['generate'] else 'run'}, fresh process per row, warm files; "
        f"measured peak = the process's VmHWM; throughput in {unit}; `same` = outputs "
        f"(greedy tokens) equal to the unbudgeted run's. Machine: {data['cpu']}.",
        "",
        "| rows | positions | budget | bytes | predicted peak | measured peak | peak / budget "
        "| throughput | vs unbudgeted | how | resident | same |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    out += [_line(r) for r in data["rows"]]
    held = [r for r in data["rows"] if r.get("peak_over_budget") is not None]
    if held:
        worst = max(held, key=lambda r: r["peak_over_budget"])
        out += [
            "",
            f"Worst measured peak / budget: {worst['peak_over_budget']:.3f} "
            f"({worst['rows']} x {worst['positions']}, {worst['budget']}).",
        ]
    return "\n".join(out) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a preset or an exported model directory")
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--positions", default="16,128,512")
    p.add_argument("--generate", action="store_true", help="generate (a decoder) instead of run")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/budget"))


def run(args) -> int:
    from bench.models import ensure_exported, model_dir_for
    from hermes_ort.core.machine import cpu_name

    model_dir = Path(args.model)
    if not (model_dir / "manifest.json").is_file():
        model_dir = model_dir_for(args.model, args.models_dir)
        ensure_exported(args.model, model_dir)
    data = {
        "model": args.model,
        "generate": args.generate,
        "cpu": cpu_name(),
        "rows": grid(model_dir, args),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{Path(args.model).name}-{'generate' if args.generate else 'run'}"
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    text = render(data)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return 0
