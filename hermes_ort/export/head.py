"""The LM head as blocks of its own, sliced over the vocabulary (export --head-slices, issue #24).

A decoder's epilogue holds the head's whole weight (for a tied head, the embedding table: 100s of
MB for 128k-262k vocabularies), so no memory budget can be smaller than it. This stage rewrites
the stored epilogue (after cutting, quantization and the GGUF path, before verification) as

    epilogue     its nodes before the head op; writes the head's input x [batch, positions, K]
    head_00 ..   HEAD blocks: the head on vocabulary rows [a_k, b_k), x -> logits.head_k
    head_concat  EPILOGUE: Concat along the last axis, then what followed the head op -> logits

(head_graph.py finds the head and builds the graphs). Weights move, never double: a slice of a
table in a shared file (a tied embedding the prologue looks up) points at its byte range of that
file; a weight the epilogue held alone is copied into the slices' own data files, its old file
removed. A slice of a shared table starts on a page of it where the vocabulary allows.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from hermes_ort.core.choices import BlockKind
from hermes_ort.core.manifest import BlockSpec, FileSpec, HeadSpec, Manifest, check_dataflow
from hermes_ort.core.units import format_bytes
from hermes_ort.export.errors import ExportError
from hermes_ort.export.head_graph import (
    OUTPUT,
    Cut,
    Head,
    concat_model,
    find_head,
    pre_model,
    slice_model,
    tensor_bytes,
)
from hermes_ort.export.install import remove_tree
from hermes_ort.export.logs import say
from hermes_ort.export.storage import (
    EXTERNAL_MIN_BYTES,
    DataWriter,
    TensorReader,
    make_inline,
    point_to,
    write_model,
)

AUTO = "auto"
CONCAT_BLOCK = "head_concat"
PAGE_BYTES = 4096  # a slice's rows of a shared file start on a page: mapped, dropped apart


def granule(rows_bytes: float) -> int:
    """The fewest rows of `rows_bytes` each that fill whole pages (1 for a non-integral size)."""
    if rows_bytes != int(rows_bytes) or rows_bytes <= 0:
        return 1
    return PAGE_BYTES // math.gcd(int(rows_bytes), PAGE_BYTES)


def vocab_ranges(vocab: int, count: int, rows: int = 1) -> list[tuple[int, int]]:
    """`count` contiguous [start, stop) ranges covering 0 .. vocab, as even as whole groups of
    `rows` make them (single rows where there are fewer groups than ranges)."""
    units = -(-vocab // rows)
    if units < count:
        rows, units = 1, vocab
    bounds = [min(vocab, (k * units // count) * rows) for k in range(count)] + [vocab]
    return list(zip(bounds, bounds[1:], strict=False))


def widest(vocab: int, count: int, rows: int = 1) -> int:
    """The largest range vocab_ranges makes, without making them."""
    units = -(-vocab // rows)
    if units < count:
        rows, units = 1, vocab
    return min(vocab, -(-units // count) * rows)


# `auto` leaves a head whole up to this many times the largest layer block's weights: a head
# about a layer's size costs no more than a layer (tiny presets, small-vocabulary models), while
# 128k-262k vocabularies (heads of 4-60 layers' size) are what slicing is for
AUTO_WHOLE_UP_TO = 2.0


def auto_slices(vocab: int, row_bytes: float, limit_bytes: int, rows: int = 1) -> int:
    """The fewest slices whose largest holds at most `limit_bytes` of the head's weights (the
    largest layer block's): the head then sets no memory budget's floor. One (whole) for a head
    within AUTO_WHOLE_UP_TO layers."""
    total = vocab * row_bytes
    if total <= AUTO_WHOLE_UP_TO * limit_bytes:
        return 1
    count = max(1, math.ceil(total / max(limit_bytes, 1)))
    while count < vocab and widest(vocab, count, rows) * row_bytes > limit_bytes:
        count += 1
    return min(count, vocab)


def slice_head(tmp: Path, manifest: Manifest, asked: int | str) -> Manifest:
    """The manifest with its epilogue's head cut into vocabulary slices (files rewritten in
    tmp/blocks); unchanged where one slice suffices. An explicit count that cannot be honoured
    (no head found, more slices than tokens) is an ExportError."""
    epilogue = manifest.blocks[-1]
    if epilogue.kind != BlockKind.EPILOGUE or OUTPUT not in epilogue.outputs:
        return _whole(manifest, asked, f"its last block does not write '{OUTPUT}'")
    model = onnx.load(str(tmp / epilogue.path), load_external_data=False)
    head = find_head(model.graph)
    if isinstance(head, str):
        return _whole(manifest, asked, head)
    inits = {t.name: t for t in model.graph.initializer}
    row_bytes = sum(tensor_bytes(inits[c.name]) for c in head.cuts) / head.vocab
    rows = _rows_per_page(epilogue, inits[head.weight], head)
    if asked == AUTO:
        layer = _largest_layer_bytes(tmp, manifest)
        count = auto_slices(head.vocab, row_bytes, layer, rows) if layer else 1
    elif asked > head.vocab:
        raise ExportError(
            f"--head-slices {asked} exceeds the vocabulary: '{head.head_op}' computes "
            f"{head.vocab} logits"
        )
    else:
        count = asked
    if count == 1:
        return manifest
    ranges = vocab_ranges(head.vocab, count, rows)
    blocks, spec = _write(tmp, epilogue, model, head, ranges, asked)
    shared = sorted({f.path for b in blocks for f in b.files if not b.is_own(f)})
    how = f"reading their rows of {', '.join(shared)} in place" if shared else "own files each"
    say(
        f"LM head '{head.head_op}': {count} slices of the {head.vocab}-token vocabulary, "
        f"{format_bytes(max(spec.bytes))} at most each ({how})"
    )
    result = replace(manifest, blocks=(*manifest.blocks[:-1], *blocks), head=spec)
    check_dataflow(result, "head-sliced manifest")
    return result


def _whole(manifest: Manifest, asked: int | str, why: str) -> Manifest:
    if asked == AUTO:
        say(f"the LM head stays in the epilogue: {why}")
        return manifest
    raise ExportError(f"--head-slices {asked}: cannot slice the LM head: {why}")


def _rows_per_page(epilogue: BlockSpec, weight: onnx.TensorProto, head: Head) -> int:
    """Rows of the head's weight per group that fills whole pages, where the slices point into
    a shared file (a tied table, its rows contiguous); 1 where they get files of their own."""
    shared = {Path(f.path).name for f in epilogue.files if not epilogue.is_own(f)}
    location = {e.key: e.value for e in weight.external_data}.get("location")
    cut = next(c for c in head.cuts if c.name == weight.name)
    if cut.axis != 0 or location not in shared:
        return 1
    return granule(tensor_bytes(weight) / head.vocab)


def _largest_layer_bytes(tmp: Path, manifest: Manifest) -> int:
    """The weight bytes of the largest layer block (its initializers: not the alignment holes
    of its data file, which a tiny model's sizes would be all about)."""
    largest = 0
    for b in manifest.blocks:
        if b.kind == BlockKind.LAYERS:
            graph = onnx.load(str(tmp / b.path), load_external_data=False).graph
            largest = max(largest, sum(tensor_bytes(t) for t in graph.initializer))
    return largest


def _write(tmp: Path, epilogue: BlockSpec, model, head: Head, ranges, asked):
    """Write the epilogue, the slices and head_concat into a staging folder, then swap them in
    for the epilogue's files. Returns their BlockSpecs and the HeadSpec."""
    stage = tmp / ".scratch" / "head"
    (stage / "blocks").mkdir(parents=True, exist_ok=True)
    width = max(2, len(str(len(ranges) - 1)))
    names = [f"head_{k:0{width}d}" for k in range(len(ranges))]
    outs = [f"{OUTPUT}.{name}" for name in names]
    shared = {Path(f.path).name: f for f in epilogue.files if not epilogue.is_own(f)}
    originals = {t.name: t for t in model.graph.initializer}
    cuts = {c.name: c for c in head.cuts}
    reader = TensorReader()
    try:
        layout = _Layout(tmp / "blocks", stage, shared, originals, reader)
        blocks, read = [], []
        pre = pre_model(model, head)
        if pre is not None:
            blocks.append(layout.block(epilogue.name, BlockKind.EPILOGUE, pre, {}, (0, 0)))
        for name, out, (start, stop) in zip(names, outs, ranges, strict=True):
            sliced = slice_model(model, head, start, stop, out)
            blocks.append(layout.block(name, BlockKind.HEAD, sliced, cuts, (start, stop)))
            read.append(layout.last_bytes)
        widths = [(out, stop - start) for out, (start, stop) in zip(outs, ranges, strict=True)]
        joined = concat_model(model, head, widths, CONCAT_BLOCK)
        blocks.append(layout.block(CONCAT_BLOCK, BlockKind.EPILOGUE, joined, {}, (0, 0)))
    finally:
        reader.close()
    for f in epilogue.files:  # the old epilogue's own files: their bytes now live in the new ones
        if epilogue.is_own(f):
            (tmp / f.path).unlink()
    for staged in (stage / "blocks").iterdir():
        os.replace(staged, tmp / "blocks" / staged.name)
    remove_tree(stage)
    spec = HeadSpec(asked, head.vocab, head.x, OUTPUT, tuple(names), tuple(ranges), tuple(read))
    return blocks, spec


class _Layout:
    """Where the new blocks' initializers go: pointers into the shared files kept as they are
    (contiguous rows of them), every other tensor into the block's own data file (staged) or
    inline when small."""

    def __init__(
        self, blocks_dir: Path, stage: Path, shared: dict[str, FileSpec], originals, reader
    ):
        self.blocks_dir, self.stage, self.shared = blocks_dir, stage, shared
        self.originals, self.reader = originals, reader
        self.last_bytes = 0  # the weight bytes of the block written last

    def block(self, name: str, kind: BlockKind, model, cuts: dict[str, Cut], rows) -> BlockSpec:
        writer = None
        used: set[str] = set()
        self.last_bytes = 0
        for t in model.graph.initializer:
            cut = cuts.get(t.name)
            pointer = self._in_shared(t, cut, rows)
            if pointer is not None:
                location, offset, length = pointer
                point_to(t, location, offset, length)
                used.add(location)
                self.last_bytes += length
                continue
            data = self._bytes(t.name, cut, rows)
            if data is None:  # a string tensor: stays inline as it is
                continue
            if len(data) < EXTERNAL_MIN_BYTES:
                make_inline(t, data)
            else:
                writer = writer or DataWriter(self.stage / "blocks" / f"{name}.data")
                point_to(t, writer.path.name, *writer.append(data))
            self.last_bytes += len(data)
        files = [write_model(model, self.stage / "blocks" / f"{name}.onnx", self.stage)]
        if writer is not None:
            files.append(writer.close(self.stage))
        files += [self.shared[location] for location in sorted(used)]
        inits = {t.name for t in model.graph.initializer}
        inputs = tuple(v.name for v in model.graph.input if v.name not in inits)
        outputs = tuple(v.name for v in model.graph.output)
        return BlockSpec(name, kind, (), files[0].path, inputs, outputs, tuple(files))

    def _in_shared(self, t, cut: Cut | None, rows) -> tuple[str, int, int] | None:
        """(file, offset, length) of the tensor's bytes in a shared file, where they are one
        run of it: the whole tensor, or rows of its first axis."""
        original = self.originals[t.name]
        info = {e.key: e.value for e in original.external_data}
        if (
            original.data_location != onnx.TensorProto.EXTERNAL
            or info["location"] not in self.shared
        ):
            return None
        offset, length = int(info.get("offset", 0)), int(info["length"])
        if cut is None:
            return info["location"], offset, length
        if cut.axis != 0:
            return None
        row = length // original.dims[0]
        start, stop = rows[0] * cut.per, rows[1] * cut.per
        return info["location"], offset + start * row, (stop - start) * row

    def _bytes(self, name: str, cut: Cut | None, rows) -> bytes | None:
        """The tensor's bytes, or those of its rows `rows` where it is cut."""
        original = self.originals[name]
        data = self.reader.read(original, self.blocks_dir)
        if cut is None or data is None:
            return None if data is None else bytes(data)
        dtype = helper.tensor_dtype_to_np_dtype(original.data_type)
        array = np.frombuffer(data, dtype).reshape(tuple(original.dims))
        index = [slice(None)] * array.ndim
        index[cut.axis] = slice(rows[0] * cut.per, rows[1] * cut.per)
        return np.ascontiguousarray(array[tuple(index)]).tobytes()
