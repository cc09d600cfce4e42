"""The rounding algorithms (export/quant_methods.py): each lands in nbits.py's form, reproduces
a weight already on its grid, ranks as measured on real weights, and treats every (row, block)
alone (packing q, k and v together changes nothing)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the exporter's modules need onnx")

from hermes_ort.export.nbits import dequantize  # noqa: E402
from hermes_ort.export.quant_choices import Algorithm  # noqa: E402
from hermes_ort.export.quant_methods import block_size_for, quantize_weight  # noqa: E402


def _weights(n=96, k=256, seed=0) -> np.ndarray:
    """Heavy-tailed like trained weights: Student-t, a few outlier columns."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(5, (n, k)) * 0.02
    w[:, rng.integers(0, k, 4)] *= 3
    return w.astype(np.float32)


def _error(w: np.ndarray, algorithm: Algorithm, bits=4, block=32) -> float:
    q = quantize_weight(w, bits, block, algorithm)
    return float(np.linalg.norm(dequantize(q) - w) / np.linalg.norm(w))


@pytest.mark.parametrize("algorithm", list(Algorithm))
@pytest.mark.parametrize("bits", [4, 8])
def test_every_algorithm_gives_codes_in_range_and_a_small_error(algorithm, bits):
    w = _weights()
    q = quantize_weight(w, bits, 32, algorithm)
    assert q.q.dtype == np.uint8 and q.q.max() < 2**bits and q.scales.shape == (96, 8)
    # 4 bits: ~8% of the weights' norm (RTN measured 8.5-10% on SmolLM2 and MiniLM); 8 bits 16x
    # less: each bit halves the step
    assert _error(w, algorithm, bits) < (0.12 if bits == 4 else 0.12 / 16)


def test_symmetric_rtn_has_no_offset_and_the_affine_ones_do():
    w = _weights()
    assert quantize_weight(w, 4, 32, Algorithm.RTN).offsets is None
    for a in (Algorithm.MINMAX, Algorithm.MINMAX_SEARCH, Algorithm.HQQ, Algorithm.RTN_ZERO_POINT):
        assert quantize_weight(w, 4, 32, a).offsets is not None


def test_a_weight_on_a_4_bit_grid_comes_back_exactly_from_minmax():
    """GGUF's Q4_1 holds scale * q + min per block of 32: minmax recovers it (SmolLM2's
    checkpoint is such a weight), and the search never does worse than the plain grid."""
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.001, 0.01, (64, 8, 1))
    low = rng.uniform(-0.08, -0.01, (64, 8, 1))
    codes = rng.integers(0, 16, (64, 8, 32))
    codes[..., 0], codes[..., 1] = 0, 15  # every block spans its grid
    w = (scale * codes + low).reshape(64, 256).astype(np.float32)
    exact = np.abs(dequantize(quantize_weight(w, 4, 32, Algorithm.MINMAX)) - w).max()
    assert exact <= 1e-6 * np.abs(w).max()
    assert _error(w, Algorithm.MINMAX_SEARCH) <= _error(w, Algorithm.MINMAX) + 1e-7
    assert _error(w, Algorithm.RTN) > 0.05  # the symmetric grid cannot hold it


def test_the_search_beats_the_plain_grids_on_weights_off_any_grid():
    """The order measured on real weights (docs/quantization.md): minmax-search < minmax <
    rtn, at every block size."""
    w = _weights(seed=3)
    for block in (32, 64, 128):
        errors = {a: _error(w, a, 4, block) for a in Algorithm}
        assert errors[Algorithm.MINMAX_SEARCH] < errors[Algorithm.MINMAX] < errors[Algorithm.RTN]
        assert errors[Algorithm.RTN_ZERO_POINT] < errors[Algorithm.RTN]


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_rows_are_quantized_alone_so_packing_qkv_changes_nothing(algorithm):
    q, k = _weights(48, 128, seed=4), _weights(16, 128, seed=5)
    packed = quantize_weight(np.concatenate([q, k]), 4, 32, algorithm)
    apart = [quantize_weight(x, 4, 32, algorithm) for x in (q, k)]
    np.testing.assert_array_equal(
        dequantize(packed), np.concatenate([dequantize(a) for a in apart])
    )


def test_constant_and_zero_blocks_stay_finite():
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.5
    w[2, :32] = -1.0
    for a in Algorithm:
        back = dequantize(quantize_weight(w, 4, 32, a))
        assert np.isfinite(back).all()
        np.testing.assert_allclose(back, w, atol=1e-6, err_msg=a)


def test_a_block_size_that_does_not_divide_k_falls_back_to_one_that_does():
    assert block_size_for(576, 128) == 64  # SmolLM2's hidden size
    assert block_size_for(1536, 128) == 128
    assert block_size_for(24, 32) is None  # no MatMulNBits form: the weight stays fp32
