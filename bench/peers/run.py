"""`python -m bench peers`: every engine on the same weights under the same device profiles.

    python -m bench peers --model tinyllama-1.1b --profiles warm,cold:100%,cold:50%,cold:25%,sd:50%
    python -m bench peers --model bert-large --engines hermes-ort:fp32,transformers,optimum
    python -m bench peers --render bench/results/latest/peers/tinyllama-1.1b.json
    python -m bench peers --model smollm2-135m --repeats 3

A configuration is ENGINE:FORMAT[:VARIANT] (llama.cpp's variant `no-repack`: its load-time
weight repacking off; hermes-ort's `full-mmap`/`full`: that strategy instead of pipeload). A
profile is a bench device profile (`bench/matrix.py`: STORAGE[:Nc][:CAP]) whose share caps are of
the fp32 checkpoint's bytes; cold profiles evict every engine's files first, warm ones read the
engine's own files into the page cache. Each configuration runs in fresh processes; an engine
that is not installed is skipped with the command that installs it.

A real model (`--model smollm2-135m`, bench/peers/real.py) is a GGUF file as a package ships it:
llama.cpp runs it as shipped and requantized by its own quantizer, hermes-ort runs its export of
it (`hermes-ort:gguf`, the file's blocks kept); its share caps are of the GGUF file's bytes, its
default profiles warm and 100/75/50/25% caps on the disk, eMMC and SD, and the report checks the
issue's targets (bench/peers/targets.py) with hermes-ort's `plan --budget min` beside them."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import ENGINES, installed

DECODER_CONFIGS = (
    "hermes-ort:fp32",
    "hermes-ort:int4",
    "hermes-ort:int8",
    "llama.cpp:f32",
    "llama.cpp:f16",
    "llama.cpp:q8_0",
    "llama.cpp:q4_0",
    "llama.cpp:q4_0:no-repack",
    "onnxruntime-genai:fp32",
    "onnxruntime-genai:int4",
    "transformers:fp32",
    "accelerate:fp32",
    "airllm:fp32",
)
ENCODER_CONFIGS = (
    "hermes-ort:fp32",
    "hermes-ort:fp32:full",
    "hermes-ort:int8",  # int4 fails its accuracy floor on bert-large's random weights (README)
    "transformers:fp32",
    "optimum:fp32",
)
PROFILES = ("warm", "cold:100%", "cold:50%", "cold:25%", "sd:50%")
# hermes-ort's budget: the cap less this share (--cap-margin). 0: the cap itself, as the other
# engines get it; page cache beyond the plan is clean and reclaimed under the cap, not killed
CAP_MARGIN = 0.0
EXACT_FORMATS = ("fp32", "f32", "f16")  # their greedy tokens must equal transformers'
# a real GGUF (real.py): the file as shipped, llama.cpp's requantizations, hermes-ort's export
REAL_CONFIGS = (
    "hermes-ort:gguf",
    "llama.cpp:q4_1",
    "llama.cpp:q4_1:no-repack",
    "llama.cpp:q4_0",
    "llama.cpp:q4_0:no-repack",
    "llama.cpp:q8_0",
    "llama.cpp:q8_0:no-repack",
)
REAL_PROFILES = (
    "warm",
    *(f"{storage}:{share}%" for storage in ("cold", "emmc", "sd") for share in (100, 75, 50, 25)),
)


@dataclass(frozen=True)
class Config:
    engine: str
    format: str
    variant: str = ""

    @property
    def label(self) -> str:
        return ":".join(x for x in (self.engine, self.format, self.variant) if x)


def parse_config(text: str) -> Config:
    engine, _, rest = text.partition(":")
    fmt, _, variant = rest.partition(":")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine '{engine}' (choose from {', '.join(ENGINES)})")
    spec = ENGINES[engine]
    fmt = fmt or spec.formats[0]
    if fmt not in spec.formats:
        raise ValueError(f"{engine} runs {', '.join(spec.formats)} here, not '{fmt}'")
    variants = {"llama.cpp": ("", "no-repack"), "hermes-ort": ("", "full", "full-mmap", "min")}
    if variant not in variants.get(engine, ("",)):
        raise ValueError(f"'{text}': {engine} has no variant '{variant}'")
    return Config(engine, fmt, variant)


def check_model_runs(model, configs: list[Config]) -> None:
    """ValueError for a configuration the model has no weights for: a real model runs the
    formats made from its file, a preset every format but a GGUF's own ("gguf")."""
    for c in configs:
        if model.real:
            formats = model.real.formats.get(c.engine, ())
        else:
            formats = tuple(f for f in ENGINES[c.engine].formats if f != "gguf")
        if c.format not in formats:
            runs = ", ".join(formats) or "nothing"
            raise ValueError(f"'{c.label}': {c.engine} runs {runs} of {model.preset}")


