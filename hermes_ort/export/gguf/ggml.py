"""GGML block types -> NBitsWeight, exactly (every value equal to gguf-py's dequantization).

A GGUF tensor's bytes, read as [N, K] (ggml's ne = [K, N]: the HF Linear layout), are blocked
along K like MatMulNBits' B; only the inside of each block is rearranged. With c = 2**(bits - 1),
MatMulNBits' default zero point, each type is s * (q' - c) + o (`d`, `m`, `dmin` float16):

    Q4_0  d (q - 8)                      4-bit block 32, q' = q
    Q4_1  d q + m                        4-bit block 32, q' = q, o = m + 8 d
    Q5_0  d (q - 16)                     8-bit block 32, q' = q + 112
    Q5_1  d q + m                        8-bit block 32, q' = q + 112, o = m + 16 d
    Q8_0  d q (q int8)                   8-bit block 32, q' = q + 128
    Q4_K  d sc_j q - dmin m_j            4-bit block 32, s = d sc_j, o = 8 s - dmin m_j
    Q5_K  d sc_j q - dmin m_j (q 5-bit)  8-bit block 32, q' = q + 112, o = 16 s - dmin m_j
    Q6_K  d sc_j (q - 32) (q 6-bit)      8-bit block 16, q' = q + 96, s = d sc_j

Other types (F32/F16/BF16 and the quantizations with no exact 4/8-bit form: Q2_K, Q3_K, IQ*)
are dequantized to float32 by the caller."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hermes_ort.export.nbits import NBitsWeight


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float32 [rows, 1]."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] bytes -> [blocks, 32] values: byte j holds q[j] low, q[j + 16] high."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's qh (uint32 per block: bit i is bit 4 of element i) -> [blocks, 32] 0 or 16."""
    word = np.ascontiguousarray(qh).view(np.uint32)
    return (((word >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)


def _weight(q, scales, offsets, bits: int, block: int, n: int, k: int) -> NBitsWeight:
    off = None if offsets is None else offsets.reshape(n, k // block).astype(np.float32)
    return NBitsWeight(
        q.reshape(n, k).astype(np.uint8),
        scales.reshape(n, k // block).astype(np.float32),
        off,
        bits,
        block,
    )


def q4_0(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    b = raw.reshape(-1, 18)  # d, 16 bytes of nibbles
    return _weight(_nibbles(b[:, 2:]), _f16(b[:, :2]), None, 4, 32, n, k)


def q4_1(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    b = raw.reshape(-1, 20)  # d, m, 16 bytes of nibbles; d q + m = d (q - 8) + (m + 8 d)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _weight(_nibbles(b[:, 4:]), d, m + 8 * d, 4, 32, n, k)


def q5_0(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    b = raw.reshape(-1, 22)  # d, qh, 16 bytes of nibbles; d (q - 16) = d (q + 112 - 128)
    q = _nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])
    return _weight(q + 112, _f16(b[:, :2]), None, 8, 32, n, k)


def q5_1(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    b = raw.reshape(-1, 24)  # d, m, qh, nibbles; d q + m = d (q + 112 - 128) + (m + 16 d)
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])
    return _weight(q + 112, d, m + 16 * d, 8, 32, n, k)


def q8_0(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    b = raw.reshape(-1, 34)  # d, 32 int8; d q = d ((q + 128) - 128)
    q = (b[:, 2:] ^ 0x80).astype(np.uint8)  # int8 + 128, as uint8
    return _weight(q, _f16(b[:, :2]), None, 8, 32, n, k)


def _k_scales(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and eight 6-bit mins -> ([n, 8], [n, 8])."""
    s = sc12.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 63, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 63, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_quant(raw: np.ndarray, width: int):
    """Q4_K/Q5_K super-blocks of 256: (sub-block scales s [n, 8], mins [n, 8], 4-bit q [n, 8, 32],
    the bytes [n, width])."""
    b = raw.reshape(-1, width)  # d, dmin, 12 bytes of scales, (Q5_K: 32 bytes qh), 128 bytes qs
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(-1, 4, 32)  # each 64-value group: sub-block 2g low, 2g + 1 high
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)
    return d * sc, dmin * mn, q, b


def q4_k(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    s, mins, q, _ = _k_quant(raw, 144)  # s q - mins = s (q - 8) + (8 s - mins)
    return _weight(q, s, 8 * s - mins, 4, 32, n, k)


def q5_k(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    s, mins, q, b = _k_quant(raw, 176)
    qh = b[:, 16:48]  # bit j of byte i: bit 4 of element i of sub-block j
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = q | (high << 4)  # s q - mins = s (q + 112 - 128) + (16 s - mins)
    return _weight(q + 112, s, 16 * s - mins, 8, 32, n, k)


def q6_k(raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    b = raw.reshape(-1, 210)  # ql 128, qh 64, 16 int8 scales, d
    ql, qh = b[:, :128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 1, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210])
    low = np.stack([ql & 15, ql >> 4], axis=2).reshape(-1, 256)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = low | (high.reshape(-1, 256) << 4)  # d sc (q - 32) = d sc ((q + 96) - 128)
    return _weight(q + 96, d * sc, None, 8, 16, n, k)


# GGML type name -> (converter, what MatMulNBits keeps: the manifest's record)
CONVERTERS: dict[str, tuple[Callable[[np.ndarray, int, int], NBitsWeight], str]] = {
    "Q4_0": (q4_0, "MatMulNBits 4-bit block 32"),
    "Q4_1": (q4_1, "MatMulNBits 4-bit block 32 + offsets"),
    "Q5_0": (q5_0, "MatMulNBits 8-bit block 32"),
    "Q5_1": (q5_1, "MatMulNBits 8-bit block 32 + offsets"),
    "Q8_0": (q8_0, "MatMulNBits 8-bit block 32"),
    "Q4_K": (q4_k, "MatMulNBits 4-bit block 32 + offsets"),
    "Q5_K": (q5_k, "MatMulNBits 8-bit block 32 + offsets"),
    "Q6_K": (q6_k, "MatMulNBits 8-bit block 16"),
}


def to_nbits(kind: str, raw: np.ndarray, n: int, k: int) -> NBitsWeight:
    """The GGUF tensor `raw` (its bytes, any shape) of GGML type `kind`, shape [n, k]."""
    return CONVERTERS[kind][0](np.asarray(raw, np.uint8).reshape(-1), n, k)
