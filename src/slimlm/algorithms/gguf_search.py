"""Beyond llama.cpp's quantizer at the same GGUF bytes: error-compensating (GPTQ-style) block quantization.

llama.cpp rounds every block independently, choosing scales that minimise the imatrix-weighted error of
that block alone. Here each block is still encoded by the exact llama.cpp codec (so the file is a normal
GGUF of the same types and size), but the weights it encodes have absorbed the rounding error of the blocks
before it: with H = E[x x^T] over calibration inputs, the error of block b is pushed onto the not yet
quantized columns along H^-1 (optimal brain surgeon / GPTQ, Frantar et al. 2022), so the layer's output
error ||X (W - Q)^T|| drops, not just the weight error. Blocks are whole codec blocks (32 values for the
legacy and IQ4_NL types, 256 for the k-quants), so the encoder is a black box and the bytes stay exact.

Inside a block all columns are quantized at once; the error propagated from it is E = (W_b - Q_b) U_bb^-1
where H^-1 = U^T U (upper Cholesky), which equals GPTQ's column-by-column recurrence for fixed Q_b.
"""

from __future__ import annotations

from typing import Callable

import gguf
import numpy as np
import torch

from slimlm.formats import ggml

T = gguf.GGMLQuantizationType
_FLOATS = (T.F32, T.F16, T.BF16)


def _inverse_cholesky_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U with H^-1 = U^T U, after GPTQ's damping (a fraction of the mean diagonal added to the diagonal)."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0
    h += damp * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (0.0, 0.1, 1.0):  # ill-conditioned H: damp harder rather than fail
        try:
            lower = torch.linalg.cholesky(h + extra * diag.mean() * torch.eye(h.shape[0], dtype=h.dtype))
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True)
        except RuntimeError:
            continue
    raise RuntimeError("input covariance is not positive definite even after damping")


