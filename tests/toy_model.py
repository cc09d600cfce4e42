"""A toy block model written with onnx.helper: no torch needed, shapes like a tiny encoder.

    prologue: h0 = E[input_ids] (B, S, H); mask = Cast(attention_mask)[..., None] (B, S, 1)
    layer i:  h = h + Relu(h @ W_i + b_i) * mask  (every layer reads mask: several blocks back)
    epilogue: logits = h @ W_out (B, S, V)

Weights live in external data files (one per block), as the exporter writes them. A whole-model file
over the same weights is written too, so `full` can be compared with the block strategies.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from toy_forward import toy_forward

OPSET = 17


def _sha(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _save(model: onnx.ModelProto, out: Path, rel: str) -> list[dict]:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data_rel = Path(rel).with_suffix(".data").name
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_rel,
        size_threshold=1024,
    )
    files = [{"path": rel, **_sha(path)}]
    data = path.parent / data_rel
    if data.exists():
        files.append({"path": str(Path(rel).parent / data_rel), **_sha(data)})
    return files


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "block", inputs, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def write_toy_model(
    out: Path, layers: int = 4, hidden: int = 32, vocab: int = 50, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    f32 = TensorProto.FLOAT
    emb = numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "emb")
    w_out = numpy_helper.from_array(
        rng.standard_normal((hidden, vocab)).astype(np.float32) * 0.2, "w_out"
    )
    weights = [
        (
            numpy_helper.from_array(
                (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32),
                f"w{i}",
            ),
            numpy_helper.from_array(
                (rng.standard_normal(hidden) * 0.1).astype(np.float32), f"b{i}"
            ),
        )
        for i in range(layers)
    ]
    bsh, bs1 = ["batch_size", "sequence_length", hidden], ["batch_size", "sequence_length", 1]

    pro_nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h_0"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=f32),
        helper.make_node("Unsqueeze", ["mask_f", "axis_m1"], ["mask"]),
    ]
    axis = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axis_m1")
    ids_vi = _vi("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask_vi = _vi("attention_mask", TensorProto.INT64, ["batch_size", "sequence_length"])
    blocks = [
        (
            "prologue",
            "prologue",
            [],
            _model(
                pro_nodes,
                [ids_vi, mask_vi],
                [_vi("h_0", f32, bsh), _vi("mask", f32, bs1)],
                [emb, axis],
            ),
            ["input_ids", "attention_mask"],
            ["h_0", "mask"],
        )
    ]
    all_nodes, all_inits = list(pro_nodes), [emb, axis]
    for i, (w, b) in enumerate(weights):
        h_in, h_out = f"h_{i}", f"h_{i + 1}"
        nodes = [
            helper.make_node("MatMul", [h_in, w.name], [f"mm{i}"]),
            helper.make_node("Add", [f"mm{i}", b.name], [f"lin{i}"]),
            helper.make_node("Relu", [f"lin{i}"], [f"act{i}"]),
            helper.make_node("Mul", [f"act{i}", "mask"], [f"masked{i}"]),
            helper.make_node("Add", [h_in, f"masked{i}"], [h_out]),
        ]
        model = _model(
            nodes, [_vi(h_in, f32, bsh), _vi("mask", f32, bs1)], [_vi(h_out, f32, bsh)], [w, b]
        )
        blocks.append((f"layer_{i:02d}", "layers", [i], model, [h_in, "mask"], [h_out]))
        all_nodes += nodes
        all_inits += [w, b]
    epi_nodes = [helper.make_node("MatMul", [f"h_{layers}", "w_out"], ["logits"])]
    logits_vi = _vi("logits", f32, ["batch_size", "sequence_length", vocab])
    blocks.append(
        (
            "epilogue",
            "epilogue",
            [],
            _model(epi_nodes, [_vi(f"h_{layers}", f32, bsh)], [logits_vi], [w_out]),
            [f"h_{layers}"],
            ["logits"],
        )
    )
    all_nodes += epi_nodes
    all_inits.append(w_out)

    out.mkdir(parents=True, exist_ok=True)
    block_entries = []
    for name, kind, layer_ids, model, ins, outs in blocks:
        files = _save(model, out, f"blocks/{name}.onnx")
        block_entries.append(
            {
                "name": name,
                "kind": kind,
                "layers": layer_ids,
                "path": f"blocks/{name}.onnx",
                "inputs": ins,
                "outputs": outs,
                "files": files,
            }
        )
    full = _model(all_nodes, [ids_vi, mask_vi], [logits_vi], all_inits)
    manifest = {
        "schema_version": 1,
        "name": "toy",
        "family": "toy",
        "task": "feature-extraction",
        "source": {"kind": "toy", "seed": seed},
        "inputs": [
            {
                "name": "input_ids",
                "dtype": "int64",
                "shape": ["batch_size", "sequence_length"],
                "sample": {"kind": "randint", "high": vocab},
            },
            {
                "name": "attention_mask",
                "dtype": "int64",
                "shape": ["batch_size", "sequence_length"],
                "sample": {"kind": "ones"},
            },
        ],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["batch_size", "sequence_length", vocab],
            }
        ],
        "blocks": block_entries,
        "full_model": {"path": "full/model.onnx", "files": _save(full, out, "full/model.onnx")},
        "sample": {"batch_size": 1, "sequence_length": 16, "max_sequence_length": 64},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def reference_logits(model_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The toy model computed in numpy from its own weight files (independent of the runtime)."""
    full = onnx.load(str(model_dir / "full/model.onnx"))
    w = {
        t.name: numpy_helper.to_array(t, base_dir=str(model_dir / "full"))
        for t in full.graph.initializer
    }
    return toy_forward(w, feeds)