def default_configs(model) -> tuple[str, ...]:
    if model.real:
        return REAL_CONFIGS
    return DECODER_CONFIGS if model.kind == "decoder" else ENCODER_CONFIGS


def _tokens_for(profile, args) -> int:
    return args.new_tokens if profile.storage.cache == "warm" else args.cold_new_tokens


def child_command(config: Config, model, weights: Path, profile, cap: int | None, args) -> list:
    kind = model.kind
    cmd = [
        sys.executable,
        "-m",
        "bench.peers.child",
        config.engine,
        str(weights),
        "--reference",
        str(model.reference),
        "--kind",
        kind,
        "--threads",
        str(args.threads),
    ]
    if kind == "decoder":
        cmd += ["--new-tokens", str(_tokens_for(profile, args))]
    else:
        cmd += ["--passes", str(args.passes)]
    if config.variant == "no-repack":
        cmd.append("--no-repack")
    if config.engine == "hermes-ort" and config.variant == "min":  # pipeload at its least memory
        cmd += ["--strategy", "pipeload", "--budget", "min"]
    elif config.engine == "hermes-ort":
        cmd += ["--strategy", config.variant or "pipeload"]
        if cap is not None and not config.variant:
            cmd += ["--budget", str(int(cap / (1 + args.cap_margin)))]
    if config.engine in ("accelerate", "airllm"):
        scratch = model.root / ("airllm" if config.engine == "airllm" else "scratch")
        scratch.mkdir(parents=True, exist_ok=True)
        cmd += ["--scratch", str(scratch)]
    return cmd


def run_one(config: Config, model, profile, args, emulation, disk) -> dict[str, Any]:
    from bench.device import Launch, prepare_cache, run_under
    from bench.peers.weights import prepare

    weights = prepare(model, config.engine, config.format)
    base = model.share_base_bytes  # fp32 checkpoint, or a real model's GGUF file
    cap = profile.memory_cap.resolve(base, 0) if profile.memory_cap else None
    every = [p for p in model.root.rglob("*") if p.is_file()]  # a cold start evicts them all
    own = model.files(config.engine, config.format, config.variant)
    prepare_cache(profile.storage, own, every)
    launch = Launch(
        emulation,
        cores=profile.cores,
        cap_bytes=cap,
        disk=disk,
        read_bytes_per_s=profile.storage.read_bytes_per_s,
        tag="peer",
    )
    cmd = child_command(config, model, weights, profile, cap, args)
    result = run_under(launch, cmd, args.timeout)
    mem = launch.memory
    killed = bool(mem and mem.oom_kills) or (launch.cap_enforced and result.returncode == -9)
    record = {k: v for k, v in result.record.items() if k != "ok"}
    record.update(
        engine=config.engine,
        format=config.format,
        variant=config.variant,
        label=config.label,
        profile=profile.text,
        cap_bytes=cap if launch.cap_enforced else None,
        budget_bytes=_budget(cmd) or result.record.get("budget_bytes"),
        ok=result.ok,
        error=None if result.ok else ("killed for memory" if killed else result.error),
        killed_for_memory=killed,
        peak_rss_bytes=result.peak_rss_bytes,
        cgroup_peak_bytes=mem.peak_bytes if mem else None,
        read_bytes=launch.blkio_read_bytes,
        wall_s=result.wall_s,
        weights_bytes=sum(p.stat().st_size for p in own),
    )
    return record


