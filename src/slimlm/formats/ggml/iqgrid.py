"""The lattices of the grid i-quants (IQ2_*, IQ3_*) and the quantizer's nearest-grid-point search.

Each grid type stores groups of 4 (IQ3) or 8 (IQ2) magnitudes as an index into a fixed list of lattice points
whose coordinates are small level indices l (value 2l+1 in the quantizer's units). The point lists are format
data, taken from gguf-py (the tables its dequantizers use). llama.cpp's quantizer rounds a group to levels; if
that point is not in the list it tries the group's *neighbours*: every point at one of the ``nwant`` smallest
squared distances from the rounded point, in order of (distance, index), as ``iq2xs_init_impl`` /
``iq3xs_init_impl`` build them, and keeps the first with the least weighted error.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from .common import F32


class Lattice(NamedTuple):
    levels: np.ndarray  # [N, dim] int32 level index of each coordinate
    values: np.ndarray  # [N, dim] float32 2l+1, the quantizer's units
    columns: np.ndarray  # values transposed, [dim, N] contiguous: one coordinate of every point
    bits: int  # bits per coordinate in the packed key
    kmap: np.ndarray  # [2**(bits*dim)] grid index of a packed key, or -1
    nb_start: np.ndarray  # [2**(bits*dim)] where a key's neighbour list starts in nb_flat
    nb_count: np.ndarray  # [2**(bits*dim)] its length (0 for keys on the grid)
    nb_flat: np.ndarray  # all neighbour lists, key after key, each in (distance, index) order

    @property
    def dim(self) -> int:
        return self.levels.shape[1]

    def key(self, L: np.ndarray) -> np.ndarray:
        """Packed key of level groups [..., dim] (coordinate i at bits*i)."""
        shifts = (self.bits * np.arange(self.dim)).astype(np.int64)
        return (L.astype(np.int64) << shifts).sum(axis=-1)


_SOURCES = {  # type -> (gguf-py class, bits per coordinate, nwant)
    T.IQ3_XXS: (gq.IQ3_XXS, 3, 2), T.IQ3_S: (gq.IQ3_S, 3, 3),
    T.IQ2_XXS: (gq.IQ2_XXS, 2, 2), T.IQ2_XS: (gq.IQ2_XS, 2, 2), T.IQ2_S: (gq.IQ2_S, 2, 1),
    T.IQ1_S: (gq.IQ1_S, 2, 3), T.IQ1_M: (gq.IQ1_S, 2, 3),
}


@functools.lru_cache(maxsize=None)
def lattice(qtype: T) -> Lattice:
    cls, bits, nwant = _SOURCES[qtype]
    cls.init_grid()
    vals = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    levels = np.searchsorted(np.asarray(cls.grid_map, dtype=np.float32), vals).astype(np.int32)
    n, dim = levels.shape
    size = 1 << (bits * dim)
    kmap = np.full(size, -1, dtype=np.int32)
    shifts = bits * np.arange(dim)
    kmap[(levels.astype(np.int64) << shifts).sum(axis=1)] = np.arange(n, dtype=np.int32)
    keys = np.flatnonzero(kmap < 0)
    lv = levels.astype(F32)
    norms = (lv * lv).sum(axis=1)
    count = np.zeros(size, dtype=np.int64)
    flat = []
    step = 4096
    for start in range(0, keys.size, step):  # bounded temporaries for the 65536-key IQ2 maps
        k = keys[start:start + step]
        pos = ((k[:, None] >> shifts) & ((1 << bits) - 1)).astype(F32)  # [K, dim]
        # |g - p|^2 = |g|^2 + |p|^2 - 2 g.p: small integers, exact in float32
        d2 = (norms[None, :] + (pos * pos).sum(axis=1)[:, None] - F32(2) * (pos @ lv.T)).astype(np.int32)
        limit = d2.min(axis=1)
        for _ in range(nwant - 1):  # the nwant-th smallest distinct distance
            limit = np.where(d2 > limit[:, None], d2, np.iinfo(np.int32).max).min(axis=1)
        row, j = np.nonzero(d2 <= limit[:, None])  # row-major: index order within a row
        order = np.lexsort((j, d2[row, j], row))  # then by distance: qsort's (d2, index) order
        flat.append(j[order])
        count[k] = np.bincount(row, minlength=k.size)
    nb_flat = np.concatenate(flat).astype(np.int32)
    nb_start = np.cumsum(count) - count
    values = (2 * levels + 1).astype(F32)
    return Lattice(levels, values, np.ascontiguousarray(values.T), bits, kmap, nb_start, count, nb_flat)


def best_neighbour(lat: Lattice, keys: np.ndarray, xval: np.ndarray, w: np.ndarray, scale: np.ndarray,
                   columns: np.ndarray | None = None) -> np.ndarray:
    """``iq{2,3}_find_best_neighbour`` (and IQ1's ``iq1_find_best_neighbour2``) for P off-grid groups at once: the
    neighbour minimising sum_i w_i (scale*q_i - x_i)^2 (float32, C's order, first minimum wins). keys [P],
    xval/w [P, dim], scale [P]; q from ``columns`` ([dim, N], default 2l+1). The lists are ragged (1 to a few
    hundred long), so all candidates are laid end to end and reduced per group."""
    columns = lat.columns if columns is None else columns
    counts = lat.nb_count[keys]
    ends = np.cumsum(counts)
    offsets = ends - counts
    seg = np.repeat(np.arange(keys.size), counts)
    local = np.arange(int(ends[-1])) - offsets[seg]
    cand = lat.nb_flat[lat.nb_start[keys][seg] + local]
    s = scale.astype(F32)[seg]
    xt, wt = np.ascontiguousarray(xval.T), np.ascontiguousarray(w.T)  # per-coordinate rows: contiguous gathers
    d2 = np.zeros(cand.size, dtype=F32)
    diff = np.empty(cand.size, dtype=F32)
    tmp = np.empty(cand.size, dtype=F32)
    for i in range(lat.dim):
        np.multiply(s, columns[i][cand], out=diff)
        diff -= xt[i][seg]
        np.multiply(wt[i][seg], diff, out=tmp)
        tmp *= diff
        d2 += tmp
    best = np.minimum.reduceat(d2, offsets)
    first = np.minimum.reduceat(np.where(d2 == best[seg], local, np.iinfo(np.int64).max), offsets)
    return cand[offsets + first]
