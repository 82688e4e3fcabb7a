"""int4 weights in the layout of torch's "tinygemm" kernels, and back.

The kernels (``aten._weight_int4pack_mm_for_cpu`` on CPU, ``aten._weight_int4pack_mm`` on CUDA) compute
``y = x @ W.T`` with ``W[n, k] = (u[n, k] - 8) * scale[g, n] + zero[g, n]``, ``u`` in 0..15 and ``g = k //
group_size``; scales and zeros travel together as one ``(K/group, N, 2)`` tensor in the activation dtype.
Packing uses torch's own converters (``_convert_weight_to_int4pack_for_cpu`` / ``_convert_weight_to_int4pack``),
so we never depend on their byte order for the forward pass. We do read the CPU layout back (``unpack_cpu``)
to dequantize for long prompts and for reference modules; that layout is described in torch's
aten/src/ATen/native/cpu/int4mm_kernel.cpp (blocks of 64 rows on AVX512, 32 otherwise, k-major inside a
block), and ``cpu_layout_ok()`` checks our reading against the converter once per process.
"""

from __future__ import annotations

import functools

import torch

KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # BLOCK_K of the CPU kernel is the group size; these are the ones tested


def pack_scale_zero(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(N, G)`` scales and zeros → the kernels' ``(G, N, 2)`` tensor."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def pack_cpu(u: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` codes in 0..15 → the CPU kernel's packed uint8 ``(N, K/2)``."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).contiguous(), 1)


def pack_cuda(u: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """``(N, K)`` codes in 0..15 → the CUDA tinygemm layout (uint8 ``(N, K/2)`` input, as torch ≥ 2.5 wants)."""
    packed_bytes = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed_bytes.contiguous(), inner_k_tiles)


def _block_n() -> int:
    cap = torch.backends.cpu.get_cpu_capability()
    return 64 if cap.startswith("AVX512") else 32


def unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_cpu``: packed uint8 → ``(N, K)`` uint8 codes in 0..15 (vectorized, no copies of W)."""
    cap = torch.backends.cpu.get_cpu_capability()
    block = _block_n()
    flat = packed.reshape(-1)
    full = n // block
    out = torch.empty(n, k, dtype=torch.uint8)
    if full:
        blk = flat[: full * k * block // 2].view(full, k, block // 2)
        lo, hi = blk & 15, blk >> 4
        if cap.startswith("AVX512"):
            # byte d holds rows d | d+32, byte 16+d holds rows d+16 | d+48
            rows = torch.cat([lo[..., :16], lo[..., 16:], hi[..., :16], hi[..., 16:]], dim=-1)
        elif cap.startswith("AVX2"):
            rows = torch.cat([lo, hi], dim=-1)  # byte d holds rows d | d+16
        else:
            rows = torch.stack([lo, hi], dim=-1).reshape(full, k, block)  # byte j holds rows 2j | 2j+1
        out[: full * block] = rows.permute(0, 2, 1).reshape(full * block, k)
    tail = n - full * block
    if tail:
        blk = flat[full * k * block // 2:].view(k, tail // 2)
        out[full * block:] = torch.stack([blk & 15, blk >> 4], dim=-1).reshape(k, tail).t()
    return out


@functools.cache
def cpu_layout_ok() -> bool:
    """Whether ``unpack_cpu`` reads this torch build's CPU layout correctly (checked once, on a 112×64 probe)."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (112, 64), generator=gen, dtype=torch.uint8)
    try:
        return bool(torch.equal(unpack_cpu(pack_cpu(u), 112, 64), u))
    except RuntimeError:
        return False


def dequantize(u: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(u - 8) * scale + zero`` per group, computed in fp32 (what the kernels compute), returned in ``dtype``."""
    n, k = u.shape
    w = (u.view(n, k // group_size, group_size).to(torch.float32) - 8) * scale.float().unsqueeze(-1)
    return (w + zero.float().unsqueeze(-1)).reshape(n, k).to(dtype)
