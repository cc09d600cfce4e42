"""The blocks of an export: the whole graph cut into prologue, layer groups and epilogue (cut.py),
each optimised at ORT's portable level and laid out with its weights in an aligned data file
(storage.py); verify.py then checks them, chained, against the PyTorch model."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hermes_ort.core.manifest import BlockSpec
from hermes_ort.export.errors import ExportError
from hermes_ort.export.install import remove_tree
from hermes_ort.export.logs import say


def progress_bar(total: int, desc: str, enabled: bool):
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
    with progress_bar(len(plans), "optimise blocks", progress) as bar:
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
