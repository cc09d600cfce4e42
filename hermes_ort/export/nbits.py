"""Block-quantized weights as ONNX Runtime's MatMulNBits holds them, and the nodes that use them.

A weight [N, K] (a Linear's layout: N outputs, K inputs) is cut along K into blocks of
`block_size`; each value is

    w[n, k] = scale[n, b] * (q[n, k] - 2**(bits - 1)) + offset[n, b],   b = k // block_size

2**(bits - 1) is MatMulNBits' default zero point, so no zero_points input is needed: that keeps
ORT's fast packed kernel (and KleidiAI on ARM64, which refuses zero points). A per-block
`offset` (GGUF's Q4_1/K-quant mins) is added exactly, outside the kernel:
x @ offset-part^T = (x summed over each K block) @ offset^T, an [.., K/bs] x [K/bs, N] MatMul.

`matmul_nbits` emits MatMulNBits (+ that term); `gather_block_quantized` looks rows up in the
same bytes (GatherBlockQuantized), so a tied embedding and LM head can share one table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # onnx itself is imported by the functions that build nodes: light to import
    import onnx

MS = "com.microsoft"
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
ACCURACY_INT8 = 4  # MatMulNBits' accuracy_level: activations quantized to int8 per block
OFFSET_MIN_OPSET = 15  # the offset term's Shape(end=-1)


@dataclass(frozen=True)
class NBitsWeight:
    """A [N, K] weight (HF Linear layout) as MatMulNBits holds it."""

    q: np.ndarray  # uint8 [N, K], values 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [N, K // block_size]
    offsets: np.ndarray | None  # float32 [N, K // block_size], or None (all zero)
    bits: int  # 4 or 8
    block_size: int  # 16, 32, 64, 128

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if self.bits not in BITS or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"{self.bits}-bit block {self.block_size}: not a MatMulNBits form")
        blocks = (n, k // self.block_size)
        if k % self.block_size or self.scales.shape != blocks:
            raise ValueError(f"q {self.q.shape} and scales {self.scales.shape} do not match")
        if self.offsets is not None and self.offsets.shape != blocks:
            raise ValueError(f"offsets {self.offsets.shape}: expected {blocks}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def packed(self) -> np.ndarray:
        """MatMulNBits' B: uint8 [N, K / bs, bs * bits / 8]; 4-bit: byte i of a block holds
        element 2i in its low nibble, 2i + 1 in its high nibble."""
        n, k = self.q.shape
        q = self.q.reshape(n, k // self.block_size, self.block_size)
        if self.bits == 8:
            return np.ascontiguousarray(q, np.uint8)
        return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)

    def rows(self, index: np.ndarray) -> NBitsWeight:
        """The rows `index` (a permutation or a selection): whole rows move, nothing is
        requantized."""
        off = None if self.offsets is None else self.offsets[index]
        return NBitsWeight(self.q[index], self.scales[index], off, self.bits, self.block_size)


def dequantize(w: NBitsWeight) -> np.ndarray:
    """float32 [N, K]: what MatMulNBits (+ the offset term) multiplies by."""
    n, k = w.q.shape
    q = w.q.reshape(n, k // w.block_size, w.block_size).astype(np.float32)
    value = (q - (1 << (w.bits - 1))) * w.scales[..., None]
    if w.offsets is not None:
        value += w.offsets[..., None]
    return value.reshape(n, k)


def stack_rows(weights: list[NBitsWeight]) -> NBitsWeight:
    """Weights of the same bits and block size, one below the other (packed QKV): [sum N, K]."""
    first = weights[0]
    if any((w.bits, w.block_size) != (first.bits, first.block_size) for w in weights):
        raise ValueError("only weights of the same bits and block size stack")
    offsets = None
    if any(w.offsets is not None for w in weights):
        zero = [np.zeros_like(w.scales) if w.offsets is None else w.offsets for w in weights]
        offsets = np.concatenate(zero)
    return NBitsWeight(
        np.concatenate([w.q for w in weights]),
        np.concatenate([w.scales for w in weights]),
        offsets,
        first.bits,
        first.block_size,
    )


def _tables(w: NBitsWeight, weight: str) -> tuple[str, str, list[onnx.TensorProto]]:
    """The packed bytes and scales as initializers named after `weight` (equal names, equal
    tensors: a gather and a MatMul of one weight share them)."""
    from onnx import numpy_helper

    q_name, s_name = f"{weight}.q{w.bits}", f"{weight}.scales"
    inits = [
        numpy_helper.from_array(w.packed(), q_name),
        numpy_helper.from_array(np.ascontiguousarray(w.scales, np.float32), s_name),
    ]
    return q_name, s_name, inits


def matmul_nbits(
    x: str,
    w: NBitsWeight,
    out: str,
    name: str,
    accuracy_level: int = ACCURACY_INT8,
    weight: str | None = None,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """out = x @ dequantize(w)^T for x [.., K]: MatMulNBits without zero points and, when `w` has
    offsets, the exact offset term. Initializers are named `<weight>.q4`/`.q8`, `.scales`,
    `.offsets_t` (weight: default `name`); the nodes `name` and `name/offsets/...`. The offset
    term needs opset >= OFFSET_MIN_OPSET."""
    from onnx import helper, numpy_helper

    weight = weight or name
    n, k = w.shape
    q_name, s_name, inits = _tables(w, weight)
    direct = out if w.offsets is None else f"{name}/output_0"
    nodes = [
        helper.make_node(
            "MatMulNBits",
            [x, q_name, s_name],
            [direct],
            name=name,
            domain=MS,
            K=k,
            N=n,
            bits=w.bits,
            block_size=w.block_size,
            accuracy_level=accuracy_level,
        )
    ]
    if w.offsets is None:
        return nodes, inits
    base = f"{name}/offsets"
    blocks = k // w.block_size
    inits += [
        numpy_helper.from_array(np.array([blocks, w.block_size], np.int64), f"{base}/blocks"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{base}/last_axis"),
        # [K / bs, N]: the offsets transposed, a plain MatMul's weight
        numpy_helper.from_array(
            np.ascontiguousarray(w.offsets.T, np.float32), f"{weight}.offsets_t"
        ),
    ]
    nodes += [
        helper.make_node("Shape", [x], [f"{base}/lead"], name=f"{base}/Shape", end=-1),
        helper.make_node(
            "Concat",
            [f"{base}/lead", f"{base}/blocks"],
            [f"{base}/shape"],
            f"{base}/Concat",
            axis=0,
        ),
        # x [.., K] -> [.., K / bs, bs] -> block sums [.., K / bs]
        helper.make_node("Reshape", [x, f"{base}/shape"], [f"{base}/x"], f"{base}/Reshape"),
        helper.make_node(
            "ReduceSum",
            [f"{base}/x", f"{base}/last_axis"],
            [f"{base}/sums"],
            f"{base}/ReduceSum",
            keepdims=0,
        ),
        helper.make_node(
            "MatMul", [f"{base}/sums", f"{weight}.offsets_t"], [f"{base}/term"], f"{base}/MatMul"
        ),
        helper.make_node("Add", [direct, f"{base}/term"], [out], f"{base}/Add"),
    ]
    return nodes, inits


def gather_block_quantized(
    ids: str, w: NBitsWeight, out: str, name: str, weight: str | None = None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """out [*ids.shape, K] = dequantize(w)[ids]: GatherBlockQuantized reading MatMulNBits' own
    packed bytes (through a Reshape to [N, K * bits / 8]: a tied embedding and LM head given the
    same `weight` share one table) and, with offsets, a Gather of them added per block."""
    from onnx import helper, numpy_helper

    weight = weight or name
    n, k = w.shape
    q_name, s_name, inits = _tables(w, weight)
    rows = f"{name}/rows"
    inits.append(numpy_helper.from_array(np.array([n, -1], np.int64), f"{rows}/shape"))
    direct = out if w.offsets is None else f"{name}/output_0"
    nodes = [
        helper.make_node("Reshape", [q_name, f"{rows}/shape"], [rows], f"{rows}/Reshape"),
        helper.make_node(
            "GatherBlockQuantized",
            [rows, ids, s_name],
            [direct],
            name=name,
            domain=MS,
            bits=w.bits,
            block_size=w.block_size,
            gather_axis=0,
            quantize_axis=1,
        ),
    ]
    if w.offsets is None:
        return nodes, inits
    base, blocks = f"{name}/offsets", k // w.block_size
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(w.offsets, np.float32), f"{weight}.offsets"),
        numpy_helper.from_array(np.array([blocks, w.block_size], np.int64), f"{base}/blocks"),
        numpy_helper.from_array(np.array([k], np.int64), f"{base}/k"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{base}/last_axis"),
    ]
    nodes += [
        helper.make_node("Shape", [ids], [f"{base}/lead"], name=f"{base}/Shape"),
        helper.make_node(
            "Concat",
            [f"{base}/lead", f"{base}/blocks"],
            [f"{base}/split"],
            f"{base}/Concat",
            axis=0,
        ),
        helper.make_node(
            "Concat", [f"{base}/lead", f"{base}/k"], [f"{base}/joined"], f"{base}/Concat_1", axis=0
        ),
        # rows [.., K] as [.., K / bs, bs], plus each block's offset [.., K / bs, 1]
        helper.make_node("Reshape", [direct, f"{base}/split"], [f"{base}/x"], f"{base}/Reshape"),
        helper.make_node(
            "Gather", [f"{weight}.offsets", ids], [f"{base}/rows"], f"{base}/Gather", axis=0
        ),
        helper.make_node(
            "Unsqueeze",
            [f"{base}/rows", f"{base}/last_axis"],
            [f"{base}/per_block"],
            f"{base}/Unsqueeze",
        ),
        helper.make_node("Add", [f"{base}/x", f"{base}/per_block"], [f"{base}/sum"], f"{base}/Add"),
        helper.make_node("Reshape", [f"{base}/sum", f"{base}/joined"], [out], f"{base}/Reshape_1"),
    ]
    return nodes, inits
