"""How a float weight becomes block-quantized codes: the quantization algorithms, in numpy.

Each takes a weight [N, K] (a Linear's layout: blocks of `block_size` along K) and returns an
nbits.NBitsWeight, value = scale * (q - 2**(bits - 1)) + offset per block. The midpoint is
MatMulNBits' default zero point, so every algorithm runs on ONNX Runtime's fast packed kernel
(a float zero point would not: docs/quantization.md); an asymmetric grid is carried by the
per-block offset, added outside the kernel.

- rtn: round to nearest, symmetric (the block's largest magnitude maps to code 0; no offset).
- rtn-zero-point: round to nearest on an integer zero point, the block's range widened to hold
  0 (ONNX Runtime's asymmetric RTN); the zero point is carried as an offset.
- minmax: the block's min .. max in 2**bits - 1 equal steps (GGUF's Q4_1 rounding).
- minmax-search: minmax's grid, then per block the scale and offset refitted by least squares
  to candidate codes from a sweep of narrower ranges; the lowest squared error wins.
- hqq: half-quadratic quantization (HQQ): minmax's grid, its zero point moved by a few proximal
  steps that minimise an lp-norm (p < 1) of the error, robust to outliers.

Every algorithm treats each (row, block) alone, so quantizing q, k and v apart or packed as QKV
gives the same codes (fake_quantize_model relies on it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hermes_ort.export.nbits import BLOCK_SIZES, NBitsWeight
from hermes_ort.export.quant_choices import Algorithm

CHUNK_ELEMENTS = 1 << 20


def block_size_for(k: int, block_size: int) -> int | None:
    """The block size a weight of K inputs is quantized with: the one asked when it divides K,
    else the largest smaller one that does (MatMulNBits' forms need whole blocks), else None:
    the weight stays fp32."""
    for size in sorted((s for s in BLOCK_SIZES if s <= block_size), reverse=True):
        if k % size == 0:
            return size
    return None


def quantize_weight(w: np.ndarray, bits: int, block_size: int, algorithm: Algorithm) -> NBitsWeight:
    """w [N, K] (K a multiple of block_size) as `algorithm` rounds it."""
    n, k = w.shape
    blocks = np.asarray(w, np.float32).reshape(n, k // block_size, block_size)
    run = _ALGORITHMS[Algorithm(algorithm)]
    q, scales = np.empty((n, k), np.uint8), np.empty((n, k // block_size), np.float32)
    offsets = None
    rows = max(1, CHUNK_ELEMENTS // k)  # float64 temporaries of a few MB, not of the tensor
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        codes, scale, offset = run(blocks[part].astype(np.float64), bits)
        q[part], scales[part] = codes.reshape(-1, k), scale
        if offset is not None:
            offsets = np.zeros_like(scales) if offsets is None else offsets
            offsets[part] = offset
    return NBitsWeight(q, scales, offsets, bits, block_size)


# Each algorithm: blocks [N, B, bs] (float64) -> (codes [N, B, bs], scales [N, B], offsets [N, B]
# or None), value = scale * (code - mid) + offset.
Result = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _rtn(x: np.ndarray, bits: int) -> Result:
    mid = 1 << (bits - 1)
    lo, hi = x.min(-1), x.max(-1)
    signed_max = np.where(np.abs(hi) > np.abs(lo), hi, lo)  # the largest magnitude, signed
    scale = signed_max / -mid  # it lands on code 0, the far end of the range
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.rint(x / safe[..., None]), -mid, mid - 1) + mid
    return q, scale, None


def _rtn_zero_point(x: np.ndarray, bits: int) -> Result:
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    lo, hi = np.minimum(x.min(-1), 0.0), np.maximum(x.max(-1), 0.0)
    scale = (hi - lo) / top
    safe = np.where(scale == 0, 1.0, scale)
    zero = np.clip(np.rint(-lo / safe), 0, top)
    zero = np.where(scale == 0, mid, zero)
    q = np.clip(np.rint(x / safe[..., None] + zero[..., None]), 0, top)
    return q, scale, scale * (mid - zero)  # scale * (q - zero) = scale * (q - mid) + offset


def _affine(x: np.ndarray, bits: int, lo: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Nearest codes of x on the grid lo + scale * code (a refitted scale may be negative; a
    zero scale: every code 0)."""
    safe = np.where(scale == 0, 1.0, scale)
    return np.clip(np.rint((x - lo[..., None]) / safe[..., None]), 0, (1 << bits) - 1)


def _minmax(x: np.ndarray, bits: int) -> Result:
    lo, hi = x.min(-1), x.max(-1)
    scale = (hi - lo) / ((1 << bits) - 1)
    q = _affine(x, bits, lo, scale)
    return q, scale, lo + scale * (1 << (bits - 1))  # scale * q + lo


SEARCH_STEPS = 20  # candidate ranges per block, as llama.cpp's make_qkx2_quants sweeps them
SEARCH_SPAN = 0.1  # each step widens the grid by this many codes


def _minmax_search(x: np.ndarray, bits: int) -> Result:
    """For each candidate inverse scale (top + t) / (hi - lo), t in -1 .. 1: codes by rounding,
    then the least-squares (scale, lo) for those codes; the best squared error per block."""
    top, n = (1 << bits) - 1, x.shape[-1]
    lo, hi = x.min(-1), x.max(-1)
    best_scale = (hi - lo) / top
    best_lo = lo.copy()
    best_err = _sq_error(x, _affine(x, bits, lo, best_scale), best_scale, lo)
    width = np.where(hi > lo, hi - lo, 1.0)
    sx = x.sum(-1)
    for step in range(SEARCH_STEPS + 1):
        inverse = (top - 1 + SEARCH_SPAN * step) / width
        q = np.clip(np.rint((x - lo[..., None]) * inverse[..., None]), 0, top)
        sq, sqq, sqx = q.sum(-1), (q * q).sum(-1), (q * x).sum(-1)
        det = n * sqq - sq * sq
        ok = det > 0
        safe = np.where(ok, det, 1.0)
        scale = np.where(ok, (n * sqx - sq * sx) / safe, best_scale)
        new_lo = np.where(ok, (sqq * sx - sq * sqx) / safe, best_lo)
        err = _sq_error(x, q, scale, new_lo)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_lo = np.where(better, new_lo, best_lo)
    # the codes again on the winning grid: rounding to it can only lower the error further
    q = _affine(x, bits, best_lo, best_scale)
    return q, best_scale, best_lo + best_scale * (1 << (bits - 1))


def _sq_error(x: np.ndarray, q: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return ((scale[..., None] * q + lo[..., None] - x) ** 2).sum(-1)


# HQQ's solver (Badri & Shaji 2023), as ONNX Runtime's quantizer runs it, but with each block
# keeping its own best zero point: a block's result never depends on the rest of the tensor.
HQQ_ITERS, HQQ_P, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01


def _hqq(x: np.ndarray, bits: int) -> Result:
    top = (1 << bits) - 1
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    width = np.where(hi > lo, hi - lo, top)
    inverse = np.minimum(top / width, 2e4)  # HQQ works with 1 / scale
    zero = np.rint(-lo * inverse)
    best_zero, best_err = zero, np.full(lo.shape, np.inf)
    beta = HQQ_BETA
    for _ in range(HQQ_ITERS):
        q = np.clip(np.rint(x * inverse + zero), 0, top)
        restored = (q - zero) / inverse
        err = np.abs(x - restored).mean(-1, keepdims=True)
        better = err < best_err
        best_zero, best_err = np.where(better, zero, best_zero), np.where(better, err, best_err)
        e = x - restored
        shrunk = np.sign(e) * np.maximum(
            np.abs(e) - np.power(np.abs(e) + 1e-8, HQQ_P - 1) / beta, 0
        )
        zero = np.mean(q - (x - shrunk) * inverse, -1, keepdims=True)
        beta *= HQQ_KAPPA
    q = np.clip(np.rint(x * inverse + best_zero), 0, top)
    scale = (1.0 / inverse)[..., 0]
    return q, scale, scale * ((1 << (bits - 1)) - best_zero[..., 0])


_ALGORITHMS: dict[Algorithm, Callable[[np.ndarray, int], Result]] = {
    Algorithm.RTN: _rtn,
    Algorithm.RTN_ZERO_POINT: _rtn_zero_point,
    Algorithm.MINMAX: _minmax,
    Algorithm.MINMAX_SEARCH: _minmax_search,
    Algorithm.HQQ: _hqq,
}
