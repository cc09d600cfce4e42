"""Generation benchmark: tokens/s, time to first token and peak memory of a decoder, per strategy,
budget and storage profile, each configuration in a fresh process inside its own memory cgroup.

    python -m bench generation models/tinyllama-1.1b --budgets 1,0.5,0.25 \
        --profiles warm,sd --out bench/results/latest/generation

Budgets are shares of the model's block bytes on top of the process baseline (a fresh Python with
numpy and ONNX Runtime imported, measured first). `pipeload` plans under the budget; every strategy
runs under a hard cap of the budget plus a margin (the baselines have no budget of their own, so
the cap is what bounds them: `full` is killed where it does not fit, `full-mmap` pages its weights
in and out). Warm: the child reads the files into the page cache itself, inside its capped cgroup,
so only what fits beside the process stays cached (a board with that much memory). The per-token
I/O floor is what a pass must read because the budget cannot hold the model (model bytes - usable
budget) at the profile's measured read bandwidth (not given when warm: the disk's own speed is not
throttled or measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

CAP_MARGIN = 0.10  # the cap over the budget: RSS noise and page cache of the block in flight
STRATEGIES = ("pipeload", "full", "full-mmap", "ondemand")


# -- the parent: the matrix ----------------------------------------------------------------------
def _run_one(
    emulation,
    model_dir: Path,
    disk,
    storage,
    strategy: str,
    budget: int | None,
    cap: int | None,
    args,
) -> dict[str, Any]:
    from bench.device import Launch, prepare_cache, run_under
    from bench.matrix import STORAGE
    from bench.models import model_files
    from hermes_ort.core.manifest import load_manifest

    # Warm = the child reads the files into the page cache itself (charged to its capped cgroup:
    # only what fits beside the process stays cached, as on a board with that much memory).
    manifest = load_manifest(model_dir)
    prepare_cache(STORAGE["cold"], [], model_files(manifest, model_dir))
    launch = Launch(
        emulation,
        cores=args.cores,
        cap_bytes=cap,
        disk=disk,
        read_bytes_per_s=storage.read_bytes_per_s,
        tag="gen",
    )
    cmd = [
        sys.executable,
        "-m",
        "bench.child",
        "generate",
        str(model_dir),
        "--strategy",
        strategy,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens if storage.cache == "warm" else args.cold_new_tokens),
    ]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    if storage.cache == "warm":
        cmd.append("--warm")
    child = run_under(launch, cmd, args.timeout)
    result = {**child.record, "ok": child.ok, "error": None if child.ok else child.error}
    code = child.returncode
    mem = launch.memory
    killed = bool(mem and mem.oom_kills) or code == -9
    result.update(
        strategy=strategy,
        profile=storage.name,
        budget_bytes=budget,
        cap_bytes=cap if launch.cap_enforced else None,
        cgroup_peak_bytes=mem.peak_bytes if mem else None,
        killed_for_memory=killed,
        blkio_read_bytes=launch.blkio_read_bytes,
        returncode=code,
    )
    return result


def run_matrix(args) -> dict[str, Any]:
    from bench.cgroups import disk_of
    from bench.device import Emulation, measure_read_bandwidth
    from bench.matrix import STORAGE
    from bench.records import machine_info, versions
    from hermes_ort.core.manifest import load_manifest

    model_dir = Path(args.model_dir)
    manifest = load_manifest(model_dir)
    model_bytes = sum(f.bytes for f in manifest.block_files().values())
    emulation = Emulation.detect()
    disk = disk_of(model_dir)
    for w in emulation.warnings(tuple(), disk):
        print(f"warning: {w}", file=sys.stderr)
    records, bandwidth = [], {}
    baseline = _process_baseline()
    for name in args.profiles.split(","):
        storage = STORAGE[name]
        bandwidth[name] = measure_read_bandwidth(emulation, storage, model_dir, disk)[
            "read_bytes_per_s"
        ]
        for share in [float(x) for x in args.budgets.split(",")]:
            budget = int(share * model_bytes) + baseline
            cap = int(budget * (1 + CAP_MARGIN))
            for strategy in args.strategies.split(","):
                for rep in range(args.repeats):
                    t = time.time()
                    r = _run_one(
                        emulation,
                        model_dir,
                        disk,
                        storage,
                        strategy,
                        budget if strategy == "pipeload" else None,
                        cap,
                        args,
                    )
                    r.update(share=share, repeat=rep, wall_s=time.time() - t)
                    r["io_floor_per_token_s"] = _io_floor(model_bytes, budget, r, bandwidth[name])
                    records.append(r)
                    print(_line(r), file=sys.stderr, flush=True)
    return {
        "kind": "hermes-ort generation bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": manifest.name,
        "model_dir": str(model_dir),
        "model_bytes": model_bytes,
        "baseline_bytes": baseline,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": {"warm": args.new_tokens, "cold": args.cold_new_tokens},
        "cap_margin": CAP_MARGIN,
        "bandwidth_bytes_per_s": bandwidth,
        "machine": machine_info(),
        "versions": versions(),
        "emulation": emulation.to_json(),
        "records": records,
    }


def _process_baseline() -> int:
    """RSS of a fresh process that imported the runtime (Python, numpy, ONNX Runtime)."""
    from hermes_ort.measure.fresh_process import require, run_child

    code = (
        "import json, hermes_ort.streaming.memory as m; print(json.dumps({'rss': m.rss_bytes()}))"
    )
    return require(run_child([sys.executable, "-c", code], 120), "the baseline probe")["rss"]


def _io_floor(model_bytes: int, budget: int, r: dict, bandwidth: float | None) -> float | None:
    """Seconds a decode pass must spend reading: the part of the model the budget cannot hold
    (besides the process baseline and the KV cache), at the profile's bandwidth."""
    if bandwidth is None:  # warm: no throttle, the disk's own speed (not measured)
        return None
    usable = budget - r.get("baseline_bytes", 80 << 20) - r.get("cache_bytes", 0)
    return max(0, model_bytes - usable) / bandwidth


