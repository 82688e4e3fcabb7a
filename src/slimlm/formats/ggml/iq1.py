"""IQ1_S and IQ1_M: ternary values (-1, 0, 1, shifted by ±1/8) coded 8 at a time as points of a 2048-point
lattice, with 3-bit odd block scales under one fp16 super-scale.

IQ1_S (50 bytes, 32-blocks): d f16, qs[32] (low 8 bits of the 11-bit grid indices), qh[8] u16 per block: three
high index bits per group of 8 (bits 3k..3k+2), the scale in bits 12-14, bit 15 set for the -1/8 shift;
x = d*(2s + 1) * (grid ± 1/8).
IQ1_M (56 bytes, 16-blocks): qs[32], qh[16] (per block: 3 high bits of each of its two groups at bits 0-2 / 4-6,
bit 3 / 7 set for a -1/8 shift of that group), scales u16[4]: 3-bit block scales (4 per u16), the fp16
super-scale spread over their top nibbles.
Encoding follows ggml-quants.c ``quantize_row_iq1_s_impl`` / ``quantize_row_iq1_m_impl`` (llama.cpp runs IQ1_S
only with an importance matrix): per block the values are sorted and every split into three runs is scored
exactly (both shifts; for IQ1_M per half-block), the winning ternary groups snapped to the lattice, the scale
refitted; IQ1_M then refits its super-scale over all blocks at their rounded scales.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .common import F32, QK_K, fp16_bits, fp16_value, nearest_int, seq_sum, superblock_rows
from .iq2 import need_imatrix
from .iqgrid import Lattice, best_neighbour, lattice
from .iqsearch import block_weights, blocks_with_d, grid_values

BYTES = 50
M_BYTES = 56
DELTA = F32(0.125)
_XP = np.array([-1 + 0.125, 0.125, 1 + 0.125], dtype=F32)  # level -> value, shift +1/8
_XM = np.array([-1 - 0.125, -0.125, 1 - 0.125], dtype=F32)  # shift -1/8
_MASKS = np.array([0x00, 0x80, 0x08, 0x88])  # IQ1_M: qh bits of shift combination k


def _split_pairs(bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Every split i1 <= i2 of a sorted block into runs of levels 0 / 1 / 2, in C's loop order."""
    return np.array([(a, b) for a in range(bs + 1) for b in range(a, bs + 1)]).T


_I1, _I2 = _split_pairs(32)
_MI1, _MI2 = _split_pairs(16)


