"""Weight-only quantization of a block (or the whole model), the manifest's record of it, and the
PyTorch twin of what the blocks hold (`fake_quantize_model`, the verification's reference).

- nbits (the default, int4 and int8): every MatMul with a constant weight becomes MatMulNBits,
  embedding tables GatherBlockQuantized, in the forms of nbits.py (no zero-point input: ONNX
  Runtime's fast packed kernel, int8 activations at accuracy level 4); quant_graph.py rewrites
  the graph, quant_methods.py rounds the weights. The LM head and the embedding tables take
  `head_bits`; a tied table is quantized once and stored once. MatMulNBits runs its fast kernel
  only on prepacked weights: these blocks are opened with prepacking (docs/design.md §2.7).
- dynamic (`--quant-method dynamic`, int8 encoders only): ONNX Runtime's dynamic quantization
  (MatMulInteger, per channel weights, each activation tensor quantized at run time with one
  scale): it runs without prepacking (a streamed block opens in milliseconds, weights
  file-backed), but the one scale costs accuracy (all-MiniLM-L6-v2's sentence embeddings at
  cosine 0.984 with fp32's, MatMulNBits 8-bit 0.9994); decoders are refused
  (`Quantization.for_model`).

The defaults are chosen by measurement on real weights (docs/quantization.md)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hermes_ort.core.choices import Choice
from hermes_ort.export.errors import ExportError
from hermes_ort.export.quant_choices import Algorithm, Method, Mode
from hermes_ort.export.quant_graph import Rounding

# per mode, by measurement on SmolLM2-135M (docs/quantization.md): (algorithm, block size).
# int4: minmax at block 32 is the only layout within 1.03x fp32's perplexity (1.002x; rtn 1.097x)
# and the best on off-grid weights too (1.19x; rtn 1.37x); its offset term costs ~20% of decode
# speed against symmetric rtn, which `--quant-algorithm rtn` keeps. int8: rtn at block 32,
# 1.006x, no offset term.
DEFAULTS = {
    Mode.INT4: (Algorithm.MINMAX, 32),
    Mode.INT8: (Algorithm.RTN, 32),
}
# the floors the export's verification holds a quantized model to where it has no PyTorch twin
# of the same weights (dynamic): cosine similarity of the logits (or the last hidden state) with
# PyTorch fp32's, on the verification sample
COSINE_FLOOR = {"int8": 0.999, "int4": 0.99}


@dataclass(frozen=True)
class Quantization:
    mode: Mode
    method: Method = Method.NBITS
    block_size: int = 32
    accuracy_level: int = 4  # MatMulNBits' compute: 4 = int8 activations, 1 = fp32
    algorithm: Algorithm = Algorithm.RTN
    embeddings: bool = True  # Gather tables too (nbits)
    head_bits: int = 8  # the LM head's and the embedding tables' bits under int4
    cosine_floor: float | None = None  # the verification's floor; None: COSINE_FLOOR[mode]

    @classmethod
    def make(
        cls,
        mode: str,
        method: str | None = None,
        block_size: int | None = None,
        algorithm: str | None = None,
        **kw,
    ) -> Quantization:
        """Check a user's choices; None: the mode's default."""
        if mode not in set(Mode):
            raise ExportError(f"--quantize {mode}: choose from {', '.join(Mode)}")
        mode = Mode(mode)
        method = method or Method.NBITS
        if method not in set(Method):
            raise ExportError(f"--quant-method {method}: choose from {', '.join(Method)}")
        if mode == Mode.INT4 and method == Method.DYNAMIC:
            raise ExportError(f"--quantize {mode} with method '{method}' is not supported")
        if algorithm is not None and algorithm not in set(Algorithm):
            raise ExportError(
                f"quantization algorithm '{algorithm}': choose from {', '.join(Algorithm)}"
            )
        default_algorithm, default_block = DEFAULTS[mode]
        q = cls(
            mode,
            Method(method),
            default_block if block_size is None else block_size,
            algorithm=Algorithm(algorithm or default_algorithm),
            **kw,
        )
        if q.cosine_floor is not None and not 0 < q.cosine_floor <= 1:
            raise ExportError(f"--accuracy-floor {q.cosine_floor}: a cosine in (0, 1]")
        if q.head_bits not in (4, 8):
            raise ExportError(f"--quant-head-bits {q.head_bits}: 4 or 8")
        if q.block_size not in (16, 32, 64, 128):
            raise ExportError(f"block size {q.block_size} must be a power of two, 16 .. 128")
        return q

    def for_model(self, decoder: bool) -> Quantization:
        """These settings for a decoder or an encoder. Dynamic is refused for decoders: its one
        int8 scale per activation tensor cannot hold a decoder's outlier channels (SmolLM2-135M's
        MLP down-projection inputs reach 3065 against a median of 0.06, so at that step nearly
        every input rounds to 0; its logits came out at cosine -0.49 with fp32's), where
        MatMulNBits scales activations per block of K."""
        if decoder and self.method == Method.DYNAMIC:
            raise ExportError(
                "--quant-method dynamic is for encoders: it quantizes each activation tensor "
                "with one int8 scale, and a decoder's outlier channels (SmolLM2-135M: inputs up "
                "to 3065, median 0.06) round nearly every other input to 0 (its logits at cosine "
                "-0.49 with fp32's); use --quant-method nbits (the default)"
            )
        return self

    @property
    def bits(self) -> int:
        return 4 if self.mode == Mode.INT4 else 8

    def rounding(self) -> Rounding:
        """How each weight is rounded. Under int4 an 8-bit head and tables take symmetric RTN:
        at 8 bits it is within 0.5% of the weights (docs/quantization.md), and without an
        offset term a tied table's lookup and head share every byte (offsets would be stored
        twice: by row for the lookup, transposed for the head)."""
        head_bits = self.head_bits if self.mode == Mode.INT4 else 8
        eight_under_int4 = self.mode == Mode.INT4 and head_bits == 8
        return Rounding(
            bits=self.bits,
            head_bits=head_bits,
            block_size=self.block_size,
            algorithm=self.algorithm,
            head_algorithm=Algorithm.RTN if eight_under_int4 else self.algorithm,
            accuracy_level=self.accuracy_level,
            embeddings=self.embeddings,
        )

    def to_json(self) -> dict[str, Any]:
        record = {k: str(v) if isinstance(v, Choice) else v for k, v in asdict(self).items()}
        # the floor asked for (--accuracy-floor) is held even where a same-weights reference
        # checks the graph; the default floor only where none does
        return {**record, "accuracy_floor": self.cosine_floor, "cosine_floor": floor_of(record)}


def floor_of(q: dict[str, Any]) -> float:
    """The cosine floor of a quantization record (the manifest's, or Quantization's fields)."""
    return q.get("cosine_floor") or COSINE_FLOOR[q["mode"]]


def quantize_model(model, q: Quantization):
    """`model` (a ModelProto with its weights loaded) with its weights quantized."""
    if q.mode == "gguf":  # a GGUF's own blocks (gguf/source.py): the graph holds them already
        return model
    if q.method == Method.DYNAMIC:
        with _quantizer_logs_off():
            return _dynamic(model)
    from hermes_ort.export.quant_graph import quantize_graph

    return quantize_graph(model, q.rounding())


@contextlib.contextmanager
def _quantizer_logs_off():
    """Only errors from ONNX Runtime's quantizer: it logs each node at INFO and warns through the
    root logger ("consider pre-processing")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


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


def fake_quantize_model(model, q: Quantization) -> bool:
    """Give the torch `model` the weights the blocks hold, quantized then dequantized, in place,
    so PyTorch computes what the blocks compute but for their int8 activations (the
    verification's tight reference). False, the model untouched, where no such twin exists
    (dynamic: activations are quantized per tensor at run time)."""
    if q.method != Method.NBITS or q.mode == "gguf":  # gguf: the model holds its weights already
        return False
    from hermes_ort.export.quant_torch import fake_quantize

    fake_quantize(model, q.rounding())
    return True
