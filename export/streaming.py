"""Streaming export: a checkpoint larger than the export machine's memory, one layer at a time.

1. A template: the checkpoint's architecture with only 3 layers, its weights (embeddings, layers
   0-2, head) read from the checkpoint's safetensors. It goes through the regular export (ONNX, cut,
   optimise, store, verified against PyTorch): prologue, layer_00, layer_01, layer_02, epilogue.
   Three, because a layer reads its predecessor's output and may also read tensors that layer 0
   computes once for all (Llama's rotary cos/sin): layer 2 shows which is which.
2. Every initializer of layer_02 is matched, by its bytes, to a layer-2 parameter of the template
   (as is, or transposed: the ONNX exporter stores Linear weights as W^T). Initializers that match
   no parameter must also appear in layer_01 (layer-independent constants), else the architecture
   is refused.
3. Layer i >= 3 is layer_02's graph with its names moved to layer i (`<scope>.2/` -> `.i/`, its
   input `<scope>.1/` -> `.i-1/`, `past_key_values.2.*`/`present.2.*` -> `.i.*`; what it reads from
   layer 0 stays) and its weights read from the checkpoint, one tensor at a time.

Peak memory: the template (embeddings + 3 layers + head) and one layer's tensors; it does not grow
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

from export.errors import ExportError
from hermes_ort.manifest import BlockSpec, Manifest, TensorSpec, check_dataflow

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


def load_template(ref: Path, task: str | None):
    """(template model with the checkpoint's weights, task, the checkpoint's number of layers)."""
    import torch
    import transformers

    from export.checkpoint import load_checkpoint

    config = transformers.AutoConfig.from_pretrained(ref)
    key = next((k for k in _NUM_LAYERS_KEYS if hasattr(config, k)), None)
    if key is None:
        raise ExportError(f"'{ref}': config.json gives no number of layers; cannot stream it")
    num_layers = int(getattr(config, key))
    if num_layers <= TEMPLATE_LAYERS:
        raise ExportError(f"'{ref}' has {num_layers} layers: export it without --streaming")
    checkpoint = SafetensorsCheckpoint(ref)
    model, task = load_checkpoint(str(ref), task, weights=False, **{key: TEMPLATE_LAYERS})
    state = {}
    for name in model.state_dict():
        if name in checkpoint:
            state[name] = checkpoint.get(name)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"'{ref}': checkpoint tensors missing for the template: {sorted(missing)[:5]}"
        )
    model.tie_weights()
    return model.to(torch.float32).eval(), task, num_layers, checkpoint


@dataclass(frozen=True)
class _Source:
    """Where a template initializer's bytes come from for another layer."""

    suffix: str | None  # parameter name after "<stack>.<i>."; None: layer-independent, copied
    transposed: bool = False


def _digest(data) -> bytes:
    return hashlib.sha256(data).digest()


def match_initializers(layer2, layer1, params: dict[str, Any], read) -> list[_Source]:
    """For each initializer of the layer-2 block: its layer-2 parameter (and layout), or None
    for a constant that layer 1 holds too."""
    known: dict[bytes, _Source] = {}
    for suffix, p in params.items():
        a = p.detach().float().contiguous().numpy()
        known.setdefault(_digest(a.tobytes()), _Source(suffix))
        if a.ndim == 2:
            known.setdefault(_digest(a.T.copy().tobytes()), _Source(suffix, True))
    in_layer1 = {_digest(read(t)) for t in layer1.graph.initializer}
    sources = []
    for t in layer2.graph.initializer:
        key = _digest(read(t))
        if key in known:
            sources.append(known[key])
        elif key in in_layer1:
            sources.append(_Source(None))
        else:
            raise ExportError(
                f"streaming export: initializer '{t.name}' of layer 2 matches no layer-2 parameter "
                f"and differs from layer 1's; this architecture cannot be exported layer by layer"
            )
    return sources


