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

from .common import F32, QK_K, element_major, fp16_bits, fp16_value, nearest_int, seq_sum, superblock_rows
from .iqgrid import Lattice, best_neighbour, lattice

XXS_BYTES = 98
S_BYTES = 110
_NB = QK_K // 32
_KMAXQ = 8


def _grid_levels(lat: Lattice, xg: np.ndarray, wg: np.ndarray, iscale: np.ndarray, scale: np.ndarray,
                 only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Round groups xg [8, G, 4] at inverse scale ``iscale`` [G] to levels, moving off-grid ones to their best
    neighbour at ``scale`` [G]. ``only`` [8, G]: groups to touch (others get level -1). Returns (levels
    [8, G, 4] int32, on_grid [8, G])."""
    v = np.multiply(xg, iscale[None, :, None])
    v -= F32(1)
    v *= F32(0.5)
    L = np.clip(nearest_int(v), 0, _KMAXQ - 1)
    keys = lat.key(L)
    on = lat.kmap[keys] >= 0
    off = ~on if only is None else (~on & only)
    if off.any():
        idx = np.nonzero(off)
        gi = best_neighbour(lat, keys[idx], xg[idx], wg[idx], scale[idx[1]])
        L[idx] = lat.levels[gi]
    return L, on


def _fit(xg: np.ndarray, w: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum (w*x)*q and sum (w*q)*q over the 32 values of each block, q = 2L+1 (xg, w, L: [8, G, 4])."""
    q = (2 * L + 1).astype(F32)
    G = xg.shape[1]
    order = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(32, G)  # noqa: E731  C's value order
    qe, we = order(q), order(w)
    return seq_sum((we * order(xg)) * qe), seq_sum((we * qe) * qe)


def _blocks(rows: np.ndarray, imatrix: np.ndarray | None, xxs: bool) -> tuple:
    """Per 32-block search shared by both types. Returns (scales [G], L [8, G, 4], signs [4, G] uint8 per 8
    values, empty [G])."""
    lat = lattice(T.IQ3_XXS if xxs else T.IQ3_S)
    xe = element_major(rows, 32)  # [32, G]
    G = xe.shape[1]
    if imatrix is None:
        w = xe * xe
    else:
        xs = element_major(rows, QK_K)
        sigma2 = np.repeat((F32(2) * seq_sum(xs * xs)) / F32(QK_K), _NB)
        w = element_major(np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape), 32) * np.sqrt(sigma2[None] + xe * xe)
    waux = np.sqrt(w)
    neg = ~(xe >= 0)
    xval = np.where(neg, -xe, xe).astype(F32)
    bits = (1 << np.arange(8))[:, None]
    s = (neg.reshape(4, 8, G) * bits).sum(axis=1)  # [4, G]
    if xxs:  # odd number of negatives: flip the least important value of the 8 (first minimum)
        odd = (neg.reshape(4, 8, G).sum(axis=1) % 2).astype(bool)
        a = ((w * xe) * xe).reshape(4, 8, G)
        imin = np.argmin(a, axis=1)  # [4, G]
        kk, gg = np.nonzero(odd)
        pos = kk * 8 + imin[kk, gg]
        xval[pos, gg] = -xval[pos, gg]
        s[kk, gg] ^= (1 << imin[kk, gg])
        s &= 127
    vmax = np.maximum.reduce(xval, axis=0)
    empty = (vmax < F32(1e-8)) if xxs else (vmax == 0)
    group = lambda a: np.ascontiguousarray(a.reshape(8, 4, G).transpose(0, 2, 1))  # noqa: E731  [8, G, 4]
    xg, wg, wauxg = group(xval), group(w), group(waux)
    safe_max = np.where(empty, F32(1), vmax).astype(F32)
    best = np.zeros(G, F32)
    scale = (safe_max / F32(2 * _KMAXQ - 1)).astype(F32)
    Lbest = np.zeros((8, G, 4), np.int32)
    on_grid = np.full((8, G), xxs)
    nsteps = 15 if xxs else 9
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(-nsteps, nsteps + 1):
            iscale = (F32(2 * _KMAXQ - 1) + F32(step) * F32(0.2)) / safe_max
            this_scale = F32(1) / iscale
            L, on = _grid_levels(lat, xg, wauxg, iscale, this_scale)
            sumqx, sumq2 = _fit(xg, wg, L)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2) & ~empty
            if better.any():
                scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale).astype(F32)
                best = np.where(better, scale * sumqx, best).astype(F32)
                Lbest[:, better] = L[:, better]
                on_grid[:, better] = on[:, better]
        redo = (~on_grid).any(axis=0) & (scale > 0) & ~empty
        if redo.any():
            cols = np.flatnonzero(redo)
            sc = scale[cols]
            only = ~on_grid[:, cols] if xxs else None
            L, _ = _grid_levels(lat, xg[:, cols], wauxg[:, cols], F32(1) / sc, sc, only)
            if xxs:
                L = np.where(only[:, :, None], L, Lbest[:, cols])
            Lbest[:, cols] = L
            sumqx, sumq2 = _fit(xg[:, cols], wg[:, cols], L)
            scale[cols] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), sc)
    flip = scale < 0
    if flip.any():  # "should never happen" in ggml; it flips scale and signs
        scale = np.abs(scale)
        s[:, flip] = ~s[:, flip] & (127 if xxs else 255)
    scale[empty] = F32(0)
    return scale, Lbest, s.astype(np.uint8), empty


