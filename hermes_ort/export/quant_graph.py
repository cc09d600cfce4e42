"""Weight-only quantization of an ONNX graph (a block, or the whole model) into nbits.py's forms.

- `MatMul(x, W^T)` with a constant 2-D weight, a tied head `FusedMatMul(x, table, transB=1)` and
  `Gemm(x, W or W^T, bias)` (GPT-2's Conv1D) become MatMulNBits (+ the offset term where the
  algorithm has one; + the bias);
- `Gather(table, ids)` of a constant 2-D table becomes GatherBlockQuantized (`embeddings`).

The LM head (the node writing `logits`) and embedding tables take `head_bits`, the other weights
the mode's bits. A table read by a Gather and a MatMul (tied) is quantized once: both nodes read
the same initializers, and across blocks (the prologue's lookup, the epilogue's head) the same
bytes, which storage.py stores once. The graph keeps its opset: only com.microsoft ops are added
(ONNX Runtime's quantizer moved models to opset 21 for its int4 tables, which broke graphs using
ReduceMean's `axes` attribute)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hermes_ort.export import nbits
from hermes_ort.export.logs import say
from hermes_ort.export.quant_choices import Algorithm
from hermes_ort.export.quant_methods import block_size_for, quantize_weight

MS = "com.microsoft"
HEAD_OUTPUT = "logits"
OFFSET_MIN_OPSET = 15  # the offset term's Shape(end=...)


@dataclass(frozen=True)
class Rounding:
    """What quantize_graph needs of a Quantization: the bits and algorithm of each kind of
    weight (the LM head and embedding tables apart), the block size asked, MatMulNBits' compute,
    and whether tables are quantized."""

    bits: int
    head_bits: int
    block_size: int
    algorithm: Algorithm
    head_algorithm: Algorithm
    accuracy_level: int
    embeddings: bool

    def of(self, head: bool) -> tuple[int, Algorithm]:
        """(bits, algorithm) of a head / table weight, or of any other."""
        return (self.head_bits, self.head_algorithm) if head else (self.bits, self.algorithm)


@dataclass(frozen=True)
class _Site:
    """A node reading a quantizable weight: its [N, K] view and how it is replaced."""

    node: onnx.NodeProto
    weight: str  # the initializer
    transposed: bool  # the initializer is [K, N] (a MatMul's W^T), else [N, K]
    gather: bool
    bias: str = ""  # a Gemm's C, added after


def quantize_graph(model: onnx.ModelProto, r: Rounding) -> onnx.ModelProto:
    """`model` (its weights loaded) with every quantizable weight in MatMulNBits form, in place."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    sites = [s for s in (_site(n, inits, r.embeddings) for n in graph.node) if s is not None]
    if not sites:
        return model
    heads = _head_nodes(graph)
    head_tables = {s.weight for s in sites if s.gather or s.node.output[0] in heads}
    made: dict[str, nbits.NBitsWeight | None] = {}
    names: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    replaced: dict[str, list[onnx.NodeProto]] = {}  # by the replaced node's (unique) output
    for s in sites:
        bits, algorithm = r.of(s.weight in head_tables)
        if s.weight not in made:
            made[s.weight] = _quantize(inits[s.weight], s.transposed, bits, algorithm, r)
        w = made[s.weight]
        if w is None:
            continue
        nodes, tensors = _replacement(s, w, r.accuracy_level)
        replaced[s.node.output[0]] = nodes
        for t in tensors:  # equal names are equal tensors (nbits names them after the weight)
            if t.name not in names:
                names.add(t.name)
                new_inits.append(t)
    if any(w is not None and w.offsets is not None for w in made.values()):
        _require_opset(model, OFFSET_MIN_OPSET)
    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(node.output[0], [node]) if node.output else [node])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_unused(graph)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return model


def _head_nodes(graph: onnx.GraphProto) -> set[str]:
    """The outputs of the nodes writing `logits`, directly or through the head's bias (an
    Add)."""
    producer = {out: node for node in graph.node for out in node.output}
    node = producer.get(HEAD_OUTPUT)
    if node is None:
        return set()
    if node.op_type == "Add":
        return {HEAD_OUTPUT, *(x for x in node.input if x in producer)}
    return {HEAD_OUTPUT}


