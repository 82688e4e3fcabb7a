"""IQ4_NL: 32-value blocks of 4-bit indices into a fixed non-linear table, one fp16 scale per block.

Layout: d f16 + 16 bytes (index j low nibble, j+16 high). Encoding follows ggml-quants.c
``quantize_iq4_nl`` (what llama_model_quantize calls, with or without an imatrix): weights x^2 (or
imatrix * sqrt(2*mean(x^2) + x^2) over the block), a least-squares scale from the block max and 15
nudged inverse scales, then the indices re-picked with the chosen scale.
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, element_major, first_absmax, fp16_bits, seq_sum

QK = 32
VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_VALUES_F = VALUES.astype(F32)
# ggml's best_index_int8 picks index i once 2x reaches val[i-1] + val[i] (its float compares are exact for
# these magnitudes; ties go up). Those midpoints are integers, so 2x >= t  <=>  floor(2x) >= t, and a lookup
# table on floor(2x) replaces the binary search.
_THRESHOLDS = (VALUES[:-1].astype(np.int32) + VALUES[1:].astype(np.int32))
_LO, _HI = int(_THRESHOLDS[0]) - 1, int(_THRESHOLDS[-1])
_INDEX_LUT = np.searchsorted(_THRESHOLDS, np.arange(_LO, _HI + 1), side="right").astype(np.int32)
_VALUE_LUT = _VALUES_F[_INDEX_LUT]
NTRY = 7


def _lut_pos(x: np.ndarray) -> np.ndarray:
    v = np.add(x, x)
    np.floor(v, out=v)
    np.fmin(v, F32(_HI), out=v)  # NaN (inf scale times 0) -> last index, where C's binary search ends
    np.fmax(v, F32(_LO), out=v)
    v -= F32(_LO)
    return v.astype(np.intp)


def best_index(x: np.ndarray) -> np.ndarray:
    """Nearest table entry index for each value (ties go up, as in ggml)."""
    with np.errstate(invalid="ignore"):
        return _INDEX_LUT[_lut_pos(x)]


def _fit(xe: np.ndarray, w: np.ndarray, inv_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    q = _VALUE_LUT[_lut_pos(inv_scale[None] * xe)]
    wq = w * q
    sumq2 = seq_sum(wq * q)
    return seq_sum(np.multiply(wq, xe, out=wq)), sumq2


def block_weights(xe: np.ndarray, imatrix_e: np.ndarray | None, sigma2: np.ndarray | None = None) -> np.ndarray:
    """The fit's weights: x^2, or imatrix * sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2) over the
    (super-)block that ggml passes to ``quantize_row_iq4_nl_impl`` (``sigma2`` [G], default: this block)."""
    if imatrix_e is None:
        return xe * xe
    if sigma2 is None:
        sigma2 = seq_sum(xe * xe) * (F32(2) / F32(QK))
    return imatrix_e * np.sqrt(sigma2[None] + xe * xe)


def block_scales(xe: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each 32-value block's least-squares scale: the block max and 15 nudged inverse scales, keeping the best
    weighted fit (0 for an all-zero block). xe, w: [32, G] element-major -> d [G] float32 (not fp16-rounded)."""
    amax, vmax = first_absmax(xe)
    zero = amax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax).astype(F32)
    v0 = _VALUES_F[0]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -vmax / v0
        sumqx, sumq2 = _fit(xe, w, F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), F32(0)).astype(F32)
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            inv = F32(itry + int(VALUES[0])) / vmax
            sqx, sq2 = _fit(xe, w, inv)
            better = (sq2 > 0) & (sqx * sqx > best * sq2)
            if better.any():
                d = np.where(better, sqx / np.where(sq2 > 0, sq2, F32(1)), d).astype(F32)
                best = np.where(better, d * sqx, best).astype(F32)
    return np.where(zero, F32(0), d).astype(F32)


def pack_indices(L: np.ndarray) -> np.ndarray:
    """[B, 32] indices -> [B, 16] bytes: index j in the low nibble, j+16 in the high one."""
    return (L[:, :16] | (L[:, 16:] << 4)).astype(np.uint8)


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = x.shape[0]
    xe = element_major(x, QK)
    d = block_scales(xe, block_weights(xe, None if imatrix is None else element_major(imatrix, QK)))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
    L = best_index(inv[None] * xe).T  # [B, 32]
    dbytes = fp16_bits(d).astype("<u2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([dbytes, pack_indices(L)], axis=1).reshape(rows, -1)


def fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d as float32 [B], codes as int8 [B, 32]: the table values, -127..113) of IQ4_NL blocks: x = d·q."""
    b = np.ascontiguousarray(data).reshape(-1, 18)
    qs = b[:, 2:]
    idx = np.concatenate([qs & 0xF, qs >> 4], axis=1)
    return b[:, :2].copy().view("<f2")[:, 0].astype(F32), VALUES.astype(np.int8)[idx]


def decode(data: np.ndarray) -> np.ndarray:
    d, q = fields(data)
    return (d[:, None] * q.astype(F32)).reshape(data.shape[0], -1)