def _super_scale(scales: np.ndarray, fudge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d = max_scale/31 stored as fp16(d*fudge); 4-bit block scales nearest_int(0.5*(scale/d - 1)).
    scales [S, 8] -> (d bits [S], ls [S, 8], zero [S])."""
    max_scale = np.maximum.reduce(scales, axis=1)
    zero = ~(max_scale != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (max_scale / F32(31)).astype(F32)
        bits = np.where(zero, 0, fp16_bits(d * F32(fudge))).astype(np.uint16)
        iscale = F32(1) / np.where(zero, F32(1), d)
        v = (iscale[:, None] * scales - F32(1)) * F32(0.5)
        ls = np.where(zero[:, None], 0, np.clip(nearest_int(v), 0, 15))
    return bits, ls, zero


def encode_xxs(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = superblock_rows(x, "IQ3_XXS")
    S = rows.size // QK_K
    scales, L, signs, empty = _blocks(rows, imatrix, xxs=True)
    signs[:, empty] = 0  # ggml skips an all-zero block before writing its signs
    lat = lattice(T.IQ3_XXS)
    gidx = lat.kmap[lat.key(L)]  # [8, G]
    d_bits, ls, zero = _super_scale(scales.reshape(S, _NB), 1.0125)
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
    rows = superblock_rows(x, "IQ3_S")
    S = rows.size // QK_K
    scales, L, signs, empty = _blocks(rows, imatrix, xxs=False)
    lat = lattice(T.IQ3_S)
    gidx = lat.kmap[lat.key(L)].T.reshape(S, _NB, 8)  # [S, 8 blocks, 8 groups]
    gidx[empty.reshape(S, _NB)] = 0
    d_bits, ls, zero = _super_scale(scales.reshape(S, _NB), 1.033)
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


def _grid_values(qtype: T) -> np.ndarray:
    from gguf import quants as gq

    cls = gq.IQ3_XXS if qtype == T.IQ3_XXS else gq.IQ3_S
    cls.init_grid()
    return np.asarray(cls.grid, dtype=F32).reshape(cls.grid_shape)


def _signed(values: np.ndarray, sign_bytes: np.ndarray) -> np.ndarray:
    """[..., 8] magnitudes times the signs of one byte per 8 (bit j set: value j negative)."""
    neg = (sign_bytes[..., None] >> np.arange(8)) & 1
    return np.where(neg.astype(bool), -values, values)


def decode_xxs(data: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, XXS_BYTES)
    S = b.shape[0]
    d = fp16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    sas = b[:, 66:98].copy().view("<u4").astype(np.uint32)  # [S, 8]
    db = (d[:, None] * (F32(0.5) + (sas >> 28).astype(F32))) * F32(0.5)
    from gguf import quants as gq

    ksigns = np.frombuffer(gq.IQ2_XXS.ksigns, dtype=np.uint8)
    sign = ksigns[(sas[:, :, None] >> (7 * np.arange(4, dtype=np.uint32))) & 127]  # [S, 8, 4]
    grid = _grid_values(T.IQ3_XXS)[b[:, 2:66].reshape(S, _NB, 4, 2)].reshape(S, _NB, 4, 8)
    y = db[:, :, None, None] * grid
    return _signed(y, sign).reshape(data.shape[0], -1)


def decode_s(data: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, S_BYTES)
    S = b.shape[0]
    d = fp16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    sc = b[:, 106:110].astype(np.int32)
    ls = np.stack([sc & 0xF, sc >> 4], axis=2).reshape(S, _NB)
    db = d[:, None] * (1 + 2 * ls).astype(F32)
    hi = (b[:, 66:74, None].astype(np.int32) >> np.arange(8)) & 1  # [S, 8 blocks, 8 groups]
    idx = b[:, 2:66].reshape(S, _NB, 8).astype(np.int32) | (hi << 8)
    grid = _grid_values(T.IQ3_S)[idx].reshape(S, _NB, 4, 8)
    y = db[:, :, None, None] * grid
    return _signed(y, b[:, 74:106].reshape(S, _NB, 4)).reshape(data.shape[0], -1)


__all__ = ["encode_xxs", "decode_xxs", "encode_s", "decode_s", "XXS_BYTES", "S_BYTES"]
