"""The cutter, the tied-weight rewrite and the block storage on small hand-built graphs (no
torch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hermes_ort.export.cut import block_model, plan_blocks, value_types
from hermes_ort.export.errors import ExportError
from hermes_ort.export.rewrite import (
    fuse_transposed_weight_matmuls,
    remove_dead_nodes,
    tie_transposed_copies,
)
from hermes_ort.export.stack import LayerStack
from hermes_ort.export.storage import ALIGN_BYTES, SHARED_DATA, store_blocks

STACK = LayerStack("stack.layer", 2, "Layer")


def _weights(rng):
    return {
        "E": rng.standard_normal(4).astype(np.float32),
        "W0": rng.standard_normal((4, 4)).astype(np.float32),
        "W1": rng.standard_normal((4, 4)).astype(np.float32),
        "T": rng.standard_normal((5, 4)).astype(np.float32),
    }


def toy_model(extra_nodes=(), extra_outputs=()) -> onnx.ModelProto:
    """embeddings -> 2 scoped layers (with unscoped glue between) -> tied-style head, like an
    export."""
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
        [
            helper.make_tensor_value_info("x", f, [None]),
            helper.make_tensor_value_info("z", f, [None]),
        ],
        [
            helper.make_tensor_value_info("y", f, [None]),
            helper.make_tensor_value_info("y2", f, [None]),
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path.stem, path


def test_store_blocks_aligns_dedupes_and_shares(tmp_path):
    rng = np.random.default_rng(2)
    n = 16384
    shared = rng.standard_normal(n).astype(np.float32)  # 64 KiB in both blocks: stored once
    own = rng.standard_normal(n).astype(np.float32)  # block b only
    twice = rng.standard_normal(n).astype(np.float32)  # two initializers of b with equal bytes
    dup = rng.standard_normal(1024).astype(np.float32)  # 4 KiB in both blocks: too small to share
    small = rng.standard_normal(1).astype(np.float32)  # 4 B: stays inline
    src = tmp_path / "src"
    src.mkdir()
    a_nodes = [
        helper.make_node("Add", ["x", "W"], ["y"]),
        helper.make_node("Add", ["z", "D"], ["y2"]),
    ]
    a = _store_model(src / "a.onnx", a_nodes, {"W": shared, "D": dup})
    b_nodes = [
        helper.make_node("Mul", ["x", "W"], ["p"]),
        helper.make_node("Add", ["p", "U"], ["q"]),
        helper.make_node("Add", ["q", "V1"], ["r"]),
        helper.make_node("Mul", ["r", "V2"], ["s"]),
        helper.make_node("Add", ["s", "S"], ["y"]),
        helper.make_node("Mul", ["z", "D"], ["y2"]),
    ]
    inits = {
        "W": shared.copy(),
        "U": own,
        "V1": twice,
        "V2": twice.copy(),
        "S": small,
        "D": dup.copy(),
    }
    b = _store_model(src / "b.onnx", b_nodes, inits)
    stored = store_blocks([a, b], tmp_path / "blocks", tmp_path)

    assert [[f.path for f in s.files] for s in stored] == [
        ["blocks/a.onnx", "blocks/a.data", f"blocks/{SHARED_DATA}"],
        ["blocks/b.onnx", "blocks/b.data", f"blocks/{SHARED_DATA}"],
    ]
    assert stored[0].files[2].bytes == shared.nbytes
    assert stored[1].files[1].bytes == 2 * ALIGN_BYTES + dup.nbytes  # U, V1 == V2 once, D
    where = {}
    for s in stored:
        for t in onnx.load(str(tmp_path / s.path), load_external_data=False).graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            where[(s.name, t.name)] = (info.get("location"), int(info.get("offset", -1)))
    assert where == {
        ("a", "W"): (SHARED_DATA, 0),
        ("a", "D"): ("a.data", 0),
        ("b", "W"): (SHARED_DATA, 0),
        ("b", "U"): ("b.data", 0),
        ("b", "V1"): ("b.data", ALIGN_BYTES),
        ("b", "V2"): ("b.data", ALIGN_BYTES),
        ("b", "S"): (None, -1),  # inline
        ("b", "D"): ("b.data", 2 * ALIGN_BYTES),
    }
    feed = {
        "x": rng.standard_normal(n).astype(np.float32),
        "z": rng.standard_normal(1024).astype(np.float32),
    }
    x, z = feed["x"], feed["z"]
    wants = {"a": (x + shared, z + dup), "b": ((x * shared + own + twice) * twice + small, z * dup)}
    for block, want in wants.items():
        session = ort.InferenceSession(
            str(tmp_path / f"blocks/{block}.onnx"), providers=["CPUExecutionProvider"]
        )
        for got, expected in zip(session.run(["y", "y2"], feed), want, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_each_set_of_sharing_blocks_gets_its_own_shared_file(tmp_path):
    rng = np.random.default_rng(3)
    w, v = (rng.standard_normal(16384).astype(np.float32) for _ in range(2))
    src = tmp_path / "src"
    src.mkdir()
    nodes = [
        helper.make_node("Add", ["x", "W"], ["y"]),
        helper.make_node("Identity", ["z"], ["y2"]),
    ]
    blocks = [
        _store_model(src / "a.onnx", nodes, {"W": w}),
        _store_model(src / "b.onnx", nodes, {"W": w.copy()}),
        _store_model(src / "c.onnx", nodes, {"W": v}),
        _store_model(src / "d.onnx", nodes, {"W": v.copy()}),
        _store_model(src / "e.onnx", nodes, {"W": -v}),
    ]
    stored = store_blocks(blocks, tmp_path / "blocks", tmp_path)
    assert [[f.path for f in s.files[1:]] for s in stored] == [
        ["blocks/shared.data"],
        ["blocks/shared.data"],
        ["blocks/shared_01.data"],  # c and d do not list the bytes only a and b read
        ["blocks/shared_01.data"],
        ["blocks/e.data"],
    ]


def test_folded_copy_of_a_tied_weight_is_tied_back():
    """torch folds `Transpose(lm_head.weight)` into a new initializer; we turn it back into a
    Transpose of the embedding, which then becomes FusedMatMul on the embedding itself."""
    model = toy_model()
    want = _run(model, _feed())
    graph = model.graph
    t = next(x for x in graph.initializer if x.name == "T")
    folded = numpy_helper.from_array(numpy_helper.to_array(t).T.copy(), "onnx::MatMul_42")
    decoy = numpy_helper.from_array(
        numpy_helper.to_array(t).T.copy() + 1, "decoy"
    )  # same shape only
    graph.initializer.extend([folded, decoy])
    head = next(n for n in graph.node if n.name == "/head/MatMul")
    head.input[1] = "onnx::MatMul_42"
    remove_dead_nodes(graph)  # the original Transpose_9

    read = {x.name: x.raw_data for x in graph.initializer}
    assert tie_transposed_copies(graph, lambda tensor: read[tensor.name]) == ["onnx::MatMul_42"]
    assert "onnx::MatMul_42" not in {x.name for x in graph.initializer}
    np.testing.assert_array_equal(_run(model, _feed())["logits"], want["logits"])
    assert fuse_transposed_weight_matmuls(graph) == 1
    assert next(n for n in graph.node if n.name == "/head/MatMul").input[1] == "T"


def test_full_model_is_rewritten_from_per_tensor_files(tmp_path):
    """Above 2 GB torch writes one file per tensor; the full model gets one aligned data file."""
    from hermes_ort.export.storage import all_tensors, write_external

    model = toy_model()
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32), "big")  # 16 KiB constant
    model.graph.initializer.append(
        numpy_helper.from_array(np.ones(512, np.float32), "ones")
    )  # 2 KiB
    model.graph.node.extend(
        [
            helper.make_node("Constant", [], ["k"], name="Constant_big", value=big),
            helper.make_node("ReduceSum", ["k"], ["k1"], name="/ReduceSum", keepdims=0),
            helper.make_node("ReduceSum", ["ones"], ["k2"], name="/ReduceSum_1", keepdims=0),
            helper.make_node("Add", ["k1", "k2"], ["ksum"], name="/Add"),
        ]
    )
    model.graph.output.append(helper.make_tensor_value_info("ksum", TensorProto.FLOAT, []))
    want = _run(model, _feed())
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(
        model,
        str(raw / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
        convert_attribute=True,
    )
    assert len(list(raw.iterdir())) > 4

    loaded = onnx.load(str(raw / "model.onnx"), load_external_data=False)
    files = write_external(loaded, raw, tmp_path / "full" / "model.onnx", tmp_path)
    assert [f.path for f in files] == ["full/model.onnx", "full/model.onnx_data"]
    written = onnx.load(str(tmp_path / "full/model.onnx"), load_external_data=False)
    external = [
        (t.name, {e.key: e.value for e in t.external_data})
        for t in all_tensors(written.graph)
        if t.data_location == TensorProto.EXTERNAL
    ]
    assert [(name, info["location"], int(info["offset"])) for name, info in external] == [
        ("ones", "model.onnx_data", 0),
        ("big", "model.onnx_data", 65536),  # aligned; the < 1 KiB tensors went inline
    ]
    session = ort.InferenceSession(
        str(tmp_path / "full/model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, _feed()), strict=True)
    )
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)
