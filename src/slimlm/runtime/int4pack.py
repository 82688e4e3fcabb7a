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


def cuda_inner_k_tiles(k: int) -> int:
    """Largest of 8/4/2 k-tiles of 16 that divides K (the CUDA kernel needs K % (16·tiles) == 0)."""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"K={k} is not a multiple of 32, which the CUDA int4 kernel needs")


def pack_cuda(u: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` codes in 0..15 (on the GPU) → the CUDA tinygemm layout.

    torch ≥ 2.5 takes uint8 ``(N, K/2)`` with the even column in the high nibble (as torchao packs it).
    """
    u = u.to(torch.int32)
    packed_bytes = (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(packed_bytes.contiguous(), cuda_inner_k_tiles(u.shape[1]))


def _block_n() -> int:
    cap = torch.backends.cpu.get_cpu_capability()
    return 64 if cap.startswith("AVX512") else 32


def unpack_cpu_kn(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_cpu``, transposed: packed uint8 → ``(K, N)`` uint8 codes in 0..15.

    (K, N) is the order the packed blocks are stored in (k-major inside each block of rows), so this costs
    two nibble masks and one copy, and the dequantized result feeds ``x @ W.T`` directly.
    """
    cap = torch.backends.cpu.get_cpu_capability()
    block = _block_n()
    flat = packed.reshape(-1)
    full = n // block
    parts = []
    if full:
        blk = flat[: full * k * block // 2].view(full, k, block // 2)
        if cap.startswith(("AVX512", "AVX2")):
            # AVX512: byte d = rows d | d+32, byte 16+d = rows d+16 | d+48; AVX2: byte d = rows d | d+16.
            # Either way low nibbles are the first half of the block's rows, high nibbles the second half.
            rows = torch.cat([blk & 15, blk >> 4], dim=-1)
        else:
            rows = torch.stack([blk & 15, blk >> 4], dim=-1).reshape(full, k, block)  # byte j = rows 2j | 2j+1
        parts.append(rows.transpose(0, 1).reshape(k, full * block))
    tail = n - full * block
    if tail:
        blk = flat[full * k * block // 2:].view(k, tail // 2)
        parts.append(torch.stack([blk & 15, blk >> 4], dim=-1).reshape(k, tail))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_cpu``: packed uint8 → ``(N, K)`` uint8 codes in 0..15."""
    return unpack_cpu_kn(packed, n, k).t().contiguous()


def prefill_params(scale_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous bf16 ``(G, 1, N)`` scale and ``zero - 8·scale`` for ``dequantize_kn_bf16``.

    Folding the -8 into the zero saves a pass over the weight; the folded zero is rounded to bf16 once.
    """
    sz = scale_zero.float()
    scale, zero = sz[..., 0], sz[..., 1] - 8 * sz[..., 0]
    return scale.to(torch.bfloat16)[:, None, :].contiguous(), zero.to(torch.bfloat16)[:, None, :].contiguous()


def dequantize_kn_bf16(packed: torch.Tensor, scale: torch.Tensor, zero8: torch.Tensor, n: int, k: int,
                       group_size: int) -> torch.Tensor:
    """The kernel's weights as a bf16 ``(K, N)`` matrix for long activations: ``u * scale + zero8``.

    ``scale``/``zero8`` from ``prefill_params``; addcmul evaluates each value in fp32 and rounds once.
    """
    t = unpack_cpu_kn(packed, n, k).to(torch.bfloat16).view(k // group_size, group_size, n)
    return torch.addcmul(zero8, t, scale).view(k, n)


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