def _site(node: onnx.NodeProto, inits: dict, embeddings: bool) -> _Site | None:
    if "/offsets/" in node.name:  # nbits.py's offset term of a weight already in NBits form
        return None

    def weight(i: int) -> str | None:
        name = node.input[i] if len(node.input) > i else ""
        t = inits.get(name)
        return name if t is not None and len(t.dims) == 2 and _is_float(t) else None

    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        w = weight(1)
        return None if w is None else _Site(node, w, transposed=True, gather=False)
    if node.op_type == "FusedMatMul" and node.domain == MS and _plain_transposed(node):
        w = weight(1)
        return None if w is None else _Site(node, w, transposed=False, gather=False)
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and _plain_gemm(node):
        w = weight(1)
        bias = node.input[2] if len(node.input) > 2 else ""
        transposed = _attr(node, "transB", 0) == 0
        return None if w is None else _Site(node, w, transposed, gather=False, bias=bias)
    if node.op_type == "Gather" and embeddings and _attr(node, "axis", 0) == 0:
        w = weight(0)
        return None if w is None else _Site(node, w, transposed=False, gather=True)
    return None


def _is_float(t: onnx.TensorProto) -> bool:
    return t.data_type == onnx.TensorProto.FLOAT


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _plain_transposed(node: onnx.NodeProto) -> bool:
    """FusedMatMul computing x @ B^T and nothing else (rewrite.py's tied head)."""
    return (
        _attr(node, "transB", 0) == 1
        and _attr(node, "transA", 0) == 0
        and _attr(node, "alpha", 1.0) == 1.0
        and _attr(node, "transBatchA", 0) == 0
        and _attr(node, "transBatchB", 0) == 0
    )


def _plain_gemm(node: onnx.NodeProto) -> bool:
    """Gemm computing x @ B (+ C) or x @ B^T (+ C), nothing scaled."""
    return (
        _attr(node, "transA", 0) == 0
        and _attr(node, "alpha", 1.0) == 1.0
        and _attr(node, "beta", 1.0) == 1.0
    )


def _quantize(
    tensor: onnx.TensorProto, transposed: bool, bits: int, algorithm: Algorithm, r: Rounding
) -> nbits.NBitsWeight | None:
    w = numpy_helper.to_array(tensor)
    w = w.T if transposed else w  # [N, K]
    return quantize_matrix(w, bits, r.block_size, algorithm, tensor.name)


def quantize_matrix(
    w: np.ndarray, bits: int, block_size: int, algorithm: Algorithm, name: str = ""
) -> nbits.NBitsWeight | None:
    """w [N, K] quantized with the block size that fits K (quant_methods.block_size_for), or
    None where none fits (the weight stays fp32)."""
    size = block_size_for(w.shape[1], block_size)
    if size is None:
        say(f"'{name}' stays fp32: its {w.shape[1]} inputs fit no block of 16 .. {block_size}")
        return None
    return quantize_weight(np.ascontiguousarray(w, np.float32), bits, size, algorithm)


def _replacement(s: _Site, w: nbits.NBitsWeight, accuracy_level: int):
    node = s.node
    # a name of its own: nbits names the kernel's output `<name>/output_0`, which in a fused
    # graph is already the replaced node's output
    op = "GatherBlockQuantized" if s.gather else "MatMulNBits"
    base = node.name or node.output[0]
    name = base.removesuffix(node.op_type) + op if base.endswith(node.op_type) else f"{base}/{op}"
    if s.gather:
        return nbits.gather_block_quantized(node.input[1], w, node.output[0], name, weight=s.weight)
    if not s.bias:
        return nbits.matmul_nbits(
            node.input[0], w, node.output[0], name, accuracy_level, weight=s.weight
        )
    product = f"{name}/product"
    nodes, inits = nbits.matmul_nbits(
        node.input[0], w, product, name, accuracy_level, weight=s.weight
    )
    add = helper.make_node("Add", [product, s.bias], [node.output[0]], name=f"{name}/bias")
    return [*nodes, add], inits


def _require_opset(model: onnx.ModelProto, version: int) -> None:
    from hermes_ort.export.errors import ExportError

    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version < version:
            raise ExportError(
                f"this quantization adds a per-block offset, which needs opset >= {version}; "
                f"the model is at opset {o.version} (--opset {version} or more)"
            )


def _drop_unused(graph: onnx.GraphProto) -> None:
    """The float weights the quantized ones replaced (and their graph inputs, older IRs)."""
    from hermes_ort.export.rewrite import node_inputs

    used = {x for n in graph.node for x in node_inputs(n)}
    used |= {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    gone = {t.name for t in graph.initializer} - {t.name for t in kept}
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [i for i in graph.input if i.name not in gone]
    del graph.input[:]
    graph.input.extend(inputs)
