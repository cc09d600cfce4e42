"""`hermes-ort export (--preset NAME | --model PATH_OR_HUB_ID) --out DIR [...]`"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from hermes_ort.core.errors import interrupted_status
from hermes_ort.core.units import format_bytes
from hermes_ort.export.errors import ExportError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", metavar="NAME", help="a config in hermes_ort/presets/NAME.json, random weights"
    )
    source.add_argument(
        "--model",
        metavar="PATH_OR_HUB_ID",
        help="a Hugging Face checkpoint directory or hub id, or a GGUF file (llama.cpp's; llama "
        "and qwen2: its quantized weights kept as they are, see --dtype)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="model directory to write"
    )
    parser.add_argument(
        "--layers-per-block",
        type=int,
        default=1,
        metavar="N",
        help="transformer layers per block (default 1)",
    )
    parser.add_argument(
        "--seq-len",
        type=int,
        default=None,
        metavar="N",
        help="sequence length of the verification sample (default 128, or the model's positions "
        "if fewer)",
    )
    parser.add_argument(
        "--task", help="export task for --model (default: from the architecture), e.g. fill-mask"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of a preset's random weights (default 0)"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="fp32: the largest difference from PyTorch allowed, relative to each output's "
        "largest value (default 1e-4)",
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    parser.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="export a decoder without its per-layer KV cache inputs/outputs (no generate())",
    )
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="--model only: export layer by layer from the checkpoint's safetensors, so memory "
        "grows with one layer, not the model (no whole-model file for full/full-mmap)",
    )
    parser.add_argument(
        "--full-model",
        action="store_true",
        help="also keep the whole-model files the `full` and `full-mmap` baselines open (full/); "
        "by default DIR holds the blocks only, the weights once",
    )
    parser.add_argument(
        "--head-slices",
        type=head_slices,
        default="auto",
        metavar="N|auto",
        help="causal LMs: cut the LM head into N blocks, each the logits of one slice of the "
        "vocabulary, streamed like layers (a tied head reads its rows of the embedding table in "
        "place); auto (default) = as many as keep each slice within the largest layer block's "
        "weights, where the head is over twice a layer's size (else it stays whole); 1 = the "
        "head stays in the epilogue",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace DIR if it is an existing model directory"
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print nothing but errors (no progress, no summary)"
    )
    from hermes_ort.core.choices import values
    from hermes_ort.export.quant_choices import Algorithm, Method, Mode

    q = parser.add_argument_group("quantization (weight-only; export/quantize.py)")
    q.add_argument(
        "--quantize",
        choices=values(Mode),
        default=None,
        help="int4 or int8 weights: MatMulNBits, embedding tables GatherBlockQuantized",
    )
    q.add_argument(
        "--quant-method",
        choices=values(Method),
        default=None,
        help="nbits (MatMulNBits, the default) or, int8 encoders only, dynamic (MatMulInteger: "
        "runs unpacked, less accurate)",
    )
    q.add_argument(
        "--quant-block-size",
        type=int,
        default=None,
        metavar="N",
        help="weights per block along K: 16, 32, 64 or 128 (default 32)",
    )
    q.add_argument(
        "--quant-accuracy-level",
        type=int,
        default=4,
        choices=(1, 2, 3, 4),
        help="MatMulNBits' compute: 4 = int8 activations (default), 1 = fp32",
    )
    q.add_argument(
        "--quant-algorithm",
        choices=values(Algorithm),
        default=None,
        help="how weights are rounded (default: int4 minmax, int8 rtn; docs/quantization.md): "
        "rtn = round to nearest, symmetric (the fastest kernel); rtn-zero-point = on an integer "
        "zero point; minmax = each block's min .. max in equal steps (GGUF's Q4_1); "
        "minmax-search = minmax with the range fitted to the least squared error; hqq = "
        "half-quadratic. All but rtn add a per-block offset term (~20%% slower decoding)",
    )
    q.add_argument(
        "--quant-no-embeddings",
        action="store_true",
        help="keep embedding tables fp32 (quantized at the head's bits by default)",
    )
    q.add_argument(
        "--quant-head-bits",
        type=int,
        default=8,
        choices=(4, 8),
        help="int4: the bits of the LM head and the embedding tables (default 8: the head sets "
        "every logit; a tied table is one table)",
    )
    q.add_argument(
        "--accuracy-floor",
        type=float,
        default=None,
        metavar="COSINE",
        help="dynamic int8 (no PyTorch twin of its weights): the verification's floor on the "
        "output's cosine with PyTorch fp32 (default 0.999)",
    )
    parser.add_argument(
        "--graph",
        choices=("auto", "optimum", "fused"),
        default="auto",
        help="the whole-model graph: optimum's export, or hermes-ort's fused graph "
        "for llama/mistral/qwen2 decoders (auto: fused when quantizing one)",
    )
    from hermes_ort.export.sources import WeightsDtype

    parser.add_argument(
        "--dtype",
        choices=values(WeightsDtype),
        default=WeightsDtype.AUTO.value,
        help="the weights in the blocks: auto = as the checkpoint holds them (a GGUF's quantized "
        "blocks kept bit for bit as MatMulNBits, its float tensors float32; a Hugging Face "
        "checkpoint float32); fp32 = every weight float32 (a GGUF dequantized: larger, no int8 "
        "activations). --quantize instead requantizes them with the exporter's own method",
    )


def head_slices(text: str) -> int | str:
    """--head-slices' value: "auto" or a whole number (its range is checked by the export)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of slices or auto, not {text!r}") from None


