"""Q6_K: 256-value super-blocks of 16 sub-blocks, 6-bit quants, int8 sub-block scales, fp16 super scale.

Layout (210 bytes): ql[128] low nibbles, qh[64] two high bits, scales[16] int8, d f16. Within each half
of 128 values, ql byte l holds values l (low) and l+64 (high), byte l+32 holds l+32 and l+96; qh byte l
holds the high bits of l, l+32, l+64, l+96 at shifts 0, 2, 4, 6. Encoding is ggml-quants.c
``quantize_row_q6_K_ref`` (x^2-weighted scale search per sub-block), or ``quantize_row_q6_K_impl``
whose only difference is that the imatrix is the weight.
"""

from __future__ import annotations

import numpy as np

from .common import F32, GROUP_MAX_EPS, clip_nearest, first_absmax, fp16_bits, fp16_round, make_qx_quants, nearest_int

QK_K = 256


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = x.shape[0]
    xs = np.asarray(x, dtype=F32).reshape(-1, 16, 16)  # [B, sub, elem]
    nb = xs.shape[0]
    xe = np.ascontiguousarray(xs.reshape(-1, 16).T)  # [16, B*16]
    qw = None if imatrix is None else np.ascontiguousarray(np.asarray(imatrix, dtype=F32).reshape(-1, 16).T)
    scales, L = make_qx_quants(xe, 32, qw)
    scales = scales.reshape(nb, 16)
    L = np.ascontiguousarray(L.T).reshape(nb, 16, 16)

    amax, max_scale = first_absmax(scales.T)
    empty = amax < GROUP_MAX_EPS
    max_scale = np.where(empty, F32(1), max_scale).astype(F32)
    iscale = F32(-128) / max_scale
    d = F32(1) / iscale
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dq = fp16_round(d)[:, None] * sc.astype(F32)  # [B, 16]
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = clip_nearest(xs / np.where(dq != 0, dq, F32(1))[:, :, None], -32, 31) + 32
    L = np.where((dq != 0)[:, :, None], lq, L).reshape(nb, 2, 4, 32)

    ql = np.empty((nb, 2, 2, 32), dtype=np.uint8)
    ql[:, :, 0] = (L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4)
    ql[:, :, 1] = (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    dbytes = fp16_bits(d).astype("<u2").view(np.uint8).reshape(nb, 2)
    out = np.concatenate([ql.reshape(nb, 128), qh.astype(np.uint8).reshape(nb, 64), sc.view(np.uint8), dbytes],
                         axis=1)
    out[empty] = 0
    return out.reshape(rows, -1)


def fields(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d as float32 [S], the 16 int8 scales [S, 16], codes - 32 as int8 [S, 16, 16]) of Q6_K super-blocks,
    in value order: x = d·sc·q per 16 values."""
    b = np.ascontiguousarray(data).reshape(-1, 210)
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32)
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    low = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(nb, 16, 16)
    return b[:, 208:210].copy().view("<f2")[:, 0].astype(F32), b[:, 192:208].view(np.int8), q


def decode(data: np.ndarray) -> np.ndarray:
    d, sc, q = fields(data)
    return ((d[:, None, None] * sc.astype(F32)[:, :, None]) * q.astype(F32)).reshape(data.shape[0], -1)

