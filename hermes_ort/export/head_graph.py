"""The LM head inside an epilogue block's graph, and the graphs that compute it a vocabulary slice
at a time (head.py lays them out as blocks).

An epilogue reads the last layer's output and writes `logits` [batch, positions, V]. It splits in
three:

    pre     everything before the head op: the final norm (and GPT-2's Reshape); outputs `x`,
            the head's input [batch, positions, K]
    region  the head op and what is computed from `x` alone up to `head_out` [.., V]: the
            MatMul / FusedMatMul (a tied table, transB) / Gemm / MatMulNBits, and nbits.py's
            offset term (a MatMul of [K / bs, V] offsets and an Add)
    tail    elementwise ops with constants from `head_out` to `logits` (a bias, a soft-cap, a
            scale), taken back from `logits`

Every vocabulary-sized constant of the region is cut along its vocabulary axis (`Cut`): a slice
[a, b) of the vocabulary computes head_out[.., a:b] exactly, since each logit reads only its own
row of the weight. The tail runs once, on the concatenated slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from hermes_ort.export.rewrite import MS_DOMAIN

OUTPUT = "logits"
STANDARD = ("", "ai.onnx")
# elementwise ops that keep their input's type: a vocabulary slice of their output is the same op
# on the slices of their inputs
ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "Ceil", "Clip", "Div", "Erf", "Exp", "Floor", "Identity", "Max", "Min",
        "Mul", "Neg", "Pow", "Reciprocal", "Relu", "Round", "Sigmoid", "Softplus", "Sqrt",
        "Sub", "Tanh",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Cut:
    """An initializer of the region sliced with the vocabulary: along `axis`, whose size is
    V * `per` (MatMulNBits' scales may be flat: [N * K / bs]); slice [a, b) of the vocabulary is
    [a * per, b * per) of that axis."""

    name: str
    axis: int
    per: int = 1


@dataclass(frozen=True)
class Head:
    """An epilogue's graph split at its LM head (node indices into graph.node, in order)."""

    vocab: int
    hidden: int  # K: the last dim of `x`
    x: str  # the head's input, [.., K]
    head_out: str  # what the region computes, [.., V]: `logits`, or the tail's input
    head_op: str  # the node's name, for messages
    weight: str  # the head op's weight, whose rows set the slices' sizes
    pre: tuple[int, ...]
    region: tuple[int, ...]
    tail: tuple[int, ...]
    cuts: tuple[Cut, ...]


@dataclass(frozen=True)
class _Projection:
    """A node computing y [.., N] = x [.., K] times a constant weight."""

    weight: str
    axis: int  # the weight's N axis
    n: int
    k: int
    bias: str = ""  # Gemm's C or MatMulNBits' bias, cut too where it is [N]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _projection(node: onnx.NodeProto, inits: dict) -> _Projection | None:
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or node.op_type not in ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits"):
        return None
    dims = list(w.dims)
    if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
        bias = node.input[5] if len(node.input) > 5 else ""
        return _Projection(w.name, 0, _attr(node, "N", 0), _attr(node, "K", 0), bias)
    if len(dims) != 2:
        return None
    if node.op_type == "MatMul" and node.domain in STANDARD:
        return _Projection(w.name, 1, dims[1], dims[0])
    plain = all(_attr(node, a, 0) == 0 for a in ("transA", "transBatchA", "transBatchB"))
    if not plain or node.domain not in (
        (MS_DOMAIN,) if node.op_type == "FusedMatMul" else STANDARD
    ):
        return None
    axis = 0 if _attr(node, "transB", 0) == 1 else 1
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
    return _Projection(w.name, axis, dims[axis], dims[1 - axis], bias)


def tensor_bytes(t: onnx.TensorProto) -> int:
    size = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    for d in t.dims:
        size *= d
    return size


def find_head(graph: onnx.GraphProto) -> Head | str:
    """The epilogue's head, or why it has none that slices (a sentence)."""
    nodes = list(graph.node)
    inits = {t.name: t for t in graph.initializer}
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    if any(n.op_type == "Constant" for n in nodes):  # ORT folds them into initializers
        return "its graph has Constant nodes"
    outputs = {v.name: v for v in graph.output}
    if OUTPUT not in producer or OUTPUT not in outputs:
        return f"no '{OUTPUT}' output"
    last = list(outputs[OUTPUT].type.tensor_type.shape.dim)[-1:]
    vocab = last[0].dim_value if last and last[0].HasField("dim_value") else None
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    tail, head_out = _tail(nodes, producer, consumers, inits, set(outputs))
    ancestors = _ancestors(nodes, producer, inits, head_out)
    found = [
        (i, p)
        for i in ancestors
        if (p := _projection(nodes[i], inits)) is not None
        and nodes[i].input[0] not in inits
        and vocab in (None, p.n)
    ]
    if not found:
        wide = f" {vocab} wide" if vocab else ""
        return f"no MatMul, Gemm or MatMulNBits of a constant weight computes '{head_out}'{wide}"
    # the largest: the head's weight, not its offset term's
    head_i, head = max(found, key=lambda f: tensor_bytes(inits[f[1].weight]))
    x = nodes[head_i].input[0]
    before = _ancestors(nodes, producer, inits, x) if x in producer else set()
    region = sorted(ancestors - before)
    made = {out for i in region for out in nodes[i].output}
    for i in region:
        for name in nodes[i].input:
            if name and name not in inits and name not in made and name != x:
                return (
                    f"node '{nodes[i].name}' of the head reads '{name}', not only the head's input"
                )
        for out in nodes[i].output:
            if out != head_out and any(c not in region for c in consumers.get(out, ())):
                return f"'{out}' of the head is read outside it"
            if out in outputs and out != OUTPUT:
                return f"the head's '{out}' is a graph output"
    cuts = _cuts(nodes, inits, region, head.n)
    if isinstance(cuts, str):
        return cuts
    pre = tuple(i for i in range(len(nodes)) if i not in set(region) | set(tail))
    if any(name in made or name == head_out for i in pre for name in nodes[i].input):
        return "the rest of the epilogue reads what the head computes"
    return Head(
        vocab=head.n,
        hidden=head.k,
        x=x,
        head_out=head_out,
        head_op=nodes[head_i].name,
        weight=head.weight,
        pre=pre,
        region=tuple(region),
        tail=tuple(reversed(tail)),
        cuts=tuple(cuts),
    )


def _tail(nodes, producer, consumers, inits, outputs: set[str]) -> tuple[list[int], str]:
    """Back from `logits` through elementwise ops of one tensor and constants that nothing else
    reads: those nodes (last first) and the tensor they start from."""
    tail, name = [], OUTPUT
    while True:
        i = producer[name]
        node = nodes[i]
        live = [x for x in node.input if x and x not in inits]
        if node.op_type not in ELEMENTWISE or node.domain not in STANDARD or len(live) != 1:
            return tail, name
        if live[0] not in producer or live[0] in outputs or consumers[live[0]] != [i]:
            return tail, name
        tail.append(i)
        name = live[0]


def _ancestors(nodes, producer: dict[str, int], inits: dict, name: str) -> set[int]:
    """The nodes `name` is computed by, itself included."""
    seen: set[int] = set()
    todo = [producer[name]]
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        todo += [producer[x] for x in nodes[i].input if x in producer and x not in inits]
    return seen


def _cuts(nodes, inits: dict, region: list[int], vocab: int) -> list[Cut] | str:
    """Which initializers of the region are cut, and along which axis; a sentence where a node
    would mix vocabulary entries (not elementwise along them)."""
    cuts: dict[str, Cut] = {}
    vocab_wide: set[str] = set()  # tensors whose last axis is the vocabulary
    for i in region:
        node = nodes[i]
        wide_in = any(name in vocab_wide for name in node.input)
        p = _projection(node, inits)
        if p is not None and p.n == vocab and not wide_in and node.input[0] not in inits:
            size = inits[p.weight].dims[p.axis]
            cuts[p.weight] = Cut(p.weight, p.axis, size // vocab)
            if node.op_type == "MatMulNBits":  # scales and zero points: rows of N
                for extra in node.input[2:4]:
                    if extra in inits:
                        cuts[extra] = Cut(extra, 0, inits[extra].dims[0] // vocab)
            if p.bias in inits:
                cut = _elementwise_cut(inits[p.bias], vocab)
                if isinstance(cut, str):
                    return cut
                if cut is not None:
                    cuts[p.bias] = cut
        elif wide_in:
            if node.op_type not in ELEMENTWISE or node.domain not in STANDARD:
                return f"'{node.name}' ({node.op_type}) is not elementwise over the vocabulary"
            for name in node.input:
                if name in inits:
                    cut = _elementwise_cut(inits[name], vocab)
                    if isinstance(cut, str):
                        return cut
                    if cut is not None:
                        cuts[name] = cut
        else:
            continue  # computed from x alone (the offset term's block sums): copied as is
        vocab_wide.update(node.output)
    return list(cuts.values())


def _elementwise_cut(t: onnx.TensorProto, vocab: int) -> Cut | str | None:
    """A constant broadcast against [.., V]: cut along its last axis when it is V wide."""
    dims = list(t.dims)
    if not dims or dims[-1] == 1:
        return None
    if dims[-1] == vocab:
        return Cut(t.name, len(dims) - 1)
    return f"constant '{t.name}' {dims} does not broadcast over the vocabulary ({vocab})"


# -- the graphs of the blocks ---------------------------------------------------------------------
def pre_model(model: onnx.ModelProto, head: Head) -> onnx.ModelProto | None:
    """The epilogue up to the head: its inputs, `x` (and any other output it had but `logits`)
    out; None where the head reads the last layer's output directly."""
    if not head.pre:
        return None
    g = model.graph
    nodes = [g.node[i] for i in head.pre]
    made = {out for n in nodes for out in n.output}
    reads = {x for n in nodes for x in n.input}
    inputs = [v for v in g.input if v.name in reads]
    outputs = [_value(head.x, model, head.hidden)]
    outputs += [v for v in g.output if v.name != OUTPUT and v.name in made]
    return _model(model, nodes, inputs, outputs, "epilogue")


def slice_model(model: onnx.ModelProto, head: Head, start: int, stop: int, out: str):
    """The region on vocabulary rows [start, stop): `x` in, `out` [.., stop - start] out. Its cut
    initializers keep their data pointers (head.py moves them to the slice's bytes)."""
    cuts = {c.name: c for c in head.cuts}
    nodes = []
    for i in head.region:
        node = onnx.NodeProto.FromString(model.graph.node[i].SerializeToString())
        node.output[:] = [out if o == head.head_out else o for o in node.output]
        if node.op_type == "MatMulNBits" and node.input[1] in cuts:
            next(a for a in node.attribute if a.name == "N").i = stop - start
        nodes.append(node)
    x = _value(head.x, model, head.hidden)
    graph = _model(model, nodes, [x], [_value(out, model, stop - start)], out)
    for t in graph.graph.initializer:
        if t.name in cuts:
            c = cuts[t.name]
            t.dims[c.axis] = (stop - start) * c.per
    return graph


def concat_model(model: onnx.ModelProto, head: Head, slices: list[tuple[str, int]], name: str):
    """The slices' outputs ([.., width] each) joined along the vocabulary into `head_out`, then
    the tail: `logits` as the epilogue wrote it."""
    g = model.graph
    join = helper.make_node(
        "Concat", [s for s, _ in slices], [head.head_out], name=f"/{name}/Concat", axis=-1
    )
    nodes = [join] + [g.node[i] for i in head.tail]
    inputs = [_value(s, model, width) for s, width in slices]
    return _model(model, nodes, inputs, [v for v in g.output if v.name == OUTPUT], name)


def _logits_dims(model: onnx.ModelProto):
    out = next(v for v in model.graph.output if v.name == OUTPUT)
    return out.type.tensor_type.elem_type, list(out.type.tensor_type.shape.dim)


def _value(name: str, model: onnx.ModelProto, last: int) -> onnx.ValueInfoProto:
    """A tensor like `logits` (its type, its leading dims: batch, positions) but `last` wide:
    the head's ops keep their input's type and leading dims."""
    elem, dims = _logits_dims(model)
    value = helper.make_tensor_value_info(name, elem, None)
    shape = value.type.tensor_type.shape
    for d in dims[:-1]:
        shape.dim.add().CopyFrom(d)
    shape.dim.add().dim_value = last
    return value


def _model(model: onnx.ModelProto, nodes, inputs, outputs, name: str) -> onnx.ModelProto:
    """A block of `nodes` with copies of the initializers they read."""
    reads = {x for n in nodes for x in n.input}
    inits = [
        onnx.TensorProto.FromString(t.SerializeToString())
        for t in model.graph.initializer
        if t.name in reads
    ]
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    return helper.make_model(
        graph,
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
        producer_name="hermes-ort export",
    )
