"""The block search the grid i-quants share (ggml-quants.c ``quantize_row_iq{2_xxs,2_xs,3_xxs,3_s}_impl``).

Per block of ``bs`` values: signs split off (with even parity per 8 for the XXS/XS types: the least important
value of an odd group is flipped), a sweep of inverse scales rounding each group of ``dim`` magnitudes to the
lattice (off-grid groups go to their best neighbour), the best weighted fit kept, then the groups re-rounded at
the chosen scale and the scale refitted. All blocks of a chunk run at once, element-major as in common.py.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gguf import GGMLQuantizationType as T

from .common import F32, QK_K, element_major, fp16_bits, fp16_value, make_qp_quants, nearest_int, seq_sum, superblock_rows
from .iqgrid import Lattice, best_neighbour, lattice


class Recipe(NamedTuple):
    block: int  # values per block (one scale)
    kmax: int  # levels per coordinate
    steps: int  # inverse scales tried: is = -steps..steps
    step: float  # their spacing
    sigma_mul: float  # sigma2 = sigma_mul * sum(x^2) / 256 in the imatrix weights
    parity: bool  # signs carry 7 bits per 8 values (even number of negatives)
    eps: float | None  # blocks with max < eps are empty (None: only max == 0)
    track_grid: bool | None  # True: redo only groups off the grid; False: redo all when any was off; None: always
    qp_start: bool = False  # IQ2_XXS: the sweep is centred on make_qp_quants' scale, not the block max
    plain_sigma: bool = False  # IQ2_S: weights 0.25*sigma2 + x^2 without an imatrix (others: x^2)


def _round(lat: Lattice, kmax: int, xg: np.ndarray, wg: np.ndarray, iscale: np.ndarray, scale: np.ndarray,
           only: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Levels of groups xg [ng, G, dim] at inverse scale ``iscale`` [G]: nearest_int(0.5*(iscale*x - 1)) clamped,
    off-grid groups (within ``only``) moved to their best neighbour at ``scale`` [G]. -> (L int32, on_grid)."""
    v = np.multiply(xg, iscale[None, :, None])
    v -= F32(1)
    v *= F32(0.5)
    L = np.clip(nearest_int(v), 0, kmax - 1)
    keys = lat.key(L)
    on = lat.kmap[keys] >= 0
    off = ~on if only is None else (~on & only)
    if off.any():
        idx = np.nonzero(off)
        L[idx] = lat.levels[best_neighbour(lat, keys[idx], xg[idx], wg[idx], scale[idx[1]])]
    return L, on


