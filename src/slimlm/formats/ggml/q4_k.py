"""Q4_K: 256-value super-blocks of 8 sub-blocks of 32, 4-bit quants, 6-bit sub-block scales and mins.

Layout (144 bytes): d f16, dmin f16, scales[12] (packed 6-bit scales/mins, see common),
qs[128]: within each 64 values, byte l holds value l (low nibble) and value l+32 (high nibble).
x ~ d*sc[j]*q - dmin*m[j]. Encoding follows ggml-quants.c ``quantize_row_q4_K_ref`` without an
importance matrix (what ``llama_model_quantize`` uses then) and ``quantize_row_q4_K_impl`` with one.
"""

from __future__ import annotations

import numpy as np

from .common import F32, QK_K, k4_dequantize_scales, k4_superblocks, superblock_rows

BLOCK_BYTES = 144


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = superblock_rows(x, "Q4_K")
    qw = None if imatrix is None else np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape)
    d, dmin, scales, L = k4_superblocks(rows, qw, 15, (-1.0, 0.1, 20), clamp_qp=False)
    S = L.shape[0]
    L = L.reshape(S, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).astype(np.uint8).reshape(S, 128)
    out = np.empty((S, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = d.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:4] = dmin.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 4:16] = scales
    out[:, 16:] = qs
    return out.reshape(rows.shape[0], -1)


def codes(blocks: np.ndarray) -> np.ndarray:
    """The 256 4-bit codes of each super-block ``[S, 144]`` in value order, as uint8 ``[S, 8, 32]``."""
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    return np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(-1, 8, 32)


def decode(data: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    d, m = k4_dequantize_scales(blocks)
    y = d[:, :, None] * codes(blocks).astype(F32) - m[:, :, None]
    return y.reshape(*data.shape[:-1], -1)


__all__ = ["BLOCK_BYTES", "QK_K", "codes", "decode", "encode"]
