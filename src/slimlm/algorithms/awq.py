"""AWQ (Lin et al. 2024): protect salient input channels by scaling them up before quantization.

For each smoothing pair (a norm or Linear feeding some Linears), search ``s = mean|x|^r / mean|ŵ|^(1-r)``
over a grid of r ("duo scaling", llm-compressor's default), fold ``1/s`` into the feeding op and ``s`` into the
weights, and keep the r whose quantized Linears reproduce the float outputs best. Then search a per-group
clipping ratio (AutoAWQ's ``auto_clip``) for every Linear except q/k.

Both searches use the exact output error ``‖X(Ŵ − W)ᵀ‖² = tr(ΔW H ΔWᵀ)`` with ``H = XᵀX/n`` gathered once,
so every grid point costs one (out × in × in) product instead of a pass over the calibration tokens, and
grid points are evaluated in batches.
"""

from __future__ import annotations

import torch

from slimlm.algorithms.mappings import SmoothPair, fold_scale
from slimlm.algorithms.stats import LayerStats
from slimlm.formats.groupint import QuantSpec, fake_quantize, minmax_params, quantize, dequantize

N_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5
NO_CLIP = ("q_proj", "k_proj")  # AutoAWQ leaves q/k unclipped: attention logits are sensitive to them


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``tr(ΔW H ΔWᵀ)`` for a batch of ΔW (B, out, in)."""
    return ((delta @ h) * delta).sum(dim=(-1, -2))


def _weight_salience(weights: list[torch.Tensor], specs: list[QuantSpec]) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max |w| (AWQ's weight term)."""
    parts = []
    for w, spec in zip(weights, specs):
        gs = w.shape[1] if spec.group_size is None else spec.group_size
        g = w.float().abs().reshape(w.shape[0], -1, gs)
        parts.append((g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape))
    return torch.cat(parts, 0).mean(0)


def search_scale(weights: list[torch.Tensor], specs: list[QuantSpec], act_mean: torch.Tensor,
                 h: torch.Tensor, n_grid: int = N_GRID, batch: int = 5) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scale for Linears sharing one input; returns (s, best error, error with s = 1)."""
    ws = [w.float() for w in weights]
    w_mean = _weight_salience(ws, specs).clamp(min=1e-4)
    x_mean = act_mean.float().clamp(min=1e-4)
    cands = [torch.ones_like(x_mean)]
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r) / w_mean.pow(1 - r)
        s = s / (s.max() * s.min()).sqrt()
        cands.append(s.clamp(min=1e-4))
    errors = torch.zeros(len(cands))
    for b0 in range(0, len(cands), batch):
        s = torch.stack(cands[b0:b0 + batch])  # (B, in)
        total = torch.zeros(s.shape[0])
        for w, spec in zip(ws, specs):
            scaled = w[None] * s[:, None, :]
            delta = fake_quantize(scaled, spec) / s[:, None, :] - w[None]
            total += _output_error(delta, h)
        errors[b0:b0 + batch] = total
    best = int(torch.argmin(errors))
    return cands[best], float(errors[best]), float(errors[0])


def search_clip(weight: torch.Tensor, spec: QuantSpec, h: torch.Tensor, n_grid: int = CLIP_GRID,
                max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """Per (row, group) range-shrink ratio minimising that group's output error ``Δ_gᵀ H_gg Δ_g``."""
    w = weight.float()
    out_f, in_f = w.shape
    gs = in_f if spec.group_size is None else spec.group_size
    n_groups = in_f // gs
    idx = torch.arange(n_groups)
    h_blocks = h.reshape(n_groups, gs, n_groups, gs)[idx, :, idx, :]  # (G, gs, gs) diagonal blocks
    wg = w.reshape(out_f, n_groups, gs)
    ratios = [1.0 - i / n_grid for i in range(int(n_grid * max_shrink))]
    best_err = torch.full((out_f, n_groups), float("inf"))
    best_ratio = torch.ones(out_f, n_groups)
    for r in ratios:
        scale, zero = minmax_params(w, spec.bits, spec.group_size, spec.symmetric, r)
        deq = dequantize(quantize(w, scale, zero, spec.bits, spec.group_size), scale, zero, spec.group_size)
        delta = (deq - w).reshape(out_f, n_groups, gs)
        err = torch.einsum("ogi,gij,ogj->og", delta, h_blocks, delta)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return best_ratio


def awq_layer(layer: torch.nn.Module, stats: LayerStats, pairs: list[SmoothPair],
              specs: dict[str, QuantSpec], clip: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Search and fold AWQ scales for every pair of ``layer`` (in place), then search clip ratios.

    Returns the clip ratio per Linear (``(out, groups)``, 1 where unclipped) and a small report.
    """
    modules = dict(layer.named_modules())
    report = {}
    for pair in pairs:
        names = pair.linears
        st = stats[names[0]]
        s, err, err_rtn = search_scale([modules[n].weight for n in names], [specs[n] for n in names],
                                       st.abs_mean, st.hessian)
        fold_scale(layer, pair, s)
        for shared in {id(stats[n]): stats[n] for n in names}.values():
            shared.rescale(s)
        report[pair.prev] = {"error": err, "error_unscaled": err_rtn}
    clips = {}
    for name, spec in specs.items():
        w = modules[name].weight
        if clip and not name.endswith(NO_CLIP):
            clips[name] = search_clip(w, spec, stats[name].hessian)
        else:
            clips[name] = torch.ones(w.shape[0], spec.groups(w.shape[1]))
    return clips, report
