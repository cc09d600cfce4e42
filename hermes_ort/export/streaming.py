"""Streaming export: a checkpoint larger than the export machine's memory, one layer at a time.

1. A template: the checkpoint's architecture with only T layers (TEMPLATE_LAYERS, at least 3), its
   weights (embeddings, layers 0..T-1, head) read from the checkpoint's safetensors. It goes
   through the regular export (ONNX, cut, optimise, store, verified against PyTorch): prologue,
   layer_00 .. layer_{T-1}, epilogue. At least three, because a layer reads its predecessor's
   output and may also read tensors that layer 0 computes once for all (Llama's rotary cos/sin):
   a layer past the first two shows which is which.
2. Every initializer of the last template layer (S = T-1) is matched, by its bytes, to a layer-S
   parameter of the template (as is, or transposed: the ONNX exporter stores Linear weights as
   W^T). Initializers that match no parameter must also appear in layer S-1 (layer-independent
   constants), else the architecture is refused.
3. Layer i >= T is layer S's graph with its names moved to layer i (`<scope>.S/` -> `.i/`, its
   input `<scope>.S-1/` -> `.i-1/`, `past_key_values.S.*`/`present.S.*` -> `.i.*`; what it reads
   from layer 0 stays) and its weights read from the checkpoint, one tensor at a time.

Peak memory: the template (embeddings + T layers + head) and one layer's tensors; it does not grow
with the number of layers. No whole-model file is written (`full`/`full-mmap` are unavailable).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hermes_ort.core.manifest import BlockSpec, Manifest, TensorSpec, check_dataflow
from hermes_ort.export.errors import ExportError

TEMPLATE_LAYERS = 3
_NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class SafetensorsCheckpoint:
    """Tensors of a checkpoint directory by name, read one at a time (single or sharded files)."""

    def __init__(self, ref: Path) -> None:
        index = ref / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (ref / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(ref / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise ExportError(
                f"'{ref}': streaming export reads safetensors weights (model.safetensors or "
                f"model.safetensors.index.json); none found"
            )
        self.ref = ref
        self.weight_map: dict[str, str] = weight_map
        self._files: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str):
        from safetensors import safe_open

        if key not in self.weight_map:
            raise ExportError(f"checkpoint '{self.ref}' has no tensor '{key}'")
        name = self.weight_map[key]
        if name not in self._files:
            self._files[name] = safe_open(str(self.ref / name), "pt")
        return self._files[name].get_tensor(key)


@dataclass(frozen=True)
class Template:
    """A checkpoint's architecture with `layers` layers and its weights: what the regular export
    runs on, and where every other layer's tensors are read from after."""

    model: Any  # the torch model of the template
    task: str
    num_layers: int  # the checkpoint's
    layers: int  # the template's
    checkpoint: SafetensorsCheckpoint
    ref: Path


@dataclass(frozen=True)
class Streamed:
    """What the streaming stage needs once the template's stack is known (not the template's
    torch model: it is freed before the blocks are built)."""

    num_layers: int  # the checkpoint's
    layers: int  # the template's
    checkpoint: SafetensorsCheckpoint
    stack_path: str  # module path of the layer list, e.g. "model.layers"
    params: dict[str, Any]  # the source layer's parameters, by name inside the layer

    @property
    def source_layer(self) -> int:
        """The template layer whose graph every later layer reuses."""
        return self.layers - 1


def load_template(ref: Path, task: str | None, layers: int | None = None) -> Template:
    """The template model with the checkpoint's weights, and where the rest comes from."""
    import torch
    import transformers

    from hermes_ort.export.checkpoint import load_checkpoint

    layers = TEMPLATE_LAYERS if layers is None else layers
    if layers < 3:
        raise ExportError(f"a streaming template needs at least 3 layers, not {layers}")
    config = transformers.AutoConfig.from_pretrained(ref)
    key = next((k for k in _NUM_LAYERS_KEYS if hasattr(config, k)), None)
    if key is None:
        raise ExportError(f"'{ref}': config.json gives no number of layers; cannot stream it")
    num_layers = int(getattr(config, key))
    if num_layers <= layers:
        raise ExportError(f"'{ref}' has {num_layers} layers: export it without --streaming")
    checkpoint = SafetensorsCheckpoint(ref)
    model, task = load_checkpoint(str(ref), task, weights=False, **{key: layers})
    state = {name: checkpoint.get(name) for name in model.state_dict() if name in checkpoint}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"'{ref}': checkpoint tensors missing for the template: {sorted(missing)[:5]}"
        )
    model.tie_weights()
    return Template(model.to(torch.float32).eval(), task, num_layers, layers, checkpoint, ref)


