"""GGML blocks split into integer codes and per-group parameters, for mapping onto our int kernels.

slimlm.formats.ggml decodes blocks to floats; the runtime needs the integers themselves (to run them on
int4/int8 kernels without re-rounding), so the few block types with a fast path are split here, vectorized
over all blocks. Layouts follow ggml-quants.c (block_q4_0, block_q4_1, block_q4_K); tests check
``dequantize`` of our split against gguf-py's decoder. Every function takes the tensor's raw bytes as a
``(rows, bytes_per_row)`` uint8 array and returns torch tensors with one row per output feature.

int4 results use the tinygemm convention ``w = (u - 8) * scale + zero`` with ``u`` in 0..15, one group per
32 weights; the fp32 ``scale``/``zero`` are exact products of the block's fp16 numbers and small integers.
"""

from __future__ import annotations

import numpy as np
import torch

from slimlm.errors import SlimlmError


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    rows, nbytes = raw.shape
    if nbytes % block_bytes:
        raise SlimlmError(f"row of {nbytes} bytes is not a whole number of {block_bytes}-byte blocks")
    return np.ascontiguousarray(raw).reshape(rows, nbytes // block_bytes, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_16(qs: np.ndarray) -> np.ndarray:
    """16 bytes → 32 codes: low nibbles are elements 0..15, high nibbles 16..31 (Q4_0/Q4_1 order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def split_q4_0(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 (``w = (u - 8) * d``) → u, scale = d, zero = 0."""
    b = _blocks(raw, 18)
    d = _f16(b[..., 0:2])
    u = _nibbles_16(b[..., 2:]).reshape(b.shape[0], -1)
    return torch.from_numpy(u), torch.from_numpy(d), torch.zeros(d.shape, dtype=torch.float32)


def split_q4_1(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 (``w = u * d + m``) → u, scale = d, zero = 8d + m."""
    b = _blocks(raw, 20)
    d, m = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    u = _nibbles_16(b[..., 4:]).reshape(b.shape[0], -1)
    return torch.from_numpy(u), torch.from_numpy(d), torch.from_numpy(8 * d + m)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs of a Q4_K/Q5_K super-block from its 12 scale bytes."""
    s = s.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def split_q4_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K (``w = u * d*sc - dmin*m`` per 32) → u, scale = d*sc, zero = 8*scale - dmin*m."""
    b = _blocks(raw, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k4_scales(b[..., 4:16])
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
    u = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(b.shape[0], -1)
    scale = (d[..., None] * sc).reshape(b.shape[0], -1)
    minv = (dmin[..., None] * mn).reshape(b.shape[0], -1)
    return torch.from_numpy(u), torch.from_numpy(scale), torch.from_numpy(8 * scale - minv)


INT4_SPLITTERS = {"Q4_0": split_q4_0, "Q4_1": split_q4_1, "Q4_K": split_q4_k}