def _line(r: dict) -> str:
    if not r.get("ok"):
        what = "killed for memory" if r["killed_for_memory"] else f"failed: {r.get('error')}"
        return f"{r['profile']} {r['share']:.0%} {r['strategy']}: {what}"
    return (
        f"{r['profile']} {r['share']:.0%} {r['strategy']}: {r['decode_tokens_per_s']:.2f} tok/s, "
        f"TTFT {r['time_to_first_token_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB"
    )


# -- the table -----------------------------------------------------------------------------------
def _kept(plan: dict) -> int:
    """Resident blocks of a plan record (older records counted them as resident_blocks)."""
    return len(plan["resident"]) if "resident" in plan else plan["resident_blocks"]


def render(data: dict[str, Any]) -> str:
    from hermes_ort.core.units import format_bytes

    mb = lambda b: format_bytes(b) if b is not None else "-"  # noqa: E731
    out = [
        f"# Generation: {data['model']} ({format_bytes(data['model_bytes'])} of blocks)",
        "",
        f"{data['prompt_tokens']}-token prompt, then {data['new_tokens']['warm']} new tokens "
        f"(warm) or "
        f"{data['new_tokens']['cold']} (cold profiles); one fresh process per row, inside a memory "
        f"cgroup capped at the budget + {data['cap_margin']:.0%}. Budget = a share of the model's "
        f"bytes + the process baseline ({format_bytes(data['baseline_bytes'])}: Python, numpy, "
        f"ONNX "
        f"Runtime); `pipeload` plans under the budget, the baselines have only the cap. Machine: "
        f"{data['machine'].get('cpu', '?')}, {data['machine'].get('cores', '?')} cores.",
        "",
        "| profile | budget | strategy | tokens/s | per token (median) | I/O floor per token | "
        "first token | one-shot | peak RSS | cgroup peak | read | resident blocks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["records"]:
        budget = r["cap_bytes"] and int(r["cap_bytes"] / (1 + data["cap_margin"]))
        head = f"| {r['profile']} | {r['share']:.0%} ({mb(budget)}) | {r['strategy']} |"
        if not r.get("ok"):
            why = "killed for memory" if r["killed_for_memory"] else f"failed: {r.get('error')}"
            out.append(f"{head} {why} | | | | | | {mb(r.get('cgroup_peak_bytes'))} | | |")
            continue
        per = statistics.median(r["token_s"]) if r["token_s"] else None
        floor = r.get("io_floor_per_token_s") if r["profile"] != "warm" else None
        plan = r["plan"]
        out.append(
            f"{head} {r['decode_tokens_per_s']:.2f} | {per * 1000:.0f} ms | "
            f"{'-' if floor is None else f'{floor * 1000:.0f} ms'} | "
            f"{r['time_to_first_token_s']:.2f} s | {r['one_shot_s']:.1f} s | "
            f"{mb(r['peak_rss_bytes'])} | {mb(r.get('cgroup_peak_bytes'))} | "
            f"{mb(r.get('blkio_read_bytes') or r['bytes_read'])} | {_kept(plan)}/{plan['blocks']} |"
        )
    return "\n".join(out) + "\n"


def add_arguments(m: argparse.ArgumentParser) -> None:
    m.add_argument("model_dir", type=Path, nargs="?", help="an exported decoder")
    m.add_argument("--strategies", default=",".join(STRATEGIES))
    m.add_argument("--budgets", default="1,0.5,0.25", help="shares of the model's bytes")
    m.add_argument("--profiles", default="warm,sd")
    m.add_argument("--prompt-tokens", type=int, default=32)
    m.add_argument("--new-tokens", type=int, default=16, help="new tokens on the warm profile")
    m.add_argument("--cold-new-tokens", type=int, default=4, help="on cold/emmc/sd profiles")
    m.add_argument("--repeats", type=int, default=1)
    m.add_argument("--cores", type=int, default=None)
    m.add_argument("--timeout", type=float, default=1800)
    m.add_argument("--out", type=Path, default=Path("bench/results/latest/generation"))
    m.add_argument("--render", type=Path, metavar="JSON", help="render a generation.json again")


def run(args) -> int:
    if args.render:
        data = json.loads(args.render.read_text())
        table = render(data)
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    if args.model_dir is None:
        raise ValueError("give the model directory of an exported decoder")
    from bench.cgroups import signals_raise

    with signals_raise():  # SIGTERM/SIGHUP clean up the cgroups as Ctrl-C does
        data = run_matrix(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(data, indent=1))
    table = render(data)
    (args.out / "generation.md").write_text(table)
    print(table)
    return 0