def _renamer(scope: str, i: int):
    """Names of layer_02's graph moved to layer i (what it reads from layer 0 stays)."""
    subs = [
        (re.compile(re.escape(f"{scope}2/")), f"{scope}{i}/"),
        (re.compile(re.escape(f"{scope}1/")), f"{scope}{i - 1}/"),
        (re.compile(r"^past_key_values\.2\."), f"past_key_values.{i}."),
        (re.compile(r"^present\.2\."), f"present.{i}."),
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


def expand_layers(
    tmp: Path, template: Manifest, num_layers: int, stack_path: str, params2: dict, checkpoint
) -> Manifest:
    """Write layer_03 .. layer_{N-1} into tmp/blocks from layer_02 and the checkpoint; return the
    manifest of the whole model (the template's blocks, the epilogue reading the last layer)."""
    import onnx

    from export.cut import block_name
    from export.storage import (
        EXTERNAL_MIN_BYTES,
        DataWriter,
        TensorReader,
        _make_inline,
        _point_to,
        write_model,
    )

    layers = [b for b in template.blocks if b.kind == "layers"]
    if [b.layers for b in layers] != [(i,) for i in range(TEMPLATE_LAYERS)]:
        raise ExportError("streaming export needs one layer per block")
    _, b1, b2 = layers
    hidden = [x for x in b2.inputs if x in b1.outputs]
    m = re.match(r"^(.*\.)1/", hidden[0]) if len(hidden) == 1 else None
    if m is None:
        raise ExportError(f"streaming export: cannot tell layer 2's input among {b2.inputs}")
    scope = m.group(1)
    blocks_dir = tmp / "blocks"
    reader = TensorReader()
    try:
        g1 = onnx.load(str(tmp / b1.path), load_external_data=False)
        g2_bytes = (tmp / b2.path).read_bytes()
        g2 = onnx.ModelProto.FromString(g2_bytes)
        read = lambda t: reader.read(t, blocks_dir)  # noqa: E731
        sources = match_initializers(g2, g1, params2, read)
        template_bytes = [
            bytes(read(t)) if s.suffix is None else None
            for t, s in zip(g2.graph.initializer, sources, strict=True)
        ]
        shared = [f for f in b2.files if not b2.is_own(f)]
        shared_names = {Path(f.path).name for f in shared}
        new_blocks = []
        for i in range(TEMPLATE_LAYERS, num_layers):
            name = block_name((i,), num_layers)
            model = onnx.ModelProto.FromString(g2_bytes)
            rename = _renamer(scope, i)
            _rename_graph(model.graph, rename)
            writer = DataWriter(blocks_dir / f"{name}.data")
            for t, s, kept in zip(model.graph.initializer, sources, template_bytes, strict=True):
                if s.suffix is None:
                    if t.data_location != onnx.TensorProto.EXTERNAL and kept is not None:
                        continue  # inline constant: already in the graph
                    location = dict((e.key, e.value) for e in t.external_data)["location"]
                    if location in shared_names:
                        continue  # points into a shared file, still valid
                    _point_to(t, writer.path.name, *writer.append(kept))
                    continue
                w = checkpoint.get(f"{stack_path}.{i}.{s.suffix}").float()
                a = (w.T if s.transposed else w).contiguous().numpy()
                if list(a.shape) != list(t.dims):
                    raise ExportError(
                        f"checkpoint tensor '{stack_path}.{i}.{s.suffix}' has shape {a.shape}, "
                        f"layer 2's has {tuple(t.dims)}"
                    )
                data = a.tobytes()
                if len(data) < EXTERNAL_MIN_BYTES:
                    _make_inline(t, data)
                else:
                    _point_to(t, writer.path.name, *writer.append(data))
                del w, a, data
            files = [write_model(model, blocks_dir / f"{name}.onnx", tmp), writer.close(tmp)]
            inputs = tuple(rename(x) for x in b2.inputs)
            outputs = tuple(rename(x) for x in b2.outputs)
            new_blocks.append(
                BlockSpec(
                    name, "layers", (i,), files[0].path, inputs, outputs, tuple(files + shared)
                )
            )
    finally:
        reader.close()
    last = _renamer(scope, num_layers - 1)
    blocks = []
    for b in template.blocks:
        if b.kind == "epilogue":  # it reads layer 2's output: now the last layer's
            b = _retarget_epilogue(tmp, b, lambda x: last(x) if x in b2.outputs else x)
        blocks.append(b)
        if b is layers[-1]:
            blocks.extend(new_blocks)
    manifest = replace(
        template,
        inputs=_extend(template.inputs, num_layers),
        outputs=_extend(template.outputs, num_layers),
        blocks=tuple(blocks),
        full_model=None,
        full_model_mmap=None,
    )
    check_dataflow(manifest, "streamed manifest")
    return manifest


def _retarget_epilogue(tmp: Path, block: BlockSpec, rename) -> BlockSpec:
    import onnx

    from export.storage import write_model

    model = onnx.load(str(tmp / block.path), load_external_data=False)
    _rename_graph(model.graph, rename)
    spec = write_model(model, tmp / block.path, tmp)
    return replace(
        block, inputs=tuple(rename(x) for x in block.inputs), files=(spec, *block.files[1:])
    )


def _extend(specs: tuple[TensorSpec, ...], num_layers: int) -> tuple[TensorSpec, ...]:
    """past_key_values/present of the template's layers -> of every layer, in layer order."""
    out = []
    for spec in specs:
        out.append(spec)
        for prefix in ("past_key_values.2.", "present.2."):
            if spec.name.startswith(prefix) and spec.name.endswith(".value"):
                for i in range(TEMPLATE_LAYERS, num_layers):
                    for kv in ("key", "value"):
                        other = next(s for s in specs if s.name == f"{prefix}{kv}")
                        out.append(replace(other, name=other.name.replace(".2.", f".{i}.", 1)))
    return tuple(out)


def copy_checkpoint_config(ref: Path, tmp: Path) -> None:
    """The checkpoint's own config.json (the template's says 3 layers)."""
    for name in ("config.json", "generation_config.json"):
        if (ref / name).is_file():
            shutil.copyfile(ref / name, tmp / name)
