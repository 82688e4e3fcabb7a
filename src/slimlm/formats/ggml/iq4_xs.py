"""IQ4_XS: 256-value super-blocks of eight IQ4_NL-style 32-blocks whose scales are 6-bit multiples of one fp16.

Layout (136 bytes): d f16, scales_h u16 (2 high bits per block), scales_l[4] (low nibbles, even block low),
qs[128] (per block as IQ4_NL: index j low nibble, j+16 high). x = d*(ls-32)*VALUES[idx]. Encoding follows
ggml-quants.c ``quantize_iq4_xs`` (with or without an imatrix): IQ4_NL's per-block scale search with weights
from the whole super-block, then d = -max_scale/32 (float32, not fp16-rounded) and indices re-picked with the
rounded block scale d*l.
"""

from __future__ import annotations

import numpy as np

from . import iq4_nl
from .common import F32, QK_K, element_major, first_absmax, fp16_bits, fp16_value, nearest_int, seq_sum, superblock_rows

BLOCK_BYTES = 136
_NB = QK_K // 32


def encode(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = superblock_rows(x, "IQ4_XS")
    S = rows.size // QK_K
    xe = element_major(rows, 32)  # [32, 8S], column s*8 + ib
    qe = None
    sigma2 = None
    if imatrix is not None:
        qe = element_major(np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape), 32)
        xs = element_major(rows, QK_K)
        sigma2 = np.repeat(seq_sum(xs * xs) * (F32(2) / F32(QK_K)), _NB)
    scales = iq4_nl.block_scales(xe, iq4_nl.block_weights(xe, qe, sigma2))
    amax, max_scale = first_absmax(np.ascontiguousarray(scales.reshape(S, _NB).T))
    max_scale = np.where(amax > 0, max_scale, F32(0)).astype(F32)  # C starts from +0.0 and needs |d| > 0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = -max_scale / F32(32)
        inv_d = np.where(d != 0, F32(1) / np.where(d != 0, d, F32(1)), F32(0)).astype(F32)
        ls = np.clip(nearest_int(np.repeat(inv_d, _NB) * scales), -32, 31)
        dl = np.repeat(d, _NB) * ls.astype(F32)
        idl = np.where(dl != 0, F32(1) / np.where(dl != 0, dl, F32(1)), F32(0)).astype(F32)
        L = iq4_nl.best_index(idl[None] * xe).T  # [8S, 32]
    ls = (ls + 32).reshape(S, _NB)
    out = np.empty((S, BLOCK_BYTES), dtype=np.uint8)
    out[:, 0:2] = fp16_bits(d).astype("<u2").view(np.uint8).reshape(S, 2)
    high = ((ls >> 4) << (2 * np.arange(_NB))).sum(axis=1).astype("<u2")
    out[:, 2:4] = high.view(np.uint8).reshape(S, 2)
    low = ls & 0xF
    out[:, 4:8] = low[:, 0::2] | (low[:, 1::2] << 4)
    out[:, 8:] = iq4_nl.pack_indices(L).reshape(S, 128)
    return out.reshape(rows.shape[0], -1)


def decode(data: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK_BYTES)
    S = b.shape[0]
    d = fp16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    high = b[:, 2:4].copy().view("<u2")[:, 0].astype(np.int32)
    low = np.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], axis=2).reshape(S, _NB).astype(np.int32)
    ls = low | (((high[:, None] >> (2 * np.arange(_NB))) & 3) << 4)
    dl = d[:, None] * (ls - 32).astype(F32)  # [S, 8]
    qs = b[:, 8:].reshape(S, _NB, 16)
    idx = np.concatenate([qs & 0xF, qs >> 4], axis=2)  # [S, 8, 32]
    return (dl[:, :, None] * iq4_nl.VALUES.astype(F32)[idx]).reshape(data.shape[0], -1)


__all__ = ["encode", "decode", "BLOCK_BYTES"]
