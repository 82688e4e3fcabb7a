"""Integer group-wise weight quantization (int4/int8), in compressed-tensors' conventions.

Codes are signed (int4 in [-8, 7], int8 in [-128, 127]); ``w ≈ (q - zero) * scale`` with one scale (and zero
point when asymmetric) per output row and group of ``group_size`` columns, or per row ("channel"): exactly what
compressed-tensors' ``pack-quantized`` / ``int-quantized`` store, so what we evaluate is what vLLM runs.
Written by hand (not compressed_tensors.quantize): the algorithms need the codes, the chosen scales and cheap
batched fake-quantization over many candidate scales; packing uses compressed-tensors' own ``pack_to_int32``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import SlimlmError

GROUP_SIZES = (32, 64, 128)


def qrange(bits: int, restricted_range: bool = False) -> tuple[int, int]:
    """Signed code range of a ``bits``-bit integer, as compressed-tensors uses it; ``restricted_range`` drops
    the most negative code (int8: -127..127, symmetric around 0, as the runtime's int8 kernels take it)."""
    return -(1 << (bits - 1)) + restricted_range, (1 << (bits - 1)) - 1


@dataclass(frozen=True)
class QuantSpec:
    """How one weight tensor is quantized: bits, group size (None = one group per row), symmetry."""

    bits: int
    group_size: int | None
    symmetric: bool

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else in_features // self.group_size

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size is None else "group"


@dataclass
class QuantizedWeight:
    """One ``(out, in)`` weight: int8 codes ``q``, float ``scale`` and int8 ``zero`` (None when symmetric)
    ``(out, groups)``."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.zero, self.spec.group_size).to(dtype)


def choose_group_size(in_features: int, requested: int | None, smallest: int = 16) -> tuple[int | None, str]:
    """The group size for ``in_features`` columns, and why: compressed-tensors (and vLLM) cannot represent a
    padded last group, so the largest power-of-two size ≤ requested that divides (at least ``smallest``),
    else one group per row ("channel"), which every kernel supports."""
    if requested is None:
        return None, "channel"
    if requested <= 0:
        raise SlimlmError(f"group size must be positive, got {requested}")
    if in_features % requested == 0:
        return requested, "as requested"
    size = requested // 2
    while size >= smallest:
        if in_features % size == 0:
            return size, f"{requested} does not divide {in_features}; largest dividing group size is {size}"
        size //= 2
    return None, f"no group size ≤ {requested} divides {in_features}; one scale per row (channel)"


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View ``(out, in)`` as ``(out, groups, group)``."""
    out, cols = w.shape[-2], w.shape[-1]
    g = cols if group_size is None else group_size
    return w.reshape(*w.shape[:-2], out, cols // g, g)


def minmax_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  clip: torch.Tensor | float = 1.0, *, restricted_range: bool = False, tiny: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from each group's range (compressed-tensors' ``calculate_qparams`` rule).

    ``clip`` (scalar or broadcastable to ``(..., out, groups)``) shrinks the range, for clipping searches.
    Leading batch dims of ``w`` are kept, so many candidates are computed at once. A group whose scale
    would be 0 gets ``tiny`` (None: the dtype's eps, as compressed-tensors; the runtime kernels use 1e-10).
    ``restricted_range`` drops the most negative code; symmetric, it is the runtime int8 kernels' rule: codes
    ±(2^(bits-1) - 1) and scale ``max(max|w|, tiny) / qmax``, the floor applied before the division.
    """
    qmin, qmax = qrange(bits, restricted_range)
    g = _grouped(w, group_size)
    lo = g.amin(-1).clamp(max=0) * clip
    hi = g.amax(-1).clamp(min=0) * clip
    if symmetric:
        half = torch.maximum(lo.abs(), hi)
        if restricted_range:
            half = half.clamp(min=torch.finfo(half.dtype).eps if tiny is None else tiny)
        scale = half / ((qmax - qmin) / 2)
        zero = None
    else:
        scale = (hi - lo) / (qmax - qmin)
    tiny = torch.finfo(scale.dtype).eps if tiny is None else tiny
    scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)
    if not symmetric:
        zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
             group_size: int | None, restricted_range: bool = False) -> torch.Tensor:
    """Integer codes (same float dtype as ``w``; cast with ``.to(torch.int8)``)."""
    qmin, qmax = qrange(bits, restricted_range)
    g = _grouped(w, group_size)
    x = g / scale.unsqueeze(-1)
    if zero is not None:
        x = x + zero.unsqueeze(-1).to(x.dtype)
    return torch.round(x).clamp_(qmin, qmax).reshape(w.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               group_size: int | None) -> torch.Tensor:
    """``(q - zero) * scale`` per group, in the scale's dtype."""
    g = _grouped(q.to(scale.dtype), group_size)
    if zero is not None:
        g = g - zero.to(scale.dtype).unsqueeze(-1)
    return (g * scale.unsqueeze(-1)).reshape(q.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Quantize then dequantize with min/max parameters (batched over leading dims of ``w``)."""
    scale, zero = minmax_params(w, spec.bits, spec.group_size, spec.symmetric, clip)
    return dequantize(quantize(w, scale, zero, spec.bits, spec.group_size), scale, zero, spec.group_size)


def quantize_weight(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float = 1.0, *,
                    restricted_range: bool = False, tiny: float | None = None) -> QuantizedWeight:
    """Round-to-nearest with min/max (optionally clipped) parameters, in fp32: THE RTN rule, for files
    (defaults) and for the runtime kernels (``restricted_range``/``tiny``, see :func:`minmax_params`)."""
    w = w.detach().float()
    scale, zero = minmax_params(w, spec.bits, spec.group_size, spec.symmetric, clip,
                                restricted_range=restricted_range, tiny=tiny)
    q = quantize(w, scale, zero, spec.bits, spec.group_size, restricted_range).to(torch.int8)
    return QuantizedWeight(q, scale, None if zero is None else zero.to(torch.int8), spec)


def pack_codes(q: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Signed codes packed 32/bits per int32 word along the last dim, by compressed-tensors' own packer
    (``pack-quantized``: code + 2^(bits-1) at bit bits·i of the row's bit stream)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.to(torch.int8).contiguous(), bits)


def unpack_codes(packed: torch.Tensor, shape: tuple[int, int], bits: int = 4) -> torch.Tensor:
    """Inverse of :func:`pack_codes`."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, bits, torch.Size(shape))


def pack_zero_points(zero: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Zero points ``(out, groups)`` packed along the output dim, as pack-quantized stores them."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(zero.to(torch.int8).contiguous(), bits, packed_dim=0).contiguous()


def unpack_zero_points(packed: torch.Tensor, shape: tuple[int, int], bits: int = 4) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=0)
