"""Cut the whole-model graph into blocks: prologue, layer groups, epilogue.

Nodes are assigned by the module scope in their names (`/transformer/h.3/...` is layer 3). Constant-
like nodes (all inputs initializers or constants: Constant, Identity(weight), Transpose(weight)) are
copied into every block that consumes them, so no weight-derived tensor crosses a block boundary.
Other unscoped nodes go to the prologue when they depend on no layer, else to the epilogue, unless a
layer block consumes them: then they join the block of their latest producer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from onnx import helper

from hermes_ort.export.errors import ExportError
from hermes_ort.export.rewrite import MS_DOMAIN, node_inputs
from hermes_ort.export.stack import LayerStack

# Ops with no inputs that are not constants.
_RANDOM_OPS = {
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
}


@dataclass(frozen=True)
class BlockPlan:
    name: str
    kind: str  # "prologue" | "layers" | "epilogue"
    layers: tuple[int, ...]
    nodes: tuple[int, ...]  # indices into graph.node, in topological order
    inputs: tuple[str, ...]  # graph inputs or tensors of earlier blocks
    outputs: tuple[str, ...]  # tensors later blocks or the graph outputs read
    initializers: tuple[str, ...]


def layer_groups(num_layers: int, layers_per_block: int) -> list[tuple[int, ...]]:
    return [
        tuple(range(start, min(start + layers_per_block, num_layers)))
        for start in range(0, num_layers, layers_per_block)
    ]


def block_name(layers: tuple[int, ...], num_layers: int) -> str:
    width = max(2, len(str(num_layers - 1)))
    if len(layers) == 1:
        return f"layer_{layers[0]:0{width}d}"
    return f"layers_{layers[0]:0{width}d}_{layers[-1]:0{width}d}"


def _constant_like(
    nodes: list[onnx.NodeProto], inits: set[str], producer: dict[str, int]
) -> list[bool]:
    const = [False] * len(nodes)
    for i, node in enumerate(nodes):
        if node.op_type in _RANDOM_OPS or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            continue
        const[i] = all(
            x in inits or (x in producer and const[producer[x]]) for x in node.input if x
        )
    return const


def layer_scope(nodes: list[onnx.NodeProto], stack: LayerStack, arch: str) -> str:
    """The node-name prefix of the stack's layers: `/transformer/h` for `transformer.h`, so layer
    i's nodes are named `/transformer/h.<i>/...`. The legacy exporter names scopes after the modules
    actually called, so a wrapper whose forward is skipped drops out (OPT calls `self.model.decoder`
    directly: its layers are `/decoder/layers.<i>/`); the longest path suffix covering every layer
    wins."""
    parts = stack.path.split(".")
    for k in range(len(parts)):
        prefix = "/" + "/".join(parts[k:])
        pattern = re.compile(re.escape(prefix) + r"\.(\d+)/")
        seen = {int(m.group(1)) for node in nodes if (m := pattern.match(node.name))}
        if seen == set(range(stack.num_layers)):
            return prefix
    raise ExportError(
        f"unsupported architecture '{arch}': the ONNX graph has no node-name scopes "
        f"'{stack.scope}.<i>/' for the {stack.num_layers} layers of '{stack.path}' "
        f"({stack.layer_class}); cannot tell where each layer begins and ends"
    )


class _Index:
    """Producers, consumers and readers of every tensor of a graph (nodes in topological order)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.nodes = list(graph.node)
        self.inits = {t.name for t in graph.initializer}
        self.graph_inputs = [v.name for v in graph.input if v.name not in self.inits]
        self.graph_outputs = [v.name for v in graph.output]
        self.producer = {out: i for i, node in enumerate(self.nodes) for out in node.output if out}
        self.reads = [node_inputs(node) for node in self.nodes]
        self.const = _constant_like(self.nodes, self.inits, self.producer)
        self.consumers: dict[str, list[int]] = {}  # non-constant consumers only
        for i, names in enumerate(self.reads):
            for x in names:
                if x not in self.inits and x not in self.producer and x not in self.graph_inputs:
                    raise ExportError(
                        f"node '{self.nodes[i].name}' reads '{x}', which nothing produces"
                    )
                if not self.const[i]:
                    self.consumers.setdefault(x, []).append(i)

    def producers(self, i: int) -> list[int]:
        """Non-constant nodes whose outputs node i reads."""
        return [
            self.producer[x]
            for x in self.reads[i]
            if x in self.producer and not self.const[self.producer[x]]
        ]


