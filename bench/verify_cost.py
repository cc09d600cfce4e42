"""What the integrity checks cost: `hermes_ort.load` (and its first pass) in fresh processes with
verify="size" (sizes and external data only), verify="once" with nothing cached (every file the
strategy opens is hashed: page cache warm, then cold) and verify="once" with verified.json there.

    python -m bench verify-cost models/bert-base [--strategy pipeload] [--repeats 3]

Prints one JSON line per case and a Markdown table; the medians of --repeats fresh processes."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from bench import child_env
from hermes_ort.measure.fresh_process import require, run_child

CASES = (  # name, verify, cache: keep / remove verified.json first, page cache: warm / cold
    ("size only", "size", "keep", "warm"),
    ("sha256, nothing cached, files in page cache", "once", "remove", "warm"),
    ("sha256, nothing cached, files on disk", "once", "remove", "cold"),
    ("sha256 cached (verified.json)", "once", "keep", "warm"),
)


def _files(model_dir: Path, strategy: str) -> list[Path]:
    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.planning.strategies import get_strategy, opened_graphs

    graphs = opened_graphs(load_manifest(model_dir), get_strategy(strategy))
    return sorted({model_dir / f.path for _, files in graphs for f in files})


def measure(model_dir: Path, strategy: str, repeats: int) -> list[dict]:
    from hermes_ort.streaming.integrity import cache_path
    from hermes_ort.streaming.memory import drop_file_cache
    from hermes_ort.streaming.readahead import warm_files

    files = _files(model_dir, strategy)
    rows = []
    for name, verify, cache, pages in CASES:
        samples = []
        for _ in range(repeats):
            if cache == "remove":
                cache_path(model_dir).unlink(missing_ok=True)
            if pages == "cold":
                for f in files:
                    drop_file_cache(str(f))
            else:
                warm_files(files)
            cmd = [sys.executable, "-m", "bench.child", "verify", str(model_dir)]
            cmd += ["--strategy", strategy, "--verify", verify]
            samples.append(require(run_child(cmd, 600, env=child_env()), name))
        row = {"case": name, "verify": verify, "bytes": sum(f.stat().st_size for f in files)}
        for key in ("load_s", "first_pass_s"):
            row[key] = statistics.median(s[key] for s in samples)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    base = rows[0]["load_s"]
    lines = ["| case | load() | vs size only | first pass |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['load_s'] * 1000:.0f} ms | {(r['load_s'] - base) * 1000:+.0f} ms "
            f"| {r['first_pass_s'] * 1000:.0f} ms |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", type=Path)
    p.add_argument("--strategy", default="pipeload")
    p.add_argument("--repeats", type=int, default=3)


def run(args) -> int:
    rows = measure(args.model_dir, args.strategy, args.repeats)
    print(markdown(rows))
    return 0