def _budget(cmd: list) -> int | None:
    """The budget in bytes given to hermes-ort (None: none, or "min", which the child reports)."""
    text = cmd[cmd.index("--budget") + 1] if "--budget" in cmd else ""
    return int(text) if text.isdigit() else None


def summarise(record: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """s/token (median of the decode steps, their spread), tokens/s, agreement with the
    reference's tokens (transformers', or a real model's llama.cpp run of the file as shipped)."""
    steps = record.get("token_s") or []
    if steps:
        record["s_per_token"] = statistics.median(steps)
        record["s_per_token_range"] = [min(steps), max(steps)]
        record["tokens_per_s"] = 1 / record["s_per_token"]
    passes = record.get("pass_s") or []
    if passes:
        record["steady_pass_s"] = statistics.median(passes)
    new = record.get("new_ids")
    want = reference.get(reference.get("tokens_of", "transformers"))
    if new is not None and isinstance(want, list):
        same = sum(a == b for a, b in zip(new, want, strict=False))
        prefix = next(
            (i for i, (a, b) in enumerate(zip(new, want, strict=False)) if a != b), len(new)
        )
        record["agreement"] = same / len(new) if new else None
        record["equal_prefix"] = prefix
        record["tokens_equal"] = new == want[: len(new)]
    if "checksums" in record and isinstance(want, dict):
        diffs = [
            abs(a - b) / max(1.0, abs(b))
            for k in want
            for a, b in zip(record["checksums"].get(k, []), want[k], strict=False)
        ]
        record["checksum_rel_diff"] = max(diffs) if diffs else None
    return record


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="tinyllama-1.1b",
        help="a preset (decoder or encoder) or a real GGUF: smollm2-135m",
    )
    p.add_argument("--engines", default=None, help="ENGINE:FORMAT[:VARIANT], comma-separated")
    p.add_argument(
        "--profiles",
        default=None,
        help=(  # argparse formats help with %: a share's % doubled
            f"comma-separated (default: {','.join(PROFILES)}; a real model's: "
            f"{','.join(REAL_PROFILES)})"
        ).replace("%", "%%"),
    )
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per configuration")
    p.add_argument("--new-tokens", type=int, default=8, help="decoders, warm profiles")
    p.add_argument("--cold-new-tokens", type=int, default=4, help="decoders, cold profiles")
    p.add_argument("--passes", type=int, default=3, help="encoders")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--cap-margin", type=float, default=CAP_MARGIN, help="hermes-ort's budget: cap/(1+M)"
    )
    p.add_argument("--timeout", type=float, default=2400, help="seconds per process")
    p.add_argument("--prepare-only", action="store_true", help="make the weights and stop")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/peers"))
    p.add_argument("--render", type=Path, metavar="JSON", help="render a stored run again")
    p.add_argument(
        "--merge",
        action="store_true",
        help="replace only these configurations' records in the stored run (a rerun of some)",
    )