def gptq_encode(w: np.ndarray, qtype: T, hessian: np.ndarray, importance: np.ndarray | None,
                damp: float = 0.01) -> np.ndarray:
    """Encode w [rows, n] to GGML blocks of ``qtype`` with block-wise error compensation under ``hessian``."""
    qtype = ggml.qtype_of(qtype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, n = w.shape
    work = torch.from_numpy(np.array(w, dtype=np.float64))
    u = _inverse_cholesky_upper(torch.from_numpy(np.asarray(hessian, dtype=np.float64)), damp)
    out = np.empty((rows, n // block * type_size), dtype=np.uint8)
    imp = None if importance is None else np.asarray(importance, dtype=np.float32).reshape(-1)
    for c0 in range(0, n, block):
        c1 = c0 + block
        wb = work[:, c0:c1]
        data = ggml.quantize(wb.to(torch.float32).numpy(), qtype, None if imp is None else imp[c0:c1])
        out[:, c0 // block * type_size: c1 // block * type_size] = data
        if c1 == n:
            break
        qb = torch.from_numpy(ggml.dequantize(data, qtype, (rows, block))).to(torch.float64)
        err = torch.linalg.solve_triangular(u[c0:c1, c0:c1], wb - qb, upper=True, left=False)
        work[:, c1:] -= err @ u[c0:c1, c1:]
    return out


def gptq_encoder(hessians: dict[str, np.ndarray], damp: float = 0.01
                 ) -> Callable[[np.ndarray, T, np.ndarray | None, str], np.ndarray]:
    """An encoder for quantize_gguf: GPTQ-compensated for matrices with a Hessian, llama.cpp's otherwise."""

    def encode(values: np.ndarray, qtype: T, importance: np.ndarray | None, name: str) -> np.ndarray:
        h = hessians.get(name)
        if qtype in _FLOATS or h is None or values.ndim != 2 or h.shape[0] != values.shape[1]:
            if qtype == T.F32:
                return np.ascontiguousarray(values, dtype=np.float32)
            if qtype == T.F16:
                return values.astype(np.float16)
            return ggml.quantize(values, qtype, importance)
        return gptq_encode(values, qtype, h, importance, damp)

    return encode


# ---------------------------------------------------------------- AWQ-style equalization folded into norms

ALPHAS = (0.0, 0.25, 0.5, 0.75)


def _proxy_error(w: np.ndarray, qtype: T, importance: np.ndarray | None, hessian: np.ndarray | None) -> float:
    """Output error of rounding w the llama.cpp way: tr(dW H dW^T) with H the input covariance (or its diagonal)."""
    if qtype in _FLOATS:
        return 0.0
    q = ggml.dequantize(ggml.quantize(w, qtype, importance), qtype, w.shape)
    d = (w - q).astype(np.float64)
    if hessian is not None:
        return float(np.einsum("ij,jk,ik->", d, hessian, d))
    diag = np.ones(w.shape[1]) if importance is None else importance.astype(np.float64)
    return float(((d * d) * diag).sum())


def _scales(mean_sq: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's s = E|x|^alpha (here from E[x^2]), normalised to geometric mean 1 so weights keep their range."""
    s = np.maximum(mean_sq.astype(np.float64), 1e-12) ** (alpha / 2)
    s /= np.exp(np.log(s).mean())
    return s.astype(np.float32)


def equalization_plan(load: Callable[[str], np.ndarray], names: set[str], plan: dict[str, T], n_layers: int,
                      importance: Callable[[str], np.ndarray | None], hessians: dict[str, np.ndarray] | None,
                      alphas: tuple[float, ...] = ALPHAS) -> dict[str, tuple[str, np.ndarray]]:
    """Per-channel scales for each (norm -> matrices) and (ffn_up -> ffn_down) pair, alpha searched per layer.

    Returns {group key: (kind, s)}: kind "norm" scales the norm by 1/s and its matrices' columns by s;
    kind "up" scales ffn_up's rows by 1/s and ffn_down's columns by s. Both are exact in real arithmetic;
    the search keeps alpha = 0 (no change) unless the rounding error under the calibration covariance drops.
    """
    groups = []
    for i in range(n_layers):
        b = f"blk.{i}."
        groups.append(("norm", b + "attn_norm.weight", [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"]))
        groups.append(("norm", b + "ffn_norm.weight", [b + "ffn_gate.weight", b + "ffn_up.weight"]))
        groups.append(("up", b + "ffn_up.weight", [b + "ffn_down.weight"]))
    chosen: dict[str, tuple[str, np.ndarray]] = {}
    for kind, key, mats in groups:
        if key not in names or not all(m in names for m in mats):
            continue
        imp = importance(mats[0])
        if imp is None or np.ndim(imp) != 1:
            continue
        weights = {m: load(m) for m in mats}
        best, best_err = None, None
        for alpha in alphas:
            s = _scales(imp, alpha)
            err = 0.0
            for m, w in weights.items():
                h = None if hessians is None or m not in hessians else hessians[m] / np.outer(s, s)
                err += _proxy_error(w * s, plan[m], importance(m) / (s * s), h)
            if best_err is None or err < best_err:
                best, best_err = s, err
        if best is not None and not np.all(best == 1.0):
            chosen[key] = (kind, best)
    return chosen


def apply_equalization(scales: dict[str, tuple[str, np.ndarray]], n_layers: int
                       ) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per-tensor value transforms that realise the chosen scales (composed where a tensor is in two groups)."""
    ops: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {}

    def add(name: str, fn: Callable[[np.ndarray], np.ndarray]) -> None:
        ops.setdefault(name, []).append(fn)

    for i in range(n_layers):
        b = f"blk.{i}."
        for norm, mats in ((b + "attn_norm.weight", ("attn_q", "attn_k", "attn_v")),
                           (b + "ffn_norm.weight", ("ffn_gate", "ffn_up"))):
            if norm in scales:
                s = scales[norm][1]
                add(norm, lambda a, s=s: a / s)
                for m in mats:
                    add(b + m + ".weight", lambda a, s=s: a * s[None, :])
        if b + "ffn_up.weight" in scales:
            s = scales[b + "ffn_up.weight"][1]
            add(b + "ffn_up.weight", lambda a, s=s: a / s[:, None])
            add(b + "ffn_down.weight", lambda a, s=s: a * s[None, :])

    def compose(fns):
        def run(a: np.ndarray) -> np.ndarray:
            for fn in fns:
                a = fn(a)
            return np.ascontiguousarray(a, dtype=np.float32)
        return run

    return {name: compose(fns) for name, fns in ops.items()}


def input_scale_of(scales: dict[str, tuple[str, np.ndarray]], name: str) -> np.ndarray | None:
    """The column scale s applied to matrix ``name`` (its inputs become x / s), if any."""
    import re

    m = re.match(r"(blk\.\d+\.)(attn_q|attn_k|attn_v|ffn_gate|ffn_up|ffn_down)\.weight$", name)
    if not m:
        return None
    b, kind = m.groups()
    key = {"attn_q": "attn_norm", "attn_k": "attn_norm", "attn_v": "attn_norm", "ffn_gate": "ffn_norm",
           "ffn_up": "ffn_norm", "ffn_down": "ffn_up"}[kind]
    entry = scales.get(b + key + ".weight")
    return None if entry is None else entry[1]
