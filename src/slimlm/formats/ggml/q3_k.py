"""Q3_K: 256-value super-blocks of 16 sub-blocks, 3-bit quants, 6-bit signed sub-block scales, fp16 d.

Layout (110 bytes): hmask[32] (bit b of byte m = high bit of value 32*b + m), qs[64] (two low bits;
byte 32h + l holds values 128h + l + 32k at shift 2k), scales[12] (6-bit scales + 32: low nibbles in
bytes 0..7, j and j+8 sharing a byte; top two bits in bytes 8..11 at shift 2*(j//4) of byte 8 + j%4),
d f16. Encoding is ggml-quants.c ``quantize_row_q3_K_ref`` (x^2-weighted coordinate descent per
sub-block, scales from the largest) or, with an imatrix, ``quantize_row_q3_K_impl`` (weighted scale
searches for the quants and for the scales themselves).
"""

from __future__ import annotations

import numpy as np

from .common import (F32, clip_nearest, first_absmax, fp16_bits, fp16_round, make_q3_quants, make_qx_quants, nearest_int,
                     seq_sum, seq_sum_last)


def _sub_major(a: np.ndarray) -> np.ndarray:
    """[B*256] -> element-major [16, B*16] (one column per 16-value sub-block)."""
    return np.ascontiguousarray(np.asarray(a, dtype=F32).reshape(-1, 16).T)


def _pack_scales(ls: np.ndarray) -> np.ndarray:
    """[B, 16] values 0..63 -> [B, 12] bytes."""
    nb = ls.shape[0]
    out = np.zeros((nb, 12), dtype=np.int32)
    out[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = (ls >> 4).reshape(nb, 4, 4)  # [B, j//4, j%4]
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out.astype(np.uint8)


def _unpack_scales(sc: np.ndarray) -> np.ndarray:
    """[B, 12] bytes -> [B, 16] signed scales (-32..31)."""
    nb = sc.shape[0]
    low = np.concatenate([sc[:, :8] & 0xF, sc[:, :8] >> 4], axis=1).astype(np.int32)
    high = ((sc[:, 8:12][:, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, :, None]) & 3).reshape(nb, 16)
    return (low | (high.astype(np.int32) << 4)) - 32


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = x.shape[0]
    xs = np.asarray(x, dtype=F32).reshape(-1, 16, 16)
    nb = xs.shape[0]
    xe = _sub_major(xs)
    if imatrix is None:
        scales, L = make_q3_quants(xe, 4)
        scales = scales.reshape(nb, 16)
        amax, max_scale = first_absmax(scales.T)
        has = max_scale != 0
        safe = np.where(has, max_scale, F32(1)).astype(F32)
        iscale = F32(-32) / safe
        ls = np.clip(nearest_int(iscale[:, None] * scales), -32, 31) + 32
        ls = np.where(has[:, None], ls, 0)
        d = np.where(has, F32(1) / iscale, F32(0)).astype(F32)
    else:
        xb = xs.reshape(nb, 256)
        sigma2 = (F32(2) * seq_sum_last(xb * xb)) / F32(256)
        weight = _sub_major(imatrix) * np.sqrt(np.repeat(sigma2, 16)[None] + xe * xe)
        sw = seq_sum(weight).reshape(nb, 16)
        scales, L = make_qx_quants(xe, 4, weight)
        d, ls = make_qx_quants(np.ascontiguousarray(scales.reshape(nb, 16).T), 32, np.ascontiguousarray(sw.T))
        ls = ls.T
    L = np.ascontiguousarray(L.T).reshape(nb, 16, 16)
    scale_bytes = _pack_scales(ls)
    dq = fp16_round(d)[:, None] * _unpack_scales(scale_bytes).astype(F32)  # [B, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = clip_nearest(xs / np.where(dq != 0, dq, F32(1))[:, :, None], -4, 3) + 4
    L = np.where((dq != 0)[:, :, None], lq, L).reshape(nb, 256)

    hbit = (L > 3).reshape(nb, 8, 32).astype(np.uint8)  # [B, bit, m]
    hmask = np.bitwise_or.reduce(hbit << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    L = (L & 3).reshape(nb, 2, 4, 32)
    qs = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    dbytes = fp16_bits(d).astype("<u2").view(np.uint8).reshape(nb, 2)
    out = np.concatenate([hmask, qs.astype(np.uint8).reshape(nb, 64), scale_bytes, dbytes], axis=1)
    return out.reshape(rows, -1)


def fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d as float32 [S], the 16 signed scales [S, 16] (-32..31), signed codes [S, 16, 16] int8 in -4..3, in value
    order) of Q3_K super-blocks: x = d·sc·q per 16 values."""
    b = np.ascontiguousarray(data).reshape(-1, 110)
    nb = b.shape[0]
    hmask = b[:, :32]
    qs = b[:, 32:96].reshape(nb, 2, 1, 32)
    low = (qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3  # [B, half, k, l]
    hi = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [B, 8, 32]
    q = low.astype(np.int8) - np.where(hi.reshape(nb, 2, 4, 32) != 0, 0, 4).astype(np.int8)
    d = b[:, 108:110].copy().view("<f2")[:, 0].astype(F32)
    return d, _unpack_scales(b[:, 96:108]), q.reshape(nb, 16, 16)


def decode(data: np.ndarray) -> np.ndarray:
    d, sc, q = fields(data)
    return ((d[:, None, None] * sc.astype(F32)[:, :, None]) * q.astype(F32)).reshape(data.shape[0], -1)
