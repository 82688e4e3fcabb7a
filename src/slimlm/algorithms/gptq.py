"""GPTQ (Frantar et al. 2023): quantize columns in order, pushing each step's rounding error onto the columns
not yet quantized through the inverse Hessian of the layer's input.

One core (:func:`gptq_core`) with a rounding callback: :func:`gptq_quantize` rounds one column at a time to
group-int codes; :func:`gptq_encode` rounds whole GGML blocks (32 or 256 columns) with llama.cpp's encoder as a
black box, so the GGUF bytes are those of a normal file. A step of k columns pushes on E = (W_s − Q_s) U_ss⁻¹,
H⁻¹ = UᵀU (upper Cholesky): GPTQ's column recurrence for fixed Q_s. Rows are independent given H: Linears sharing
an input are stacked."""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np
import torch

from slimlm.algorithms.stats import LayerStats
from slimlm.errors import SlimlmError
from slimlm.formats import ggml
from slimlm.formats.groupint import QuantizedWeight, QuantSpec, minmax_params, qrange

DEFAULT_DAMPENING = 0.01
DEFAULT_BLOCK = 128

# (lazy batch of columns, offset of the step in it, its first column in the matrix) -> dequantized step:
# a column (rows,) for a step of 1, else (rows, step). Reads the batch, never writes it.
Rounding = Callable[[torch.Tensor, int, int], torch.Tensor]


