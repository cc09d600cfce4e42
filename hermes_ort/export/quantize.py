"""Weight-only quantization of a block (or the whole model), the manifest's record of it.

- int4: every MatMul with a constant weight becomes MatMulNBits (4-bit, blocks of `block_size`
  along K, symmetric by default, int8 activations at accuracy level 4), and embedding tables
  (Gather of a constant) become GatherBlockQuantized; ONNX Runtime's MatMulNBitsQuantizer does it
  (round to nearest by default, or HQQ). MatMulNBits runs its fast kernel only on prepacked
  weights: these blocks are opened with prepacking (docs/design.md §2.7).
- int8: `method="nbits"` (decoders' default): MatMulNBits with 8 bits, prepacked like int4;
  `method="dynamic"` (encoders' default): ONNX Runtime's dynamic quantization (MatMulInteger, per
  channel weights, each activation tensor quantized at run time with one scale): it runs without
  prepacking (a streamed block opens in milliseconds, weights file-backed), but the one scale
  costs accuracy (`Quantization.for_model`).

A tied embedding keeps one table: only the MatMul side (the LM head) is quantized when the same
initializer also feeds a Gather, which then reads it as it was."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hermes_ort.export.errors import ExportError

MODES = ("int4", "int8")
METHODS = ("nbits", "dynamic")
ALGORITHMS = ("rtn", "hqq")
# the floors the export's verification holds a quantized model to: cosine similarity of the
# logits (or the last hidden state) with PyTorch fp32's, on the verification sample
COSINE_FLOOR = {"int8": 0.999, "int4": 0.99}


@dataclass(frozen=True)
class Quantization:
    mode: str  # "int4" | "int8"
    method: str | None = "nbits"  # "nbits" (MatMulNBits) | "dynamic" (MatMulInteger, int8 only)
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits' compute: 4 = int8 activations, 1 = fp32
    algorithm: str = "rtn"  # round to nearest | "hqq"
    embeddings: bool = True  # Gather tables too (int4, nbits)
    head_bits: int = 8  # the LM head's bits under int4 (llama.cpp keeps its output tensor at 6)
    cosine_floor: float | None = None  # the verification's floor; None: COSINE_FLOOR[mode]

    @classmethod
    def make(cls, mode: str, method: str | None = None, **kw) -> Quantization:
        if mode not in MODES:
            raise ExportError(f"--quantize {mode}: choose from {', '.join(MODES)}")
        method = method or ("nbits" if mode == "int4" else None)  # int8: for_model decides
        if method not in (*METHODS, None) or (mode == "int4" and method == "dynamic"):
            raise ExportError(f"--quantize {mode} with method '{method}' is not supported")
        q = cls(mode, method, **kw)
        if q.algorithm not in ALGORITHMS:
            raise ExportError(f"quantization algorithm '{q.algorithm}': choose from {ALGORITHMS}")
        if q.cosine_floor is not None and not 0 < q.cosine_floor <= 1:
            raise ExportError(f"--accuracy-floor {q.cosine_floor}: a cosine in (0, 1]")
        if q.algorithm == "hqq" and q.embeddings and q.mode == "int4":
            raise ExportError(
                "--quant-algorithm hqq does not quantize embedding tables (ONNX Runtime's HQQ "
                "has no Gather): add --quant-no-embeddings"
            )
        if q.head_bits not in (4, 8):
            raise ExportError(f"--quant-head-bits {q.head_bits}: 4 or 8")
        if q.block_size < 16 or q.block_size & (q.block_size - 1):
            raise ExportError(f"block size {q.block_size} must be a power of two, >= 16")
        return q

    def for_model(self, decoder: bool) -> Quantization:
        """int8's method where none was asked, by measurement (docs/design.md §2.7): decoders
        MatMulNBits (dynamic's one scale per activation tensor put a tiny Llama's logits at
        cosine 0.996, MatMulNBits at 0.99996), encoders dynamic (MatMulNBits 8-bit runs
        bert-large's 128-token pass 3.7x slower than fp32 here; dynamic runs unpacked)."""
        if self.method is not None:
            return self
        return replace(self, method="nbits" if decoder else "dynamic")

    @property
    def bits(self) -> int:
        return 4 if self.mode == "int4" else 8

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cosine_floor": floor_of(asdict(self))}


def floor_of(q: dict[str, Any]) -> float:
    """The cosine floor of a quantization record (the manifest's, or Quantization's fields)."""
    return q.get("cosine_floor") or COSINE_FLOOR[q["mode"]]


def _tied_tables(model) -> set[str]:
    """Initializers read by a Gather and a MatMul both (a tied embedding/head)."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    multiplied = {n.input[1] for n in model.graph.node if n.op_type in ("MatMul", "FusedMatMul")}
    return gathered & multiplied


def quantize_model(model, q: Quantization):
    """`model` (a ModelProto with its weights loaded) with its weights quantized."""
    with _quantizer_logs_off():
        if q.method == "dynamic":
            return _dynamic(model)
        head = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
        if q.bits == 4 and q.head_bits == 8 and head:  # the head alone at 8 bits, then the rest
            model = _nbits(model, replace(q, mode="int8", embeddings=False), only=head)
        return _nbits(model, q)


@contextlib.contextmanager
def _quantizer_logs_off():
    """Only errors from ONNX Runtime's quantizers: they log each node at INFO, and warn through
    the root logger (opset < 21 "may not be a valid model": the verification runs it; "consider
    pre-processing"). Importing matmul_nbits_quantizer calls logging.basicConfig(level=INFO),
    which would print every library's INFO logs from then on: undone."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401  (its basicConfig)

    root.handlers[:] = handlers
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _nbits(model, q: Quantization, only: list[str] | None = None):
    """MatMulNBits for the MatMuls with constant weights (those named `only`, or all)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    tied = _tied_tables(model)
    ops = ("MatMul", "Gather") if q.embeddings and q.mode == "int4" else ("MatMul",)
    exclude = [n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] in tied]
    if only is not None:
        exclude += [
            n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in only
        ]
    axes = (("MatMul", 0), ("Gather", 1))
    if q.algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(
            block_size=q.block_size, bits=q.bits, op_types_to_quantize=ops, quant_axes=axes
        )
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(
            block_size=q.block_size,
            is_symmetric=q.symmetric,
            accuracy_level=q.accuracy_level,
            op_types_to_quantize=ops,
            quant_axes=axes,
            bits=q.bits,
        )
    quantizer = mnq.MatMulNBitsQuantizer(
        model,
        bits=q.bits,
        block_size=q.block_size,
        is_symmetric=q.symmetric,
        accuracy_level=q.accuracy_level,
        nodes_to_exclude=exclude,
        op_types_to_quantize=ops,
        quant_axes=axes,
        algo_config=config,
    )
    quantizer.process()
    return quantizer.model.model


def _dynamic(model):
    """int8 dynamic quantization of the MatMuls with constant weights, in memory."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="hermes-q8-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save_model(model, str(src), save_as_external_data=True, location="in.data")
        quantize_dynamic(
            src,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=True,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
        )
        return onnx.load(str(dst))


def quantize_file(src: Path, dst: Path, q: Quantization) -> None:
    """Quantize the ONNX file `src` (weights beside it) into `dst` + `dst.bin` (store_blocks
    lays it out afterwards, as it does ORT's optimised blocks)."""
    import onnx

    from hermes_ort.export.storage import save_with_data

    model = onnx.load(str(src))  # the block's weights, loaded: one block at a time
    quantized = quantize_model(model, q)
    save_with_data(quantized, dst, dst.stem + ".bin")


def check_accuracy(mode: str, cosine: float, output: str, floor: float) -> None:
    if not cosine >= floor:
        raise ExportError(
            f"verification failed: the {mode} model's '{output}' has cosine similarity "
            f"{cosine:.5f} with PyTorch fp32's, below the floor {floor} for {mode} "
            "(--accuracy-floor sets another)"
        )