def _quantization(args):
    if args.quantize is None:
        return None
    from hermes_ort.export.quantize import Quantization

    return Quantization.make(
        args.quantize,
        args.quant_method,
        block_size=args.quant_block_size,
        accuracy_level=args.quant_accuracy_level,
        algorithm=args.quant_algorithm,
        embeddings=not args.quant_no_embeddings,
        cosine_floor=args.accuracy_floor,
        head_bits=args.quant_head_bits,
    )


def _interrupt(signum, frame):  # SIGTERM cleans up like Ctrl-C
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from hermes_ort.export.pipeline import ExportOptions, export_model

    try:
        quantization = _quantization(args)
    except ExportError as e:
        print(f"hermes-ort export: error: {e}", file=sys.stderr)
        return 1
    opts = ExportOptions(
        out=args.out,
        preset=args.preset,
        model=args.model,
        task=args.task,
        layers_per_block=args.layers_per_block,
        seq_len=args.seq_len,
        seed=args.seed,
        opset=args.opset,
        force=args.force,
        verify=not args.no_verify,
        tolerance=args.tolerance,
        kv_cache=not args.no_kv_cache,
        streaming=args.streaming,
        progress=not args.quiet,
        quantization=quantization,
        graph=args.graph,
        full_model=args.full_model,
        dtype=args.dtype,
        head_slices=args.head_slices,
    )
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        result = export_model(opts)
    except ExportError as e:
        print(f"hermes-ort export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hermes-ort export: interrupted; nothing was written", file=sys.stderr)
        return interrupted_status()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if not args.quiet:
        print_summary(result)
    return 0


def on_disk(root: Path, paths) -> int:
    """Bytes the files take on disk, as `du` counts them: the 64 KiB alignment of the data files
    leaves holes (storage.py) that their length counts and the disk does not hold."""
    return sum(os.stat(root / p).st_blocks * 512 for p in paths)


def print_summary(result) -> None:
    """Elapsed time, then a table of blocks and their bytes on disk (shared files counted
    apart)."""
    m, root = result.manifest, result.out
    uses: dict[str, int] = {}
    for b in m.blocks:
        for f in b.files:
            uses[f.path] = uses.get(f.path, 0) + 1
    shared = sorted(p for p, n in uses.items() if n > 1)
    rows = [("block", "kind", "layers", "on disk", "")]
    for b in m.blocks:
        layers = (
            "-" if not b.layers else "-".join(str(x) for x in sorted({b.layers[0], b.layers[-1]}))
        )
        own = on_disk(root, (f.path for f in b.files if f.path not in shared))
        also = ", ".join(f.path for f in b.files if f.path in shared)
        rows.append((b.name, b.kind, layers, format_bytes(own), f"+ {also}" if also else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    print(f"exported '{m.name}' ({m.family}, {m.task}) to {result.out} in {result.elapsed_s:.1f} s")
    stages = ", ".join(f"{k.removesuffix('_s')} {v:.1f} s" for k, v in result.stages_s.items())
    print(f"  ({stages})")
    for name, kind, layers, size, note in rows:
        print(
            f"  {name:<{widths[0]}}  {kind:<{widths[1]}}  {layers:<{widths[2]}}  "
            f"{size:>{widths[3]}}  {note}".rstrip()
        )
    for path in shared:
        print(
            f"  {path}: {format_bytes(on_disk(root, [path]))} on disk, stored once, "
            f"read by {uses[path]} blocks"
        )
    print("  " + _totals(m, root))
    print("  " + describe_verification(m.verification, m.output_names[0]))


def describe_verification(v: dict, main: str) -> str:
    """The manifest's verification record in one line."""
    if "quantized" in v:
        q = v["quality"]
        line = (
            f"verified on {v['sample']} ({v['quantized']}): '{main}' cosine with fp32 "
            f"{q['cosine']:.5f}"
        )
        if "same_weights" in v:
            line += f", with the same weights {v['same_weights']['cosine']:.5f}"
        if "perplexity_ratio" in q:
            line += (
                f"; perplexity {q['perplexity']:.2f} vs fp32 {q['perplexity_fp32']:.2f} "
                f"({q['perplexity_ratio']:.3f}x)"
            )
        if "top1" in q:
            line += f", top-1 agreement {q['top1']:.1%}"
        return line
    if "blocks_max_relative_diff" in v:
        line = (
            f"verified on {v['sample']}: max abs diff {v['max_abs_diff']:.3g}, "
            f"{v['blocks_max_relative_diff']:.2g} of the output's scale "
            f"(tolerance {v['tolerance_relative']:g})"
        )
        if "perplexity" in v:
            line += f"; perplexity {v['perplexity']:.2f} (PyTorch {v['perplexity_pytorch']:.2f})"
        return line
    if "max_abs_diff" in v:  # a model exported before relative tolerances
        return f"verified vs PyTorch: max abs diff {v['max_abs_diff']:.3g}"
    return "not verified (--no-verify)"


def _totals(m, root: Path) -> str:
    blocks = on_disk(root, m.block_files())
    line = f"blocks on disk: {format_bytes(blocks)}"
    if m.blocks_bytes > blocks:  # sparse files: their length (the manifest's bytes) is more
        line += f" (file length {format_bytes(m.blocks_bytes)}, with the alignment's holes)"
    if m.full_model is None:
        return line
    full = on_disk(root, (f.path for f in m.full_model.files))
    return f"{line}; full model on disk: {format_bytes(full)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hermes-ort export", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