def assign_blocks(
    index: _Index, layer_of: list[int | None], layer_block: dict[int, int], epilogue: int, arch: str
) -> list[int]:
    """Block index of every non-constant node (-1 for constant-like ones); 0 is the prologue."""
    n = len(index.nodes)
    on_layer = [False] * n  # depends (transitively) on some layer's output
    for i in range(n):
        if not index.const[i]:
            on_layer[i] = layer_of[i] is not None or any(on_layer[p] for p in index.producers(i))
    first_use = [epilogue] * n  # earliest block that consumes the node's outputs
    for i in reversed(range(n)):
        if index.const[i]:
            continue
        if layer_of[i] is not None:
            first_use[i] = layer_block[layer_of[i]]
        else:
            uses = [
                first_use[c] for out in index.nodes[i].output for c in index.consumers.get(out, ())
            ]
            first_use[i] = min(uses, default=epilogue)
    block = [-1] * n
    for i in range(n):
        if index.const[i]:
            continue
        latest = max((block[p] for p in index.producers(i)), default=0)
        if layer_of[i] is not None:
            block[i] = layer_block[layer_of[i]]
            if latest > block[i]:
                raise ExportError(
                    f"cannot cut '{arch}': node '{index.nodes[i].name}' of layer {layer_of[i]} "
                    f"reads a "
                    f"tensor computed in a later block"
                )
        elif not on_layer[i]:
            block[i] = 0
        elif first_use[i] < epilogue:
            block[i] = latest  # glue between layers: with its latest producer
        else:
            block[i] = epilogue
    return block


def plan_blocks(
    graph: onnx.GraphProto, stack: LayerStack, layers_per_block: int, arch: str
) -> list[BlockPlan]:
    """Prologue, one block per `layers_per_block` layers, epilogue (an empty prologue/epilogue is
    left out)."""
    index = _Index(graph)
    scope = re.compile(re.escape(layer_scope(index.nodes, stack, arch)) + r"\.(\d+)/")
    layer_of = [int(m.group(1)) if (m := scope.match(node.name)) else None for node in index.nodes]
    groups = layer_groups(stack.num_layers, layers_per_block)
    layer_block = {layer: 1 + g for g, group in enumerate(groups) for layer in group}
    kinds = [("prologue", "prologue", ())]
    kinds += [(block_name(g, stack.num_layers), "layers", g) for g in groups]
    kinds += [("epilogue", "epilogue", ())]
    block = assign_blocks(index, layer_of, layer_block, len(kinds) - 1, arch)
    plans = []
    for b, (name, kind, layers) in enumerate(kinds):
        own = [i for i, ib in enumerate(block) if ib == b]
        if own:
            plans.append(_plan(index, block, b, own, name, kind, layers))
        elif kind == "layers":
            raise ExportError(f"cannot cut '{arch}': block '{name}' has no nodes")
    return plans


def _plan(
    index: _Index, block: list[int], b: int, own: list[int], name: str, kind: str, layers
) -> BlockPlan:
    # Copy in the constant-like nodes the block's nodes read, transitively.
    needed, todo = set(own), list(own)
    while todo:
        for x in index.reads[todo.pop()]:
            p = index.producer.get(x)
            if p is not None and index.const[p] and p not in needed:
                needed.add(p)
                todo.append(p)
    order = sorted(needed)
    made = {out for i in order for out in index.nodes[i].output}
    inputs: list[str] = []
    inits: list[str] = []
    for i in order:
        for x in index.reads[i]:
            if x in made or x in inputs or x in inits:
                continue
            if x in index.inits:
                inits.append(x)
            elif x in index.graph_inputs or block[index.producer[x]] < b:
                inputs.append(x)
            else:
                raise ExportError(f"block '{name}' reads '{x}' before it is produced")
    graph_inputs, graph_outputs = index.graph_inputs, index.graph_outputs
    inputs.sort(key=lambda x: graph_inputs.index(x) if x in graph_inputs else len(graph_inputs))
    outputs = [
        out
        for i in own
        for out in index.nodes[i].output
        if out in graph_outputs or any(block[c] != b for c in index.consumers.get(out, ()))
    ]
    outputs.sort(key=lambda x: graph_outputs.index(x) if x in graph_outputs else len(graph_outputs))
    return BlockPlan(
        name, kind, tuple(layers), tuple(order), tuple(inputs), tuple(outputs), tuple(inits)
    )


def block_model(
    model: onnx.ModelProto, plan: BlockPlan, types: dict[str, onnx.ValueInfoProto]
) -> onnx.ModelProto:
    """The block as a standalone model; its initializers keep the whole model's external data."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    missing = [x for x in plan.inputs + plan.outputs if x not in types]
    if missing:
        raise ExportError(f"block '{plan.name}': shape inference gave no type for {missing[:3]}")
    sub = helper.make_graph(
        [graph.node[i] for i in plan.nodes],
        plan.name,
        [_boundary(types[x]) for x in plan.inputs],
        [_boundary(types[x]) for x in plan.outputs],
        [inits[x] for x in plan.initializers],
    )
    opsets = list(model.opset_import)
    if any(n.domain == MS_DOMAIN for n in sub.node) and not any(
        o.domain == MS_DOMAIN for o in opsets
    ):
        opsets.append(helper.make_opsetid(MS_DOMAIN, 1))
    return helper.make_model(
        sub, opset_imports=opsets, ir_version=model.ir_version, producer_name="hermes-ort export"
    )


def _boundary(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """A copy without shape inference's made-up dim names ("unk__12"): an unnamed dim says the same
    without suggesting that two tensors share a size."""
    value = onnx.ValueInfoProto.FromString(value.SerializeToString())
    for dim in value.type.tensor_type.shape.dim:
        if dim.dim_param.startswith("unk__"):
            dim.ClearField("dim_param")
    return value


def value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Type and shape of every tensor (graph inputs/outputs and what shape inference found)."""
    g = model.graph
    return {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