def _fit(xg: np.ndarray, wg: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum (w*x)*q and sum (w*q)*q over each block's values in C's order, q = 2L+1 ([ng, G, dim] inputs)."""
    ng, G, dim = xg.shape
    order = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(ng * dim, G)  # noqa: E731
    qe, we = order((2 * L + 1).astype(F32)), order(wg)
    return seq_sum((we * order(xg)) * qe), seq_sum((we * qe) * qe)


class Blocks(NamedTuple):
    scale: np.ndarray  # [G] float32 >= 0 (0 for empty blocks)
    L: np.ndarray  # [ng, G, dim] int32 level indices (grid points)
    signs: np.ndarray  # [bs/8, G] int64 sign bits per 8 values (7 kept with parity)
    empty: np.ndarray  # [G] blocks C skipped (nothing written for them)


def block_weights(rows: np.ndarray, imatrix: np.ndarray | None, bs: int, sigma_mul: float = 2.0,
                  plain_sigma: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``bs`` values element-major ([bs, G]) and their fit weights: imatrix * sqrt(sigma2 + x^2) with
    sigma2 = sigma_mul * sum(x^2)/256 over the super-block, else x^2 (or 0.25*sigma2 + x^2). -> (xe, w)."""
    xe = element_major(rows, bs)
    xs = element_major(rows, QK_K)
    sigma2 = np.repeat((F32(sigma_mul) * seq_sum(xs * xs)) / F32(QK_K), QK_K // bs)
    if imatrix is None:
        return xe, (F32(0.25) * sigma2[None] + xe * xe) if plain_sigma else xe * xe
    qw = element_major(np.broadcast_to(np.asarray(imatrix, dtype=F32), rows.shape), bs)
    return xe, qw * np.sqrt(sigma2[None] + xe * xe)


def search(lat: Lattice, r: Recipe, rows: np.ndarray, imatrix: np.ndarray | None) -> Blocks:
    """Run the block search over float32 rows [R, n] (n a multiple of 256)."""
    bs, dim = r.block, lat.dim
    xe, w = block_weights(rows, imatrix, bs, r.sigma_mul, r.plain_sigma)
    G = xe.shape[1]
    waux = np.sqrt(w)
    neg = ~(xe >= 0)
    xval = np.where(neg, -xe, xe).astype(F32)
    n8 = bs // 8
    s = (neg.reshape(n8, 8, G) * (1 << np.arange(8))[:, None]).sum(axis=1)  # [n8, G]
    if r.parity:  # odd number of negatives: flip the least important value of the 8 (first minimum)
        odd = (neg.reshape(n8, 8, G).sum(axis=1) % 2).astype(bool)
        imin = np.argmin(((w * xe) * xe).reshape(n8, 8, G), axis=1)
        kk, gg = np.nonzero(odd)
        pos = kk * 8 + imin[kk, gg]
        xval[pos, gg] = -xval[pos, gg]
        s[kk, gg] ^= (1 << imin[kk, gg])
        s &= 127
    vmax = np.maximum.reduce(xval, axis=0)
    empty = ~(vmax >= F32(r.eps)) if r.eps is not None else (vmax == 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if r.qp_start:
            qp_scale, _ = make_qp_quants(xval, r.kmax + 1, w)
            base = (qp_scale * F32(r.kmax)).astype(F32)
            empty |= ~(base > 0)
        else:
            base = vmax
        base = np.where(empty, F32(1), base).astype(F32)
        ng = bs // dim
        group = lambda a: np.ascontiguousarray(a.reshape(ng, dim, G).transpose(0, 2, 1))  # noqa: E731
        xg, wg, wauxg = group(xval), group(w), group(waux)
        best = np.zeros(G, F32)
        scale = qp_scale if r.qp_start else (base / F32(2 * r.kmax - 1)).astype(F32)
        scale = np.where(empty, F32(0), scale).astype(F32)
        Lbest = np.zeros((ng, G, dim), np.int32)
        on_grid = np.full((ng, G), r.track_grid is True)
        for step in range(-r.steps, r.steps + 1):
            iscale = (F32(2 * r.kmax - 1) + F32(step) * F32(r.step)) / base
            L, on = _round(lat, r.kmax, xg, wauxg, iscale, F32(1) / iscale)
            sumqx, sumq2 = _fit(xg, wg, L)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2) & ~empty
            if better.any():
                scale = np.where(better, sumqx / np.where(better, sumq2, F32(1)), scale).astype(F32)
                best = np.where(better, scale * sumqx, best).astype(F32)
                Lbest[:, better] = L[:, better]
                on_grid[:, better] = on[:, better]
        redo = (scale > 0) & ~empty
        if r.track_grid is not None:
            redo &= (~on_grid).any(axis=0)
        if redo.any():
            cols = np.flatnonzero(redo)
            sc = scale[cols]
            only = ~on_grid[:, cols] if r.track_grid else None
            L, _ = _round(lat, r.kmax, xg[:, cols], wauxg[:, cols], F32(1) / sc, sc, only)
            if only is not None:
                L = np.where(only[:, :, None], L, Lbest[:, cols])
            Lbest[:, cols] = L
            sumqx, sumq2 = _fit(xg[:, cols], wg[:, cols], L)
            scale[cols] = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, F32(1)), sc)
    flip = scale < 0
    if flip.any():  # "should never happen" in ggml; it flips the scale and the signs
        scale = np.abs(scale)
        s[:, flip] = ~s[:, flip] & (127 if r.parity else 255)
    scale[empty] = F32(0)
    return Blocks(scale, Lbest, s, empty)


def super_scale(scales: np.ndarray, fudge: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d = max_scale/31 stored as fp16(d*fudge); 4-bit block scales nearest_int(0.5*(scale/d - 1)).
    scales [S, nb] -> (d bits [S], ls [S, nb] int, zero [S]: super-blocks with nothing but zero scales)."""
    max_scale = np.maximum.reduce(scales, axis=1)
    zero = ~(max_scale != 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = (max_scale / F32(31)).astype(F32)
        bits = np.where(zero, 0, fp16_bits(d * F32(fudge) if fudge != 1.0 else d)).astype(np.uint16)
        iscale = F32(1) / np.where(zero, F32(1), d)
        v = (iscale[:, None] * scales - F32(1)) * F32(0.5)
        ls = np.where(zero[:, None], 0, np.clip(nearest_int(v), 0, 15))
    return bits, ls, zero


def signed(values: np.ndarray, sign_bytes: np.ndarray) -> np.ndarray:
    """[..., 8] magnitudes times the signs of one byte per 8 (bit j set: value j negative)."""
    neg = (sign_bytes[..., None] >> np.arange(8)) & 1
    return np.where(neg.astype(bool), -values, values)


def grid_values(cls) -> np.ndarray:
    """The dequantizer's grid of a gguf-py i-quant class, float32 [N, dim]."""
    cls.init_grid()
    return np.asarray(cls.grid, dtype=F32).reshape(cls.grid_shape)


def run(qtype: T, recipe: Recipe, x: np.ndarray, imatrix: np.ndarray | None
        ) -> tuple[np.ndarray, int, Lattice, Blocks]:
    """Checked rows of ``x``, their super-block count, the type's lattice and the block search's result."""
    rows = superblock_rows(x, qtype.name)
    lat = lattice(qtype)
    return rows, rows.size // QK_K, lat, search(lat, recipe, rows, imatrix)


def blocks_with_d(data: np.ndarray, nbytes: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Blocks of ``nbytes`` that start with an fp16 d: (bytes [S, nbytes], S, d [S] float32)."""
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nbytes)
    return b, b.shape[0], fp16_value(b[:, 0:2].copy().view("<u2")[:, 0])
