"""Graph rewrites applied to the whole graph before it is cut."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper

MS_DOMAIN = "com.microsoft"


def _perm(node: onnx.NodeProto) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == "perm":
            return list(attr.ints)
    return None


def tie_transposed_copies(
    graph: onnx.GraphProto, read: Callable[[onnx.TensorProto], Any]
) -> list[str]:
    """Undo the exporter's copy of a tied weight: an initializer B read by a MatMul that equals
    another initializer A transposed (GPT-2's head: torch folds `lm_head.weight.T` into a new
    tensor) is replaced by `Transpose(A)`, as optimum's tied-weight pass does (that pass fails on
    models > 2 GB: `ByteSize()` of the loaded proto raises). `read(tensor)` gives a tensor's bytes.
    Returns the names of the removed copies."""
    inits = {t.name: t for t in graph.initializer}
    by_dims: dict[tuple, list[str]] = {}
    for t in graph.initializer:
        if len(t.dims) == 2:
            by_dims.setdefault((t.data_type, tuple(t.dims)), []).append(t.name)
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            t = inits[name]
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
            arrays[name] = np.frombuffer(read(t), dtype=dtype).reshape(tuple(t.dims))
        return arrays[name]

    ties: dict[str, str] = {}  # copy -> original
    for node in graph.node:
        b = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if b not in inits or b in ties or len(inits[b].dims) != 2:
            continue
        rows, cols = inits[b].dims
        for a in by_dims.get((inits[b].data_type, (cols, rows)), []):
            if a != b and a not in ties and _is_transpose(array(a), array(b)):
                ties[b] = a
                break
    if not ties:
        return []
    new_nodes = []
    for b, a in ties.items():
        out = f"{a}_transposed"
        new_nodes.append(
            helper.make_node("Transpose", [a], [out], name=f"/tied/{a}/Transpose", perm=[1, 0])
        )
        for node in graph.node:
            for i, x in enumerate(node.input):
                if x == b:
                    node.input[i] = out
    kept = [t for t in graph.initializer if t.name not in ties]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = new_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return list(ties)


def _is_transpose(a: np.ndarray, b: np.ndarray) -> bool:
    """a.T == b bit for bit; a few sampled elements first, as nearly all candidates differ there."""
    rng = np.random.default_rng(0)
    i = rng.integers(0, a.shape[0], 64)
    j = rng.integers(0, a.shape[1], 64)
    if not np.array_equal(a[i, j].view(np.uint8), b[j, i].view(np.uint8)):
        return False
    return all(
        np.array_equal(a[r : r + 256].T, b[:, r : r + 256]) for r in range(0, a.shape[0], 256)
    )


def fuse_transposed_weight_matmuls(graph: onnx.GraphProto) -> int:
    """`MatMul(x, Transpose(W))` with W a 2-D initializer -> `com.microsoft.FusedMatMul(x, W,
    transB=1)`.

    A tied LM head then reads the embedding matrix in place: no transposed copy is stored, nor
    constant-folded into a new weight by ORT at load. Returns the number of MatMuls rewritten."""
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def source_initializer(name: str) -> str | None:
        while name not in inits:  # through Identity aliases of a weight
            node = producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return name

    count = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        transpose = producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose":
            continue
        weight = source_initializer(transpose.input[0])
        if weight is None or len(inits[weight].dims) != 2 or _perm(transpose) not in (None, [1, 0]):
            continue
        node.op_type, node.domain = "FusedMatMul", MS_DOMAIN
        node.input[1] = weight
        node.attribute.extend([helper.make_attribute("transB", 1)])
        count += 1
    if count:
        remove_dead_nodes(graph)  # the Transposes
    return count


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs reach a graph output."""
    live = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(out in live for out in node.output):
            keep.append(node)
            live.update(node_inputs(node))
    keep.reverse()
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs plus outer-scope names its subgraphs (If/Loop) use."""
    names = [x for x in node.input if x]
    for attr in node.attribute:
        for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            names.extend(_outer_names(sub))
    return names


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    outer = []
    for node in graph.node:
        outer.extend(x for x in node_inputs(node) if x not in local)
        local.update(node.output)
    return outer