def _running_best(sqx: list[np.ndarray], sq2: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """C's scan over splits c (outer) and variants k (inner) keeping sumqx/sumq2 while sumqx^2 > best*sumq2
    (best from -FLT_MAX). sqx[k], sq2[k]: [C, G] -> (scale, split, variant) per block; variant -1: none."""
    G = sqx[0].shape[1]
    best = np.full(G, -np.finfo(F32).max, F32)
    scale = np.zeros(G, F32)
    pick = np.full(G, -1, np.int64)
    which = np.full(G, -1, np.int64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for c in range(sqx[0].shape[0]):
            for k in range(len(sqx)):
                qx, q2 = sqx[k][c], sq2[k][c]
                better = (q2 > 0) & (qx * qx > best * q2)
                if better.any():
                    np.putmask(scale, better, qx / q2)
                    np.putmask(best, better, scale * qx)
                    np.putmask(pick, better, c)
                    np.putmask(which, better, k)
    return scale, pick, which


def _ternary(order: np.ndarray, pick: np.ndarray, i1s: np.ndarray, i2s: np.ndarray) -> np.ndarray:
    """Levels of the chosen split: sorted positions below i1 -> 0, below i2 -> 1, else 2, in the values' order."""
    bs, G = order.shape
    pos = np.arange(bs)[:, None]
    i1, i2 = i1s[np.maximum(pick, 0)], i2s[np.maximum(pick, 0)]
    L = np.empty((bs, G), np.int64)
    L[order, np.arange(G)] = np.where(pos < i1, 0, np.where(pos < i2, 1, 2))
    return L


def _snap(lat: Lattice, L: np.ndarray, xe: np.ndarray, w: np.ndarray, scale: np.ndarray, minus: np.ndarray,
          empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each group of 8 levels to the lattice; an off-grid one to its best neighbour at ``scale`` in its shifted
    values (``minus`` [ng, G]: the -1/8 ones), then blocks that had one refit their scale if both sums are > 0.
    -> (grid index [ng, G], scale [G])."""
    bs, G = xe.shape
    ng = bs // 8
    group = lambda a: np.ascontiguousarray(a.reshape(ng, 8, G).transpose(0, 2, 1))  # noqa: E731  [ng, G, 8]
    keys = lat.key(group(L))
    gidx = lat.kmap[keys].astype(np.int64)
    off = (gidx < 0) & ~empty[None]
    xg, wg = group(xe), group(w)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for m, xx in ((False, _XP), (True, _XM)):
            sel = off & (minus == m)
            if sel.any():
                idx = np.nonzero(sel)
                cols = np.ascontiguousarray(xx[lat.levels].T)
                gidx[idx] = best_neighbour(lat, keys[idx], xg[idx], wg[idx], scale[idx[1]], cols)
        refit = off.any(axis=0)
        if refit.any():
            qe = _values(lat, gidx, minus)
            wq = w * qe
            sumqx, sumq2 = seq_sum(wq * xe), seq_sum(wq * qe)
            ok = refit & (sumqx > 0) & (sumq2 > 0)
            scale = np.where(ok, sumqx / np.where(ok, sumq2, F32(1)), scale).astype(F32)
    return gidx, scale


def _values(lat: Lattice, gidx: np.ndarray, minus: np.ndarray) -> np.ndarray:
    """The quantizer's values xx[level] of grid points gidx [ng, G] with shifts ``minus``, element-major [8ng, G]."""
    ng, G = gidx.shape
    lv = lat.levels[np.maximum(gidx, 0)]  # [ng, G, 8]
    v = np.where(minus[:, :, None], _XM[lv], _XP[lv])
    return np.ascontiguousarray(v.transpose(0, 2, 1)).reshape(ng * 8, G)


def _block_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d = max_scale/15 and 3-bit block scales nearest_int(0.5*(scale/d - 1)): scales [S, nb] ->
    (d [S] float32, ls [S, nb], zero [S] where every block scale is 0)."""
    max_scale = np.maximum.reduce(scales, axis=1)
    zero = ~(max_scale != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (max_scale / F32(15)).astype(F32)
        iscale = F32(1) / np.where(zero, F32(1), d)
        ls = np.where(zero[:, None], 0, np.clip(nearest_int((iscale[:, None] * scales - F32(1)) * F32(0.5)), 0, 7))
    return d, ls, zero


def _sorted_block(xe: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, w*x, w) in ascending order of x: glibc's qsort (a merge sort) keeps ties in index order."""
    order = np.argsort(xe, axis=0, kind="stable")
    cols = np.arange(xe.shape[1])
    sw = w[order, cols]
    return order, sw * xe[order, cols], sw


def _splits_s(xe: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IQ1_S: score every split with both shifts. -> (scale, split, shift (+1/-1, 0: none), order)."""
    order, wx, sw = _sorted_block(xe, w)
    zero = np.zeros((1, xe.shape[1]), F32)
    sumx = np.concatenate([zero, np.cumsum(wx, axis=0, dtype=F32)])  # [33, G], sequential from +0.0
    sumw = np.concatenate([zero, np.cumsum(sw, axis=0, dtype=F32)])
    a_x, b_x, c_x = sumx[_I1] - sumx[0], sumx[_I2] - sumx[_I1], sumx[32] - sumx[_I2]  # [C, G]
    a_w, b_w, c_w = sumw[_I1] - sumw[0], sumw[_I2] - sumw[_I1], sumw[32] - sumw[_I2]
    sqx = [a_x * xx[0] + b_x * xx[1] + c_x * xx[2] for xx in (_XP, _XM)]
    sq2 = [(a_w * xx[0]) * xx[0] + (b_w * xx[1]) * xx[1] + (c_w * xx[2]) * xx[2] for xx in (_XP, _XM)]
    scale, pick, which = _running_best(sqx, sq2)
    return scale, pick, np.where(which < 0, 0, 1 - 2 * which), order


def encode_s(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    need_imatrix(imatrix, "IQ1_S")
    rows = superblock_rows(x, "IQ1_S")
    S = rows.size // QK_K
    xe, w = block_weights(rows, imatrix, 32)
    empty = np.maximum.reduce(np.abs(xe), axis=0) < F32(1e-12)
    scale, pick, shift, order = _splits_s(xe, w)
    empty |= shift == 0
    L = _ternary(order, pick, _I1, _I2)
    neg = scale < 0  # C flips levels, scale and shift
    L[:, neg] = 2 - L[:, neg]
    shift = np.where(neg, -shift, shift)
    gidx, scale = _snap(lattice(T.IQ1_S), L, xe, w, np.abs(scale), np.broadcast_to(shift == -1, (4, shift.size)),
                        empty)
    scale = np.where(empty, F32(0), scale).astype(F32)
    gi = np.where(empty[None], 0, gidx).T.reshape(S, 8, 4)
    d, ls, zero = _block_scales(scale.reshape(S, 8))
    d_bits = np.where(zero, 0, fp16_bits(d * F32(1.125))).astype(np.uint16)
    ls = np.where(zero[:, None], 0, ls | np.where((shift == -1) & ~empty, 8, 0).reshape(S, 8))
    qh = ((gi >> 8) << (3 * np.arange(4))).sum(axis=2) | (ls << 12)
    out = np.empty((S, BYTES), dtype=np.uint8)
    out[:, 0:2] = d_bits.astype("<u2").view(np.uint8).reshape(S, 2)
    out[:, 2:34] = (gi & 255).reshape(S, 32).astype(np.uint8)
    out[:, 34:50] = qh.astype("<u2").view(np.uint8).reshape(S, 16)
    return out.reshape(rows.shape[0], -1)


def decode_s(data: np.ndarray) -> np.ndarray:
    b, S, d = blocks_with_d(data, BYTES)
    qh = b[:, 34:50].copy().view("<u2").astype(np.int32)  # [S, 8]
    dl = d[:, None] * (2 * ((qh >> 12) & 7) + 1).astype(F32)
    delta = np.where(qh & 0x8000, -DELTA, DELTA).astype(F32)
    idx = b[:, 2:34].reshape(S, 8, 4).astype(np.int32) | (((qh[:, :, None] >> (3 * np.arange(4))) & 7) << 8)
    g = grid_values(gq.IQ1_S)[idx]  # [S, 8, 4, 8]
    return (dl[:, :, None, None] * (g + delta[:, :, None, None])).reshape(data.shape[0], -1)


def _half_prefix(c: np.ndarray, in_half: np.ndarray) -> np.ndarray:
    """C's per-half prefix sums over the sorted values: px[j+1] = px[j] + c[j] where value j is in the half, else a
    copy of px[j] (from +0.0). c, in_half [16, G] in sorted order -> [17, G]."""
    G = c.shape[1]
    cnt = np.concatenate([np.zeros((1, G), np.int64), np.cumsum(in_half, axis=0)])  # [17, G]
    pos = np.argsort(~in_half, axis=0, kind="stable")[:8]  # the half's 8 members, in sorted order
    own = np.concatenate([np.zeros((1, G), F32), np.take_along_axis(c, pos, axis=0)])
    return np.take_along_axis(np.cumsum(own, axis=0, dtype=F32), cnt, axis=0)


def _splits_m(xe: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """IQ1_M: every split with the four shift combinations of the two halves, via C's collapsed per-half sums.
    -> (scale, split, combination k (bit 1: first half -1/8, bit 0: second half; -1: none), order)."""
    order, wx, sw = _sorted_block(xe, w)
    second = order >= 8
    px = [_half_prefix(wx, ~second), _half_prefix(wx, second)]
    pw = [_half_prefix(sw, ~second), _half_prefix(sw, second)]
    qx, q2 = {}, {}
    for h in (0, 1):
        sx = px[h][_MI1] + px[h][_MI2]  # [C, G]
        for m, xx in ((0, _XP), (1, _XM)):
            c1, c2 = xx[0] * xx[0] - xx[1] * xx[1], xx[1] * xx[1] - xx[2] * xx[2]
            qx[h, m] = px[h][16] * xx[2] - sx
            q2[h, m] = ((pw[h][16] * xx[2]) * xx[2] + pw[h][_MI1] * c1) + pw[h][_MI2] * c2
    combos = ((0, 0), (0, 1), (1, 0), (1, 1))
    scale, pick, which = _running_best([qx[0, a] + qx[1, b] for a, b in combos],
                                       [q2[0, a] + q2[1, b] for a, b in combos])
    return scale, pick, which, order


def encode_m(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    rows = superblock_rows(x, "IQ1_M")
    S = rows.size // QK_K
    lat = lattice(T.IQ1_M)
    xe, w = block_weights(rows, imatrix, 16)
    empty = np.maximum.reduce(np.abs(xe), axis=0) < F32(1e-7)
    scale, pick, k, order = _splits_m(xe, w)
    empty |= k < 0
    L = _ternary(order, pick, _MI1, _MI2)
    neg = scale < 0  # C flips levels and scale, and swaps each half's shift
    L[:, neg] = 2 - L[:, neg]
    k = np.where(empty, 0, np.where(neg, 3 - k, k))
    minus = np.stack([k >= 2, k % 2 == 1])  # [2, G]
    gidx, scale = _snap(lat, L, xe, w, np.abs(scale), minus, empty)
    scale = np.where(empty, F32(0), scale).astype(F32)
    gidx = np.where(empty[None], 0, gidx)
    # super-block: 3-bit block scales against max_scale/15, then d refitted over all 256 values at those scales
    # (blocks C skipped count too, as grid point 0)
    d, ls, zero = _block_scales(scale.reshape(S, 16))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        qe = _values(lat, gidx, minus) * (2 * ls + 1).astype(F32).reshape(-1)[None]  # [16, G]
        wq = w * qe
        per_superblock = lambda a: np.ascontiguousarray(a.reshape(16, S, 16).transpose(2, 0, 1)).reshape(QK_K, S)  # noqa: E731
        sx, s2 = seq_sum(per_superblock(wq * xe)), seq_sum(per_superblock(wq * qe))
        d = np.where(s2 > 0, sx / np.where(s2 > 0, s2, F32(1)), d).astype(F32)
        dbits = fp16_bits(d * F32(1.1125)).astype(np.int64)
    gi = gidx.T.reshape(S, 16, 2)
    qh = (gi[:, :, 0] >> 8) | ((gi[:, :, 1] >> 8) << 4)
    qh = np.where(zero[:, None], qh, qh | _MASKS[k.reshape(S, 16)])
    sc = (ls.reshape(S, 4, 4) << (3 * np.arange(4))).sum(axis=2)  # [S, 4] u16
    sc |= np.where(zero[:, None], 0, ((dbits[:, None] >> (4 * np.arange(4))) & 0xF) << 12)
    out = np.empty((S, M_BYTES), dtype=np.uint8)
    out[:, 0:32] = (gi & 255).reshape(S, 32).astype(np.uint8)
    out[:, 32:48] = qh.astype(np.uint8)
    out[:, 48:56] = sc.astype("<u2").view(np.uint8).reshape(S, 8)
    return out.reshape(rows.shape[0], -1)


def decode_m(data: np.ndarray) -> np.ndarray:
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, M_BYTES)
    S = b.shape[0]
    sc = b[:, 48:56].copy().view("<u2").astype(np.int32)  # [S, 4]
    bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00) | (sc[:, 3] & 0xF000)
    d = fp16_value(bits.astype(np.uint16))
    ls = (sc[:, :, None] >> (3 * np.arange(4))) & 7  # [S, 4, 4]: block 4u + t
    dl = d[:, None] * (2 * ls.reshape(S, 16) + 1).astype(F32)  # [S, 16]
    qh = b[:, 32:48].astype(np.int32)  # [S, 16]
    idx = b[:, 0:32].reshape(S, 16, 2).astype(np.int32) | (np.stack([qh & 7, (qh >> 4) & 7], axis=2) << 8)
    delta = np.where(np.stack([qh & 0x08, qh & 0x80], axis=2) != 0, -DELTA, DELTA).astype(F32)
    g = grid_values(gq.IQ1_S)[idx]  # [S, 16, 2, 8]
    return (dl[:, :, None, None] * (g + delta[:, :, :, None])).reshape(data.shape[0], -1)
