"""The exporter's peak memory against the number of layers, regular vs --streaming.

    python -m bench export-memory --layers 4,8,16 --out bench/results/latest/export-memory

Saves Llama-style checkpoints of one width and growing depth (random weights, safetensors), exports
each both ways in a fresh process, and records its peak RSS (the kernel's, for that child) and
wall time. Needs the exporter's extra (torch, transformers, optimum).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench import child_env
from hermes_ort.measure.fresh_process import require, run_child

WIDTH = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 512,
}


def save_checkpoint(path: Path, num_layers: int) -> int:
    """A Llama-style checkpoint; returns its parameter bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=num_layers, **WIDTH))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    model.save_pretrained(path)
    return sum(p.numel() * 4 for p in model.parameters())


def export_peak(ckpt: Path, out: Path, streaming: bool) -> dict:
    """Export in a child; its peak RSS is the kernel's (wait4's maxrss of the child)."""
    cmd = [
        sys.executable,
        "-m",
        "hermes_ort.export",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--quiet",
    ]
    cmd += ["--seq-len", "32", "--force"] + (["--streaming"] if streaming else [])
    result = run_child(cmd, timeout_s=7200, env=child_env())
    require(result, f"export of '{ckpt}'")
    return {"peak_rss_bytes": result.peak_rss_bytes, "seconds": result.wall_s}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", default="4,8,16")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/export-memory"))


def run(args) -> int:
    rows = []
    work = Path(tempfile.mkdtemp(prefix="hermes-export-memory-"))
    try:
        sizes = {}
        for n in [int(x) for x in args.layers.split(",")]:
            sizes[n] = save_checkpoint(work / f"ckpt-{n}", n)
            for mode in ("regular", "streaming"):
                ckpt = work / f"ckpt-{n}"
                r = export_peak(ckpt, work / f"out-{n}-{mode}", mode == "streaming")
                shutil.rmtree(work / f"out-{n}-{mode}")
                rows.append({"layers": n, "mode": mode, "model_bytes": sizes[n], **r})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"width": WIDTH, "rows": rows}
    (args.out / "export-memory.json").write_text(json.dumps(doc, indent=1))
    lines = ["| layers | model (fp32) | mode | exporter peak RSS | time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['model_bytes'] / 1e6:.0f} MB | {r['mode']} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} MB | {r['seconds']:.0f} s |"
        )
    (args.out / "export-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