def streamed_layers(template: Template, stack_path: str) -> Streamed:
    """The source layer's parameters, to find in its ONNX block (taken before the model goes)."""
    prefix = f"{stack_path}.{template.layers - 1}."
    state = template.model.state_dict()
    params = {k[len(prefix) :]: v.clone() for k, v in state.items() if k.startswith(prefix)}
    return Streamed(template.num_layers, template.layers, template.checkpoint, stack_path, params)


@dataclass(frozen=True)
class _Origin:
    """Where a template initializer's bytes come from for another layer."""

    suffix: str | None  # parameter name after "<stack>.<i>."; None: layer-independent, copied
    transposed: bool = False


def _digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def match_initializers(source, previous, params: dict[str, Any], read) -> list[_Origin]:
    """For each initializer of the source layer's block: its parameter (and layout), or None for
    a constant that the previous layer's block holds too."""
    known: dict[bytes, _Origin] = {}
    for suffix, p in params.items():
        a = p.detach().float().contiguous().numpy()
        known.setdefault(_digest(a.tobytes()), _Origin(suffix))
        if a.ndim == 2:
            known.setdefault(_digest(a.T.copy().tobytes()), _Origin(suffix, True))
    in_previous = {_digest(read(t)) for t in previous.graph.initializer}
    origins = []
    for t in source.graph.initializer:
        key = _digest(read(t))
        if key in known:
            origins.append(known[key])
        elif key in in_previous:
            origins.append(_Origin(None))
        else:
            raise ExportError(
                f"streaming export: initializer '{t.name}' of the template's last layer matches "
                f"none of its parameters and differs from the layer before's; this architecture "
                f"cannot be exported layer by layer"
            )
    return origins


def _renamer(scope: str, source: int, i: int):
    """Names of the source layer's graph moved to layer i (what it reads from layer 0 stays)."""
    subs = [
        (re.compile(re.escape(f"{scope}{source}/")), f"{scope}{i}/"),
        (re.compile(re.escape(f"{scope}{source - 1}/")), f"{scope}{i - 1}/"),
        (re.compile(rf"^past_key_values\.{source}\."), f"past_key_values.{i}."),
        (re.compile(rf"^present\.{source}\."), f"present.{i}."),
    ]

    def rename(name: str) -> str:
        if not name:
            return name
        for pattern, new in subs:
            if pattern.search(name):
                return pattern.sub(new, name, count=1)
        return name

    return rename


