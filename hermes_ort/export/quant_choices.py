"""The closed sets of the quantization options, light to import (the CLI takes its choices from
them before numpy or onnx are loaded)."""

from __future__ import annotations

from hermes_ort.core.choices import Choice


class Mode(Choice):
    INT4 = "int4"
    INT8 = "int8"


class Method(Choice):
    NBITS = "nbits"  # MatMulNBits / GatherBlockQuantized, weights rounded offline
    DYNAMIC = "dynamic"  # MatMulInteger, activations quantized per tensor at run time (int8)


class Algorithm(Choice):
    """How weights are rounded (`--quant-algorithm`; quant_methods.py)."""

    RTN = "rtn"  # round to nearest, symmetric
    RTN_ZERO_POINT = "rtn-zero-point"  # round to nearest on an integer zero point
    MINMAX = "minmax"  # the block's min .. max in equal steps (GGUF's Q4_1)
    MINMAX_SEARCH = "minmax-search"  # minmax, the range refitted to the least squared error
    HQQ = "hqq"  # half-quadratic: the zero point fitted to an lp-norm of the error
