"""The whole-model files the `full` and `full-mmap` baselines open: optimum's export rewritten as
`full/model.onnx` + `model.onnx_data` (tied weights stored once, tensors aligned: mmap), and below
2 GB also `full/model_inline.onnx` with the weights inside, as optimum's users get it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from hermes_ort.core.manifest import FileSpec, FullModelSpec, Manifest
from hermes_ort.export.install import remove_tree
from hermes_ort.export.logs import say

INLINE_LIMIT_BYTES = 2_000_000_000  # protobuf's 2 GB: above it optimum writes external data too


def write_full_model(raw: Path, tmp: Path):
    """optimum's export at `raw` as full/model.onnx + aligned data, its tied weights stored once.
    Returns the model (tensors pointing into full/model.onnx_data) and its files."""
    import onnx

    from hermes_ort.export.rewrite import tie_transposed_copies
    from hermes_ort.export.storage import TensorReader, write_external

    whole = onnx.load(str(raw), load_external_data=False)
    reader = TensorReader()
    try:
        tied = tie_transposed_copies(whole.graph, lambda t: reader.read(t, raw.parent))
    finally:
        reader.close()
    if tied:
        say(f"tied weights: dropped the exporter's copies {tied}")
    files = write_external(whole, raw.parent, tmp / "full" / "model.onnx", tmp)
    remove_tree(raw.parent)
    return whole, files


def add_inline_full_model(manifest: Manifest, tmp: Path) -> Manifest:
    """The whole model as users of optimum get it below 2 GB: one .onnx with the weights inside
    (`full` opens it; ORT then copies every weight into the heap). The external-data copy stays
    for `full-mmap`."""
    import onnx

    from hermes_ort.export.storage import write_model

    external = manifest.full_model
    if external.bytes >= INLINE_LIMIT_BYTES:
        return replace(manifest, full_model_mmap=external)
    whole = onnx.load(str(tmp / external.path))  # weights loaded into the proto: saved inline
    inline: FileSpec = write_model(whole, tmp / "full" / "model_inline.onnx", tmp)
    spec = FullModelSpec("full/model_inline.onnx", (inline,))
    return replace(manifest, full_model=spec, full_model_mmap=external)


def quantize_full_model(manifest: Manifest, tmp: Path, quantization) -> Manifest:
    """full/model.onnx + data quantized as the blocks were (the same weight-only algorithm on the
    same weights gives the same quantized weights)."""
    import onnx

    from hermes_ort.export.quantize import quantize_model
    from hermes_ort.export.storage import save_with_data, write_external

    spec = manifest.full_model
    whole = onnx.load(str(tmp / spec.path))  # every weight in memory: not for streaming exports
    quantized = quantize_model(whole, quantization)
    del whole
    staging = tmp / ".scratch" / "full-q"
    staging.mkdir(parents=True, exist_ok=True)
    save_with_data(quantized, staging / "model.onnx", "model.onnx_data")
    del quantized
    target = tmp / spec.path
    for f in spec.files:
        (tmp / f.path).unlink()
    reloaded = onnx.load(str(staging / "model.onnx"), load_external_data=False)
    files = write_external(reloaded, staging, target, tmp)
    remove_tree(staging)
    return replace(manifest, full_model=FullModelSpec(spec.path, tuple(files)))
