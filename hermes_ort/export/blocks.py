"""The blocks of an export: the whole graph cut into prologue, layer groups and epilogue (cut.py),
each optimised at ORT's portable level and laid out with its weights in an aligned data file
(storage.py), then checked, chained, against the PyTorch model (verify.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes_ort.core.manifest import BlockSpec, Manifest
from hermes_ort.export.errors import ExportError
from hermes_ort.export.install import remove_tree
from hermes_ort.export.logs import say
from hermes_ort.tensors.kv_cache import dim_sizes


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="block", file=sys.stderr, disable=not enabled, leave=False
    )


def cut_blocks(
    whole,
    stack,
    arch: str,
    tmp: Path,
    layers_per_block: int,
    progress: bool,
    lap: Callable[[str], None],
    quantization=None,
) -> list[BlockSpec]:
    """Plan the blocks, quantize each (if asked), optimise each with ORT, lay them out in
    blocks/. Quantized before ORT's optimisation: its fusions turn MatMuls into ops the
    quantizer does not know."""
    import onnx

    from hermes_ort.export.cut import block_model, plan_blocks, value_types
    from hermes_ort.export.rewrite import fuse_transposed_weight_matmuls, remove_dead_nodes
    from hermes_ort.export.storage import optimise_block, store_blocks

    whole = onnx.shape_inference.infer_shapes(whole)
    types = value_types(whole)
    fused = fuse_transposed_weight_matmuls(whole.graph)  # a tied head reads the table in place
    if fused:
        say(f"{fused} MatMul(x, Transpose(W)) -> FusedMatMul(x, W, transB=1): W read in place")
    remove_dead_nodes(whole.graph)
    plans = plan_blocks(whole.graph, stack, layers_per_block, arch)
    lap("cut_s")

    opt_dir = tmp / ".scratch" / "opt"
    opt_dir.mkdir(parents=True)
    optimised = []
    with _progress(len(plans), "optimise blocks", progress) as bar:
        for plan in plans:
            src = tmp / "full" / f".cut-{plan.name}.onnx"  # beside model.onnx_data, its weights
            onnx.save_model(block_model(whole, plan, types), str(src))
            if quantization is not None:
                from hermes_ort.export.quantize import quantize_file

                quantized = tmp / ".scratch" / "q" / f"{plan.name}.onnx"
                quantized.parent.mkdir(parents=True, exist_ok=True)
                quantize_file(src, quantized, quantization)
                src.unlink()
                src = quantized
            optimise_block(src, opt_dir / f"{plan.name}.onnx")
            src.unlink()
            optimised.append((plan.name, opt_dir / f"{plan.name}.onnx"))
            bar.update(1)
    lap("optimise_s")
    stored = store_blocks(optimised, tmp / "blocks", tmp)
    remove_tree(tmp / ".scratch")
    lap("store_s")
    blocks = []
    for plan, block in zip(plans, stored, strict=True):
        if block.outputs != plan.outputs:
            raise ExportError(
                f"block '{plan.name}': ORT changed its outputs {plan.outputs} -> {block.outputs}"
            )
        spec = BlockSpec(
            plan.name, plan.kind, plan.layers, block.path, block.inputs, block.outputs, block.files
        )
        blocks.append(spec)
    return blocks


def verify_blocks(
    tmp: Path,
    manifest: Manifest,
    reference: dict[str, Any],
    seq_len: int,
    tolerance: float,
    progress: bool,
) -> dict[str, Any]:
    """The chained blocks and the whole-model file against PyTorch on the same sample; the
    manifest's `verification` record, or ExportError past the tolerance. A quantized model is
    held to a cosine floor on its main output instead (quantize.COSINE_FLOOR), and its chained
    blocks must equal its whole-model file (streaming adds no error of its own)."""
    from hermes_ort.export import verify

    feed = verify.make_sample(manifest.inputs, dim_sizes(manifest.sample, 1, seq_len))
    with _progress(len(manifest.blocks), "verify blocks", progress) as bar:
        got = verify.run_blocks(tmp, manifest, feed, step=lambda _: bar.update(1))
    full = verify.run_full(tmp, manifest, feed)
    if manifest.quantization:
        return _verify_quantized(manifest, got, full, reference)
    diffs = verify.max_abs_diff(got, reference)
    full_diffs = verify.max_abs_diff(full, reference)
    worst = max(diffs, key=diffs.get)
    worst_full = max(full_diffs, key=full_diffs.get)
    say(
        f"verified against PyTorch: blocks max abs diff {diffs[worst]:.3g} ('{worst}'), "
        f"full model {full_diffs[worst_full]:.3g} (tolerance {tolerance:g})"
    )
    for what, d, key in (("chained blocks", diffs, worst), ("full model", full_diffs, worst_full)):
        if not d[key] <= tolerance:
            raise ExportError(
                f"verification failed: {what} differ from PyTorch on output '{key}' by "
                f"{d[key]:.3g} > tolerance {tolerance:g}"
            )
    return {
        "reference": "pytorch",
        "max_abs_diff": diffs[worst],
        "tolerance": tolerance,
        "outputs_max_abs_diff": diffs,
        "full_model_max_abs_diff": full_diffs[worst_full],
        "sample_seed": verify.SAMPLE_SEED,
    }


def _verify_quantized(manifest: Manifest, got: dict, full: dict, reference: dict) -> dict:
    from hermes_ort.export import verify
    from hermes_ort.export.quantize import check_accuracy, floor_of

    mode, floor = manifest.quantization["mode"], floor_of(manifest.quantization)
    main = manifest.output_names[0]  # logits, last_hidden_state
    accuracy = verify.accuracy(got, reference)
    streaming = max(verify.max_abs_diff(got, full).values())
    a = accuracy[main]
    top1 = f", top-1 agreement {a['top1']:.1%}" if "top1" in a else ""
    say(
        f"verified against PyTorch fp32 ({mode}): '{main}' cosine {a['cosine']:.5f} (floor "
        f"{floor}), max abs diff {a['max_abs_diff']:.3g}{top1}; chained blocks vs "
        f"the whole {mode} model: max abs diff {streaming:.3g}"
    )
    check_accuracy(mode, a["cosine"], main, floor)
    check_accuracy(mode, verify.accuracy(full, reference)[main]["cosine"], main, floor)
    return {
        "reference": "pytorch fp32",
        "quantized": mode,
        "cosine_floor": floor,
        "outputs": accuracy,
        "max_abs_diff": a["max_abs_diff"],
        "blocks_vs_full_max_abs_diff": streaming,
        "sample_seed": verify.SAMPLE_SEED,
    }
