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
    bits: int  # bits per coordinate in the packed key
    kmap: np.ndarray  # [2**(bits*dim)] grid index of a packed key, or -1
    neighbours: np.ndarray  # [2**(bits*dim), M] grid indices of an off-grid key's neighbours, padded with -1

    @property
    def dim(self) -> int:
        return self.levels.shape[1]

    def key(self, L: np.ndarray) -> np.ndarray:
        """Packed key of level groups [..., dim] (coordinate i at bits*i)."""
        shifts = (self.bits * np.arange(self.dim)).astype(np.int64)
        return (L.astype(np.int64) << shifts).sum(axis=-1)


_SOURCES = {  # type -> (gguf-py class, bits per coordinate, nwant)
    T.IQ3_XXS: (gq.IQ3_XXS, 3, 2), T.IQ3_S: (gq.IQ3_S, 3, 3),
    T.IQ2_XXS: (gq.IQ2_XXS, 2, 2), T.IQ2_XS: (gq.IQ2_XS, 2, 2), T.IQ2_S: (gq.IQ2_S, 2, 2),
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
    nbrs = []
    step = max(1, (1 << 22) // (n * dim))
    for start in range(0, keys.size, step):  # bounded temporaries for the 65536-key IQ2 maps
        k = keys[start:start + step]
        pos = (k[:, None] >> shifts) & ((1 << bits) - 1)  # [K, dim]
        d2 = ((levels[None, :, :] - pos[:, None, :]) ** 2).sum(axis=2)  # [K, N]
        order = np.argsort(d2, axis=1, kind="stable")  # ties by index, as qsort on (d2, index)
        ds = np.take_along_axis(d2, order, axis=1)
        rank = np.cumsum(np.diff(ds, axis=1, prepend=ds[:, :1]) > 0, axis=1)  # distinct distances seen
        nbrs.append(np.where(rank < nwant, order, -1))
    table = np.concatenate(nbrs) if nbrs else np.zeros((0, 1), np.int64)
    width = int((table >= 0).sum(axis=1).max())
    neighbours = np.full((size, width), -1, dtype=np.int32)
    neighbours[keys] = table[:, :width]
    return Lattice(levels, (2 * levels + 1).astype(F32), bits, kmap, neighbours)


def best_neighbour(lat: Lattice, keys: np.ndarray, xval: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``iq{2,3}_find_best_neighbour`` for P off-grid groups at once: the neighbour minimising
    sum_i w_i (scale*q_i - x_i)^2 (float32, C's order, first minimum wins). keys [P], xval/w [P, dim], scale [P]."""
    nb = lat.neighbours[keys]  # [P, M]
    q = lat.values[np.maximum(nb, 0)]  # [P, M, dim]
    s = scale.astype(F32)[:, None]
    d2 = np.zeros(nb.shape, dtype=F32)
    for i in range(lat.dim):
        diff = s * q[:, :, i] - xval[:, None, i]
        d2 += (w[:, None, i] * diff) * diff
    d2[nb < 0] = np.inf
    return np.take_along_axis(nb, np.argmin(d2, axis=1)[:, None], axis=1)[:, 0]
