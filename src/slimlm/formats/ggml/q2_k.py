"""Q2_K: 256-value super-blocks of 16 sub-blocks of 16, 2-bit quants, 4-bit sub-block scales and mins.

Layout (84 bytes): scales[16] (low nibble scale, high nibble min), qs[64], d f16, dmin f16.
In each half of 128 values, qs byte l holds values l, l+32, l+64, l+96 at shifts 0, 2, 4, 6.
x ~ d*(s & 15)*q - dmin*(s >> 4). Encoding follows ggml-quants.c ``quantize_row_q2_K_ref`` (|x|-weighted
``make_qkx2_quants`` with mean-absolute error) without an importance matrix and
``quantize_row_q2_K_impl`` (``make_qkx3_quants`` + ``make_qp_quants``) with one.
"""

from __future__ import annotations

import numpy as np

from .common import (F32, QK_K, element_major, fp16_bits, fp16_value, make_qkx_quants, make_qp_quants,
                             nearest_int, requantize_levels, seq_sum, superblock_rows)

BLOCK_BYTES = 84


def _scales_ref(xe: np.ndarray, S: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q2_K_ref's search: returns (scale bytes [S, 16] int32, d bits, dmin bits, L [16, 16S])."""
    scales, mins, L = make_qkx_quants(xe, np.abs(xe), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(S, 16), mins.reshape(S, 16)
    max_scale = np.maximum(np.maximum.reduce(scales, axis=1), F32(0))
    max_min = np.maximum(np.maximum.reduce(mins, axis=1), F32(0))
    has_s, has_m = max_scale > 0, max_min > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = nearest_int((F32(15) / max_scale)[:, None] * scales)
        lm = nearest_int((F32(15) / max_min)[:, None] * mins)
    ls = np.where(has_s[:, None], ls, 0)
    lm = np.where(has_m[:, None], lm, 0)
    sbytes = (ls & 0xFF) | ((lm << 4) & 0xFF)
    d_bits = fp16_bits(np.where(has_s, max_scale / F32(15), F32(0)))
    dmin_bits = fp16_bits(np.where(has_m, max_min / F32(15), F32(0)))
    return sbytes, d_bits, dmin_bits, L


def _scales_imatrix(xe: np.ndarray, x_rows: np.ndarray, qw_rows: np.ndarray, S: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q2_K_impl's search under importance weights (same outputs as ``_scales_ref``)."""
    xs = element_major(x_rows, QK_K)
    sigma2 = seq_sum(xs * xs) / F32(QK_K)
    w = element_major(qw_rows, 16) * np.sqrt(np.repeat(sigma2, 16)[None, :] + xe * xe)
    sw = seq_sum(w)
    scales, mins, L = make_qkx_quants(xe, w, 3, -0.9, 0.05, 36, use_mad=False)
    swT = np.ascontiguousarray(sw.reshape(S, 16).T)
    dm, Ls = make_qp_quants(np.ascontiguousarray(scales.reshape(S, 16).T), 15, swT)
    mm, Lm = make_qp_quants(np.ascontiguousarray(mins.reshape(S, 16).T), 15, swT)
    sbytes = (Ls.T | (Lm.T << 4)) & 0xFF
    return sbytes, fp16_bits(dm), fp16_bits(mm), L


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = superblock_rows(x, "Q2_K")
    S = rows.size // QK_K
    xe = element_major(rows, 16)  # [16, 16S]
    if imatrix is None:
        sbytes, d_bits, dmin_bits, L = _scales_ref(xe, S)
    else:
        qw = np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape)
        sbytes, d_bits, dmin_bits, L = _scales_imatrix(xe, rows, qw, S)
    dsub = (fp16_value(d_bits)[:, None] * (sbytes & 0xF).astype(F32)).reshape(-1)
    msub = (fp16_value(dmin_bits)[:, None] * (sbytes >> 4).astype(F32)).reshape(-1)
    L = requantize_levels(xe, dsub, msub, 3, L)
    L = np.ascontiguousarray(L.T).reshape(S, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).astype(np.uint8)
    out = np.empty((S, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:16] = sbytes
    out[:, 16:80] = qs.reshape(S, 64)
    out[:, 80:82] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 82:84] = dmin_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    return out.reshape(rows.shape[0], -1)


def fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(d, dmin as float32 [S], scales and mins [S, 16] (0..15, one per 16 values), codes [S, 16, 16] uint8 in
    0..3, in value order) of Q2_K super-blocks: x = d·sc·q - dmin·m per 16 values."""
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    S = blocks.shape[0]
    sc = blocks[:, 0:16]
    d = fp16_value(blocks[:, 80:82].copy().view("<u2")[:, 0])
    dmin = fp16_value(blocks[:, 82:84].copy().view("<u2")[:, 0])
    qs = blocks[:, 16:80].reshape(S, 2, 1, 32)
    q = ((qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3).reshape(S, 16, 16)
    return d, dmin, sc & 0xF, sc >> 4, q


def decode(data: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = fields(data)
    dl = (d[:, None] * sc.astype(F32))[:, :, None]
    ml = (dmin[:, None] * m.astype(F32))[:, :, None]
    return (dl * q.astype(F32) - ml).reshape(*data.shape[:-1], -1)


__all__ = ["BLOCK_BYTES", "QK_K", "decode", "encode", "fields"]
