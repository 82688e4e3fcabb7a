"""Round-to-nearest: min/max scales per group, no calibration data; the baseline every method must beat. One rule
(:func:`slimlm.formats.groupint.quantize_weight`) for files and kernels; the kernel layouts below only pick its
runtime parameters (int8: codes ±127, a 1e-10 floor; int4: zero scales become 1e-10)."""

from __future__ import annotations

import torch

from slimlm.formats.groupint import QuantizedWeight, QuantSpec, quantize_weight

KERNEL_TINY = 1e-10  # the runtime kernels' floor for a zero range (files use the dtype's eps)


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) with each group's own min/max range."""
    return quantize_weight(weight, spec)


def rtn_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row for the int8 kernels: codes in -127..127 and fp32 scales ``(N,)``."""
    qw = quantize_weight(w, QuantSpec(8, None, True), restricted_range=True, tiny=KERNEL_TINY)
    return qw.q, qw.scale.reshape(-1)


def rtn_int4_groups(w: torch.Tensor, group_size: int, symmetric: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Signed int4 codes (-8..7), scales ``(N, G)`` and integer zero points (None when symmetric) for the int4
    kernel: compressed-tensors' min/max rule (``w ≈ (q - zero) * scale``), so RTN here equals an RTN export."""
    qw = quantize_weight(w, QuantSpec(4, group_size, symmetric), tiny=KERNEL_TINY)
    return qw.q, qw.scale, qw.zero
