"""The exporter's peak memory against the number of layers, regular vs --streaming.

    python -m export.memory_bench --layers 4,8,16 --out bench/results/latest/export-memory

Saves Llama-style checkpoints of one width and growing depth (random weights, safetensors), exports
each both ways in a fresh process, and records its peak RSS (GNU time) and wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
    """Export in a child under GNU time, which reports the child's own peak RSS."""
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "export",
        "--model",
        str(ckpt),
        "--out",
        str(out),
        "--quiet",
        "--seq-len",
        "32",
        "--force",
    ] + (["--streaming"] if streaming else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-800:])
    kib = next(
        int(line.split(":")[1])
        for line in r.stderr.splitlines()
        if "Maximum resident set size" in line
    )
    return {"peak_rss_bytes": kib * 1024, "seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.memory_bench", description=__doc__)
    p.add_argument("--layers", default="4,8,16")
    p.add_argument("--out", type=Path, default=Path("bench/results/latest/export-memory"))
    args = p.parse_args(argv)
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
    (args.out / "export-memory.json").write_text(
        json.dumps({"width": WIDTH, "rows": rows}, indent=1)
    )
    lines = ["| layers | model (fp32) | mode | exporter peak RSS | time |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layers']} | {r['model_bytes'] / 1e6:.0f} MB | {r['mode']} | "
            f"{r['peak_rss_bytes'] / 1e6:.0f} MB | {r['seconds']:.0f} s |"
        )
    (args.out / "export-memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
