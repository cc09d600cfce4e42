"""What the integrity checks cost: `hermes_ort.load` (and its first pass) in fresh processes with
verify="size" (sizes and external data only), verify="once" with nothing cached (every file the
strategy opens is hashed: page cache warm, then cold) and verify="once" with verified.json there.

    python -m hermes_ort.bench.verify_cost models/bert-base [--strategy pipeload] [--repeats 3]

Prints one JSON line per case and a Markdown table; the medians of --repeats fresh processes."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import hermes_ort
t1 = time.perf_counter()
model = hermes_ort.load(sys.argv[1], strategy=sys.argv[2], verify=sys.argv[3])
t2 = time.perf_counter()
model.run(model.sample_inputs())
t3 = time.perf_counter()
model.close()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_pass_s": t3 - t2}))
"""

CASES = (  # name, verify, cache: keep / remove verified.json first, page cache: warm / cold
    ("size only", "size", "keep", "warm"),
    ("sha256, nothing cached, files in page cache", "once", "remove", "warm"),
    ("sha256, nothing cached, files on disk", "once", "remove", "cold"),
    ("sha256 cached (verified.json)", "once", "keep", "warm"),
)


def _files(model_dir: Path, strategy: str) -> list[Path]:
    from hermes_ort.integrity import strategy_graphs
    from hermes_ort.manifest import load_manifest

    graphs = strategy_graphs(load_manifest(model_dir), strategy)
    return sorted({model_dir / f.path for _, files in graphs for f in files})


def measure(model_dir: Path, strategy: str, repeats: int) -> list[dict]:
    from hermes_ort.integrity import cache_path
    from hermes_ort.memory import drop_file_cache
    from hermes_ort.readahead import warm_files

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
            cmd = [sys.executable, "-c", CHILD, str(model_dir), strategy, verify]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"{name}: {r.stderr.strip().splitlines()[-1:]}")
            samples.append(json.loads(r.stdout.strip().splitlines()[-1]))
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hermes_ort.bench.verify_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", type=Path)
    p.add_argument("--strategy", default="pipeload")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    rows = measure(args.model_dir, args.strategy, args.repeats)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
