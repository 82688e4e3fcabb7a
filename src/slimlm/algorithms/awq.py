"""AWQ (Lin et al. 2024): protect salient input channels by scaling them up before quantization.

:func:`best_scale` keeps the first candidate per-channel scale ``s`` whose quantized ``W·diag(s)`` best reproduces
the float outputs, scored by the exact output error ``tr(ΔW H ΔWᵀ)``, ``H = XᵀX/n`` gathered once. The layer stream
(:func:`search_scale`) searches llm-compressor's duo-scaling grid ``s = mean|x|^r / mean|ŵ|^(1-r)`` under group-int
fake quantization, then a per-group clip ratio (AutoAWQ's ``auto_clip``) for all but q/k and gate (:data:`NO_CLIP`);
the GGUF tensor stream (:func:`equalization_plan`) searches ``s = E[x²]^(α/2)`` under llama.cpp's encoder round trip.

At real width the exact metric costs ``out·in²`` per grid point (21 points of one 7B down_proj: ~27 TFLOP): a
pair whose Linears would cost more than ``EXACT_MAX_MACS`` is scored with the diagonal ``group×group`` blocks of ``H`` (the
clip search's metric; cross-group terms dropped), ``out·in·group`` per grid point, and only those blocks are gathered
(:func:`gram_blocks`). A pair of more than ``SEARCH_ELEMENTS`` weights scores its grid on a seeded sample of output
rows (the scale is per input channel, shared by every row; the sampled error, scaled up, estimates the whole).
Weights are rounded in chunks of rows that stay in cache (every step is per row, so results do not change)."""

from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Iterable, Sequence, TypeVar

import gguf
import numpy as np
import torch

from slimlm.algorithms.mappings import SmoothPair, fold_scale, gguf_pairs
from slimlm.algorithms.stats import LayerStats
from slimlm.formats import ggml
from slimlm.formats.groupint import QuantSpec, fake_quantize, minmax_params, quantize, dequantize

N_GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5
# Linears the clip search leaves alone. q/k: AutoAWQ's rule (attention logits are sensitive to them). gate_proj: its
# output goes through SiLU and multiplies up_proj's, so its own output error misjudges which rounding matters. With
# gate clipped by that score, AWQ scored 1.015× RTN's KLD on Qwen2.5-0.5B; left unclipped, 0.922× (SmolLM2: 0.411× →
# 0.416×). Fp32 statistics, 6 test windows: benchmarks/awq_ablation.py, BENCHMARKS.md 2026-12-05.
NO_CLIP = ("q_proj", "k_proj", "gate_proj")
ALPHAS = (0.0, 0.25, 0.5, 0.75)  # the tensor stream's grid (α = 0: no scaling)
# Multiply-adds per grid point above which a pair is scored with H's group blocks: every pair of SmolLM2-135M and
# Qwen2.5-0.5B (largest 2.1e10, Qwen2's down_proj) stays exact; every pair of a 7B (q/k/v: 5.9e10) is blocked.
EXACT_MAX_MACS = 2 ** 35
BATCH_ELEMENTS = 2 ** 26  # scaled weight copies per batch of grid points, at most (5 for small models)
# Weights per pair whose grid is scored in full: no pair of SmolLM2 or Qwen2.5-0.5B is sampled (largest 8.7 M, Qwen2's
# gate+up); a 7B's gate+up (136 M) scores 25% of its rows, its down_proj 49%.
SEARCH_ELEMENTS = 2 ** 25
CHUNK_ELEMENTS = 2 ** 20  # weights rounded at once (a 7B gate_proj's clip search: 8.5 s whole, 2.7 s in chunks)

S = TypeVar("S")


def best_scale(candidates: Sequence[S], errors: Callable[[Sequence[S]], Iterable[float]],
               batch: int = 1) -> tuple[int, list[float]]:
    """The index of the first candidate with the least error, and every candidate's error; ``errors`` scores
    a batch of (at most ``batch``) candidates, quantizing the scaled weights its own way."""
    errs: list[float] = []
    for b0 in range(0, len(candidates), batch):
        errs.extend(float(e) for e in errors(candidates[b0:b0 + batch]))
    return min(range(len(errs)), key=errs.__getitem__), errs


def _output_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``tr(ΔW H ΔWᵀ)`` for a batch of ΔW (B, out, in)."""
    return ((delta @ h) * delta).sum(dim=(-1, -2))


def _diagonal_blocks(h: torch.Tensor, group: int) -> torch.Tensor:
    """H's (G, group, group) diagonal blocks (``h`` as gathered: whole, or already its blocks of ``group``)."""
    if h.ndim == 3:
        if h.shape[1] != group:
            raise ValueError(f"H gathered in blocks of {h.shape[1]}, {group} needed")
        return h
    n = h.shape[0] // group
    idx = torch.arange(n)
    return h.reshape(n, group, n, group)[idx, :, idx, :]


