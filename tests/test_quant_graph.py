"""The graph pass (export/quant_graph.py) on hand-built graphs, no torch: what it replaces, that
the result runs in ONNX Runtime and computes x @ dequantize(w)^T, that a tied table becomes one
table both nodes read, and that the model keeps its opset (ONNX Runtime's own quantizer moved
models to opset 21, where ReduceMean's `axes` attribute is invalid)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the exporter's modules need onnx")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from hermes_ort.export.errors import ExportError  # noqa: E402
from hermes_ort.export.nbits import dequantize  # noqa: E402
from hermes_ort.export.quant_choices import Algorithm  # noqa: E402
from hermes_ort.export.quant_graph import Rounding, quantize_graph, quantize_matrix  # noqa: E402

V, H, F = 64, 32, 48  # vocabulary, hidden, feed-forward


def _rounding(algorithm=Algorithm.MINMAX_SEARCH, accuracy_level=1, head_bits=8) -> Rounding:
    head = Algorithm.RTN if head_bits == 8 else algorithm
    return Rounding(4, head_bits, 16, algorithm, head, accuracy_level, embeddings=True)


def _decoder(opset=17, rng=None):
    """ids -> Gather(table) -> ReduceMean-norm (axes as an attribute: opset < 18) -> MatMul(W^T)
    -> tied head FusedMatMul(x, table, transB=1) -> logits."""
    rng = rng or np.random.default_rng(0)
    table = (rng.standard_normal((V, H)) * 0.5).astype(np.float32)
    up = (rng.standard_normal((H, F)) * 0.2).astype(np.float32)  # [K, N]: a MatMul's W^T
    down = (rng.standard_normal((F, H)) * 0.2).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["h"], name="/embed/Gather"),
        helper.make_node("Mul", ["h", "h"], ["sq"], name="/norm/Mul"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="/norm/ReduceMean", axes=[-1]),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="/norm/Add"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="/norm/Sqrt"),
        helper.make_node("Div", ["h", "rms"], ["normed"], name="/norm/Div"),
        helper.make_node("MatMul", ["normed", "up"], ["u"], name="/mlp/up/MatMul"),
        helper.make_node("Relu", ["u"], ["a"], name="/mlp/Relu"),
        helper.make_node("MatMul", ["a", "down"], ["d"], name="/mlp/down/MatMul"),
        helper.make_node(
            "FusedMatMul",
            ["d", "table"],
            ["logits"],
            name="/lm_head/FusedMatMul",
            domain="com.microsoft",
            transB=1,
        ),
    ]
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(up, "up"),
        numpy_helper.from_array(down, "down"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "t", V])],
        inits,
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), (table, up, down)


def _run(model, ids):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"input_ids": ids})[0]


def _numpy(ids, table, up, down):
    h = table[ids]
    normed = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-5)
    return np.maximum(normed @ up, 0) @ down @ table.T


def test_weights_become_matmulnbits_and_the_tied_table_one_table():
    model, _ = _decoder()
    q = quantize_graph(model, _rounding())
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 3 and "GatherBlockQuantized" in ops
    assert "FusedMatMul" not in ops and ops.count("MatMul") == 2  # the up/down offset terms
    names = {t.name for t in q.graph.initializer}
    assert {"table", "up", "down"}.isdisjoint(names)  # the float weights are gone
    # the head and the lookup read the same packed bytes and scales (an 8-bit, offset-free table)
    head = next(n for n in q.graph.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    lookup = next(n for n in q.graph.node if n.op_type == "GatherBlockQuantized")
    assert head.input[2] == lookup.input[2] == "table.scales"
    reshape = next(n for n in q.graph.node if n.output[0] == lookup.input[0])
    assert reshape.input[0] == head.input[1] == "table.q8"


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_the_quantized_graph_keeps_its_opset_and_computes_the_dequantized_weights(algorithm):
    """At accuracy level 1 (fp32 compute) the blocks compute exactly x @ dequantize(w)^T: the
    rounding alone is the difference from fp32."""
    model, (table, up, down) = _decoder(opset=17)
    q = quantize_graph(model, _rounding(algorithm))
    assert {o.domain: o.version for o in q.opset_import}[""] == 17
    onnx.checker.check_model(q)
    ids = np.random.default_rng(1).integers(0, V, (2, 7))
    got = _run(q, ids)
    back = {
        "table": dequantize(quantize_matrix(table, 8, 16, Algorithm.RTN)),
        "up": dequantize(quantize_matrix(up.T, 4, 16, algorithm)).T,
        "down": dequantize(quantize_matrix(down.T, 4, 16, algorithm)).T,
    }
    want = _numpy(ids, back["table"], back["up"], back["down"])
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-5 * scale
    fp32 = _numpy(ids, table, up, down)
    assert np.abs(got - fp32).max() > 1e-3 * scale  # it did quantize


def test_int8_activations_stay_close_to_the_dequantized_weights():
    model, (table, up, down) = _decoder()
    got = _run(quantize_graph(model, _rounding(accuracy_level=4)), ids := np.arange(12)[None])
    back = [
        dequantize(quantize_matrix(table, 8, 16, Algorithm.RTN)),
        dequantize(quantize_matrix(up.T, 4, 16, Algorithm.MINMAX_SEARCH)).T,
        dequantize(quantize_matrix(down.T, 4, 16, Algorithm.MINMAX_SEARCH)).T,
    ]
    want = _numpy(ids, *back)
    cos = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cos > 0.999 and np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_a_4_bit_head_quantizes_the_tied_table_with_the_algorithm():
    model, _ = _decoder()
    q = quantize_graph(model, _rounding(head_bits=4))
    names = {t.name for t in q.graph.initializer}
    assert {"table.q4", "table.offsets", "table.offsets_t"} <= names
    _run(q, np.arange(5)[None])


def test_offsets_need_opset_15():
    model, _ = _decoder(opset=13)
    with pytest.raises(ExportError, match="needs opset >= 15"):
        quantize_graph(model, _rounding())
    model, _ = _decoder(opset=13)
    quantize_graph(model, _rounding(Algorithm.RTN))  # no offsets: any opset


def test_weights_whose_k_fits_no_block_stay_fp32():
    model, _ = _decoder()
    odd = (np.random.default_rng(2).standard_normal((24, 8))).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(odd, "odd"))
    model.graph.node.append(helper.make_node("MatMul", ["x24", "odd"], ["y"], name="/odd/MatMul"))
    q = quantize_graph(model, _rounding())
    assert "odd" in {t.name for t in q.graph.initializer}
    assert any(n.name == "/odd/MatMul" and n.op_type == "MatMul" for n in q.graph.node)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_a_gemm_with_a_bias_becomes_matmulnbits_and_an_add(trans_b):
    """GPT-2's Conv1D exports as Gemm(x, W, bias): its weight is quantized like a MatMul's."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((F, H)) * 0.2).astype(np.float32)  # [N, K]
    bias = rng.standard_normal(F).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="/fc/Gemm", transB=trans_b)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", F])],
        [
            numpy_helper.from_array(w if trans_b else w.T.copy(), "w"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = quantize_graph(model, _rounding())
    assert [n.op_type for n in q.graph.node].count("Gemm") == 0
    x = rng.standard_normal((3, H)).astype(np.float32)
    session = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    want = x @ dequantize(quantize_matrix(w, 4, 16, Algorithm.MINMAX_SEARCH)).T + bias
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
