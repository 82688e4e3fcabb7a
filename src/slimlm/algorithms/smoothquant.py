"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

Per input channel j, ``s_j = max|x_j|^α / max|W_:,j|^(1-α)`` (α = smoothing strength, 0.8 by default as in
llm-compressor); ``x/s`` is folded into the preceding norm and ``W·diag(s)`` into the Linears: the model is unchanged
in real arithmetic, but its activations are far easier to quantize per token."""

from __future__ import annotations

import torch

from slimlm.algorithms.mappings import SmoothPair, fold_scale
from slimlm.algorithms.stats import LayerStats

DEFAULT_STRENGTH = 0.8


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], strength: float) -> torch.Tensor:
    """The per-channel scales for one norm → Linears pair."""
    w_absmax = torch.cat([w.float().abs() for w in weights], 0).amax(0)
    s = act_absmax.float().clamp(min=1e-5).pow(strength) / w_absmax.clamp(min=1e-5).pow(1 - strength)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(min=1e-5)


def smooth_layer(layer: torch.nn.Module, stats: LayerStats, pairs: list[SmoothPair],
                 strength: float = DEFAULT_STRENGTH) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into ``layer`` in place; returns the scales per pair (``prev`` name)."""
    modules = dict(layer.named_modules())
    applied = {}
    for pair in pairs:
        st = stats[pair.linears[0]]
        s = smoothing_scales(st.abs_max, [modules[n].weight for n in pair.linears], strength)
        fold_scale(layer, pair, s)
        for shared in {id(stats[n]): stats[n] for n in pair.linears}.values():
            shared.rescale(s)
        applied[pair.prev] = s
    return applied
