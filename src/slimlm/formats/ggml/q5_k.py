"""Q5_K: Q4_K's super-block structure (8 sub-blocks of 32, 6-bit scales/mins) with 5-bit quants.

Layout (176 bytes): d f16, dmin f16, scales[12], qh[32], qs[128]. Within each 64 values (pair p = 0..3),
qs byte l holds the low 4 bits of value l (low nibble) and l+32 (high nibble); qh byte l bit 2p is the
fifth bit of value 64p+l and bit 2p+1 that of value 64p+32+l. Encoding follows ggml-quants.c
``quantize_row_q5_K_ref`` without an importance matrix and ``quantize_row_q5_K_impl`` with one.
"""

from __future__ import annotations

import numpy as np

from .common import F32, QK_K, k4_dequantize_scales, k4_superblocks, superblock_rows

BLOCK_BYTES = 176
_BIT = (1 << np.arange(8, dtype=np.int32)).reshape(1, 8, 1)


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = superblock_rows(x, "Q5_K")
    qw = None if imatrix is None else np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape)
    d, dmin, scales, L = k4_superblocks(rows, qw, 31, (-0.5, 0.1, 15), clamp_qp=True)
    S = L.shape[0]
    L = L.reshape(S, 8, 32)  # sub-block j = 2p + (0: low nibble, 1: high nibble)
    qh = ((L >> 4) * _BIT).sum(axis=1).astype(np.uint8)  # bit j of byte l = fifth bit of L[j, l]
    low = (L & 0xF).reshape(S, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).astype(np.uint8).reshape(S, 128)
    out = np.empty((S, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:4] = dmin.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 4:16] = scales
    out[:, 16:48] = qh
    out[:, 48:] = qs
    return out.reshape(rows.shape[0], -1)


def codes(blocks: np.ndarray) -> np.ndarray:
    """The 256 5-bit codes of each super-block ``[S, 176]`` in value order, as uint8 ``[S, 8, 32]``."""
    S = blocks.shape[0]
    qh = blocks[:, 16:48].astype(np.int32).reshape(S, 1, 32)
    qs = blocks[:, 48:].reshape(S, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).astype(np.int32).reshape(S, 8, 32)
    return (low | (((qh & _BIT) != 0) << 4)).astype(np.uint8)


def decode(data: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    d, m = k4_dequantize_scales(blocks)
    y = d[:, :, None] * codes(blocks).astype(F32) - m[:, :, None]
    return y.reshape(*data.shape[:-1], -1)


__all__ = ["BLOCK_BYTES", "QK_K", "codes", "decode", "encode"]
