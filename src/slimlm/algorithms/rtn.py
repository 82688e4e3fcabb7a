"""Round-to-nearest: min/max scales per group, no calibration data. The baseline every method must beat."""

from __future__ import annotations

import torch

from slimlm.formats.groupint import QuantizedWeight, QuantSpec, quantize_weight


def rtn_quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize ``weight`` (out, in) with each group's own min/max range."""
    return quantize_weight(weight, spec)