def dead_inputs_fixed(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of H whose never-active inputs (zero diagonal) get diagonal 1, and their mask: they carry no error."""
    h = hessian.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    return h, dead


def inverse_hessian_factor(h: torch.Tensor, dampening: float = DEFAULT_DAMPENING) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean(diag H), ×10 while H is indefinite."""
    diag_mean = torch.diag(h).mean().clamp(min=1e-8)
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(6):
        damp = dampening * (10 ** attempt) * diag_mean
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
    raise SlimlmError("GPTQ: the calibration Hessian is not positive definite even with heavy dampening")


def gptq_core(w: torch.Tensor, hinv: torch.Tensor, round_step: Rounding, *, step: int = 1,
              block: int = DEFAULT_BLOCK) -> None:
    """Round ``w`` (out, in; updated in place) ``step`` columns at a time; ``hinv`` from :func:`inverse_hessian_factor`.
    ``block`` (a multiple of ``step``) is the lazy batch: updates inside it touch only the batch, the rest of the
    matrix gets the batch's error in one matmul. The dtype is the caller's (float32 or float64)."""
    n = w.shape[1]
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        errs = []
        for j in range(0, i2 - i1, step):
            k = min(j + step, i2 - i1)
            deq = round_step(w1, j, i1 + j)
            if i1 + k == n:
                return  # nothing left to push the error onto
            if step == 1:
                err = (w1[:, j] - deq) / hinv1[j, j]
                w1[:, j:] -= err[:, None] * hinv1[j, j:][None, :]
                errs.append(err[:, None])
            else:
                err = torch.linalg.solve_triangular(hinv1[j:k, j:k], w1[:, j:k] - deq, upper=True, left=False)
                w1[:, k:] -= err @ hinv1[j:k, k:]
                errs.append(err)
        err1 = errs[0] if len(errs) == 1 else torch.cat(errs, 1)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  dampening: float = DEFAULT_DAMPENING, block_size: int = DEFAULT_BLOCK,
                  actorder: bool = False) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` (out, in) to group-int codes given ``hessian`` = mean x xᵀ of its inputs. Group
    scales come from the *updated* weights when a group starts (reference implementation, llm-compressor).
    ``actorder`` (llm-compressor's "static"): scales fixed up front from the original weights, columns quantized
    by decreasing Hessian diagonal, so the most-used inputs are rounded first and the rest absorb their error."""
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    h, dead = dead_inputs_fixed(hessian.detach().float())
    w[:, dead] = 0.0
    qmin, qmax = qrange(spec.bits)
    gs = spec.group_size
    n_groups = spec.groups(in_f)
    scale = torch.empty(out_f, n_groups)
    zero = None if spec.symmetric else torch.empty(out_f, n_groups)
    fixed = gs is None or actorder
    if fixed:
        s0, z0 = minmax_params(w, spec.bits, gs, spec.symmetric)
        scale[:] = s0
        if zero is not None:
            zero[:] = z0
    perm = torch.argsort(torch.diag(h), descending=True) if actorder else None
    if perm is not None:
        w = w[:, perm]
        h = h[perm][:, perm]
    group_of = (torch.arange(in_f) if perm is None else perm) // (gs or in_f)
    if gs is not None and not fixed:
        block_size = gs * max(1, block_size // gs)  # groups never straddle blocks
    hinv = inverse_hessian_factor(h, dampening)
    codes = torch.empty(out_f, in_f)

    def round_column(w1: torch.Tensor, i: int, col: int) -> torch.Tensor:
        if not fixed and col % gs == 0:
            g = col // gs
            s_g, z_g = minmax_params(w1[:, i:i + gs], spec.bits, None, spec.symmetric)
            scale[:, g] = s_g[:, 0]
            if zero is not None:
                zero[:, g] = z_g[:, 0]
        g = int(group_of[col])
        s_c = scale[:, g]
        z_c = 0.0 if zero is None else zero[:, g]
        q = torch.round(w1[:, i] / s_c + z_c).clamp_(qmin, qmax)
        codes[:, col] = q
        return (q - z_c) * s_c

    # GPTQ is thousands of small ops (one column at a time) and a few modest matmuls: one thread avoids the
    # per-op fork/join cost, 3-25x faster on a busy 2-core machine and about even on an idle one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gptq_core(w, hinv, round_column, step=1, block=block_size)
    finally:
        torch.set_num_threads(threads)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.int8), scale, None if zero is None else zero.to(torch.int8), spec)


def gptq_encode(w: np.ndarray, qtype: gguf.GGMLQuantizationType, hessian: np.ndarray,
                importance: np.ndarray | None, damp: float = DEFAULT_DAMPENING) -> np.ndarray:
    """Encode ``w`` [rows, n] (float64 inside) to GGML blocks of ``qtype``, each block's error compensated."""
    qtype = ggml.qtype_of(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = w.shape[0]
    out = np.empty((rows, w.shape[1] // block * type_size), dtype=np.uint8)
    imp = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)

    def round_block(w1: torch.Tensor, j: int, c0: int) -> torch.Tensor:
        data = ggml.quantize(w1[:, j:j + block].to(torch.float32).numpy(), qtype,
                             None if imp is None else imp[c0:c0 + block])
        out[:, c0 // block * type_size:(c0 + block) // block * type_size] = data
        return torch.from_numpy(ggml.dequantize(data, qtype, (rows, block))).to(torch.float64)

    h, _ = dead_inputs_fixed(torch.from_numpy(np.asarray(hessian, dtype=np.float64)))
    hinv = inverse_hessian_factor(h, damp)
    gptq_core(torch.from_numpy(np.array(w, dtype=np.float64)), hinv, round_block, step=block, block=block)
    return out


def gptq_linears(linears: dict[str, torch.nn.Linear], names: list[str], stats: LayerStats,
                 specs: dict[str, QuantSpec], actorder: bool) -> dict[str, QuantizedWeight]:
    """GPTQ for Linears grouped by shared input statistics and spec: one stacked run per group."""
    groups: dict[tuple[int, QuantSpec], list[str]] = {}
    for n in names:
        groups.setdefault((id(stats[n]), specs[n]), []).append(n)
    out: dict[str, QuantizedWeight] = {}
    for (_, spec), batch in groups.items():
        w = torch.cat([linears[m].weight.float() for m in batch], 0)
        qw = gptq_quantize(w, stats[batch[0]].hessian, spec, actorder=actorder)
        row = 0
        for m in batch:
            rows = slice(row, row + linears[m].out_features)
            out[m] = QuantizedWeight(qw.q[rows], qw.scale[rows], None if qw.zero is None else qw.zero[rows], spec)
            row = rows.stop
    return out
