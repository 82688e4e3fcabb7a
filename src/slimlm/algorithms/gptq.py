"""GPTQ (Frantar et al. 2023): quantize columns in order, pushing each column's error onto the columns not yet
quantized through the inverse Hessian of the layer's input.

Blocked ("lazy batch") form: inside a block of columns the updates touch only the block; the accumulated
error is applied to the rest of the matrix with one matmul per block. The inverse Hessian comes from a
Cholesky factorisation (upper factor of H⁻¹). Rows are independent given H, so Linears that share an input
(q/k/v, gate/up) are quantized as one stacked matrix. Group scales are chosen from the *updated* weights when
a group starts, as in the reference implementation and llm-compressor.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.groupint import QuantizedWeight, QuantSpec, minmax_params, qrange

DEFAULT_DAMPENING = 0.01
DEFAULT_BLOCK = 128


def _inverse_hessian_factor(h: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, increasing λ if H is numerically indefinite."""
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


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  dampening: float = DEFAULT_DAMPENING, block_size: int = DEFAULT_BLOCK,
                  actorder: bool = False) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` (out, in) given ``hessian`` = mean x xᵀ of its inputs (in, in).

    ``actorder`` ("static" activation ordering, as llm-compressor calls it): group scales are fixed up front
    from the original weights, then columns are quantized in order of decreasing Hessian diagonal, so the
    most-used input channels are rounded first and the rest absorb their error.
    """
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
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
    hinv = _inverse_hessian_factor(h, dampening)
    if gs is not None and not fixed:
        block_size = gs * max(1, block_size // gs)  # groups never straddle blocks
    codes = torch.empty(out_f, in_f)

    # GPTQ is thousands of small ops (one column at a time) and a few modest matmuls: one thread avoids the
    # per-op fork/join cost, 3-25x faster on a busy 2-core machine and about even on an idle one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        codes = _gptq_columns(w, hinv, codes, scale, zero, gs, fixed, group_of, spec, qmin, qmax, block_size)
    finally:
        torch.set_num_threads(threads)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return QuantizedWeight(codes.to(torch.int8), scale, None if zero is None else zero.to(torch.int8), spec)


def _gptq_columns(w, hinv, codes, scale, zero, gs, fixed, group_of, spec, qmin, qmax, block_size):
    """Blocked GPTQ over all columns (in place on ``w``, ``codes``, ``scale``, ``zero``)."""
    in_f = w.shape[1]
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        _quantize_block(w1, err1, hinv1, codes, scale, zero, i1, gs, fixed, group_of, spec, qmin, qmax)
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


def _quantize_block(w1, err1, hinv1, codes, scale, zero, i1, gs, fixed, group_of, spec, qmin, qmax) -> None:
    """GPTQ's sequential part over one block of columns (in place on ``w1``, ``err1``, ``codes``)."""
    for i in range(w1.shape[1]):
        col = i1 + i
        if not fixed and col % gs == 0:
            g = col // gs
            s_g, z_g = minmax_params(w1[:, i:i + gs], spec.bits, None, spec.symmetric)
            scale[:, g] = s_g[:, 0]
            if zero is not None:
                zero[:, g] = z_g[:, 0]
        g = int(group_of[col])
        s_c = scale[:, g]
        z_c = 0.0 if zero is None else zero[:, g]
        x = w1[:, i]
        q = torch.round(x / s_c + z_c).clamp_(qmin, qmax)
        codes[:, col] = q
        err = (x - (q - z_c) * s_c) / hinv1[i, i]
        w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
        err1[:, i] = err
