"""IQ2_XXS and IQ2_XS: 256-value super-blocks whose magnitudes are coded 8 at a time as points of a 2-bit lattice
(256 / 512 points), signs 7 per 8 (even parity), a 4-bit odd scale per block under one fp16.

IQ2_XXS (66 bytes): d f16, then per 32-block two u32: four 8-bit grid indices, and four 7-bit sign masks |
scale << 28; x = d*(0.5 + s)*0.25 * grid * sign.
IQ2_XS (74 bytes): d f16, qs[32] u16 = 9-bit grid index | signs << 9 (one per 8 values), scales[8] (two 4-bit
scales per byte, one per 16-block); x = d*(0.5 + s)*0.25 * grid * sign.
Encoding follows ggml-quants.c ``quantize_row_iq2_xxs_impl`` / ``quantize_row_iq2_xs_impl``, which llama.cpp only
runs with an importance matrix (and so do we).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from slimlm.errors import SlimlmError

from .common import F32, QK_K
from .iqsearch import Recipe, blocks_with_d, grid_values, run, signed, super_scale

XXS_BYTES = 66
XS_BYTES = 74
XXS_RECIPE = Recipe(block=32, kmax=3, steps=6, step=0.1, sigma_mul=1.0, parity=True, eps=1e-15, track_grid=None,
                    qp_start=True)
XS_RECIPE = Recipe(block=16, kmax=3, steps=9, step=0.1, sigma_mul=1.0, parity=True, eps=1e-15, track_grid=True)


def need_imatrix(imatrix: np.ndarray | None, name: str) -> None:
    if imatrix is None:
        raise SlimlmError(f"{name} needs an importance matrix (llama.cpp does not quantize to it without one)")


def encode_xxs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    need_imatrix(imatrix, "IQ2_XXS")
    rows, S, lat, (scales, L, signs, empty) = run(T.IQ2_XXS, XXS_RECIPE, x, imatrix)
    gidx = np.where(empty[None], 0, lat.kmap[lat.key(L)]).astype(np.uint32)  # [4, G]
    signs = np.where(empty[None], 0, signs).astype(np.uint32)
    d_bits, ls, zero = super_scale(scales.reshape(S, 8))
    q = np.empty((S, 8, 2), np.uint32)
    q[:, :, 0] = (gidx << (8 * np.arange(4, dtype=np.uint32))[:, None]).sum(axis=0, dtype=np.uint32).reshape(S, 8)
    q[:, :, 1] = ((signs << (7 * np.arange(4, dtype=np.uint32))[:, None]).sum(axis=0, dtype=np.uint32).reshape(S, 8)
                  | (ls.astype(np.uint32) << 28))
    q[zero] = 0
    out = np.empty((S, XXS_BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:] = q.astype("<u4").view(np.uint8).reshape(S, 64)
    return out.reshape(rows.shape[0], -1)


def encode_xs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    need_imatrix(imatrix, "IQ2_XS")
    rows, S, lat, (scales, L, signs, empty) = run(T.IQ2_XS, XS_RECIPE, x, imatrix)
    gidx = lat.kmap[lat.key(L)].astype(np.uint16)  # [2, G]
    q = np.where(empty[None], 0, gidx | (signs.astype(np.uint16) << 9)).astype(np.uint16)  # [2, G]
    d_bits, ls, zero = super_scale(scales.reshape(S, 16))
    q = q.T.reshape(S, 32)
    q[zero] = 0
    out = np.empty((S, XS_BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:66] = q.astype("<u2").view(np.uint8).reshape(S, 64)
    out[:, 66:74] = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    return out.reshape(rows.shape[0], -1)


def _ksigns() -> np.ndarray:
    return np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)


def decode_xxs(data: np.ndarray) -> np.ndarray:
    b, S, d = blocks_with_d(data, XXS_BYTES)
    q = b[:, 2:].copy().view("<u4").reshape(S, 8, 2)
    db = (d[:, None] * (F32(0.5) + (q[:, :, 1] >> 28).astype(F32))) * F32(0.25)
    idx = b[:, 2:].reshape(S, 8, 8)[:, :, :4]  # the first u32's bytes
    sign = _ksigns()[(q[:, :, 1:2] >> (7 * np.arange(4, dtype=np.uint32))) & 127]  # [S, 8, 4]
    y = db[:, :, None, None] * grid_values(gq.IQ2_XXS)[idx]
    return signed(y, sign).reshape(data.shape[0], -1)


def decode_xs(data: np.ndarray) -> np.ndarray:
    b, S, d = blocks_with_d(data, XS_BYTES)
    q = b[:, 2:66].copy().view("<u2").reshape(S, 16, 2)  # per 16-block: two groups of 8
    sc = b[:, 66:74].astype(np.int32)
    ls = np.stack([sc & 0xF, sc >> 4], axis=2).reshape(S, 16)
    db = (d[:, None] * (F32(0.5) + ls.astype(F32))) * F32(0.25)
    y = db[:, :, None, None] * grid_values(gq.IQ2_XS)[q & 511]
    return signed(y, _ksigns()[q >> 9]).reshape(data.shape[0], -1)





# ---- IQ2_S (82 bytes): d f16, qs[32] low 8 bits of 10-bit grid indices (one per 8 values), signs[32] (one
# bit per value), qh[8] (2 high index bits per group, 4 groups a byte), scales[8] (4 bits per 16-block).
# Encoding follows ``quantize_row_iq2_s_impl``: like IQ2_XS, but signs are stored whole, the weights without
# an imatrix are 0.25*sigma2 + x^2, and d is fp16(max_scale/31 * 0.9875).
S_BYTES = 82
S_RECIPE = Recipe(block=16, kmax=3, steps=9, step=0.1, sigma_mul=2.0, parity=False, eps=1e-8, track_grid=True,
                  plain_sigma=True)


def encode_s(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows, S, lat, (scales, L, signs, empty) = run(T.IQ2_S, S_RECIPE, x, imatrix)
    gidx = np.where(empty[None], 0, lat.kmap[lat.key(L)]).T.reshape(S, 32)  # group 2*ib + k
    signs = np.where(empty[None], 0, signs).T.reshape(S, 32)
    d_bits, ls, _ = super_scale(scales.reshape(S, 16), 0.9875)
    out = np.empty((S, S_BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:34] = (gidx & 255).astype(np.uint8)
    out[:, 34:66] = signs.astype(np.uint8)
    out[:, 66:74] = ((gidx >> 8).reshape(S, 8, 4) << (2 * np.arange(4))).sum(axis=2).astype(np.uint8)
    out[:, 74:82] = (ls[:, 0::2] | (ls[:, 1::2] << 4)).astype(np.uint8)
    return out.reshape(rows.shape[0], -1)


def decode_s(data: np.ndarray) -> np.ndarray:
    b, S, d = blocks_with_d(data, S_BYTES)
    hi = (b[:, 66:74, None].astype(np.int32) >> (2 * np.arange(4))) & 3  # [S, 8, 4]
    idx = b[:, 2:34].astype(np.int32) | (hi.reshape(S, 32) << 8)
    sc = b[:, 74:82].astype(np.int32)
    ls = np.stack([sc & 0xF, sc >> 4], axis=2).reshape(S, 16)
    db = (d[:, None] * (F32(0.5) + ls.astype(F32))) * F32(0.25)
    y = db.reshape(S, 16, 1, 1) * grid_values(gq.IQ2_S)[idx.reshape(S, 16, 2)]
    return signed(y, b[:, 34:66].reshape(S, 16, 2)).reshape(data.shape[0], -1)
