"""The cutter, the tied-weight rewrite and the block storage on small hand-built graphs (no torch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.cut import block_model, plan_blocks, value_types
from export.rewrite import fuse_transposed_weight_matmuls, remove_dead_nodes
from export.stack import LayerStack
from export.storage import ALIGN_BYTES, SHARED_DATA, store_blocks
from hermes_ort.errors import ExportError

STACK = LayerStack("stack.layer", 2, "Layer")


def _weights(rng):
    return {
        "E": rng.standard_normal(4).astype(np.float32),
        "W0": rng.standard_normal((4, 4)).astype(np.float32),
        "W1": rng.standard_normal((4, 4)).astype(np.float32),
        "T": rng.standard_normal((5, 4)).astype(np.float32),
    }


def toy_model(extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    """embeddings -> 2 scoped layers (with unscoped glue between) -> tied-style head, like an export."""
    w = _weights(np.random.default_rng(0))
    half = numpy_helper.from_array(np.array(0.5, np.float32))
    nodes = [
        helper.make_node("Add", ["x", "E"], ["h0"], name="/emb/Add"),
        helper.make_node("Constant", [], ["c"], name="Constant_1", value=half),
        helper.make_node("Mul", ["mask", "c"], ["m"], name="/Mul"),
        helper.make_node("MatMul", ["h0", "W0"], ["a0"], name="/stack/layer.0/MatMul"),
        helper.make_node("Mul", ["a0", "c"], ["b0"], name="/stack/layer.0/Mul"),
        helper.make_node("Add", ["b0", "m"], ["h1"], name="/stack/layer.0/Add"),
        helper.make_node("Relu", ["h1"], ["r1"], name="/Relu"),  # unscoped glue read by layer 1
        helper.make_node("MatMul", ["r1", "W1"], ["a1"], name="/stack/layer.1/MatMul"),
        helper.make_node("Add", ["a1", "m"], ["h2"], name="/stack/layer.1/Add"),
        helper.make_node("Transpose", ["T"], ["Tt"], name="Transpose_9"),
        helper.make_node("MatMul", ["h2", "Tt"], ["logits"], name="/head/MatMul"),
        helper.make_node("Identity", ["h2"], ["hidden"], name="/Identity"),
        helper.make_node("Neg", ["h2"], ["unused"], name="/dead/Neg"),
        *extra_nodes,
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "toy",
        [
            helper.make_tensor_value_info("x", f, ["B", "S", 4]),
            helper.make_tensor_value_info("mask", f, ["B", "S", 1]),
        ],
        [
            helper.make_tensor_value_info("logits", f, ["B", "S", 5]),
            helper.make_tensor_value_info("hidden", f, ["B", "S", 4]),
            *extra_outputs,
        ],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def _feed():
    rng = np.random.default_rng(1)
    return {
        "x": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "mask": rng.standard_normal((2, 3, 1)).astype(np.float32),
    }


def _run(model: onnx.ModelProto, feed: dict) -> dict:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = {i.name: feed[i.name] for i in session.get_inputs()}
    return dict(zip(names, session.run(names, inputs), strict=True))


def _chain(model, plans, feed):
    types = value_types(model)
    env = dict(feed)
    for plan in plans:
        env.update(_run(block_model(model, plan, types), env))
    return env


def test_blocks_follow_scopes_and_constants_are_copied():
    model = toy_model()
    remove_dead_nodes(model.graph)
    plans = plan_blocks(model.graph, STACK, 1, "Toy")
    nodes = model.graph.node
    summary = [(p.name, p.kind, p.layers, p.inputs, p.outputs) for p in plans]
    assert summary == [
        ("prologue", "prologue", (), ("x", "mask"), ("h0", "m")),
        ("layer_00", "layers", (0,), ("h0", "m"), ("r1",)),  # the glue Relu joins its producer
        ("layer_01", "layers", (1,), ("r1", "m"), ("h2",)),  # m skips a block
        ("epilogue", "epilogue", (), ("h2",), ("logits", "hidden")),
    ]
    names = {p.name: [nodes[i].name for i in p.nodes] for p in plans}
    assert names["prologue"] == ["/emb/Add", "Constant_1", "/Mul"]
    assert names["layer_00"] == [
        "Constant_1",
        "/stack/layer.0/MatMul",
        "/stack/layer.0/Mul",
        "/stack/layer.0/Add",
        "/Relu",
    ]
    assert names["epilogue"] == ["Transpose_9", "/head/MatMul", "/Identity"]  # Neg was dead
    assert [p.initializers for p in plans] == [("E",), ("W0",), ("W1",), ("T",)]


def test_chained_blocks_equal_the_whole_graph():
    model = toy_model()
    want = _run(model, _feed())
    for per in (1, 2):
        plans = plan_blocks(model.graph, STACK, per, "Toy")
        got = _chain(model, plans, _feed())
        for name in ("logits", "hidden"):
            np.testing.assert_array_equal(got[name], want[name])
    assert [p.name for p in plan_blocks(model.graph, STACK, 2, "Toy")] == [
        "prologue",
        "layers_00_01",
        "epilogue",
    ]


def test_transposed_weight_matmul_becomes_fused_matmul():
    model = toy_model()
    want = _run(model, _feed())
    assert fuse_transposed_weight_matmuls(model.graph) == 1
    ops = {n.name: (n.domain, n.op_type, list(n.input)) for n in model.graph.node}
    assert ops["/head/MatMul"] == ("com.microsoft", "FusedMatMul", ["h2", "T"])
    assert "Transpose_9" not in ops
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    got = _run(model, _feed())
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-6)
    epilogue = plan_blocks(model.graph, STACK, 1, "Toy")[-1]
    assert epilogue.initializers == ("T",)  # the weight itself, no transposed copy


def test_scoped_node_reading_a_later_layer_cannot_be_cut():
    bad = helper.make_node("Add", ["h2", "x"], ["z"], name="/stack/layer.0/Late")
    model = toy_model([bad], [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", "S", 4])])
    with pytest.raises(ExportError, match="layer 0 reads a tensor computed in a later block"):
        plan_blocks(model.graph, STACK, 1, "Toy")


def test_graph_without_the_layer_scopes_is_unsupported():
    with pytest.raises(ExportError, match="unsupported architecture 'Toy'.*'/enc/blocks.<i>/'"):
        plan_blocks(toy_model().graph, LayerStack("enc.blocks", 2, "Block"), 1, "Toy")


def _store_model(path, nodes, inits):
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", f, [None])],
        [helper.make_tensor_value_info("y", f, [None])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path.stem, path


def test_store_blocks_aligns_dedupes_and_shares(tmp_path):
    rng = np.random.default_rng(2)
    shared = rng.standard_normal(1024).astype(np.float32)  # 4 KiB, in both blocks
    own = rng.standard_normal(1024).astype(np.float32)  # block b only
    twice = rng.standard_normal(1024).astype(np.float32)  # two initializers of b with equal bytes
    small = rng.standard_normal(1).astype(np.float32)  # 4 B: stays inline
    src = tmp_path / "src"
    src.mkdir()
    a = _store_model(src / "a.onnx", [helper.make_node("Add", ["x", "W"], ["y"])], {"W": shared})
    b_nodes = [
        helper.make_node("Mul", ["x", "W"], ["p"]),
        helper.make_node("Add", ["p", "U"], ["q"]),
        helper.make_node("Add", ["q", "V1"], ["r"]),
        helper.make_node("Mul", ["r", "V2"], ["s"]),
        helper.make_node("Add", ["s", "S"], ["y"]),
    ]
    inits = {"W": shared.copy(), "U": own, "V1": twice, "V2": twice.copy(), "S": small}
    b = _store_model(src / "b.onnx", b_nodes, inits)
    stored = store_blocks([a, b], tmp_path / "blocks", tmp_path)

    assert [[f.path for f in s.files] for s in stored] == [
        ["blocks/a.onnx", f"blocks/{SHARED_DATA}"],
        ["blocks/b.onnx", "blocks/b.data", f"blocks/{SHARED_DATA}"],
    ]
    assert stored[0].files[1].bytes == shared.nbytes
    assert stored[1].files[1].bytes == ALIGN_BYTES + twice.nbytes  # U at 0, then V1 == V2 once
    where = {}
    for s in stored:
        for t in onnx.load(str(tmp_path / s.path), load_external_data=False).graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            where[(s.name, t.name)] = (info.get("location"), int(info.get("offset", -1)))
    assert where == {
        ("a", "W"): (SHARED_DATA, 0),
        ("b", "W"): (SHARED_DATA, 0),
        ("b", "U"): ("b.data", 0),
        ("b", "V1"): ("b.data", ALIGN_BYTES),
        ("b", "V2"): ("b.data", ALIGN_BYTES),
        ("b", "S"): (None, -1),  # inline
    }
    x = rng.standard_normal(1024).astype(np.float32)
    for block, want in (("a", x + shared), ("b", (x * shared + own + twice) * twice + small)):
        session = ort.InferenceSession(
            str(tmp_path / f"blocks/{block}.onnx"), providers=["CPUExecutionProvider"]
        )
        np.testing.assert_allclose(session.run(None, {"x": x})[0], want, rtol=1e-6)
