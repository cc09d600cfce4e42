"""nbits.py (MatMulNBits weights and nodes) and gguf/ggml.py (GGML blocks -> NBitsWeight): every
GGML type converts to exactly gguf-py's dequantized values, and ONNX Runtime's MatMulNBits /
GatherBlockQuantized built by nbits.py compute x @ dequantize(w)^T / dequantize(w)[ids]."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("onnx", reason="the exporter's modules need onnx (not on the aarch64 board)")
from onnx import TensorProto, helper  # noqa: E402

from hermes_ort.export.nbits import (  # noqa: E402
    MS,
    NBitsWeight,
    dequantize,
    gather_block_quantized,
    matmul_nbits,
    stack_rows,
)

gguf = pytest.importorskip("gguf", reason="gguf-py comes with the export extra")
from hermes_ort.export.gguf.ggml import CONVERTERS, to_nbits  # noqa: E402

N, K = 48, 512  # K: two Q4_K/Q5_K/Q6_K super-blocks of 256
# int8 activations (accuracy level 4) round x per block of K to max|x| / 127 steps: a uniform
# error of rms max|x| / (127 sqrt 12), about 0.5% of rms|x| for Gaussian x (a block of 32's max is
# ~2.1 sigma), and so of the output; measured 0.54-0.56% here. Three times that:
INT8_RELATIVE = 1.5e-2
FP32_RELATIVE = 1e-5  # accuracy level 1: fp32 arithmetic, a different summation order


def _ggml_bytes(kind: str, rng) -> np.ndarray:
    """[N, bytes per row] of type `kind`: gguf-py quantizes the legacy types from random weights;
    K-quants (gguf-py has no quantizer for them) are random blocks with sane float16 scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    if not kind.endswith("_K"):
        return gguf.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.05, qtype)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(N * K // block, nbytes)).astype(np.uint8)
    d = np.full((raw.shape[0], 1), 0.01, np.float16).view(np.uint8)
    if kind == "Q6_K":
        raw[:, 208:210] = d  # d is the last field
    else:
        raw[:, 0:2], raw[:, 2:4] = d, d  # d, dmin
    return raw.reshape(N, -1)


@pytest.mark.parametrize("kind", sorted(CONVERTERS))
def test_each_ggml_type_is_gguf_py_dequantization_exactly(kind):
    raw = _ggml_bytes(kind, np.random.default_rng(3))
    want = gguf.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(N, K)
    w = to_nbits(kind, raw, N, K)
    assert w.q.dtype == np.uint8 and int(w.q.max()) < 2**w.bits
    np.testing.assert_array_equal(dequantize(w), want)


def _run(nodes, inits, name: str, value: np.ndarray, out: str = "y") -> np.ndarray:
    dtype = TensorProto.FLOAT if value.dtype == np.float32 else TensorProto.INT64
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(name, dtype, list(value.shape))],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    return session.run([out], {name: value})[0]


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("shape", [(7, K), (2, 5, K)], ids=["rank2", "rank3"])
def test_matmul_nbits_multiplies_by_the_dequantized_weight(kind, shape):
    rng = np.random.default_rng(5)
    w = to_nbits(kind, _ggml_bytes(kind, rng), N, K)
    x = rng.standard_normal(shape).astype(np.float32)
    want = x.astype(np.float64) @ dequantize(w).T.astype(np.float64)
    for level, bound in ((1, FP32_RELATIVE), (4, INT8_RELATIVE)):
        y = _run(*matmul_nbits("x", w, "y", "mm", accuracy_level=level), "x", x)
        assert y.shape == (*shape[:-1], N)
        assert _relative(y, want) < bound, (kind, level, _relative(y, want))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0", "Q5_K"])
def test_gather_block_quantized_looks_up_the_same_bytes(kind):
    rng = np.random.default_rng(7)
    w = to_nbits(kind, _ggml_bytes(kind, rng), N, K)
    ids = rng.integers(0, N, size=(2, 9)).astype(np.int64)
    rows = _run(*gather_block_quantized("ids", w, "y", "gbq"), "ids", ids)
    np.testing.assert_array_equal(rows, dequantize(w)[ids])


def test_a_gather_and_a_matmul_of_one_weight_share_its_initializers():
    w = to_nbits("Q8_0", _ggml_bytes("Q8_0", np.random.default_rng(1)), N, K)
    _, gathered = gather_block_quantized("ids", w, "e", "/embed/Gather", weight="table")
    _, multiplied = matmul_nbits("h", w, "logits", "/head/MatMulNBits", weight="table")
    shared = {t.name: t.raw_data for t in gathered} | {t.name: t.raw_data for t in multiplied}
    assert {"table.q8", "table.scales"} <= {t.name for t in gathered} & {t.name for t in multiplied}
    assert all(shared[t.name] == t.raw_data for t in gathered + multiplied)


def test_rows_move_whole_and_stacking_keeps_each_value():
    rng = np.random.default_rng(2)
    a = to_nbits("Q4_1", _ggml_bytes("Q4_1", rng), N, K)
    b = to_nbits("Q4_0", _ggml_bytes("Q4_0", rng), N, K)  # no offsets: zeros when stacked
    order = rng.permutation(N)
    np.testing.assert_array_equal(dequantize(a.rows(order)), dequantize(a)[order])
    both = stack_rows([a, b])
    np.testing.assert_array_equal(dequantize(both), np.concatenate([dequantize(a), dequantize(b)]))
    with pytest.raises(ValueError, match="same bits"):
        stack_rows([a, to_nbits("Q8_0", _ggml_bytes("Q8_0", rng), N, K)])


def test_an_nbits_weight_checks_its_shapes():
    q = np.zeros((4, 64), np.uint8)
    with pytest.raises(ValueError, match="do not match"):
        NBitsWeight(q, np.ones((4, 3), np.float32), None, 4, 32)
    with pytest.raises(ValueError, match="not a MatMulNBits form"):
        NBitsWeight(q, np.ones((4, 2), np.float32), None, 3, 32)