def _block_output_error(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``Σ_g Δ_g H_gg Δ_gᵀ`` for a batch of ΔW (B, out, in): the output error without cross-group terms."""
    b, out_f, _ = delta.shape
    n, gs = blocks.shape[0], blocks.shape[1]
    d = delta.reshape(b * out_f, n, gs).transpose(0, 1)  # (G, B·out, gs)
    return (torch.bmm(d, blocks) * d).sum(dim=(0, 2)).reshape(b, out_f).sum(-1)


def _weight_salience(weights: list[torch.Tensor], specs: list[QuantSpec]) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max |w| (AWQ's weight term)."""
    parts = []
    for w, spec in zip(weights, specs):
        gs = w.shape[1] if spec.group_size is None else spec.group_size
        g = w.float().abs().reshape(w.shape[0], -1, gs)
        parts.append((g / g.amax(-1, keepdim=True).clamp(min=1e-12)).reshape(w.shape))
    return torch.cat(parts, 0).mean(0)


def _blocked(out_features: int, in_f: int, specs: Sequence[QuantSpec], exact_max_macs: int | None) -> int | None:
    """The block size a pair is scored with (None: exactly, with the whole H)."""
    group = min((sp.group_size or in_f) for sp in specs)
    block = group if group < in_f else 128  # per-channel scales: blocks of 128 columns
    limit = EXACT_MAX_MACS if exact_max_macs is None else exact_max_macs
    return block if out_features * in_f * in_f > limit and in_f % block == 0 else None


def gram_blocks(pairs: Iterable[SmoothPair], modules: dict[str, torch.nn.Module],
                specs: dict[str, QuantSpec]) -> dict[str, int]:
    """{Linear: block} for the pairs the search scores with H's diagonal blocks and whose clip groups are those
    blocks: nothing else of their Gram is read, so only the blocks need gathering."""
    out: dict[str, int] = {}
    for pair in pairs:
        sps = [specs[n] for n in pair.linears]
        in_f = modules[pair.linears[0]].in_features
        block = _blocked(sum(modules[n].out_features for n in pair.linears), in_f, sps, None)
        if block is not None and all(sp.group_size == block for sp in sps):
            out.update({n: block for n in pair.linears})
    return out


def _sample_rows(ws: list[torch.Tensor], limit: int) -> tuple[list[torch.Tensor], list[float]]:
    """At most about ``limit`` weights: the same seeded fraction of each Linear's rows, and each one's scale-up."""
    total = sum(w.numel() for w in ws)
    if total <= limit:
        return ws, [1.0] * len(ws)
    gen = torch.Generator().manual_seed(0)
    kept, ups = [], []
    for w in ws:
        k = max(1, math.ceil(w.shape[0] * limit / total))
        kept.append(w[torch.randperm(w.shape[0], generator=gen)[:k].sort().values])
        ups.append(w.shape[0] / k)
    return kept, ups


def search_scale(weights: list[torch.Tensor], specs: list[QuantSpec], act_mean: torch.Tensor,
                 h: torch.Tensor, n_grid: int = N_GRID, batch: int = 5,
                 exact_max_macs: int | None = None, search_elements: int | None = None
                 ) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scale for Linears sharing one input; returns (s, best error, error with s = 1).
    ``h``: the input's Gram, whole or as diagonal blocks (:func:`gram_blocks`)."""
    ws = [w.float() for w in weights]
    in_f = act_mean.shape[0]
    block = h.shape[1] if h.ndim == 3 else _blocked(sum(w.shape[0] for w in ws), in_f, specs, exact_max_macs)
    blocks = _diagonal_blocks(h, block) if block is not None else None
    w_mean = _weight_salience(ws, specs).clamp(min=1e-4)
    ws, ups = _sample_rows(ws, SEARCH_ELEMENTS if search_elements is None else search_elements)
    batch = max(1, min(batch, BATCH_ELEMENTS // max(w.numel() for w in ws)))
    x_mean = act_mean.float().clamp(min=1e-4)
    cands = [torch.ones_like(x_mean)]
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.pow(r) / w_mean.pow(1 - r)
        s = s / (s.max() * s.min()).sqrt()
        cands.append(s.clamp(min=1e-4))

    def errors(group: Sequence[torch.Tensor]) -> torch.Tensor:
        s = torch.stack(list(group))  # (B, in): grid points evaluated in batches
        total = torch.zeros(s.shape[0], dtype=torch.float64)
        rows = max(1, CHUNK_ELEMENTS // (s.shape[0] * in_f))  # rows of every grid point in one chunk
        for w, spec, up in zip(ws, specs, ups):
            for r0 in range(0, w.shape[0], rows):
                wc = w[None, r0:r0 + rows]
                delta = fake_quantize(wc * s[:, None, :], spec) / s[:, None, :] - wc
                err = _block_output_error(delta, blocks) if blocks is not None else _output_error(delta, h)
                total += err.double() * up
        return total

    best, errs = best_scale(cands, errors, batch)
    return cands[best], errs[best], errs[0]


def search_clip(weight: torch.Tensor, spec: QuantSpec, h: torch.Tensor, n_grid: int = CLIP_GRID,
                max_shrink: float = MAX_SHRINK) -> torch.Tensor:
    """Per (row, group) range-shrink ratio minimising that group's output error ``Δ_gᵀ H_gg Δ_g``."""
    w = weight.float()
    out_f, in_f = w.shape
    gs = in_f if spec.group_size is None else spec.group_size
    n_groups = in_f // gs
    h_blocks = _diagonal_blocks(h, gs)
    ratios = [1.0 - i / n_grid for i in range(int(n_grid * max_shrink))]
    best_ratio = torch.ones(out_f, n_groups)
    rows = max(1, CHUNK_ELEMENTS // in_f)
    for r0 in range(0, out_f, rows):
        wc = w[r0:r0 + rows]
        best_err = torch.full((wc.shape[0], n_groups), float("inf"))
        best = best_ratio[r0:r0 + rows]
        for r in ratios:
            scale, zero = minmax_params(wc, spec.bits, spec.group_size, spec.symmetric, r)
            deq = dequantize(quantize(wc, scale, zero, spec.bits, spec.group_size), scale, zero, spec.group_size)
            delta = (deq - wc).reshape(wc.shape[0], n_groups, gs)
            err = torch.einsum("ogi,gij,ogj->og", delta, h_blocks, delta)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best.masked_fill_(better, r)
    return best_ratio


def awq_layer(layer: torch.nn.Module, stats: LayerStats, pairs: list[SmoothPair],
              specs: dict[str, QuantSpec], clip: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Search and fold AWQ scales for every pair of ``layer`` (in place), then search clip ratios; returns the
    clip ratio per Linear (``(out, groups)``, 1 where unclipped) and a small report."""
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


# ---------------------------------------------------------------- tensor stream: GGML codecs, GGUF names
def power_scales(mean_sq: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's s = E|x|^α (here from E[x²]), normalised to geometric mean 1 so weights keep their range."""
    s = np.maximum(mean_sq.astype(np.float64), 1e-12) ** (alpha / 2)
    s /= np.exp(np.log(s).mean())
    return s.astype(np.float32)


def ggml_output_error(w: np.ndarray, qtype: gguf.GGMLQuantizationType, importance: np.ndarray | None,
                      hessian: np.ndarray | None) -> float:
    """Output error of rounding w the llama.cpp way: tr(ΔW H ΔWᵀ) with H the input covariance (or its diagonal)."""
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return 0.0
    q = ggml.dequantize(ggml.quantize(w, qtype, importance), qtype, w.shape)
    d = (w - q).astype(np.float64)
    if hessian is not None:
        return float(np.einsum("ij,jk,ik->", d, hessian, d))
    diag = np.ones(w.shape[1]) if importance is None else importance.astype(np.float64)
    return float(((d * d) * diag).sum())


def equalization_plan(load: Callable[[str], np.ndarray], names: set[str],
                      plan: dict[str, gguf.GGMLQuantizationType], n_layers: int,
                      importance: Callable[[str], np.ndarray | None], hessians: dict[str, np.ndarray] | None,
                      alphas: tuple[float, ...] = ALPHAS) -> dict[str, np.ndarray]:
    """Per-channel scales {feeding tensor: s} for the GGUF pairs, α searched per pair; α = 0 (no change) is
    kept unless the rounding error under the calibration covariance drops."""
    chosen: dict[str, np.ndarray] = {}
    for pair in gguf_pairs(n_layers):
        mats = pair.linears
        if not alphas or pair.prev not in names or not all(m in names for m in mats):
            continue
        imp = importance(mats[0])
        if imp is None or np.ndim(imp) != 1:
            continue
        weights = {m: load(m) for m in mats}

        def error(s: np.ndarray, weights: dict[str, np.ndarray] = weights) -> float:
            return sum(ggml_output_error(w * s, plan[m], importance(m) / (s * s),
                                         hessians[m] / np.outer(s, s) if hessians and m in hessians else None)
                       for m, w in weights.items())

        cands = [power_scales(imp, alpha) for alpha in alphas]
        best = cands[best_scale(cands, lambda group: [error(s) for s in group])[0]]
        if not np.all(best == 1.0):
            chosen[pair.prev] = best
    return chosen


def apply_equalization(scales: dict[str, np.ndarray], n_layers: int
                       ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per-tensor value transforms that realise the chosen scales (composed where a tensor is in two pairs)."""
    ops: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {}
    for pair in gguf_pairs(n_layers):
        s = scales.get(pair.prev)
        if s is None:
            continue
        ops.setdefault(pair.prev, []).append(lambda a, s=s: a / s if a.ndim == 1 else a / s[:, None])
        for m in pair.linears:
            ops.setdefault(m, []).append(lambda a, s=s: a * s[None, :])
    return {name: lambda a, fns=fns: np.ascontiguousarray(reduce(lambda v, fn: fn(v), fns, a), dtype=np.float32)
            for name, fns in ops.items()}

