"""Batches that stream each block once: throughput and peak memory of a batch under a budget
against `full` with everything resident, and batched generation against one prompt; each
configuration in a fresh process, warm (the files read into the page cache first).

    python -m bench batches --encoder bert-base --batch 256 --seq-len 128 \
        --decoder models/peers/tinyllama-1.1b/hermes-fp32 --decoder-budget 25% --prompts 1,8 \
        --out bench/results/latest/batches

Encoders: `full` and `pipeload` at `min` for that batch (the smallest budget the planner finds
for it; each block then runs over the whole batch in micro-batches); sequences/s of the steady
passes, the process's peak RSS. Decoders: `pipeload` under a budget that is a share of the
model's block bytes on top of the process baseline, N prompts at once: tokens/s of the decode
steps (every row's tokens), peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _child(cmd: list[str], timeout: float) -> dict[str, Any]:
    from bench import child_env
    from hermes_ort.measure.fresh_process import require, run_child

    return require(run_child(cmd, timeout, env=child_env()), " ".join(cmd[2:5]))


def _warm(model_dir: Path) -> None:
    from hermes_ort.core.manifest import load_manifest
    from hermes_ort.streaming.readahead import warm_files

    manifest = load_manifest(model_dir)
    warm_files([model_dir / p for p in manifest.all_files()])


def encoder_rows(model_dir: Path, args) -> list[dict[str, Any]]:
    rows = []
    for strategy, budget in (("full", None), ("pipeload", "min")):
        for repeat in range(args.repeats):
            _warm(model_dir)
            cmd = [sys.executable, "-m", "bench.child", "run", str(model_dir)]
            cmd += ["--strategy", strategy, "--passes", str(args.passes)]
            cmd += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
            if budget:
                cmd += ["--budget", budget]
            r = _child(cmd, args.timeout)
            steady = statistics.median(r["steady_s"])
            rows.append(
                {
                    "strategy": strategy,
                    "budget": budget,
                    "repeat": repeat,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "steady_pass_s": steady,
                    "sequences_per_s": args.batch / steady,
                    "first_pass_s": r["first_pass_s"],
                    "peak_rss_bytes": r["peak_rss_bytes"],
                    "budget_bytes": r["budget_bytes"],
                    "micro_batch": r["plan"].get("micro_batch"),
                    "resident": len(r["plan"]["resident"]),
                    "blocks": r["plan"]["blocks"],
                    "steady_read_bytes": r["steady_read_bytes"],
                }
            )
            print(
                f"{strategy} {budget or ''} x{args.batch}: {args.batch / steady:.1f} seq/s, "
                f"peak {r['peak_rss_bytes'] / 1e6:.0f} MB",
                file=sys.stderr,
            )
    return rows


def decoder_rows(model_dir: Path, args) -> list[dict[str, Any]]:
    from hermes_ort.core.manifest import load_manifest

    describe = _child(
        [sys.executable, "-m", "bench.child", "describe", str(model_dir)], args.timeout
    )
    share = float(args.decoder_budget.rstrip("%")) / 100
    blocks = load_manifest(model_dir).blocks_bytes
    budget = int(describe["baseline_bytes"] + share * blocks)
    rows = []
    for prompts in [int(p) for p in args.prompts.split(",")]:
        for repeat in range(args.repeats):
            _warm(model_dir)
            cmd = [sys.executable, "-m", "bench.child", "generate", str(model_dir)]
            cmd += ["--budget", str(budget), "--prompts", str(prompts)]
            cmd += [
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--new-tokens",
                str(args.new_tokens),
            ]
            r = _child(cmd, args.timeout)
            steps = r["token_s"]
            step = statistics.median(steps)
            rows.append(
                {
                    "prompts": prompts,
                    "repeat": repeat,
                    "budget_bytes": budget,
                    "budget_share": args.decoder_budget,
                    "decode_step_s": step,
                    "tokens_per_s": prompts / step,
                    "peak_rss_bytes": r["peak_rss_bytes"],
                    "resident": len(r["plan"]["resident"]),
                    "blocks": r["plan"]["blocks"],
                    "streamed_bytes": r["plan"]["streamed_bytes"],
                }
            )
            print(
                f"{prompts} prompt(s) at {args.decoder_budget}: {prompts / step:.2f} tokens/s, "
                f"peak {r['peak_rss_bytes'] / 1e6:.0f} MB",
                file=sys.stderr,
            )
    return rows


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(data: dict[str, Any]) -> str:
    out = ["# Batches that stream each block once", ""]
    enc = data.get("encoder") or []
    if enc:
        by = {s: [r for r in enc if r["strategy"] == s] for s in ("full", "pipeload")}
        full, pipe = by["full"], by["pipeload"]
        b, t = enc[0]["batch"], enc[0]["seq_len"]
        out += [
            f"Encoder `{data['encoder_model']}`, a batch of {b} sequences x {t} tokens, warm, "
            f"fresh process each ({len(full)} each, medians):",
            "",
            "| strategy | budget | sequences/s | steady pass | peak RSS | micro-batch | resident |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, rows in by.items():
            budget, first = rows[0]["budget_bytes"], rows[0]
            seqs, steady = _median(rows, "sequences_per_s"), _median(rows, "steady_pass_s")
            peak = _median(rows, "peak_rss_bytes") / 1e6
            out.append(
                f"| {name} | {'-' if budget is None else f'{budget / 1e6:.0f} MB (min)'} | "
                f"{seqs:.1f} | {steady:.2f} s | {peak:.0f} MB | {first['micro_batch'] or '-'} | "
                f"{first['resident']}/{first['blocks']} |"
            )
        ratio = _median(pipe, "sequences_per_s") / _median(full, "sequences_per_s")
        mem = _median(pipe, "peak_rss_bytes") / _median(full, "peak_rss_bytes")
        out += ["", f"pipeload / full: throughput {ratio:.2f}x, peak RSS {mem:.2f}x.", ""]
    dec = data.get("decoder") or []
    if dec:
        counts = sorted({r["prompts"] for r in dec})
        out += [
            f"Decoder `{data['decoder_model']}`, pipeload at a {dec[0]['budget_share']} budget "
            f"({dec[0]['budget_bytes'] / 1e6:.0f} MB), warm, {data['prompt_tokens']}-token "
            f"prompts, {data['new_tokens']} new tokens each:",
            "",
            "| prompts | decode step | tokens/s | x one prompt | peak RSS | resident |",
            "|---|---|---|---|---|---|",
        ]
        one = _median([r for r in dec if r["prompts"] == counts[0]], "tokens_per_s")
        for n in counts:
            rows = [r for r in dec if r["prompts"] == n]
            tps = _median(rows, "tokens_per_s")
            out.append(
                f"| {n} | {_median(rows, 'decode_step_s'):.3f} s | {tps:.2f} | {tps / one:.2f}x | "
                f"{_median(rows, 'peak_rss_bytes') / 1e6:.0f} MB | "
                f"{rows[0]['resident']}/{rows[0]['blocks']} |"
            )
        out.append("")
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", default=None, help="a preset or exported encoder directory")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--decoder", default=None, help="an exported decoder directory")
    p.add_argument("--decoder-budget", default="25%", help="share of the block bytes")
    p.add_argument("--prompts", default="1,8")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--models-dir", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/batches"))


def run(args) -> int:
    from bench.models import ensure_exported, model_dir_for

    data: dict[str, Any] = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens}
    if args.encoder:
        d = model_dir_for(args.encoder, args.models_dir)
        ensure_exported(args.encoder, d)
        data.update(encoder_model=args.encoder, encoder=encoder_rows(d, args))
    if args.decoder:
        data.update(decoder_model=args.decoder, decoder=decoder_rows(Path(args.decoder), args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batches.json").write_text(json.dumps(data, indent=1))
    table = render(data)
    (args.out / "batches.md").write_text(table)
    print(table)
    return 0
