"""`hermes-ort demo`: the main job on the embedded default model, in one command.

Exports `bert-base` from its preset (random weights, no download) unless already exported, then runs
one pass with `full` and with `pipeload` under a budget, each in a fresh process, side by side."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hermes_ort.core.manifest import load_manifest
from hermes_ort.core.units import format_bytes
from hermes_ort.measure.fresh_process import run_child
from hermes_ort.streaming.readahead import warm_files

DEFAULT_PRESET = "bert-base"


def ensure_exported(preset: str, model_dir: Path) -> int:
    """0 once `model_dir` holds the exported preset; else the export's exit status (the export
    has printed why, in one line)."""
    if (model_dir / "manifest.json").is_file():
        print(f"using the model exported in {model_dir}")
        return 0
    print(f"exporting preset '{preset}' to {model_dir} ...", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "hermes_ort",
        "export",
        "--preset",
        preset,
        "--out",
        str(model_dir),
        "--full-model",  # the demo runs `full` beside pipeload
    ]
    return subprocess.run(cmd).returncode


def main(
    preset: str = DEFAULT_PRESET, model_dir: Path | None = None, budget: str | None = None
) -> int:
    model_dir = model_dir or Path("models") / preset
    status = ensure_exported(preset, model_dir)
    if status:
        return status
    print("profiling the blocks on this machine (once; stored beside the manifest) ...", flush=True)
    profile = [sys.executable, "-m", "hermes_ort", "profile", str(model_dir)]
    profiled = run_child(profile)
    if not profiled.ok:
        print(f"profiling failed ({profiled.error}): planning from file sizes instead")
    manifest = load_manifest(model_dir)
    files = [model_dir / f.path for f in manifest.block_files().values()]
    files += [model_dir / f.path for f in manifest.full_model.files] if manifest.full_model else []
    rows = []
    for strategy, b in (("full", None), ("pipeload", budget or "min")):
        warm_files(files)  # both start from a warm page cache
        cmd = [sys.executable, "-m", "hermes_ort", "run", str(model_dir), "--json"]
        cmd += ["--strategy", strategy] + (["--budget", b] if b else [])
        result = run_child(cmd)
        if not result.ok:
            print(f"{strategy}: failed: {result.error}")
            return 1
        rows.append((strategy, result.record))
    print(f"\n{preset}: one pass (batch 1), each strategy in a fresh process, loading included\n")
    print("| strategy | budget | latency (load + run) | peak RSS | read from storage |")
    print("|---|---|---|---|---|")
    for strategy, r in rows:
        s = r["runs"][0]
        print(
            f"| {strategy} | {format_bytes(r['budget_bytes'])} | {s['latency_s'] * 1000:.0f} ms | "
            f"{format_bytes(s['peak_rss_bytes'])} | {format_bytes(s['bytes_read'])} |"
        )
    full, pipe = rows[0][1]["runs"][0], rows[1][1]["runs"][0]
    print(
        f"\npipeload: {full['latency_s'] / pipe['latency_s']:.2f}x the speed of full, "
        f"{pipe['peak_rss_bytes'] / full['peak_rss_bytes']:.0%} of its peak memory"
    )
    return 0