def _rename_graph(graph, rename) -> None:
    for node in graph.node:
        node.name = rename(node.name)
        node.input[:] = [rename(x) for x in node.input]
        node.output[:] = [rename(x) for x in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = rename(value.name)
    for tensor in graph.initializer:  # ORT folds Constant nodes into initializers named as outputs
        tensor.name = rename(tensor.name)


def _layer_scope(source: BlockSpec, previous: BlockSpec) -> str:
    """`<scope>.` of the layer names: the source layer's hidden input is `<scope>.S-1/...`."""
    hidden = [x for x in source.inputs if x in previous.outputs]
    below = source.layers[0] - 1
    m = re.match(rf"^(.*\.){below}/", hidden[0]) if len(hidden) == 1 else None
    if m is None:
        raise ExportError(f"streaming export: cannot tell the hidden input among {source.inputs}")
    return m.group(1)


class _LayerWriter:
    """Writes layer i's block: the source layer's graph, renamed, with layer i's tensors."""

    def __init__(self, tmp: Path, streamed: Streamed, source: BlockSpec, previous: BlockSpec):
        import onnx

        from hermes_ort.export.storage import TensorReader

        self.tmp, self.streamed, self.source = tmp, streamed, source
        self.blocks_dir = tmp / "blocks"
        self.scope = _layer_scope(source, previous)
        self.reader = TensorReader()
        prev_graph = onnx.load(str(tmp / previous.path), load_external_data=False)
        self.graph_bytes = (tmp / source.path).read_bytes()
        graph = onnx.ModelProto.FromString(self.graph_bytes)
        self.origins = match_initializers(graph, prev_graph, streamed.params, self.read)
        self.constants = [
            bytes(self.read(t)) if o.suffix is None else None
            for t, o in zip(graph.graph.initializer, self.origins, strict=True)
        ]
        self.shared = [f for f in source.files if not source.is_own(f)]
        self.shared_names = {Path(f.path).name for f in self.shared}

    def read(self, tensor):
        return self.reader.read(tensor, self.blocks_dir)

    def close(self) -> None:
        self.reader.close()

    def write(self, i: int) -> BlockSpec:
        import onnx

        from hermes_ort.export.cut import block_name
        from hermes_ort.export.storage import (
            EXTERNAL_MIN_BYTES,
            DataWriter,
            make_inline,
            point_to,
            write_model,
        )

        t = self.streamed
        name = block_name((i,), t.num_layers)
        model = onnx.ModelProto.FromString(self.graph_bytes)
        rename = _renamer(self.scope, t.source_layer, i)
        _rename_graph(model.graph, rename)
        writer = DataWriter(self.blocks_dir / f"{name}.data")
        tensors = zip(model.graph.initializer, self.origins, self.constants, strict=True)
        for tensor, origin, constant in tensors:
            if origin.suffix is None:
                if tensor.data_location != onnx.TensorProto.EXTERNAL and constant is not None:
                    continue  # inline constant: already in the graph
                location = dict((e.key, e.value) for e in tensor.external_data)["location"]
                if location in self.shared_names:
                    continue  # points into a shared file, still valid
                point_to(tensor, writer.path.name, *writer.append(constant))
                continue
            data = self._layer_tensor(i, origin, tuple(tensor.dims))
            if len(data) < EXTERNAL_MIN_BYTES:
                make_inline(tensor, data)
            else:
                point_to(tensor, writer.path.name, *writer.append(data))
            del data
        files = [
            write_model(model, self.blocks_dir / f"{name}.onnx", self.tmp),
            writer.close(self.tmp),
        ]
        inputs = tuple(rename(x) for x in self.source.inputs)
        outputs = tuple(rename(x) for x in self.source.outputs)
        return BlockSpec(
            name, "layers", (i,), files[0].path, inputs, outputs, (*files, *self.shared)
        )

    def _layer_tensor(self, i: int, origin: _Origin, dims: tuple[int, ...]) -> bytes:
        key = f"{self.streamed.stack_path}.{i}.{origin.suffix}"
        w = self.streamed.checkpoint.get(key).float()
        a = (w.T if origin.transposed else w).contiguous().numpy()
        if tuple(a.shape) != dims:
            raise ExportError(
                f"checkpoint tensor '{key}' has shape {a.shape}, the template layer's has {dims}"
            )
        return a.tobytes()


def expand_layers(tmp: Path, template: Manifest, streamed: Streamed) -> Manifest:
    """Write layer_T .. layer_{N-1} into tmp/blocks from the template's last layer and the
    checkpoint; return the manifest of the whole model (the epilogue reading the last layer)."""
    t = streamed
    layers = [b for b in template.blocks if b.kind == "layers"]
    if [b.layers for b in layers] != [(i,) for i in range(t.layers)]:
        raise ExportError("streaming export needs one layer per block")
    previous, source = layers[-2], layers[-1]
    writer = _LayerWriter(tmp, streamed, source, previous)
    try:
        new_blocks = [writer.write(i) for i in range(t.layers, t.num_layers)]
    finally:
        writer.close()
    last = _renamer(writer.scope, t.source_layer, t.num_layers - 1)
    # the epilogue reads the source layer's output: now the last layer's
    return _assemble(
        tmp, template, source, new_blocks, t, lambda x: last(x) if x in source.outputs else x
    )


def _assemble(tmp: Path, template: Manifest, source: BlockSpec, new_blocks, t, rename) -> Manifest:
    """The template's manifest with `new_blocks` after its `source` layer and its epilogue
    reading the last layer's output (`rename`)."""
    blocks = []
    for b in template.blocks:
        if b.kind == "epilogue":
            b = _retarget_epilogue(tmp, b, rename)
        blocks.append(b)
        if b is source:
            blocks.extend(new_blocks)
    manifest = replace(
        template,
        inputs=_extend(template.inputs, t.source_layer, t.num_layers),
        outputs=_extend(template.outputs, t.source_layer, t.num_layers),
        blocks=tuple(blocks),
        full_model=None,
        full_model_mmap=None,
    )
    check_dataflow(manifest, "streamed manifest")
    return manifest


def _retarget_epilogue(tmp: Path, block: BlockSpec, rename) -> BlockSpec:
    import onnx

    from hermes_ort.export.storage import write_model

    model = onnx.load(str(tmp / block.path), load_external_data=False)
    _rename_graph(model.graph, rename)
    spec = write_model(model, tmp / block.path, tmp)
    inputs = tuple(rename(x) for x in block.inputs)
    return replace(block, inputs=inputs, files=(spec, *block.files[1:]))


def _extend(specs: tuple[TensorSpec, ...], source: int, num_layers: int) -> tuple[TensorSpec, ...]:
    """past_key_values/present of the template's layers -> of every layer, in layer order."""
    out = []
    for spec in specs:
        out.append(spec)
        for prefix in (f"past_key_values.{source}.", f"present.{source}."):
            if spec.name.startswith(prefix) and spec.name.endswith(".value"):
                for i in range(source + 1, num_layers):
                    for kv in ("key", "value"):
                        other = next(s for s in specs if s.name == f"{prefix}{kv}")
                        new = other.name.replace(f".{source}.", f".{i}.", 1)
                        out.append(replace(other, name=new))
    return tuple(out)


def copy_checkpoint_config(ref: Path, tmp: Path) -> None:
    """The checkpoint's own config.json (the template's gives its own number of layers)."""
    for name in ("config.json", "generation_config.json"):
        if (ref / name).is_file():
            shutil.copyfile(ref / name, tmp / name)


def expand_fused(tmp: Path, template: Manifest, streamed: Streamed, quantization) -> Manifest:
    """Layers T .. N-1 of a fused graph (fused.py), each built alone from the checkpoint's tensors
    with the same names the cutter gave the template's layers, quantized as they were, optimised
    and stored; the epilogue then reads the last layer."""

    from hermes_ort.export.fused import Graph, Shape, layer_nodes
    from hermes_ort.export.storage import optimise_block, save_with_data, store_blocks

    t = streamed
    config = json.loads((t.checkpoint.ref / "config.json").read_text())
    shape = Shape.of(config)
    layers = [b for b in template.blocks if b.kind == "layers"]
    if [b.layers for b in layers] != [(i,) for i in range(t.layers)]:
        raise ExportError("streaming export needs one layer per block")
    scratch = tmp / ".scratch" / "streamed"
    scratch.mkdir(parents=True, exist_ok=True)

    def tensors(name: str):
        return t.checkpoint.get(name).float().numpy()

    new_blocks = []
    for i in range(t.layers, t.num_layers):
        from hermes_ort.export.cut import block_name

        name = block_name((i,), t.num_layers)
        model = _fused_layer(shape, i, tensors, Graph, layer_nodes)
        src = scratch / f"{name}.src.onnx"
        save_with_data(model, src, f"{name}.src.data")
        del model
        if quantization is not None:
            from hermes_ort.export.quantize import quantize_file

            quantize_file(src, scratch / f"{name}.q.onnx", quantization)
            src = scratch / f"{name}.q.onnx"
        optimise_block(src, scratch / f"{name}.onnx")
        (stored,) = store_blocks([(name, scratch / f"{name}.onnx")], tmp / "blocks", tmp)
        for leftover in scratch.iterdir():
            leftover.unlink()
        new_blocks.append(
            BlockSpec(
                name, "layers", (i,), stored.path, stored.inputs, stored.outputs, stored.files
            )
        )
    source = layers[-1]
    old, new = f"/model/layers.{t.source_layer}/", f"/model/layers.{t.num_layers - 1}/"
    return _assemble(tmp, template, source, new_blocks, t, lambda x: x.replace(old, new, 1))


def _fused_layer(shape, i: int, tensors, Graph, layer_nodes):
    """Layer i of the fused graph as a model of its own, its inputs named as the cutter names
    the boundary (the layer before's residual and MLP output, the mask's seqlens and width)."""
    from onnx import TensorProto, helper

    before = f"/model/layers.{i - 1}"
    residual = f"{before}/post_attention_layernorm/SkipLayerNorm/output_3"
    mlp = f"{before}/mlp/down_proj/MatMul/output_0"
    seqlens, width = (
        "/model/attn_mask_reformat/Sub/Cast/output_0",
        "/model/attn_mask_reformat/Gather/Cast/output_0",
    )
    g = Graph()
    out_residual, out_mlp = layer_nodes(g, shape, i, tensors, (residual, mlp), seqlens, width)
    hidden = ["batch_size", "sequence_length", shape.hidden]

    def cache(name: str, length: str):
        dims = ["batch_size", shape.kv_heads, length, shape.head_dim]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    inputs = [
        helper.make_tensor_value_info(residual, TensorProto.FLOAT, hidden),
        helper.make_tensor_value_info(mlp, TensorProto.FLOAT, hidden),
        helper.make_tensor_value_info(seqlens, TensorProto.INT32, ["batch_size"]),
        helper.make_tensor_value_info(width, TensorProto.INT32, []),
        cache(f"past_key_values.{i}.key", "past_sequence_length"),
        cache(f"past_key_values.{i}.value", "past_sequence_length"),
    ]
    outputs = [
        cache(f"present.{i}.key", "total_sequence_length"),
        cache(f"present.{i}.value", "total_sequence_length"),
        helper.make_tensor_value_info(out_residual, TensorProto.FLOAT, hidden),
        helper.make_tensor_value_info(out_mlp, TensorProto.FLOAT, hidden),
    ]
    graph = helper.make_graph(g.nodes, f"layer_{i}", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="hermes-ort fused")