def run(args) -> int:
    from bench.peers.report import write_report

    if args.render:
        doc = json.loads(args.render.read_text())
        print(write_report(doc, args.render.parent, args.render.stem))
        return 0
    from bench.cgroups import disk_of, signals_raise
    from bench.device import Emulation
    from bench.matrix import parse_profile
    from bench.peers.weights import PeerModel, prepare
    from bench.records import machine_info, versions

    model = PeerModel.named(args.model)
    chosen = args.engines.split(",") if args.engines else default_configs(model)
    configs = [parse_config(c) for c in chosen]
    check_model_runs(model, configs)
    shown = (
        args.profiles.split(",") if args.profiles else (REAL_PROFILES if model.real else PROFILES)
    )
    profiles = [parse_profile(p) for p in shown]
    runnable, skipped = [], {}
    for c in configs:
        why = installed(ENGINES[c.engine])
        if why:
            skipped[c.label] = why
            print(f"bench peers: skipped {c.label}: {why}", file=sys.stderr)
        else:
            runnable.append(c)
    for c in runnable:
        prepare(model, c.engine, c.format)
    if args.prepare_only:
        return 0
    emulation, disk = Emulation.detect(), disk_of(model.root)
    reference = json.loads(model.reference.read_text())
    records = []
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    with signals_raise():
        smallest = smallest_budgets(model, runnable, emulation, args.timeout)
        for profile in profiles:
            for repeat in range(args.repeats):
                for c in runnable:
                    r = summarise(run_one(c, model, profile, args, emulation, disk), reference)
                    r["repeat"] = repeat
                    records.append(r)
                    print(_line(r), file=sys.stderr, flush=True)
    doc = {
        "kind": "hermes-ort-peers",
        "created": started,
        "model": args.model,
        "model_kind": model.kind,
        "share_base": f"GGUF file ({model.real.shipped})" if model.real else "fp32 checkpoint",
        "share_base_bytes": model.share_base_bytes,
        "tokens_of": reference.get("tokens_of", "transformers"),
        "smallest_budget_bytes": smallest,
        "prompt_tokens": len(reference.get("prompt_ids", [])),
        "new_tokens": {"warm": args.new_tokens, "cold": args.cold_new_tokens},
        "threads": args.threads,
        "cap_margin": args.cap_margin,
        "profiles": [p.text for p in profiles],
        "machine": machine_info(),
        "versions": versions(),
        "emulation": emulation.to_json(),
        "skipped": skipped,
        "records": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stored = args.out / f"{args.model}.json"
    if args.merge and stored.is_file():
        doc = merge_runs(json.loads(stored.read_text()), doc)
    stored.write_text(json.dumps(doc, indent=1) + "\n")
    print(write_report(doc, args.out, args.model))
    return 0


def smallest_budgets(model, configs: list[Config], emulation, timeout_s: float) -> dict:
    """A real model's hermes-ort pipeload exports: label -> `plan --budget min`'s figure (or
    why it failed), before any run (a user's first plan measures the profile later runs use)."""
    if not model.real:
        return {}
    from bench.peers.real import smallest_budget

    out = {}
    for c in configs:
        if c.engine == "hermes-ort" and not c.variant:
            out[c.label] = smallest_budget(model.weights(c.engine, c.format), emulation, timeout_s)
            print(f"bench peers: {c.label} plan --budget min: {out[c.label]}", file=sys.stderr)
    return out


def merge_runs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with its records of the (configuration, profile) pairs `new` ran replaced by new's;
    the merged run keeps old's order and notes when each part was measured."""
    rerun = {(r["label"], r["profile"]) for r in new["records"]}
    fresh = {(r["label"], r["profile"], r["repeat"]): r for r in new["records"]}
    records = []
    for r in old["records"]:
        key = (r["label"], r["profile"])
        if key in rerun:
            r = fresh.pop((*key, r["repeat"]), None)
        if r is not None:
            records.append(r)
    records += fresh.values()
    profiles = old["profiles"] + [p for p in new["profiles"] if p not in old["profiles"]]
    note = {
        "created": new["created"],
        "git_commit": new.get("versions", {}).get("git_commit"),
        "rerun": sorted(rerun),
    }
    merged = {**old, "profiles": profiles, "records": records}
    merged["merged"] = old.get("merged", []) + [note]
    if any(label.startswith("hermes-ort") for label, _ in rerun):
        merged["cap_margin"] = new["cap_margin"]
    if new.get("smallest_budget_bytes"):  # a real model's hermes-ort, planned again
        merged["smallest_budget_bytes"] = {
            **old.get("smallest_budget_bytes", {}),
            **new["smallest_budget_bytes"],
        }
    return merged


def _line(r: dict[str, Any]) -> str:
    head = f"{r['profile']} {r['label']}"
    if not r["ok"]:
        return f"{head}: {r['error']}"
    if "s_per_token" in r:
        return (
            f"{head}: {r['s_per_token']:.3f} s/token, first token "
            f"{r['time_to_first_token_s']:.2f} s, peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB, "
            f"tokens equal: {r.get('tokens_equal')}"
        )
    return f"{head}: first pass {r['first_pass_s']:.3f} s, steady {r.get('steady_pass_s', 0):.3f} s"
