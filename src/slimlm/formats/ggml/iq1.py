"""IQ1_S: 256-value super-blocks of 32-blocks whose values are ternary (-1, 0, 1, shifted by ±1/8 per block),
coded 8 at a time as points of a 2048-point lattice, with a 3-bit odd scale per block under one fp16.

Layout (50 bytes): d f16, qs[32] (low 8 bits of the 11-bit grid indices), qh[8] u16 per block: three high
index bits per group of 8 (bits 3k..3k+2), the scale in bits 12-14, bit 15 set for the -1/8 shift;
x = d*(2s + 1) * (grid ± 1/8). Encoding follows ggml-quants.c ``quantize_row_iq1_s_impl``, which llama.cpp
only runs with an importance matrix: per block the values are sorted and every split into three runs is
scored exactly (both shifts), the winning ternary groups snapped to the lattice, the scale refitted.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .common import F32, QK_K, element_major, fp16_bits, fp16_value, nearest_int, seq_sum, superblock_rows
from .iq2 import need_imatrix
from .iqgrid import best_neighbour, lattice
from .iqsearch import grid_values

BYTES = 50
DELTA = F32(0.125)
_BS = 32
_NB = QK_K // _BS
_XP = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=F32)  # level -> value, shift +1
_XM = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=F32)  # shift -1
# every split i1 <= i2 of the sorted block into runs of levels 0 / 1 / 2, in C's loop order
_I1, _I2 = np.array([(a, b) for a in range(_BS + 1) for b in range(a, _BS + 1)]).T


def _splits(xe: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The exhaustive split search for blocks xe, w [32, G]: returns (scale, i1, i2, shift, order) of the best
    split under C's running ``sumqx^2 > best*sumq2`` test (shift 0: none accepted)."""
    G = xe.shape[1]
    order = np.argsort(xe, axis=0, kind="stable")  # glibc's qsort (a merge sort) keeps ties in index order
    cols = np.arange(G)
    sw = w[order, cols]
    zero = np.zeros((1, G), F32)
    sumx = np.concatenate([zero, np.cumsum(sw * xe[order, cols], axis=0, dtype=F32)])  # [33, G], sequential
    sumw = np.concatenate([zero, np.cumsum(sw, axis=0, dtype=F32)])
    a_x, b_x, c_x = sumx[_I1] - sumx[0], sumx[_I2] - sumx[_I1], sumx[_BS] - sumx[_I2]  # [C, G]
    a_w, b_w, c_w = sumw[_I1] - sumw[0], sumw[_I2] - sumw[_I1], sumw[_BS] - sumw[_I2]
    cands = []
    for xx in (_XP, _XM):
        sqx = a_x * xx[0] + b_x * xx[1] + c_x * xx[2]
        sq2 = (a_w * xx[0]) * xx[0] + (b_w * xx[1]) * xx[1] + (c_w * xx[2]) * xx[2]
        cands.append((sqx, sq2))
    best = np.full(G, -np.finfo(F32).max, F32)
    scale = np.zeros(G, F32)
    pick = np.full(G, -1, np.int64)
    shift = np.zeros(G, np.int64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for c in range(_I1.size):
            for sgn, (sqx, sq2) in zip((1, -1), cands):
                qx, q2 = sqx[c], sq2[c]
                better = (q2 > 0) & (qx * qx > best * q2)
                if better.any():
                    np.putmask(scale, better, qx / q2)
                    np.putmask(best, better, scale * qx)
                    np.putmask(pick, better, c)
                    np.putmask(shift, better, sgn)
    return scale, pick, shift, order


def encode_s(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    need_imatrix(imatrix, "IQ1_S")
    rows = superblock_rows(x, "IQ1_S")
    S = rows.size // QK_K
    lat = lattice(T.IQ1_S)
    xe = element_major(rows, _BS)  # [32, G]
    G = xe.shape[1]
    xs = element_major(rows, QK_K)
    sigma2 = np.repeat((F32(2) * seq_sum(xs * xs)) / F32(QK_K), _NB)
    w = element_major(np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape), _BS) * np.sqrt(sigma2[None] + xe * xe)
    vmax = np.maximum.reduce(np.abs(xe), axis=0)
    empty = vmax < F32(1e-12)
    scale, pick, shift, order = _splits(xe, w)
    empty |= shift == 0
    # levels: sorted positions below i1 -> 0, below i2 -> 1, else 2, scattered back to the values' order
    pos = np.arange(_BS)[:, None]
    i1, i2 = _I1[np.maximum(pick, 0)], _I2[np.maximum(pick, 0)]
    L = np.empty((_BS, G), np.int64)
    L[order, np.arange(G)] = np.where(pos < i1, 0, np.where(pos < i2, 1, 2))
    neg = scale < 0
    L[:, neg] = 2 - L[:, neg]
    scale = np.abs(scale)
    shift = np.where(neg, -shift, shift)
    # snap each group of 8 to the lattice (off-grid: the best neighbour at this scale, in the shifted values)
    Lg = np.ascontiguousarray(L.reshape(4, 8, G).transpose(0, 2, 1))  # [4, G, 8]
    keys = lat.key(Lg)
    gidx = lat.kmap[keys].astype(np.int64)
    off = (gidx < 0) & ~empty[None]
    xg = np.ascontiguousarray(xe.reshape(4, 8, G).transpose(0, 2, 1))
    wg = np.ascontiguousarray(w.reshape(4, 8, G).transpose(0, 2, 1))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for sgn, xx in ((1, _XP), (-1, _XM)):
            sel = off & (shift == sgn)[None]
            if sel.any():
                idx = np.nonzero(sel)
                cols = np.ascontiguousarray(xx[lat.levels].T)
                gidx[idx] = best_neighbour(lat, keys[idx], xg[idx], wg[idx], scale[idx[1]], cols)
        refit = off.any(axis=0)
        if refit.any():
            q = np.where((shift == 1)[None, :, None], _XP[lat.levels[np.maximum(gidx, 0)]],
                         _XM[lat.levels[np.maximum(gidx, 0)]])  # [4, G, 8]
            order8 = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(_BS, G)  # noqa: E731
            qe, we = order8(q), order8(wg)
            wq = we * qe
            sumqx, sumq2 = seq_sum(wq * xe), seq_sum(wq * qe)
            ok = refit & (sumqx > 0) & (sumq2 > 0)
            scale = np.where(ok, sumqx / np.where(ok, sumq2, F32(1)), scale).astype(F32)
    scale = np.where(empty, F32(0), scale).astype(F32)
    shift = np.where(empty, 1, shift)
    gidx = np.where(empty[None], 0, gidx)
    # super-block scale: d = max_scale/15, stored as fp16(d*1.125); 3-bit block scales
    scales = scale.reshape(S, _NB)
    max_scale = np.maximum.reduce(scales, axis=1)
    zero = ~(max_scale != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (max_scale / F32(15)).astype(F32)
        d_bits = np.where(zero, 0, fp16_bits(d * F32(1.125))).astype(np.uint16)
        iscale = F32(1) / np.where(zero, F32(1), d)
        ls = np.clip(nearest_int((iscale[:, None] * scales - F32(1)) * F32(0.5)), 0, 7)
    ls = np.where(zero[:, None], 0, ls | np.where(shift.reshape(S, _NB) == -1, 8, 0))
    gi = gidx.T.reshape(S, _NB, 4)
    qh = ((gi >> 8) << (3 * np.arange(4))).sum(axis=2) | (ls << 12)
    out = np.empty((S, BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:34] = (gi & 255).reshape(S, 32).astype(np.uint8)
    out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(S, 16)
    return out.reshape(rows.shape[0], -1)


def decode_s(data: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BYTES)
    S = b.shape[0]
    d = fp16_value(b[:, 0:2].copy().view("<u2")[:, 0])
    qh = b[:, 34:50].copy().view("<u2").astype(np.int32)  # [S, 8]
    dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(F32)
    delta = np.where(qh & 0x8000, -DELTA, DELTA).astype(F32)
    idx = b[:, 2:34].reshape(S, _NB, 4).astype(np.int32) | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
    g = grid_values(gq.IQ1_S)[idx]  # [S, 8, 4, 8]
    return (dl[:, :, None, None] * (g + delta[:, :, None, None])).reshape(data.shape[0], -1)
