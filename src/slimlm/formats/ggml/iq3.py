"""IQ3_XXS and IQ3_S: 256-value super-blocks of 32-blocks whose magnitudes are coded 4 at a time as points of a
3-bit lattice (256 / 512 points), signs apart, with a 4-bit odd scale per block under one fp16.

IQ3_XXS (98 bytes): d f16, 64 grid indices, then per block a u32 = four 7-bit sign masks (the 8th sign of each
8 is implied by even parity) | scale << 28; x = d*(0.5 + s)*0.5 * grid * sign.
IQ3_S (110 bytes): d f16, qs[64] (low 8 bits of 9-bit indices), qh[8] (bit k of byte b: 9th bit of group k of
block b), signs[32] (one bit per value), scales[4] (two 4-bit per byte); x = d*(1 + 2s) * grid * sign.
Encoding follows ggml-quants.c ``quantize_row_iq3_xxs_impl`` / ``quantize_row_iq3_s_impl`` with and without an
imatrix, including IQ3_S's habit of not advancing its qs/signs write positions past an all-zero block.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .common import F32, QK_K
from .iqsearch import Recipe, blocks_with_d, grid_values, run, signed, super_scale

XXS_BYTES = 98
S_BYTES = 110
_NB = QK_K // 32
XXS_RECIPE = Recipe(block=32, kmax=8, steps=15, step=0.2, sigma_mul=2.0, parity=True, eps=1e-8, track_grid=True)
S_RECIPE = Recipe(block=32, kmax=8, steps=9, step=0.2, sigma_mul=2.0, parity=False, eps=None, track_grid=False)


def encode_xxs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows, S, lat, (scales, L, signs, empty) = run(T.IQ3_XXS, XXS_RECIPE, x, imatrix)
    signs[:, empty] = 0  # ggml skips an all-zero block before writing its signs
    gidx = lat.kmap[lat.key(L)]  # [8, G]
    d_bits, ls, zero = super_scale(scales.reshape(S, _NB), 1.0125)
    sas = (signs.astype(np.uint32) << (7 * np.arange(4, dtype=np.uint32))[:, None]).sum(axis=0, dtype=np.uint32)
    sas = sas.reshape(S, _NB) | (ls.astype(np.uint32) << 28)
    q3 = gidx.T.reshape(S, _NB * 8).astype(np.uint8)
    out = np.zeros((S, XXS_BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:66] = q3
    out[:, 66:98] = sas.astype("<u4").view(np.uint8).reshape(S, 32)
    out[zero, 2:] = 0
    return out.reshape(rows.shape[0], -1)


def encode_s(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows, S, lat, (scales, L, signs, empty) = run(T.IQ3_S, S_RECIPE, x, imatrix)
    gidx = lat.kmap[lat.key(L)].T.reshape(S, _NB, 8)  # [S, 8 blocks, 8 groups]
    gidx[empty.reshape(S, _NB)] = 0
    d_bits, ls, zero = super_scale(scales.reshape(S, _NB), 1.033)
    out = np.zeros((S, S_BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    qh = ((gidx >> 8) << np.arange(8)).sum(axis=2)  # [S, 8]: placed by block number
    out[:, 66:74] = qh.astype(np.uint8)
    # qs and signs: ggml advances their write positions only past blocks that were not all zero
    live = ~empty.reshape(S, _NB)
    slot = np.cumsum(live, axis=1) - 1
    qs = np.zeros((S, _NB, 8), np.uint8)
    sg = np.zeros((S, _NB, 4), np.uint8)
    sb, ib = np.nonzero(live)
    qs[sb, slot[sb, ib]] = (gidx[sb, ib] & 255).astype(np.uint8)
    sg[sb, slot[sb, ib]] = signs.T.reshape(S, _NB, 4)[sb, ib]
    out[:, 2:66] = qs.reshape(S, 64)
    out[:, 74:106] = sg.reshape(S, 32)
    out[:, 106:110] = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    return out.reshape(rows.shape[0], -1)


def decode_xxs(data: np.ndarray) -> np.ndarray:
    b, S, d = blocks_with_d(data, XXS_BYTES)
    sas = b[:, 66:98].copy().view("<u4").astype(np.uint32)  # [S, 8]
    db = (d[:, None] * (F32(0.5) + (sas >> 28).astype(F32))) * F32(0.5)
    ksigns = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)
    sign = ksigns[(sas[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127]  # [S, 8, 4]
    grid = grid_values(gq.IQ3_XXS)[b[:, 2:66].reshape(S, _NB, 4, 2)].reshape(S, _NB, 4, 8)
    y = db[:, :, None, None] * grid
    return signed(y, sign).reshape(data.shape[0], -1)


def decode_s(data: np.ndarray) -> np.ndarray:
    b, S, d = blocks_with_d(data, S_BYTES)
    sc = b[:, 106:110].astype(np.int32)
    ls = np.stack([sc & 0xF, sc >> 4], axis=2).reshape(S, _NB)
    db = d[:, None] * (1 + 2 * ls).astype(F32)
    hi = (b[:, 66:74, None].astype(np.int32) >> np.arange(8)) & 1  # [S, 8 blocks, 8 groups]
    idx = b[:, 2:66].reshape(S, _NB, 8).astype(np.int32) | (hi << 8)
    grid = grid_values(gq.IQ3_S)[idx].reshape(S, _NB, 4, 8)
    y = db[:, :, None, None] * grid
    return signed(y, b[:, 74:106].reshape(S, _NB, 4)).reshape(data.shape[0], -1)


__all__ = ["encode_xxs", "decode_xxs", "encode_s", "decode_s", "XXS_BYTES", "S_BYTES"]
